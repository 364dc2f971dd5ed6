//! `npc-agent inspect`: the pinned maps, decoded. What `bpftool map dump` shows as bytes, in the
//! words of the policy: endpoints with their isolation, which identity an address has, ipBlock
//! classes, allow entries (local identity, direction, peer, protocol, port, rule id), tracked
//! connections, drop and allow counters.
use std::{fmt, net::IpAddr};

use npc_common::{
    CIDR_CLASS_BASE, FIRST_SERVICE_IDENTITY, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6,
    ct_state, endpoint_flags, peer,
};
use serde::Serialize;

use super::{Datapath, DatapathError};
use npc_policy::model::{addr_from_bytes, protocol_name};
use npc_policy::policy::direction_name;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub epoch: u32,
    pub mode: u32,
    pub endpoints: Vec<Endpoint>,
    pub identities: Vec<Identity>,
    pub cidr_classes: Vec<CidrClass>,
    pub allows: Vec<Allow>,
    pub conntrack_total: usize,
    /// The first `conntrack_limit` tracked connections.
    pub conntrack: Vec<Connection>,
    pub drops: Vec<Counter>,
    pub allowed_connections: AllowedCounters,
    /// Packets local pods sent from addresses not their own (dropped).
    pub spoofed_packets: u64,
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub ifindex: u32,
    pub identity: u32,
    pub addr: IpAddr,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
}

#[derive(Debug, Serialize)]
pub struct Identity {
    pub addr: IpAddr,
    /// A pod identity number, or "node" for this node's own addresses.
    pub identity: String,
}

#[derive(Debug, Serialize)]
pub struct CidrClass {
    pub prefix: String,
    pub class: u32,
}

#[derive(Debug, Serialize)]
pub struct Allow {
    pub identity: u32,
    pub direction: &'static str,
    /// `identity N`, `ipBlock class N` or `any`.
    pub peer: String,
    pub protocol: String,
    /// `80`, `9000-9127` or `any`.
    pub ports: String,
    pub rule: u32,
}

#[derive(Debug, Serialize)]
pub struct Connection {
    pub ifindex: u32,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub state: &'static str,
    pub opened: &'static str,
    pub epoch: u32,
}

#[derive(Debug, Serialize)]
pub struct Counter {
    pub direction: &'static str,
    pub protocol: String,
    pub dport: u16,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct AllowedCounters {
    pub ingress: u64,
    pub egress: u64,
}

fn protocol(p: u8) -> String {
    match p {
        PROTO_ANY => "any".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        other => protocol_name(other).map_or_else(|| other.to_string(), str::to_string),
    }
}

fn peer_name(p: u32) -> String {
    match p {
        peer::ANY => "any".into(),
        peer::HOST => "node".into(),
        peer::WORLD => "world".into(),
        c if c & CIDR_CLASS_BASE != 0 => format!("ipBlock class {}", c & !CIDR_CLASS_BASE),
        s if s >= FIRST_SERVICE_IDENTITY => format!("service {s}"),
        id => format!("identity {id}"),
    }
}

fn socket(addr: [u8; 16], port: u16) -> String {
    match addr_from_bytes(addr) {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
    }
}

impl Snapshot {
    /// Reads every map once. `conntrack_limit` bounds the connections listed (not counted).
    pub fn read(dp: &Datapath, conntrack_limit: usize) -> Result<Self, DatapathError> {
        let config = dp.config()?;
        let endpoints = dp
            .endpoints()?
            .into_iter()
            .map(|(ifindex, ep)| Endpoint {
                ifindex,
                identity: ep.identity,
                addr: addr_from_bytes(ep.addrs[0]),
                ingress_isolated: ep.flags & endpoint_flags::INGRESS_ISOLATED != 0,
                egress_isolated: ep.flags & endpoint_flags::EGRESS_ISOLATED != 0,
            })
            .collect();
        let (identities, cidrs) = dp.kernel_numbering()?;
        let identities = identities
            .into_iter()
            .map(|(addr, id)| Identity {
                addr: addr_from_bytes(addr),
                identity: match id {
                    peer::HOST => "node".into(),
                    s if s >= FIRST_SERVICE_IDENTITY => format!("service {s}"),
                    id => id.to_string(),
                },
            })
            .collect();
        let cidr_classes = cidrs
            .into_iter()
            .map(|(k, class)| {
                let addr = addr_from_bytes(k.addr);
                let len = if addr.is_ipv4() {
                    k.prefix_len.saturating_sub(96)
                } else {
                    k.prefix_len
                };
                CidrClass {
                    prefix: format!("{addr}/{len}"),
                    class,
                }
            })
            .collect();
        let (policy, ranges) = dp.policy_entries()?;
        let mut allows: Vec<Allow> = policy
            .into_iter()
            .map(|(k, v)| Allow {
                identity: k.identity,
                direction: direction_name(k.direction),
                peer: peer_name(k.peer),
                protocol: protocol(k.protocol),
                ports: if k.port == PORT_ANY {
                    "any".into()
                } else {
                    k.port.to_string()
                },
                rule: v.rule,
            })
            .collect();
        allows.extend(ranges.into_iter().map(|(prefix_len, k, v)| {
            let bits = prefix_len.saturating_sub(PORT_RANGE_FIXED_BITS);
            let first = u16::from_be_bytes(k.port_be);
            let last = u32::from(first) + (1u32 << (16 - bits)) - 1;
            Allow {
                identity: k.identity,
                direction: direction_name(k.direction),
                peer: peer_name(k.peer),
                protocol: protocol(k.protocol),
                ports: format!("{first}-{last}"),
                rule: v.rule,
            }
        }));
        allows.sort_by(|a, b| (a.identity, a.direction, &a.peer).cmp(&(b.identity, b.direction, &b.peer)));
        let ct = dp.conntrack_entries()?;
        let conntrack_total = ct.len();
        let conntrack = ct
            .into_iter()
            .take(conntrack_limit)
            .map(|(k, v)| {
                // The entry is shared by both directions; show it as it was opened.
                let (src, dst, sport, dport) = v.opener(&k);
                Connection {
                    ifindex: k.ifindex,
                    protocol: protocol(k.protocol),
                    src: socket(src, sport),
                    dst: socket(dst, dport),
                    state: match v.state {
                        ct_state::OPEN => "open",
                        ct_state::TCP_SYN_SENT => "syn-sent",
                        ct_state::TCP_ESTABLISHED => "established",
                        ct_state::TCP_CLOSING => "closing",
                        ct_state::TCP_CLOSED => "closed",
                        _ => "?",
                    },
                    opened: direction_name(v.direction),
                    epoch: v.epoch,
                }
            })
            .collect();
        let drops = dp
            .drops()?
            .into_iter()
            .map(|(k, count)| Counter {
                direction: direction_name(k.direction),
                protocol: protocol(k.protocol),
                dport: k.dport,
                count,
            })
            .collect();
        let (ingress, egress) = dp.allowed_connections()?;
        Ok(Self {
            epoch: config.epoch,
            mode: config.mode,
            endpoints,
            identities,
            cidr_classes,
            allows,
            conntrack_total,
            conntrack,
            drops,
            allowed_connections: AllowedCounters { ingress, egress },
            spoofed_packets: dp.spoofed_packets()?,
        })
    }
}

/// A borderless table of `rows`, one column per field (named as in the JSON output), laid out
/// by comfy-table, indented, without trailing blanks.
fn table<T: Serialize>(rows: &[T]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING).force_no_tty();
    for (i, row) in rows.iter().enumerate() {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(row) else {
            continue;
        };
        if i == 0 {
            t.set_header(fields.keys().map(|k| k.replace('_', " ")));
        }
        t.add_row(fields.values().map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }));
    }
    t.lines().map(|l| format!("  {}\n", l.trim_end())).collect()
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.mode == npc_common::mode::AUDIT {
            "audit"
        } else {
            "enforce"
        };
        writeln!(f, "policy epoch {} ({mode} mode)", self.epoch)?;
        writeln!(f, "endpoints ({}):", self.endpoints.len())?;
        f.write_str(&table(&self.endpoints))?;
        writeln!(f, "addresses ({}):", self.identities.len())?;
        f.write_str(&table(&self.identities))?;
        writeln!(f, "ipBlock prefixes ({}):", self.cidr_classes.len())?;
        f.write_str(&table(&self.cidr_classes))?;
        writeln!(f, "allow entries ({}):", self.allows.len())?;
        f.write_str(&table(&self.allows))?;
        writeln!(
            f,
            "conntrack ({} tracked, {} shown):",
            self.conntrack_total,
            self.conntrack.len()
        )?;
        f.write_str(&table(&self.conntrack))?;
        writeln!(
            f,
            "new connections allowed: {} at ingress, {} at egress",
            self.allowed_connections.ingress, self.allowed_connections.egress
        )?;
        writeln!(
            f,
            "forged packets dropped (a pod sending from an address not its own): {}",
            self.spoofed_packets
        )?;
        writeln!(f, "drops:")?;
        f.write_str(&table(&self.drops))
    }
}
