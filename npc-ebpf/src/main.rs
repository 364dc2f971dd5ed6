//! npc's datapath: two TC programs per host-side pod veth.
//!
//! - `npc_from_pod` (tc ingress of the host-side veth) sees what the pod sends: its **egress** policy.
//! - `npc_to_pod` (tc egress of the host-side veth) sees what the pod receives: its **ingress** policy.
//!
//! Per packet, in this order (the first step that decides, decides):
//!
//! 0. Conntrack, before anything else: an untagged, unfragmented IP packet of a live connection
//!    tracked at this interface and judged under the current policy epoch → pass and refresh. Out
//!    of the pod, only when it comes from the entry's checked pod end (`ConntrackValue::local`):
//!    steps 1 and 2 already held for that end under this epoch. Everything else goes on, with
//!    the lookup's result kept for step 5.
//! 1. `NPC_ENDPOINTS[ifindex]` missing → not a pod of ours → pass.
//! 2. From the pod: **source validation**, whatever the pod's policy. An IPv4/IPv6 packet (or an
//!    ARP sender address) that is not one of the pod's own addresses is dropped (reason `spoofed`,
//!    its own counter), except IPv6 link-local sources, `::` for neighbour discovery, `0.0.0.0`
//!    for ARP probes and the prefixes of the pod's `NPC_SOURCES` entries.
//! 3. ARP → pass. Any other frame (VLAN-tagged, in the frame or in the skb, or an unknown
//!    ethertype) → drop when it leaves a pod, or enters one isolated for ingress; else pass. ICMPv6 neighbour and multicast listener
//!    discovery → pass. A packet that cannot be parsed (or a first fragment too short to hold its
//!    transport header) → drop if the pod is isolated in this direction, else pass.
//! 4. ICMP errors → pass when the datagram they quote belongs to a connection tracked at this
//!    interface (conntrack's RELATED); otherwise judged by policy like a new packet, not tracked.
//!    Later IP fragments (no ports) → pass when the first fragment of the datagram was allowed
//!    here (`NPC_FRAGMENTS`) and they do not overlap the transport header; else dropped for an
//!    isolated pod.
//! 5. Conntrack (the lookup of step 0), scoped by interface, one entry for both directions of a
//!    connection (IPv4 in `NPC_CONNTRACK4`, IPv6 in `NPC_CONNTRACK`). A live entry → pass and
//!    refresh, unless it was judged under an older policy epoch: then the connection is judged
//!    again in the direction that opened it, and cut if no longer allowed.
//! 6. New connection. To the pod from the node itself → allowed (kubelet probes). Not isolated in
//!    this direction → allowed. Otherwise policy, most specific first, for each of the peer's pod
//!    identity, its ipBlock class (looked up only when the identity allowed nothing) and the
//!    wildcard peer:
//!    exact (proto, port) → (proto, any port) → (any proto) → port ranges (only when the
//!    endpoint has range entries). Every entry is an allow: order only affects cost.
//! 7. Allowed → conntrack entry (and, for a first fragment, its verdict in `NPC_FRAGMENTS`), pass.
//!    Denied → per-CPU drop counter, event, `TC_ACT_SHOT` (audit mode: counter and event, then
//!    pass).
//!
//! "Pass" is `TC_ACT_UNSPEC`, not `TC_ACT_OK`: with TCX links that means "next program", so a CNI's
//! own tc programs on the same interface still run; with no program after us the packet passes.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_skb_load_bytes},
    macros::{btf_map, classifier, map},
    maps::RingBuf,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use npc_common::{
    CIDR_CLASS_BASE, Config, ConntrackKey, ConntrackKey4, ConntrackValue, DENIED_IDLE_NS, DIR_EGRESS, DIR_INGRESS,
    DropKey, EndpointInfo, FRAGMENT_TIMEOUT_NS, FragmentKey, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, PortLabelKey, PortRangeKey,
    SOURCE_FIXED_BITS, SourceKey, VerdictEvent, capacity, ct_local, ct_origin, ct_state, ct_timeout, drop_reason,
    endpoint_flags, event_kind, log_level, mode, path_profile, peer, stats,
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
/// IPv4 connections, under a 20-byte key (see `ConntrackKey4`); `NPC_CONNTRACK` has the IPv6 ones.
#[btf_map]
static NPC_CONNTRACK4: LruHashMap<ConntrackKey4, ConntrackValue, { capacity::CONNTRACK4 as usize }> = LruHashMap::new();
#[btf_map]
static NPC_DROPS: PerCpuHashMap<DropKey, u64, { capacity::DROPS as usize }> = PerCpuHashMap::new();
/// A ring buffer has no key or value type (BTF or otherwise): it stays a legacy map.
#[map]
static NPC_EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);
#[btf_map]
static NPC_CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
static NPC_STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();
/// One `Scratch` per CPU (see `handle`). Not pinned: nothing outside a program run reads it.
#[map]
static NPC_SCRATCH: aya_ebpf::maps::PerCpuArray<Scratch> = aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
#[btf_map]
static NPC_SOURCES: LpmTrie<SourceKey, u32, { capacity::SOURCES as usize }> = LpmTrie::new();
/// The ports `NPC_DROPS` counts under their own number (written by the agent; see `PortLabelKey`).
#[btf_map]
static NPC_PORT_LABELS: HashMap<PortLabelKey, u8, { capacity::PORT_LABELS as usize }> = HashMap::new();
/// Denied flows (keyed like conntrack): when each last had a packet denied, so that a
/// connection's retransmissions count once in `NPC_DROPS` (see `count_denied`).
#[btf_map]
static NPC_DENIED: LruHashMap<ConntrackKey, u64, { capacity::DENIED as usize }> = LruHashMap::new();
/// First-fragment verdicts: the time an allowed first fragment passed.
#[btf_map]
static NPC_FRAGMENTS: LruHashMap<FragmentKey, u64, { capacity::FRAGMENTS as usize }> = LruHashMap::new();

/// Path probes (the `profile` feature only; see `npc_common::path_profile`): per CPU, how many
/// times each probe fired and the nanoseconds it measured.
#[cfg(feature = "profile")]
#[map]
static NPC_PROFILE: aya_ebpf::maps::PerCpuArray<u64> =
    aya_ebpf::maps::PerCpuArray::with_max_entries(path_profile::COUNT * 2, 0);

/// A path probe's start time; without the `profile` feature, nothing (and no code).
#[inline(always)]
fn probe_start() -> u64 {
    #[cfg(feature = "profile")]
    {
        // SAFETY: no preconditions.
        unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
    }
    #[cfg(not(feature = "profile"))]
    {
        0
    }
}

/// Counts one firing of probe `slot` and the time since `since` (a [`probe_start`]). Not inlined:
/// its map lookups would otherwise be verified again at every call site.
#[cfg(feature = "profile")]
#[inline(never)]
fn probe(slot: u32, since: u64) {
    // SAFETY: no preconditions.
    let elapsed = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }.wrapping_sub(since);
    if let Some(runs) = NPC_PROFILE.get_ptr_mut(slot * 2) {
        // SAFETY: a per-CPU slot, and this program is not re-entered on a CPU.
        unsafe { *runs += 1 };
    }
    if let Some(ns) = NPC_PROFILE.get_ptr_mut(slot * 2 + 1) {
        // SAFETY: as above.
        unsafe { *ns += elapsed };
    }
}

#[cfg(not(feature = "profile"))]
#[inline(always)]
fn probe(_slot: u32, _since: u64) {}

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
    /// The IP identification of a fragmented datagram (IPv4's 16 bits or IPv6's 32).
    frag_id: u32,
    sport: u16,
    dport: u16,
    protocol: u8,
    tcp_flags: u8,
    /// 4 or 6 once the addresses (for ARP: the sender's) are read, 0 before.
    family: u8,
    /// [`FIRST_FRAGMENT`] for the first fragment of a fragmented datagram, else 0.
    fragment: u8,
    /// For [`Parsed::IcmpError`], where the quoted datagram starts; for
    /// [`Parsed::LaterFragment`], the fragment's offset in its datagram (bytes). In the packet
    /// struct rather than in enum payloads: LLVM merged a payload register with the packet-end
    /// pointer across paths, and the verifier refused the arithmetic on it.
    offset: u16,
    /// Judge but do not track (an ICMP error that belongs to no connection of ours).
    untracked: u8,
    /// The skb carries a VLAN tag outside the frame data (`__sk_buff.vlan_present`).
    tagged: u8,
}

const FIRST_FRAGMENT: u8 = 1;

/// A program run's working memory that would not fit its stack (every call chain shares 512
/// bytes, and 6.1 counts a frame at its deepest): the packet's fields, its conntrack key (`key4`
/// for IPv4, else `key`), and the key of the datagram an ICMP error quotes.
#[repr(C, align(8))]
struct Scratch {
    pkt: Packet,
    key: ConntrackKey,
    key4: ConntrackKey4,
    quoted: ConntrackKey,
}

/// What one run of a program knows about where it runs.
/// The endpoint and config are the map values themselves, not copies: 56 bytes of stack the
/// main frame cannot spare (every call chain shares 512).
struct Hook<'a> {
    ifindex: u32,
    direction: u8,
    endpoint: &'a EndpointInfo,
    config: &'a Config,
}

/// The default config, for the moment before the agent writes `NPC_CONFIG[0]`.
static DEFAULT_CONFIG: Config = Config {
    log_level: 0,
    mode: 0,
    epoch: 0,
    _pad: 0,
};

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Parsed {
    /// Judge it.
    Ip,
    /// ARP, the sender's address in `Packet::src`. Passes whatever the policy.
    Arp,
    /// ICMPv6 neighbour and multicast listener discovery. Passes whatever the policy.
    LinkControl,
    /// An ICMP error; the datagram it quotes starts at `Packet::offset`.
    IcmpError,
    /// A fragment after the first, starting `Packet::offset` bytes into its datagram's payload.
    LaterFragment,
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

/// The empty program: the floor `cargo xtask bench` measures the others against.
#[classifier]
pub fn npc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn handle(ctx: &TcContext, direction: u8) -> i32 {
    let start = probe_start();
    // SAFETY: `skb` is the context pointer the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The packet's fields live in a per-CPU scratch map, not on the stack: what the verifier
    // reads back from a map value it knows nothing about, so the states of the many parse paths
    // (each with its own constants for family, protocol, fragment...) become one after parsing,
    // instead of each walking the rest of the program (6.1 went past its million instructions).
    // A CPU runs one of our programs at a time (tc runs with bottom halves off), so one slot
    // each is enough.
    let Some(scratch) = NPC_SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a per-CPU slot no one else uses while we run (see above).
    let Scratch { pkt, key, key4, quoted } = unsafe { &mut *scratch };
    // Zeroed word by word: a struct literal became a call to `memset`, which compiler_builtins
    // implements for BPF as a byte loop (48 iterations, ~240 instructions, on every packet).
    // Volatile, or LLVM folds the stores back into that call.
    let words = core::ptr::from_mut(pkt).cast::<u64>();
    for i in 0..size_of::<Packet>() / 8 {
        // SAFETY: `Packet` is 8-aligned and a whole number of words, all plain integers.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let parsed = parse(ctx, pkt);
    // A VLAN tag the kernel already moved out of the frame into the skb (it does on receive for
    // the outermost 802.1Q tag, before tc ingress): the frame is tagged all the same, and the
    // receiving pod's kernel would strip a VID 0 tag and take the IP packet inside.
    // SAFETY: `skb` is the context pointer the kernel handed us.
    pkt.tagged = u8::from(unsafe { (*ctx.skb.skb).vlan_present } != 0);
    // SAFETY: plain-old-data values, RCU-protected while the program runs; a concurrent update
    // by the agent can at worst give us a mix of old and new fields of a value that is
    // consistent either way.
    let config = unsafe { NPC_CONFIG.get(&0) }.unwrap_or(&DEFAULT_CONFIG);

    // Conntrack first, before the endpoint: most packets belong to a connection judged under
    // the current policy, and pass on this one lookup. The endpoint lookup (a hash lookup, ~12 ns
    // here) and source validation are for the rest. Skipping source validation is sound because
    // a packet out of the pod takes this path only when it comes from the entry's `local` end:
    // the end that passed source validation (or was the pod's own address) when the entry was
    // made under this epoch, and the epoch moves whenever an endpoint's addresses or extra
    // sources change.
    probe(path_profile::PARSE, start);
    let lookup = probe_start();
    let ct = track(ifindex, pkt, parsed, key, key4);
    probe(
        if ct.entry.is_some() {
            path_profile::LOOKUP_HIT
        } else {
            path_profile::LOOKUP_MISS
        },
        lookup,
    );
    if let Some((entry, is_reply)) = ct.entry {
        // SAFETY: the pointer came from a successful lookup; entries are plain old data.
        let e = unsafe { &mut *entry };
        // First fragments go the long way: an allowed one is recorded for the later fragments.
        let plain = parsed == Parsed::Ip && pkt.tagged == 0 && pkt.fragment == 0;
        if plain && e.epoch == config.epoch && (direction == DIR_INGRESS || e.local == ct_local::of(ct.from)) {
            refresh(e, pkt, is_reply, ct.now);
            probe(path_profile::RUN_FAST, start);
            return TC_ACT_UNSPEC;
        }
    }

    let lookup = probe_start();
    // SAFETY: as for the config.
    let Some(endpoint) = (unsafe { NPC_ENDPOINTS.get(&ifindex) }) else {
        probe(path_profile::RUN_NO_ENDPOINT, start);
        return TC_ACT_UNSPEC;
    };
    probe(path_profile::ENDPOINT, lookup);
    let hook = Hook {
        ifindex,
        direction,
        endpoint,
        config,
    };
    // Every drop goes through the one `deny` call below: each call site of a subprogram is
    // verified again for every state that reaches it, and seven sites put the program past the
    // 6.1 verifier's million-instruction budget.
    let reason = decide(ctx, &hook, pkt, parsed, &ct, quoted);
    if reason == PASS {
        probe(
            if direction == DIR_EGRESS {
                path_profile::RUN_PASSED_OUT
            } else {
                path_profile::RUN_PASSED_IN
            },
            start,
        );
        return TC_ACT_UNSPEC;
    }
    // Counted here, not inside `deny`: nested, their frames would pass the 512-byte stack.
    if reason == drop_reason::SPOOFED {
        // Its own counter: forged packets are not connections any policy refused.
        bump(stats::SPOOFED);
    } else {
        count_denied(hook.ifindex, hook.direction, pkt, reason);
    }
    let verdict = deny(ctx, &hook, pkt, reason);
    probe(path_profile::RUN_DROPPED, start);
    verdict
}

/// A packet's conntrack key and live entry, looked up once per packet (see `handle`).
struct Tracked<'a> {
    /// IPv4: the entry is `key4`'s in `NPC_CONNTRACK4`; else `key`'s in `NPC_CONNTRACK`.
    v4: bool,
    key: &'a ConntrackKey,
    key4: &'a ConntrackKey4,
    /// The end of the key this packet comes from, in `ConntrackValue::origin`'s terms.
    from: u8,
    /// A TCP SYN (without ACK): opens a connection.
    opens: bool,
    now: u64,
    /// The live entry, and whether this packet goes the other way from the one that opened it.
    entry: Option<(*mut ConntrackValue, bool)>,
}

/// Looks `pkt` up in conntrack (only IP packets and ICMP errors, the two kinds `judge` sees).
#[inline(always)]
fn track<'a>(
    ifindex: u32,
    pkt: &Packet,
    parsed: Parsed,
    key: &'a mut ConntrackKey,
    key4: &'a mut ConntrackKey4,
) -> Tracked<'a> {
    let now = now();
    // Both directions of a connection share one entry, keyed lower end first: one lookup per
    // packet, where a key per opening tuple took two for every reply and every new connection.
    let reversed = ConntrackKey::reversed(words64(&pkt.src), pkt.sport, words64(&pkt.dst), pkt.dport);
    let (src, dst) = (words32(&pkt.src), words32(&pkt.dst));
    let (lower, upper, lower_port, upper_port) = if reversed {
        (dst, src, pkt.dport, pkt.sport)
    } else {
        (src, dst, pkt.sport, pkt.dport)
    };
    // Only the key of the packet's family is written (and read).
    let v4 = pkt.family == 4;
    if v4 {
        *key4 = conntrack_key4(ifindex, pkt.protocol, lower[3], upper[3], lower_port, upper_port);
    } else {
        *key = conntrack_key(ifindex, pkt.protocol, lower, upper, lower_port, upper_port);
    }
    let (key, key4) = (&*key, &*key4);
    let from = if reversed { ct_origin::DST } else { ct_origin::SRC };
    let opens = pkt.protocol == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let found = if parsed != Parsed::Ip && parsed != Parsed::IcmpError {
        None
    } else if v4 {
        NPC_CONNTRACK4.get_ptr_mut(key4)
    } else {
        NPC_CONNTRACK.get_ptr_mut(key)
    };
    let entry = match found {
        Some(entry) => {
            // SAFETY: the pointer came from a successful lookup; entries are plain old data.
            let e = unsafe { &*entry };
            // Idle past its timeout, or a fresh SYN on a closed tuple (port reuse, from either
            // end): a new connection, not part of the old one.
            let over = now.wrapping_sub(e.last_seen_ns) > ct_timeout::of(e.state)
                || (opens && e.state >= ct_state::TCP_CLOSING);
            if over { None } else { Some((entry, e.origin != from)) }
        }
        None => None,
    };
    Tracked {
        v4,
        key,
        key4,
        from,
        opens,
        now,
        entry,
    }
}

/// "No drop reason": the packet passes.
const PASS: u8 = 0;

/// The verdict on a parsed packet: [`PASS`] or the drop reason.
#[inline(always)]
fn decide(
    ctx: &TcContext,
    hook: &Hook,
    pkt: &mut Packet,
    parsed: Parsed,
    ct: &Tracked,
    quoted: &mut ConntrackKey,
) -> u8 {
    let (ifindex, direction) = (hook.ifindex, hook.direction);
    if direction == DIR_EGRESS && pkt.family != 0 && source_ok(hook, pkt, parsed as u8) == 0 {
        return drop_reason::SPOOFED;
    }
    let isolated = is_isolated(hook.endpoint, direction);
    // Tagged frames and other ethertypes: never from a pod (nothing in Kubernetes has a pod send
    // them, and a stacked 802.1ad + 802.1Q frame hides its source from the check above), and to a
    // pod only when it is not isolated.
    if parsed == Parsed::NotIp || pkt.tagged != 0 {
        return if isolated || direction == DIR_EGRESS {
            drop_reason::NOT_IP
        } else {
            PASS
        };
    }
    match parsed {
        Parsed::Ip => {}
        Parsed::Arp | Parsed::LinkControl => return PASS,
        Parsed::Unparseable if isolated => return drop_reason::UNPARSEABLE,
        Parsed::Unparseable | Parsed::NotIp => return PASS,
        Parsed::IcmpError => {
            if related(ctx, ifindex, pkt.offset as usize, pkt.family, quoted) != 0 {
                return PASS;
            }
            // Not about a connection of ours: a new packet, judged as one (below), never tracked.
            pkt.untracked = 1;
        }
        Parsed::LaterFragment if !isolated => return PASS,
        Parsed::LaterFragment => {
            // A later fragment that starts inside the transport header could rewrite the ports or
            // flags the first fragment was judged by (RFC 1858's overlapping fragment attack).
            let whole = pkt.offset as usize >= transport_header_len(pkt.protocol);
            return if whole && first_fragment_allowed(ifindex, pkt) != 0 {
                PASS
            } else {
                drop_reason::FRAGMENT
            };
        }
    }
    // One inlined copy of `judge` (for IP packets and unrelated ICMP errors alike).
    let reason = judge(ctx, hook, pkt, ct);
    if reason == PASS && isolated {
        record_first_fragment(ifindex, pkt);
    }
    reason
}

/// Is the packet's source one the pod may send from? 1 if so, else 0. (Only called for packets
/// leaving the pod.) Not inlined: its branches then end in one return value instead of
/// multiplying the verifier's states for everything after it.
#[inline(never)]
fn source_ok(hook: &Hook, pkt: &Packet, parsed: u8) -> i64 {
    // Word by word in place: copies of the three addresses cost this frame 48 bytes of the 512
    // every call chain shares (6.1 counted main + this + `extra_source` at 544).
    let src = &pkt.src;
    let [own, other] = &hook.endpoint.addrs;
    // No address known yet (the pod's status has none): nothing to hold it to.
    let ok = is(own, [0; 4])
        || same(src, own)
        || same(src, other)
        // An ARP probe (RFC 5227) asks with sender 0.0.0.0 before claiming an address.
        || (parsed == Parsed::Arp as u8 && is(src, [0, 0, V4_MAPPED_MARK, 0]))
        // Duplicate address detection and MLD reports before an address is configured send from
        // `::`; neighbour discovery from the link-local address.
        || (parsed == Parsed::LinkControl as u8 && is(src, [0; 4]))
        || (pkt.family == 6 && src[0] == 0xfe && src[1] & 0xc0 == 0x80)
        || (hook.endpoint.flags & endpoint_flags::EXTRA_SOURCES != 0 && extra_source(hook.ifindex, pkt) != 0);
    i64::from(ok)
}

/// Whether the address at `a` (4-aligned) is the one whose memory image is `w`.
#[inline(always)]
fn is(a: &[u8; 16], w: [u32; 4]) -> bool {
    let a = a.as_ptr() as *const u32;
    // SAFETY: 16 readable bytes, 4-aligned (fields of `Packet` and `EndpointInfo`).
    unsafe { (*a ^ w[0]) | (*a.add(1) ^ w[1]) | (*a.add(2) ^ w[2]) | (*a.add(3) ^ w[3]) == 0 }
}

/// Word by word: `==` on arrays may become a `bcmp` call, which BPF has no symbol for. Both
/// arguments are 4-aligned (fields of `Packet` and `EndpointInfo`).
#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr() as *const u32, b.as_ptr() as *const u32);
    // SAFETY: 16 readable bytes each, 4-aligned (see above).
    unsafe { (*a ^ *b) | (*a.add(1) ^ *b.add(1)) | (*a.add(2) ^ *b.add(2)) | (*a.add(3) ^ *b.add(3)) == 0 }
}

/// The shortest transport header of a protocol: the part a first fragment must hold whole, and a
/// later fragment must not overlap.
#[inline(always)]
fn transport_header_len(protocol: u8) -> usize {
    match protocol {
        PROTO_TCP => 20,
        PROTO_SCTP => 12,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => 0,
    }
}

/// Is `pkt` a first fragment too short to hold its whole transport header? 1 if so. Not inlined,
/// for the verifier (see [`record_first_fragment`]).
#[inline(never)]
fn tiny_first_fragment(pkt: &Packet, l4: usize, datagram_end: usize) -> i64 {
    i64::from(pkt.fragment == FIRST_FRAGMENT && l4 + transport_header_len(pkt.protocol) > datagram_end)
}

/// The key a fragment's datagram is known by at this interface.
#[inline(always)]
fn fragment_key(ifindex: u32, pkt: &Packet) -> FragmentKey {
    #[repr(C)]
    struct Words {
        ifindex: u32,
        id: u32,
        src: [u8; 16],
        dst: [u8; 16],
        protocol: u32,
    }
    // SAFETY: the same size, and every field at the same offset as its `FragmentKey` twin; the
    // protocol word is the protocol byte and the three zero pad bytes (little-endian BPF).
    unsafe {
        core::mem::transmute::<Words, FragmentKey>(Words {
            ifindex,
            id: pkt.frag_id,
            src: pkt.src,
            dst: pkt.dst,
            protocol: u32::from(pkt.protocol),
        })
    }
}

/// A conntrack key (addresses as their memory words) with its pad bytes zeroed by one word store. A `_pad: [0; 3]` in a struct
/// literal becomes a call to compiler_builtins' byte-loop `memset` on BPF (see `handle`).
#[inline(always)]
fn conntrack_key(ifindex: u32, protocol: u8, src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16) -> ConntrackKey {
    #[repr(C)]
    struct Words {
        ifindex: u32,
        protocol: u32,
        src: [u32; 4],
        dst: [u32; 4],
        sport: u16,
        dport: u16,
    }
    // SAFETY: as in `fragment_key` (addresses as words: a byte-array copy out of the packet's
    // scratch slot became a call to the byte-loop `memmove`).
    unsafe {
        core::mem::transmute::<Words, ConntrackKey>(Words {
            ifindex,
            protocol: u32::from(protocol),
            src,
            dst,
            sport,
            dport,
        })
    }
}

/// An IPv4 conntrack key from the addresses' last memory words (see [`conntrack_key`]).
#[inline(always)]
fn conntrack_key4(ifindex: u32, protocol: u8, src: u32, dst: u32, sport: u16, dport: u16) -> ConntrackKey4 {
    #[repr(C)]
    struct Words {
        ifindex: u32,
        src: u32,
        dst: u32,
        sport: u16,
        dport: u16,
        protocol: u32,
    }
    // SAFETY: as in `fragment_key`; the addresses' words are their bytes in memory order.
    unsafe {
        core::mem::transmute::<Words, ConntrackKey4>(Words {
            ifindex,
            src,
            dst,
            sport,
            dport,
            protocol: u32::from(protocol),
        })
    }
}

/// Remembers that the first fragment of `pkt`'s datagram was allowed. Not inlined (nor is
/// [`first_fragment_allowed`]): their keys would otherwise sit in the main frame, whose stack
/// every call shares (see [`allowed`]).
/// (Checks that it is one itself: a branch on the flag in the caller would double the
/// verifier's states for the rest of the program.)
#[inline(never)]
fn record_first_fragment(ifindex: u32, pkt: &Packet) {
    if pkt.fragment == FIRST_FRAGMENT {
        let _ = NPC_FRAGMENTS.insert(&fragment_key(ifindex, pkt), &now(), 0);
    }
}

/// Was the first fragment of `pkt`'s datagram allowed here, recently? 1 if so, else 0.
#[inline(never)]
fn first_fragment_allowed(ifindex: u32, pkt: &Packet) -> i64 {
    // SAFETY: the value is copied out at once.
    match unsafe { NPC_FRAGMENTS.get(&fragment_key(ifindex, pkt)) }.copied() {
        Some(at) if now().wrapping_sub(at) <= FRAGMENT_TIMEOUT_NS => 1,
        _ => 0,
    }
}

/// Is `pkt`'s source inside one of the extra prefixes this interface's pod may send from? 1 if so.
#[inline(never)]
fn extra_source(ifindex: u32, pkt: &Packet) -> i64 {
    let key = SourceKey {
        ifindex_be: ifindex.to_be_bytes(),
        addr: pkt.src,
    };
    // SAFETY: a presence test; the value is not read.
    i64::from(unsafe { NPC_SOURCES.get(&LpmKey::new(SOURCE_FIXED_BITS + 128, key)) }.is_some())
}

/// Does the datagram an ICMP error quotes (at `quoted`) belong to a connection tracked at this
/// interface, in either direction? Returns 1 if so, else 0. Not inlined, for the stack (see
/// [`allowed`]).
#[inline(never)]
fn related(ctx: &TcContext, ifindex: u32, quoted: usize, family: u8, key: &mut ConntrackKey) -> i64 {
    // Zeroed word by word (see `handle`): a zero key literal became a call to the byte-loop
    // `memset`, whose frame, nested under this one, took the 6.1 verifier past its 512 bytes.
    let slots = core::ptr::from_mut(key).cast::<u32>();
    for i in 0..size_of::<ConntrackKey>() / 4 {
        // SAFETY: `ConntrackKey` is 4-aligned and a whole number of words, all plain integers.
        unsafe { core::ptr::write_volatile(slots.add(i), 0) };
    }
    key.ifindex = ifindex;
    // bpf_skb_load_bytes rather than direct packet access: this path is rare, and with a second
    // variable header length in the offsets LLVM shifted the packet-end pointer, which the
    // verifier refuses ("pointer arithmetic on pkt_end prohibited").
    let l4 = if family == 4 {
        let (Ok(version_ihl), Ok(protocol), Ok(src), Ok(dst)) = (
            ctx.load::<u8>(quoted),
            ctx.load::<u8>(quoted + 9),
            ctx.load::<u32>(quoted + 12),
            ctx.load::<u32>(quoted + 16),
        ) else {
            return 0;
        };
        let ihl = ((version_ihl & 0x0f) as usize) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return 0;
        }
        key.protocol = protocol;
        key.src = words([0, 0, V4_MAPPED_MARK, src]);
        key.dst = words([0, 0, V4_MAPPED_MARK, dst]);
        quoted + ihl
    } else {
        let Ok(protocol) = ctx.load::<u8>(quoted + 6) else {
            return 0;
        };
        // Straight into the key: two 16-byte temporaries cost the stack this frame cannot spare.
        if !load_into(ctx, quoted + 8, &mut key.src) || !load_into(ctx, quoted + 24, &mut key.dst) {
            return 0;
        }
        key.protocol = protocol;
        quoted + 40
    };
    let (Ok(first), Ok(second)) = (ctx.load::<[u8; 2]>(l4), ctx.load::<[u8; 2]>(l4 + 2)) else {
        return 0;
    };
    match key.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => {
            key.sport = u16::from_be_bytes(first);
            key.dport = u16::from_be_bytes(second);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Ok(id) = ctx.load::<[u8; 2]>(l4 + 4) else {
                return 0;
            };
            let id = u16::from_be_bytes(id);
            match (key.protocol, first[0]) {
                (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => key.sport = id,
                (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => key.dport = id,
                _ => return 0,
            }
        }
        _ => return 0,
    }
    // The quoted datagram went either way: the shared entry covers both.
    if !key.is_normal() {
        *key = key.swapped();
    }
    let found = if family == 4 {
        let (src, dst) = (words32(&key.src), words32(&key.dst));
        let key4 = conntrack_key4(ifindex, key.protocol, src[3], dst[3], key.sport, key.dport);
        // SAFETY: the value is copied out at once.
        unsafe { NPC_CONNTRACK4.get(&key4) }.copied()
    } else {
        // SAFETY: as above.
        unsafe { NPC_CONNTRACK.get(key) }.copied()
    };
    match found {
        Some(entry) if now().wrapping_sub(entry.last_seen_ns) <= ct_timeout::of(entry.state) => 1,
        _ => 0,
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

/// Conntrack (looked up by [`track`]), then policy for a new connection: [`PASS`] or the drop
/// reason.
#[inline(always)]
fn judge(ctx: &TcContext, hook: &Hook, pkt: &Packet, ct: &Tracked) -> u8 {
    let Hook {
        ifindex,
        direction,
        endpoint,
        config,
    } = *hook;
    let (from, opens, now, tracked) = (ct.from, ct.opens, ct.now, ct.entry);
    let (src, dst) = (words32(&pkt.src), words32(&pkt.dst));

    // One `allowed` call for both questions (see `handle` on call sites): a connection judged
    // under an older policy epoch is judged again as it was opened; otherwise it is new.
    let query = match tracked {
        Some((entry, is_reply)) => {
            // SAFETY: the pointer came from a successful lookup (`track`); entries are plain old data.
            let entry = unsafe { &mut *entry };
            if entry.epoch == config.epoch {
                // The long way only because `local` was not known (an older entry, or one opened
                // to an address not the pod's): this packet passed source validation.
                if direction == DIR_EGRESS && entry.local == ct_local::UNCHECKED {
                    entry.local = ct_local::of(from);
                }
                refresh(entry, pkt, is_reply, now);
                return PASS;
            }
            // The opening packet's tuple: this one's, or this one's reversed.
            if is_reply {
                Query::new(endpoint, entry.direction, dst, src, pkt.sport, pkt.protocol)
            } else {
                Query::new(endpoint, entry.direction, src, dst, pkt.dport, pkt.protocol)
            }
        }
        None => Query::new(endpoint, direction, src, dst, pkt.dport, pkt.protocol),
    };
    let policy = probe_start();
    let verdict = allowed(&query);
    probe(
        if direction == DIR_EGRESS {
            path_profile::POLICY_OUT
        } else {
            path_profile::POLICY_IN
        },
        policy,
    );
    if let Some((entry, is_reply)) = tracked {
        if verdict == NOT_ALLOWED {
            let _ = if ct.v4 {
                NPC_CONNTRACK4.remove(ct.key4)
            } else {
                NPC_CONNTRACK.remove(ct.key)
            };
            return drop_reason::POLICY_CHANGED;
        }
        // SAFETY: as above (LRU entries are not freed under a running program).
        let entry = unsafe { &mut *entry };
        entry.epoch = config.epoch;
        entry.local = local_end(endpoint, direction, pkt, from);
        refresh(entry, pkt, is_reply, now);
        return PASS;
    }

    // A new connection.
    if verdict == NOT_ALLOWED {
        return drop_reason::POLICY;
    }
    if pkt.untracked != 0 {
        return PASS;
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
            origin: from,
            local: local_end(endpoint, direction, pkt, from),
        };
        let insert = probe_start();
        let _ = if ct.v4 {
            NPC_CONNTRACK4.insert(ct.key4, &value, 0)
        } else {
            NPC_CONNTRACK.insert(ct.key, &value, 0)
        };
        probe(
            if direction == DIR_EGRESS {
                path_profile::INSERT_OUT
            } else {
                path_profile::INSERT_IN
            },
            insert,
        );
    }
    if config.log_level >= log_level::DEBUG {
        debug!(
            ctx,
            "npc: new connection ifindex={} dir={} proto={} dport={}", ifindex, direction, pkt.protocol, pkt.dport
        );
    }
    PASS
}

/// Which end of a connection's key is the pod's own ([`ct_local`]), as `pkt` shows it: out of
/// the pod, the end it comes from (`decide` validated its source first); into the pod, the end
/// it goes to, when that is one of the pod's addresses.
#[inline(always)]
fn local_end(endpoint: &EndpointInfo, direction: u8, pkt: &Packet, from: u8) -> u8 {
    if direction == DIR_EGRESS {
        ct_local::of(from)
    } else if same(&pkt.dst, &endpoint.addrs[0]) || same(&pkt.dst, &endpoint.addrs[1]) {
        ct_local::of(if from == ct_origin::SRC {
            ct_origin::DST
        } else {
            ct_origin::SRC
        })
    } else {
        ct_local::UNCHECKED
    }
}

/// The coarse monotonic clock (jiffies, a few ms): cheaper than `bpf_ktime_get_ns`, and
/// conntrack timeouts of seconds need no more. The same clock base as CLOCK_MONOTONIC, which the
/// agent compares entries' ages against.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// How stale an entry's `last_seen_ns` may get before a packet rewrites it. Writing the entry
/// on every packet bounces its cache line between the CPUs of a connection's two directions;
/// idle timeouts are tens of seconds, so a second of slack costs nothing.
const REFRESH_NS: u64 = 1_000_000_000;

/// A tracked connection's packet: its state moves only on flags that change it, its timestamp
/// only when stale (see [`REFRESH_NS`]): most packets read the entry and write nothing.
#[inline(always)]
fn refresh(entry: &mut ConntrackValue, pkt: &Packet, is_reply: bool, now: u64) {
    let next = next_state(entry.state, pkt, is_reply);
    if next != entry.state {
        entry.state = next;
    }
    if now.wrapping_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.last_seen_ns = now;
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
    /// The peer's address as its memory words (see [`conntrack_key`] on byte-array copies).
    peer_addr: [u32; 4],
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
    fn new(endpoint: &EndpointInfo, direction: u8, src: [u32; 4], dst: [u32; 4], port: u16, protocol: u8) -> Self {
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
    let (isolated_flag, ranges_flag) = if direction == DIR_INGRESS {
        (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES)
    } else {
        (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES)
    };
    // Not isolated: allowed, before any lookup (the peer's identity is a 16-byte-key hash
    // lookup, ~15 ns of a new connection that no policy judges).
    if q.flags & isolated_flag == 0 {
        return 0;
    }
    // Peers are plain u32s with a sentinel, not Options: an array of Option<u32> left the None
    // payloads undefined, LLVM spilled them anyway, and the verifier rejected the read of an
    // uninitialised register ("R3 !read_ok").
    // SAFETY (all map gets below): plain-old-data values, copied out at once.
    let peer_identity = unsafe { NPC_IDENTITIES.get(bytes(&q.peer_addr)) }
        .copied()
        .unwrap_or(NO_PEER);
    // The node itself (kubelet probes) may always connect to its pods.
    if direction == DIR_INGRESS && peer_identity == peer::HOST {
        return 0;
    }
    let ranges = q.flags & ranges_flag != 0;
    // The peer's pod identity, its ipBlock class, then the wildcard. The class is a trie lookup
    // (the dearest here), made only when the identity allowed nothing: most new connections are
    // between pods, and their identity's entry answers first.
    for step in 0..3 {
        let peer = match step {
            0 => peer_identity,
            1 => match unsafe { NPC_CIDRS.get(&LpmKey::new(128, *bytes(&q.peer_addr))) } {
                Some(class) => CIDR_CLASS_BASE | *class,
                None => NO_PEER,
            },
            _ => peer::ANY,
        };
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

/// Report and (unless auditing) drop (counted before, by [`count_denied`]). Not inlined, for the
/// stack (see [`allowed`]).
#[inline(never)]
fn deny(ctx: &TcContext, hook: &Hook, pkt: &Packet, reason: u8) -> i32 {
    let (ifindex, direction) = (hook.ifindex, hook.direction);
    let (endpoint, config) = (hook.endpoint, hook.config);
    let (protocol, dport) = (pkt.protocol, pkt.dport);
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

/// Adds one to a per-CPU `NPC_STATS` slot.
#[inline(always)]
fn bump(slot: u32) {
    if let Some(count) = NPC_STATS.get_ptr_mut(&slot) {
        // SAFETY: a per-CPU slot: no other CPU writes it, and this program is not re-entered.
        unsafe { *count += 1 };
    }
}

/// Counts a denied packet: every one in `NPC_STATS`, and its connection once in `NPC_DROPS`,
/// under its port only when that is a label (`NPC_PORT_LABELS`; else port 0). A packet of a
/// flow (same direction and tuple) denied less than `DENIED_IDLE_NS` before (a retransmitted SYN,
/// the rest of a connection a policy change cut) is the same connection. Frames without a flow (not IP,
/// unparseable, fragments) count one each. Not inlined, for the stack (see [`allowed`]).
#[inline(never)]
fn count_denied(ifindex: u32, direction: u8, pkt: &Packet, reason: u8) {
    bump(stats::DENIED_PACKETS);
    let (protocol, dport) = (pkt.protocol, pkt.dport);
    if reason == drop_reason::POLICY || reason == drop_reason::POLICY_CHANGED {
        // The packet's own tuple, not conntrack's normalised one: the counters are per
        // direction, and the two directions of a cut connection are each a blocked connection
        // at their own enforcement point.
        let flow = conntrack_key(
            ifindex,
            protocol,
            words32(&pkt.src),
            words32(&pkt.dst),
            pkt.sport,
            pkt.dport,
        );
        let now = now();
        let repeat = match NPC_DENIED.get_ptr_mut(&flow) {
            // SAFETY: the pointer came from a successful lookup; a racing writer writes a time too.
            Some(seen) => unsafe {
                let recent = now.wrapping_sub(*seen) < DENIED_IDLE_NS;
                *seen = now;
                recent
            },
            None => {
                let _ = NPC_DENIED.insert(&flow, &now, 0);
                false
            }
        };
        if repeat {
            return;
        }
    }
    // SAFETY: only whether the entry exists is read.
    let labelled = unsafe { NPC_PORT_LABELS.get(&PortLabelKey::new(protocol, dport)) }.is_some();
    let key = DropKey {
        direction,
        protocol,
        dport: if labelled { dport } else { 0 },
    };
    match NPC_DROPS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: only this CPU writes it while we run.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = NPC_DROPS.insert(&key, &1, 0);
        }
    }
}

/// Copies `N` bytes of the packet at `offset` into `dst` (`bpf_skb_load_bytes`); false if the
/// packet is shorter.
#[inline(always)]
fn load_into<const N: usize>(ctx: &TcContext, offset: usize, dst: &mut [u8; N]) -> bool {
    // SAFETY: `dst` is N writable bytes; the helper checks the packet bounds itself.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            dst.as_mut_ptr().cast(),
            N as u32,
        ) == 0
    }
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

/// An address of the 8-aligned [`Packet`] (`src` and `dst` sit at offsets 0 and 16) as its two
/// native-endian words, with two aligned loads.
#[inline(always)]
fn words64(a: &[u8; 16]) -> [u64; 2] {
    let p = a.as_ptr().cast::<u64>();
    // SAFETY: 16 readable bytes, 8-aligned where `Packet` holds them (its only callers' fields).
    unsafe { [*p, *p.add(1)] }
}

/// Address words as the bytes they hold in memory, in place.
#[inline(always)]
fn bytes(w: &[u32; 4]) -> &[u8; 16] {
    // SAFETY: same size; the bytes' alignment (1) is below the words'.
    unsafe { &*w.as_ptr().cast::<[u8; 16]>() }
}

/// An address of the [`Packet`] as its four memory words, with aligned loads.
#[inline(always)]
fn words32(a: &[u8; 16]) -> [u32; 4] {
    let p = a.as_ptr().cast::<u32>();
    // SAFETY: 16 readable bytes, aligned where `Packet` holds them (see `words64`).
    unsafe { [*p, *p.add(1), *p.add(2), *p.add(3)] }
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
    // Where the datagram ends by its own header (frames may carry padding past it).
    let datagram_end;
    let l4 = match ethertype {
        ETH_P_IP => {
            // One bounds check for the whole fixed header, then reads through the pointer: with a
            // check per field LLVM merged the checks in a way the verifier could not follow
            // (it walked an impossible path where an address register held a pointer).
            let Some(ip) = ptr_at::<[u8; 20]>(ctx, ETH_HLEN) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 20 bytes; all reads below are inside them.
            let (version_ihl, total_len, id, frag, protocol, src, dst) = unsafe {
                let b = ip as *const u8;
                (
                    *b,
                    u16::from_be_bytes([*b.add(2), *b.add(3)]),
                    u16::from_be_bytes([*b.add(4), *b.add(5)]),
                    u16::from_be_bytes([*b.add(6), *b.add(7)]),
                    *b.add(9),
                    core::ptr::read_unaligned(b.add(12) as *const u32),
                    core::ptr::read_unaligned(b.add(16) as *const u32),
                )
            };
            pkt.protocol = protocol;
            pkt.src = words([0, 0, V4_MAPPED_MARK, src]);
            pkt.dst = words([0, 0, V4_MAPPED_MARK, dst]);
            pkt.family = 4;
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            if version_ihl >> 4 != 4 || ihl < 20 {
                return Parsed::Unparseable;
            }
            // More-fragments flag, fragment offset in 8-octet units.
            let (more, offset) = (frag & 0x2000 != 0, (frag & 0x1fff) as usize * 8);
            if more || offset != 0 {
                pkt.frag_id = u32::from(id);
                if offset != 0 {
                    pkt.offset = offset as u16;
                    return Parsed::LaterFragment;
                }
                pkt.fragment = FIRST_FRAGMENT;
            }
            datagram_end = ETH_HLEN + total_len as usize;
            ETH_HLEN + ihl
        }
        ETH_P_IPV6 => {
            let Some(ip) = ptr_at::<[u8; 40]>(ctx, ETH_HLEN) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 40 bytes of the fixed header.
            let (version, payload_len, next_header) = unsafe {
                let b = ip as *const u8;
                // Word by word: a 16-byte array copy became a call to compiler_builtins' byte-loop
                // `memmove` (see `handle`).
                let w = |at: usize| core::ptr::read_unaligned(b.add(at) as *const u32);
                pkt.src = words([w(8), w(12), w(16), w(20)]);
                pkt.dst = words([w(24), w(28), w(32), w(36)]);
                (*b, u16::from_be_bytes([*b.add(4), *b.add(5)]), *b.add(6))
            };
            pkt.family = 6;
            if version >> 4 != 6 {
                return Parsed::Unparseable;
            }
            datagram_end = ETH_HLEN + 40 + payload_len as usize;
            let mut next = next_header;
            let mut offset = ETH_HLEN + 40;
            let mut done = false;
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                let kind = match next {
                    // Hop-by-hop, routing, destination options: 8-octet units past the first 8.
                    0 | 43 | 60 => 1,
                    // Fragment header: fixed 8 octets, offset in the high 13 bits of octets 2..4,
                    // more-fragments in the lowest bit, the identification in octets 4..8.
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
                next = following;
                if kind == 2 && frag & 0xfff9 != 0 {
                    let Some(id) = read::<4>(ctx, offset + 4) else {
                        pkt.protocol = next;
                        return Parsed::Unparseable;
                    };
                    pkt.frag_id = u32::from_be_bytes(id);
                    if frag >> 3 != 0 {
                        pkt.protocol = next;
                        pkt.offset = (frag >> 3) * 8;
                        return Parsed::LaterFragment;
                    }
                    pkt.fragment = FIRST_FRAGMENT;
                }
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
        // ARP: a pod needs it whatever its policy. The sender's protocol address (after the
        // 8-octet header and the sender's hardware address) is what source validation checks.
        ETH_P_ARP => {
            let Some(sender) = read::<4>(ctx, ETH_HLEN + 14) else {
                return Parsed::Unparseable;
            };
            pkt.src = words([0, 0, V4_MAPPED_MARK, u32::from_ne_bytes(sender)]);
            pkt.family = 4;
            return Parsed::Arp;
        }
        // VLAN-tagged frames (802.1Q, 802.1ad, any depth: the receiving kernel would strip the
        // tags and deliver the IP packet inside unjudged) and every other ethertype.
        _ => return Parsed::NotIp,
    };
    // A first fragment must hold the whole transport header: a tiny one (RFC 1858) would leave
    // the ports or flags to a later fragment, which is never judged.
    if tiny_first_fragment(pkt, l4, datagram_end) != 0 {
        return Parsed::Unparseable;
    }

    match pkt.protocol {
        // One bounds check per header, then reads through the pointer (as for the IP header):
        // a check per field let LLVM reuse a register across paths, and the verifier refused a
        // port store from one that held the context pointer on another ("invalid size of
        // register spill").
        PROTO_TCP => {
            let Some(tcp) = ptr_at::<[u8; 14]>(ctx, l4) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 14 bytes (ports ... flags).
            unsafe {
                let b = tcp as *const u8;
                pkt.sport = u16::from_be_bytes([*b, *b.add(1)]);
                pkt.dport = u16::from_be_bytes([*b.add(2), *b.add(3)]);
                pkt.tcp_flags = *b.add(13);
            }
        }
        PROTO_UDP | PROTO_SCTP => {
            let Some(ports) = ptr_at::<[u8; 4]>(ctx, l4) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 4 bytes.
            unsafe {
                let b = ports as *const u8;
                pkt.sport = u16::from_be_bytes([*b, *b.add(1)]);
                pkt.dport = u16::from_be_bytes([*b.add(2), *b.add(3)]);
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(icmp) = ptr_at::<[u8; 6]>(ctx, l4) else {
                return Parsed::Unparseable;
            };
            // SAFETY: ptr_at checked the 6 bytes (type, code, checksum, identifier).
            let (icmp_type, id) = unsafe {
                let b = icmp as *const u8;
                (*b, u16::from_be_bytes([*b.add(4), *b.add(5)]))
            };
            match (pkt.protocol, icmp_type) {
                // Echo request opens (id, 0); its reply (0, id) is then the reversed tuple.
                (PROTO_ICMP, 8) | (PROTO_ICMPV6, 128) => pkt.sport = id,
                (PROTO_ICMP, 0) | (PROTO_ICMPV6, 129) => pkt.dport = id,
                // Destination unreachable, time exceeded, parameter problem (and packet too big):
                // errors about a connection, needed for path MTU discovery.
                (PROTO_ICMP, 3 | 11 | 12) | (PROTO_ICMPV6, 1..=4) => {
                    pkt.offset = (l4 + 8) as u16;
                    return Parsed::IcmpError;
                }
                // Neighbour discovery: router/neighbour solicitation and advertisement, redirect.
                // Multicast listener discovery (MLD queries, reports, done; MLDv2 reports): link
                // control traffic the kernel sends by itself, flooded by bridges to every pod.
                // Policy never meant to filter it, and counting it as "blocked connections" would
                // only make the headline metric noisy.
                (PROTO_ICMPV6, 130..=137 | 143) => return Parsed::LinkControl,
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
