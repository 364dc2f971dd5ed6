//! npc's datapath: two TC programs per host-side pod veth.
//!
//! - `npc_from_pod` (tc ingress of the host-side veth) sees what the pod sends: its **egress** policy.
//! - `npc_to_pod` (tc egress of the host-side veth) sees what the pod receives: its **ingress** policy.
//!
//! Per packet, in this order (the first step that decides, decides):
//!
//! 1. `NPC_ENDPOINTS[ifindex]` missing → not a pod of ours → pass.
//! 2. ARP → pass. Any other non-IP frame (VLAN tags of any kind, unknown ethertypes) → drop if
//!    the pod is isolated in this direction, else pass. ICMPv6 neighbour and multicast listener discovery → pass. ICMP errors → pass (they
//!    belong to a connection; see docs/datapath.md). Non-first IP fragments → pass (they carry no
//!    ports and cannot be reassembled without the first fragment, which is judged).
//!    A packet that cannot be parsed → drop if the pod is isolated in this direction, else pass.
//! 3. Conntrack, scoped by interface: the packet's tuple, then the reversed tuple (a reply).
//!    A live entry → pass and refresh, unless it was judged under an older policy epoch: then the
//!    connection is judged again in the direction that opened it, and cut if no longer allowed.
//! 4. New connection. To the pod from the node itself → allowed (kubelet probes). Not isolated in
//!    this direction → allowed. Otherwise policy, most specific first, for each of the peer's pod
//!    identity, its ipBlock class and the wildcard peer:
//!    exact (proto, port) → (proto, any port) → (any proto) → port ranges (only when the
//!    endpoint has range entries). Every entry is an allow: order only affects cost.
//! 5. Allowed → conntrack entry, pass. Denied → per-CPU drop counter, event, `TC_ACT_SHOT`
//!    (audit mode: counter and event, then pass).
//!
//! "Pass" is `TC_ACT_UNSPEC`, not `TC_ACT_OK`: with TCX links that means "next program", so a CNI's
//! own tc programs on the same interface still run; with no program after us the packet passes.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier, map},
    maps::RingBuf,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use npc_common::{
    CIDR_CLASS_BASE, Config, ConntrackKey, ConntrackValue, DIR_EGRESS, DIR_INGRESS, DropKey, EndpointInfo, PORT_ANY,
    PORT_RANGE_FIXED_BITS, PROTO_ANY, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey,
    PolicyValue, PortRangeKey, VerdictEvent, capacity, ct_state, ct_timeout, drop_reason, endpoint_flags, event_kind,
    log_level, mode, peer, stats,
};

mod maps;
use maps::{Array, HashMap, LpmKey, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap};

// Every map but the ring buffer is BTF-defined (see maps.rs): the kernel records its key and value
// types, so `bpftool map dump` prints fields by name. All are pinned by name under the pin root.
#[btf_map]
static NPC_ENDPOINTS: HashMap<u32, EndpointInfo, { capacity::ENDPOINTS as usize }> = HashMap::new();
#[btf_map]
static NPC_IDENTITIES: HashMap<[u8; 16], u32, { capacity::IDENTITIES as usize }> = HashMap::new();
#[btf_map]
static NPC_CIDRS: LpmTrie<[u8; 16], u32, { capacity::CIDRS as usize }> = LpmTrie::new();
#[btf_map]
static NPC_POLICY: HashMap<PolicyKey, PolicyValue, { capacity::POLICY as usize }> = HashMap::new();
#[btf_map]
static NPC_PORT_RANGES: LpmTrie<PortRangeKey, PolicyValue, { capacity::PORT_RANGES as usize }> = LpmTrie::new();
#[btf_map]
static NPC_CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue, { capacity::CONNTRACK as usize }> = LruHashMap::new();
#[btf_map]
static NPC_DROPS: PerCpuHashMap<DropKey, u64, { capacity::DROPS as usize }> = PerCpuHashMap::new();
/// A ring buffer has no key or value type (BTF or otherwise): it stays a legacy map.
#[map]
static NPC_EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
#[btf_map]
static NPC_CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
static NPC_STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers we walk through, at most this many (bounded for the verifier).
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// The fields of a packet that policy and conntrack look at. Addresses first and the struct
/// 8-aligned, so they are written with whole-word stores (see `parse`).
#[repr(C, align(8))]
struct Packet {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    protocol: u8,
    tcp_flags: u8,
}

/// What one run of a program knows about where it runs.
struct Hook {
    ifindex: u32,
    direction: u8,
    endpoint: EndpointInfo,
    config: Config,
}

enum Parsed {
    /// Judge it.
    Ip,
    /// Let it through whatever the policy (ARP, neighbour discovery, ICMP errors, non-first fragments).
    AlwaysPass,
    /// Too short, bad header length, unknown extension header... (`Packet::protocol` holds the
    /// protocol if parsing got that far, else 0).
    Unparseable,
    /// Neither IPv4, IPv6 nor ARP: VLAN tags, unknown ethertypes.
    NotIp,
}

#[classifier]
pub fn npc_from_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn npc_to_pod(ctx: TcContext) -> i32 {
    handle(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: u8) -> i32 {
    // SAFETY: `skb` is the context pointer the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain-old-data value; a concurrent update by the agent can at worst give us a mix
    // of old and new fields of a value that is consistent either way.
    let Some(endpoint) = (unsafe { NPC_ENDPOINTS.get(&ifindex) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    let hook = Hook {
        ifindex,
        direction,
        endpoint,
        config: unsafe { NPC_CONFIG.get(&0) }.copied().unwrap_or_default(),
    };
    let mut pkt = Packet {
        protocol: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    match parse(ctx, &mut pkt) {
        Parsed::AlwaysPass => TC_ACT_UNSPEC,
        Parsed::Unparseable if is_isolated(&hook.endpoint, direction) => {
            deny(ctx, &hook, &pkt, drop_reason::UNPARSEABLE)
        }
        Parsed::Unparseable => TC_ACT_UNSPEC,
        Parsed::NotIp if is_isolated(&hook.endpoint, direction) => deny(ctx, &hook, &pkt, drop_reason::NOT_IP),
        Parsed::NotIp => TC_ACT_UNSPEC,
        Parsed::Ip => judge(ctx, &hook, &pkt),
    }
}

#[inline(always)]
fn is_isolated(endpoint: &EndpointInfo, direction: u8) -> bool {
    let flag = if direction == DIR_INGRESS {
        endpoint_flags::INGRESS_ISOLATED
    } else {
        endpoint_flags::EGRESS_ISOLATED
    };
    endpoint.flags & flag != 0
}

#[inline(always)]
fn judge(ctx: &TcContext, hook: &Hook, pkt: &Packet) -> i32 {
    let Hook {
        ifindex,
        direction,
        ref endpoint,
        ref config,
    } = *hook;
    // SAFETY: no helper reads uninitialised memory; ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let forward = ConntrackKey {
        ifindex,
        protocol: pkt.protocol,
        _pad: [0; 3],
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let opens = pkt.protocol == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    // Established (our tuple opened it) or a reply (the reversed tuple did). One key, reversed in
    // place, keeps the stack small.
    let mut key = forward;
    for is_reply in [false, true] {
        if is_reply {
            key.src = pkt.dst;
            key.dst = pkt.src;
            key.sport = pkt.dport;
            key.dport = pkt.sport;
        }
        let Some(entry) = NPC_CONNTRACK.get_ptr_mut(&key) else {
            continue;
        };
        // SAFETY: the pointer came from a successful lookup; entries are plain old data.
        let entry = unsafe { &mut *entry };
        if now.wrapping_sub(entry.last_seen_ns) > timeout(entry.state) {
            continue;
        }
        // A fresh SYN on a closed tuple is a new connection (port reuse), not part of the old one.
        if opens && !is_reply && entry.state >= ct_state::TCP_CLOSING {
            continue;
        }
        if entry.epoch != config.epoch {
            // The policy changed since this connection was judged: judge it again, as opened.
            let origin = entry.direction;
            let query = Query::new(endpoint, origin, key.src, key.dst, key.dport, key.protocol);
            if allowed(&query) == NOT_ALLOWED {
                let _ = NPC_CONNTRACK.remove(&key);
                return deny(ctx, hook, pkt, drop_reason::POLICY_CHANGED);
            }
            entry.epoch = config.epoch;
        }
        entry.state = next_state(entry.state, pkt, is_reply);
        entry.last_seen_ns = now;
        return TC_ACT_UNSPEC;
    }

    // A new connection.
    let query = Query::new(endpoint, direction, pkt.src, pkt.dst, pkt.dport, pkt.protocol);
    if allowed(&query) == NOT_ALLOWED {
        return deny(ctx, hook, pkt, drop_reason::POLICY);
    }
    let slot = if direction == DIR_INGRESS {
        stats::ALLOWED_INGRESS
    } else {
        stats::ALLOWED_EGRESS
    };
    if let Some(count) = NPC_STATS.get_ptr_mut(&slot) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and this program is not re-entered.
        unsafe { *count += 1 };
    }
    // A lone RST or a mid-stream packet of a connection we never saw (an agent upgrade, or
    // isolation switched on) still passes when policy allows it; track only what can continue.
    if !(pkt.protocol == PROTO_TCP && pkt.tcp_flags & TCP_RST != 0) {
        let state = if pkt.protocol != PROTO_TCP {
            ct_state::OPEN
        } else if opens {
            ct_state::TCP_SYN_SENT
        } else {
            ct_state::TCP_ESTABLISHED
        };
        let value = ConntrackValue {
            last_seen_ns: now,
            epoch: config.epoch,
            state,
            direction,
            _pad: [0; 2],
        };
        let _ = NPC_CONNTRACK.insert(&forward, &value, 0);
    }
    if config.log_level >= log_level::DEBUG {
        debug!(
            ctx,
            "npc: new connection ifindex={} dir={} proto={} dport={}", ifindex, direction, pkt.protocol, pkt.dport
        );
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn timeout(state: u8) -> u64 {
    match state {
        ct_state::TCP_SYN_SENT => ct_timeout::TCP_SYN,
        ct_state::TCP_ESTABLISHED => ct_timeout::TCP_ESTABLISHED,
        ct_state::TCP_CLOSING => ct_timeout::TCP_CLOSING,
        ct_state::TCP_CLOSED => ct_timeout::TCP_CLOSED,
        _ => ct_timeout::OTHER,
    }
}

#[inline(always)]
fn next_state(state: u8, pkt: &Packet, is_reply: bool) -> u8 {
    if pkt.protocol != PROTO_TCP {
        return state;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        ct_state::TCP_CLOSED
    } else if pkt.tcp_flags & TCP_FIN != 0 {
        ct_state::TCP_CLOSING
    } else if state == ct_state::TCP_SYN_SENT && is_reply && pkt.tcp_flags & TCP_ACK != 0 {
        ct_state::TCP_ESTABLISHED
    } else {
        state
    }
}

/// A policy question: may a new connection of the local endpoint with this peer go ahead?
struct Query {
    peer_addr: [u8; 16],
    identity: u32,
    flags: u32,
    port: u16,
    protocol: u8,
    direction: u8,
}

impl Query {
    /// The question for a connection from `src` to `dst`:`port` opened in `direction` (the peer
    /// is the source at ingress, the destination at egress).
    #[inline(always)]
    fn new(endpoint: &EndpointInfo, direction: u8, src: [u8; 16], dst: [u8; 16], port: u16, protocol: u8) -> Self {
        Self {
            peer_addr: if direction == DIR_INGRESS { src } else { dst },
            identity: endpoint.identity,
            flags: endpoint.flags,
            port,
            protocol,
            direction,
        }
    }
}

const NOT_ALLOWED: i64 = -1;
/// No such peer (never a valid id: classes stay below it).
const NO_PEER: u32 = u32::MAX;

/// Answers a [`Query`]: the rule that allows it (0 for the built-in allows), or [`NOT_ALLOWED`].
///
/// Not inlined: it runs at two call sites and its keys would otherwise be counted twice against
/// the 512-byte stack (LLVM does not overlap the inlined copies' stack slots on BPF). BPF
/// subprograms take at most five register arguments, hence the struct and the plain i64.
#[inline(never)]
fn allowed(q: &Query) -> i64 {
    let direction = q.direction;
    // Peers are plain u32s with a sentinel, not Options: an array of Option<u32> left the None
    // payloads undefined, LLVM spilled them anyway, and the verifier rejected the read of an
    // uninitialised register ("R3 !read_ok").
    // SAFETY (all map gets below): plain-old-data values, copied out at once.
    let peer_identity = unsafe { NPC_IDENTITIES.get(&q.peer_addr) }.copied().unwrap_or(NO_PEER);
    if direction == DIR_INGRESS && peer_identity == peer::HOST {
        return 0;
    }
    let (isolated_flag, ranges_flag) = if direction == DIR_INGRESS {
        (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES)
    } else {
        (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES)
    };
    if q.flags & isolated_flag == 0 {
        return 0;
    }
    let cidr_class = match unsafe { NPC_CIDRS.get(&LpmKey::new(128, q.peer_addr)) } {
        Some(class) => CIDR_CLASS_BASE | *class,
        None => NO_PEER,
    };
    let ranges = q.flags & ranges_flag != 0;
    for peer in [peer_identity, cidr_class, peer::ANY] {
        if peer == NO_PEER {
            continue;
        }
        let mut key = PolicyKey {
            identity: q.identity,
            peer,
            port: q.port,
            protocol: q.protocol,
            direction,
        };
        if let Some(v) = unsafe { NPC_POLICY.get(&key) } {
            return i64::from(v.rule);
        }
        key.port = PORT_ANY;
        if let Some(v) = unsafe { NPC_POLICY.get(&key) } {
            return i64::from(v.rule);
        }
        key.protocol = PROTO_ANY;
        if let Some(v) = unsafe { NPC_POLICY.get(&key) } {
            return i64::from(v.rule);
        }
        if ranges {
            let range_key = PortRangeKey {
                identity: q.identity,
                peer,
                direction,
                protocol: q.protocol,
                port_be: q.port.to_be_bytes(),
            };
            if let Some(v) = unsafe { NPC_PORT_RANGES.get(&LpmKey::new(PORT_RANGE_FIXED_BITS + 16, range_key)) } {
                return i64::from(v.rule);
            }
        }
    }
    NOT_ALLOWED
}

/// Count, report and (unless auditing) drop. Not inlined, for the stack (see [`allowed`]).
#[inline(never)]
fn deny(ctx: &TcContext, hook: &Hook, pkt: &Packet, reason: u8) -> i32 {
    let (ifindex, direction) = (hook.ifindex, hook.direction);
    let (endpoint, config) = (&hook.endpoint, &hook.config);
    let (protocol, dport) = (pkt.protocol, pkt.dport);
    let key = DropKey {
        direction,
        protocol,
        dport,
    };
    match NPC_DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: only this CPU writes it while we run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = NPC_DROPS.insert(&key, &1, 0);
        }
    }
    let audit = config.mode == mode::AUDIT;
    // The identity lookup's key is a stack copy of the peer's address: kernels before 6.2 (6.1:
    // "R2 type=alloc_mem expected=fp, pkt, pkt_meta, map_key, map_value") refuse a map key that
    // points into a reserved ring-buffer record.
    let peer_addr: [u8; 16] = if direction == DIR_INGRESS { pkt.src } else { pkt.dst };
    // SAFETY: the value is copied out at once; the agent only replaces entries whole.
    let peer_identity = unsafe { NPC_IDENTITIES.get(&peer_addr) }
        .copied()
        .unwrap_or(peer::WORLD);
    if let Some(mut slot) = NPC_EVENTS.reserve::<VerdictEvent>(0) {
        // Fill the reserved record in place: building a VerdictEvent on the stack first would
        // cost 52 bytes of the 512 we have.
        let ev = slot.as_mut_ptr();
        // SAFETY: `ev` points to a reserved, writable record of the right size; every field
        // is written before submit.
        unsafe {
            (*ev).src = pkt.src;
            (*ev).dst = pkt.dst;
            (*ev).sport = pkt.sport;
            (*ev).peer_identity = peer_identity;
            (*ev).ifindex = ifindex;
            (*ev).local_identity = endpoint.identity;
            (*ev).dport = dport;
            (*ev).protocol = protocol;
            (*ev).direction = direction;
            (*ev).kind = if audit { event_kind::AUDIT } else { event_kind::DROP };
            (*ev).reason = reason;
        }
        slot.submit(0);
    }
    if config.log_level >= log_level::DEBUG {
        debug!(
            ctx,
            "npc: drop ifindex={} dir={} proto={} dport={} reason={}", ifindex, direction, protocol, dport, reason
        );
    }
    if audit { TC_ACT_UNSPEC } else { TC_ACT_SHOT as i32 }
}

/// Bounds-checked pointer into the packet (direct packet access: no helper call per field).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: ptr_at checked that N bytes at offset lie inside the packet; [u8; N] has align 1.
    ptr_at::<[u8; N]>(ctx, offset).map(|p| unsafe { *p })
}

/// `::ffff:` in the third word of an IPv4-mapped address, in memory order.
const V4_MAPPED_MARK: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn words(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, both plain bytes; the result is the words' memory image.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}

#[inline(always)]
fn be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    read::<2>(ctx, offset).map(u16::from_be_bytes)
}

/// Fills `pkt` from the packet. Reads single fields rather than whole headers: copying headers
/// into stack arrays made LLVM keep every byte in its own spilled register, past the 512-byte
/// stack limit.
#[inline(always)]
fn parse(ctx: &TcContext, pkt: &mut Packet) -> Parsed {
    let Some(ethertype) = be16(ctx, 12) else {
        return Parsed::Unparseable;
    };
    let l4 = match ethertype {
        ETH_P_IP => {
            // One bounds check for the whole fixed header, then reads through the pointer: with a
            // check per field LLVM merged the checks in a way the verifier could not follow
            // (it walked an impossible path where an address register held a pointer).
            let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 20 bytes; all reads below are inside them.
            let (version_ihl, frag, protocol, src, dst) = unsafe {
                let b = ip as *const u8;
                (
                    *b,
                    u16::from_be_bytes([*b.add(6), *b.add(7)]),
                    *b.add(9),
                    core::ptr::read_unaligned(b.add(12) as *const u32),
                    core::ptr::read_unaligned(b.add(16) as *const u32),
                )
            };
            pkt.protocol = protocol;
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || ihl < 20 {
                return Parsed::Unparseable;
            }
            if frag & 0x1fff != 0 {
                return Parsed::AlwaysPass;
            }
            pkt.src = words([0, 0, V4_MAPPED_MARK, src]);
            pkt.dst = words([0, 0, V4_MAPPED_MARK, dst]);
            ETH_HLEN + ihl
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<[u8; 40]>(ctx, ETH_HLEN) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 40 bytes of the fixed header.
            let (version, next_header) = unsafe {
                let b = ip as *const u8;
                pkt.src = core::ptr::read_unaligned(b.add(8) as *const [u8; 16]);
                pkt.dst = core::ptr::read_unaligned(b.add(24) as *const [u8; 16]);
                (*b, *b.add(6))
            };
            if version >> 4 != 6 {
                return Parsed::Unparseable;
            }
            let mut next = next_header;
            let mut offset = ETH_HLEN + 40;
            let mut done = false;
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                let kind = match next {
                    // Hop-by-hop, routing, destination options: 8-octet units past the first 8.
                    0 | 43 | 60 => 1,
                    // Fragment header: fixed 8 octets, offset in the high 13 bits of octets 2..4.
                    44 => 2,
                    // Authentication header: 4-octet units, minus 2.
                    51 => 3,
                    _ => {
                        done = true;
                        break;
                    }
                };
                let (Some([following, length]), Some(frag)) = (read::<2>(ctx, offset), be16(ctx, offset + 2)) else {
                    pkt.protocol = next;
                    return Parsed::Unparseable;
                };
                if kind == 2 && frag >> 3 != 0 {
                    return Parsed::AlwaysPass;
                }
                next = following;
                offset += match kind {
                    1 => (length as usize + 1) * 8,
                    2 => 8,
                    _ => (length as usize + 2) * 4,
                };
            }
            pkt.protocol = next;
            if !done {
                return Parsed::Unparseable;
            }
            offset
        }
        // ARP: a pod needs it whatever its policy.
        ETH_P_ARP => return Parsed::AlwaysPass,
        // VLAN-tagged frames (802.1Q, 802.1ad, any depth: the receiving kernel would strip the
        // tags and deliver the IP packet inside unjudged) and every other ethertype.
        _ => return Parsed::NotIp,
    };

    match pkt.protocol {
        PROTO_TCP => {
            let (Some(sport), Some(dport), Some([_, flags])) =
                (be16(ctx, l4), be16(ctx, l4 + 2), read::<2>(ctx, l4 + 12))
            else {
                return Parsed::Unparseable;
            };
            pkt.sport = sport;
            pkt.dport = dport;
            pkt.tcp_flags = flags;
        }
        PROTO_UDP | PROTO_SCTP => {
            let (Some(sport), Some(dport)) = (be16(ctx, l4), be16(ctx, l4 + 2)) else {
                return Parsed::Unparseable;
            };
            pkt.sport = sport;
            pkt.dport = dport;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let (Some([icmp_type, _]), Some(id)) = (read::<2>(ctx, l4), be16(ctx, l4 + 4)) else {
                return Parsed::Unparseable;
            };
            match (pkt.protocol, icmp_type) {
                // Echo request opens (id, 0); its reply (0, id) is then the reversed tuple.
                (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => pkt.sport = id,
                (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => pkt.dport = id,
                // Destination unreachable, time exceeded, parameter problem (and packet too big):
                // errors about a connection, needed for path MTU discovery.
                (PROTO_ICMP, 3 | 11 | 12) | (PROTO_ICMPV6, 1..=4) => return Parsed::AlwaysPass,
                // Neighbour discovery: router/neighbour solicitation and advertisement, redirect.
                // Multicast listener discovery (MLD queries, reports, done; MLDv2 reports): link
                // control traffic the kernel sends by itself, flooded by bridges to every pod.
                // Policy never meant to filter it, and counting it as "blocked connections" would
                // only make the headline metric noisy.
                (PROTO_ICMPV6, 130..=137 | 143) => return Parsed::AlwaysPass,
                _ => {}
            }
        }
        _ => {}
    }
    Parsed::Ip
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
