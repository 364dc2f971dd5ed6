//! `npc-agent inspect`: the pinned maps, decoded. What `bpftool map dump` shows as bytes, in the
//! words of the policy: endpoints with their isolation, which identity an address has, ipBlock
//! classes, allow entries (local identity, direction, peer, protocol, port, rule id), tracked
//! connections, drop and allow counters.
use std::{fmt, net::IpAddr};

use npc_common::{
    CIDR_CLASS_BASE, DIR_INGRESS, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, ct_state, endpoint_flags, peer,
};
use serde::Serialize;

use crate::{
    datapath::{Datapath, DatapathError},
    model::addr_from_bytes,
};

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

fn direction(d: u8) -> &'static str {
    if d == DIR_INGRESS { "ingress" } else { "egress" }
}

fn protocol(p: u8) -> String {
    match p {
        PROTO_ANY => "any".into(),
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

fn peer_name(p: u32) -> String {
    match p {
        peer::ANY => "any".into(),
        peer::HOST => "node".into(),
        peer::WORLD => "world".into(),
        c if c & CIDR_CLASS_BASE != 0 => format!("ipBlock class {}", c & !CIDR_CLASS_BASE),
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
                addr: addr_from_bytes(ep.addr),
                ingress_isolated: ep.flags & endpoint_flags::INGRESS_ISOLATED != 0,
                egress_isolated: ep.flags & endpoint_flags::EGRESS_ISOLATED != 0,
            })
            .collect();
        let (identities, cidrs) = dp.kernel_numbering()?;
        let identities = identities
            .into_iter()
            .map(|(addr, id)| Identity {
                addr: addr_from_bytes(addr),
                identity: if id == peer::HOST {
                    "node".into()
                } else {
                    id.to_string()
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
                direction: direction(k.direction),
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
                direction: direction(k.direction),
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
            .map(|(k, v)| Connection {
                ifindex: k.ifindex,
                protocol: protocol(k.protocol),
                src: socket(k.src, k.sport),
                dst: socket(k.dst, k.dport),
                state: match v.state {
                    ct_state::OPEN => "open",
                    ct_state::TCP_SYN_SENT => "syn-sent",
                    ct_state::TCP_ESTABLISHED => "established",
                    ct_state::TCP_CLOSING => "closing",
                    ct_state::TCP_CLOSED => "closed",
                    _ => "?",
                },
                opened: direction(v.direction),
                epoch: v.epoch,
            })
            .collect();
        let drops = dp
            .drops()?
            .into_iter()
            .map(|(k, count)| Counter {
                direction: direction(k.direction),
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
        })
    }
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
        for e in &self.endpoints {
            let iso = match (e.ingress_isolated, e.egress_isolated) {
                (true, true) => "isolated: ingress, egress",
                (true, false) => "isolated: ingress",
                (false, true) => "isolated: egress",
                (false, false) => "not isolated",
            };
            writeln!(
                f,
                "  ifindex {:<5} {:<39} identity {:<6} {iso}",
                e.ifindex, e.addr, e.identity
            )?;
        }
        writeln!(f, "addresses ({}):", self.identities.len())?;
        for i in &self.identities {
            writeln!(f, "  {:<39} identity {}", i.addr, i.identity)?;
        }
        writeln!(f, "ipBlock prefixes ({}):", self.cidr_classes.len())?;
        for c in &self.cidr_classes {
            writeln!(f, "  {:<43} class {}", c.prefix, c.class)?;
        }
        writeln!(f, "allow entries ({}):", self.allows.len())?;
        for a in &self.allows {
            writeln!(
                f,
                "  identity {:<6} {:<7} from/to {:<22} {:<6} {:<12} rule {}",
                a.identity, a.direction, a.peer, a.protocol, a.ports, a.rule
            )?;
        }
        writeln!(
            f,
            "conntrack ({} tracked, {} shown):",
            self.conntrack_total,
            self.conntrack.len()
        )?;
        for c in &self.conntrack {
            writeln!(
                f,
                "  ifindex {:<5} {:<6} {} -> {} {} (opened at {}, epoch {})",
                c.ifindex, c.protocol, c.src, c.dst, c.state, c.opened, c.epoch
            )?;
        }
        writeln!(
            f,
            "new connections allowed: {} at ingress, {} at egress",
            self.allowed_connections.ingress, self.allowed_connections.egress
        )?;
        writeln!(f, "drops:")?;
        for d in &self.drops {
            writeln!(
                f,
                "  {:<7} {:<6} dport {:<5} {}",
                d.direction, d.protocol, d.dport, d.count
            )?;
        }
        Ok(())
    }
}
