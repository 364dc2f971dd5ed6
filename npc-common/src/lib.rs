//! Map keys, values and constants shared by the npc eBPF programs (`npc-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]`, spells its padding out as `_pad` fields (so the kernel never
//! hashes uninitialised bytes), holds no `bool`, enum or `Option`, derives bytemuck's `NoUninit`
//! (which refuses to compile a type with a padding hole) and carries a compile-time size assertion. The `user` feature adds `aya::Pod` impls for the agent.
//!
//! Addresses are always 16 bytes: IPv6 as is, IPv4 mapped into IPv6 (`::ffff:a.b.c.d`), so one
//! map serves both families.
#![no_std]

use bytemuck::NoUninit;
use core::mem::size_of;

/// Map names (at most 15 bytes: the kernel cuts longer names). Pinned under the pin root
/// (`/sys/fs/bpf/npc/` by default) by these names.
pub mod map_names {
    pub const ENDPOINTS: &str = "NPC_ENDPOINTS";
    pub const IDENTITIES: &str = "NPC_IDENTITIES";
    pub const CIDRS: &str = "NPC_CIDRS";
    pub const POLICY: &str = "NPC_POLICY";
    pub const PORT_RANGES: &str = "NPC_PORT_RANGES";
    /// IPv6 connections (and, until the agent moves them, IPv4 ones of the release before).
    pub const CONNTRACK: &str = "NPC_CONNTRACK";
    /// IPv4 connections.
    pub const CONNTRACK4: &str = "NPC_CONNTRACK4";
    pub const DROPS: &str = "NPC_DROPS";
    pub const EVENTS: &str = "NPC_EVENTS";
    pub const CONFIG: &str = "NPC_CONFIG";
    pub const STATS: &str = "NPC_STATS";
    pub const SOURCES: &str = "NPC_SOURCES";
    pub const FRAGMENTS: &str = "NPC_FRAGMENTS";
    pub const PORT_LABELS: &str = "NPC_PORT_LABELS";
    pub const DENIED: &str = "NPC_DENIED";
    pub const ALL: [&str; 15] = [
        ENDPOINTS,
        IDENTITIES,
        CIDRS,
        POLICY,
        PORT_RANGES,
        CONNTRACK,
        CONNTRACK4,
        DROPS,
        EVENTS,
        CONFIG,
        STATS,
        SOURCES,
        FRAGMENTS,
        PORT_LABELS,
        DENIED,
    ];
}

/// Slots of `NPC_STATS`, a per-CPU array of counters.
pub mod stats {
    /// New connections allowed (and tracked) at a pod's ingress.
    pub const ALLOWED_INGRESS: u32 = 0;
    /// New connections allowed (and tracked) at a pod's egress.
    pub const ALLOWED_EGRESS: u32 = 1;
    /// Packets a pod sent with a source address that is not its own (dropped, whatever policy).
    pub const SPOOFED: u32 = 2;
    /// Packets dropped by policy (every one; `NPC_DROPS` counts connections).
    pub const DENIED_PACKETS: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Where the programs spend their time in real traffic: the probes of a build with npc-ebpf's
/// `profile` feature (`cargo xtask bench traffic --profile-paths`; never in a release build).
/// `NPC_PROFILE` is a per-CPU array of u64 (not pinned): slot `2 * s` counts the times probe
/// `s` fired, slot `2 * s + 1` the nanoseconds it measured (each probe reads the clock, so the
/// figures include the probes' own cost, ~30-40 ns each here).
pub mod path_profile {
    pub const MAP: &str = "NPC_PROFILE";
    /// From the program's start to the conntrack lookup: the scratch slot, parsing, the config.
    pub const PARSE: u32 = 0;
    /// The conntrack lookup (key, clock, hash lookup) when it finds a live entry.
    pub const LOOKUP_HIT: u32 = 1;
    /// The conntrack lookup when it finds none (a new connection, or a non-pod interface).
    pub const LOOKUP_MISS: u32 = 2;
    /// The endpoint lookup (every packet off the fast path).
    pub const ENDPOINT: u32 = 3;
    /// Policy (`allowed`) for a connection out of / into a pod.
    pub const POLICY_OUT: u32 = 4;
    pub const POLICY_IN: u32 = 5;
    /// The conntrack insert of a new connection out of / into a pod.
    pub const INSERT_OUT: u32 = 6;
    pub const INSERT_IN: u32 = 7;
    /// Whole runs: the conntrack fast path; no endpoint; the long way and passed, out of / into a
    /// pod; dropped.
    pub const RUN_FAST: u32 = 8;
    pub const RUN_NO_ENDPOINT: u32 = 9;
    pub const RUN_PASSED_OUT: u32 = 10;
    pub const RUN_PASSED_IN: u32 = 11;
    pub const RUN_DROPPED: u32 = 12;
    pub const COUNT: u32 = 13;
    pub const NAMES: [&str; COUNT as usize] = [
        "parse (start to conntrack)",
        "conntrack lookup, hit",
        "conntrack lookup, miss",
        "endpoint lookup",
        "policy, out of a pod",
        "policy, into a pod",
        "conntrack insert, out of a pod",
        "conntrack insert, into a pod",
        "whole run: conntrack fast path",
        "whole run: no endpoint",
        "whole run: long way, passed, out of a pod",
        "whole run: long way, passed, into a pod",
        "whole run: dropped",
    ];
}

/// Program names, as the agent looks them up in the object.
pub mod program_names {
    /// On the tc ingress hook of the host-side veth: packets leaving the pod (its egress policy).
    pub const FROM_POD: &str = "npc_from_pod";
    /// On the tc egress hook of the host-side veth: packets entering the pod (its ingress policy).
    pub const TO_POD: &str = "npc_to_pod";
    /// Passes every packet and does nothing else: the benchmarks' floor (what the kernel's test
    /// run costs around any program). Loaded only by benchmarks, never attached.
    pub const FLOOR: &str = "npc_floor";
}

/// Map capacities. Sized for a large node; the agent reports pressure as a metric.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const IDENTITIES: u32 = 262_144;
    pub const CIDRS: u32 = 65_536;
    pub const POLICY: u32 = 524_288;
    pub const PORT_RANGES: u32 = 65_536;
    pub const CONNTRACK: u32 = 262_144;
    pub const CONNTRACK4: u32 = 262_144;
    pub const DROPS: u32 = 16_384;
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    pub const SOURCES: u32 = 4096;
    pub const FRAGMENTS: u32 = 8192;
    /// Ports that are labels of `NPC_DROPS` (the rest count under port 0): with both directions
    /// and every protocol number's port-0 key, `NPC_DROPS` can never fill
    /// (2 × (4096 + 256) < 16,384).
    pub const PORT_LABELS: u32 = 4096;
    pub const DENIED: u32 = 16_384;
}

/// Policy direction, from the local pod's point of view.
pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

/// Port value meaning "every port of the protocol" in a [`PolicyKey`]. Port 0 cannot appear in a
/// NetworkPolicy, so it is free for this.
pub const PORT_ANY: u16 = 0;

/// Reserved peer ids. Pod identities are numbered from [`FIRST_POD_IDENTITY`], Service identities
/// from [`FIRST_SERVICE_IDENTITY`]; ipBlock classes
/// from [`CIDR_CLASS_BASE`], so one `u32` peer field names either without ambiguity.
pub mod peer {
    /// Any address at all: a rule with no `from`/`to`.
    pub const ANY: u32 = 0;
    /// The local node's own addresses (and so hostNetwork pods on it). Always allowed in to a pod.
    pub const HOST: u32 = 1;
    /// An address that is neither a known pod nor the node (events only, never in policy keys).
    pub const WORLD: u32 = 2;
}
pub const FIRST_POD_IDENTITY: u32 = 256;
/// Service identities (one per Service and address family: the peer id of its VIPs) are numbered
/// from here, below the ipBlock classes.
pub const FIRST_SERVICE_IDENTITY: u32 = 0x4000_0000;
pub const CIDR_CLASS_BASE: u32 = 0x8000_0000;

/// Endpoint flags.
pub mod endpoint_flags {
    /// Some policy selecting the pod has policyType Ingress.
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    /// Some policy selecting the pod has policyType Egress.
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// The pod's identity has port-range (`endPort`) entries for ingress: consult `NPC_PORT_RANGES`.
    pub const INGRESS_RANGES: u32 = 1 << 2;
    pub const EGRESS_RANGES: u32 = 1 << 3;
    /// The pod may send from prefixes besides its own addresses (an annotation): consult
    /// `NPC_SOURCES` before calling a source forged.
    pub const EXTRA_SOURCES: u32 = 1 << 4;
}

/// `NPC_ENDPOINTS`: host-side interface index → the pod behind it.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo {
    pub identity: u32,
    pub flags: u32,
    /// The pod's addresses: Kubernetes gives a pod at most one per family. The first is its
    /// primary address (for events and `inspect`); a single-address pod has it in both slots, and
    /// a pod with none has zeros. The only sources the from-pod program accepts besides IPv6
    /// link-local (and `::` for neighbour discovery) and `NPC_SOURCES`.
    pub addrs: [[u8; 16]; 2],
}
const _: () = assert!(size_of::<EndpointInfo>() == 40);

impl EndpointInfo {
    /// The value for a pod with these addresses (only the first two count; see `addrs`).
    pub fn new(identity: u32, flags: u32, addrs: &[[u8; 16]]) -> Self {
        let first = addrs.first().copied().unwrap_or([0; 16]);
        Self {
            identity,
            flags,
            addrs: [first, addrs.get(1).copied().unwrap_or(first)],
        }
    }
}

/// `NPC_SOURCES` LPM key data: extra source prefixes a pod may send from, per host-side interface.
/// The interface index is big-endian so that it is the prefix's leading, always fully matched,
/// [`SOURCE_FIXED_BITS`]; the address follows.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub ifindex_be: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SourceKey>() == 20);
pub const SOURCE_FIXED_BITS: u32 = 32;

/// `NPC_FRAGMENTS` key: one fragmented datagram at one interface. The first fragment's verdict is
/// kept under it (as Cilium does), because later fragments carry no ports to judge.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub ifindex: u32,
    /// IPv4's 16-bit identification or IPv6's 32-bit one, host byte order.
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragmentKey>() == 44);

/// How long a first fragment's verdict stands for its later fragments (nanoseconds): IPv6's
/// reassembly timeout, the longer of the two families'.
pub const FRAGMENT_TIMEOUT_NS: u64 = 60_000_000_000;

/// `NPC_POLICY` key: is traffic between a local identity and a peer, in a direction, on a
/// protocol and port, allowed? Lookups try the exact port, then [`PORT_ANY`] with the protocol,
/// then [`PROTO_ANY`] with [`PORT_ANY`] (a rule with no `ports`).
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub identity: u32,
    pub peer: u32,
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub direction: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// `NPC_POLICY` value: which rule allowed it (the agent's rule table index; for audit and explain).
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub rule: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 4);

/// `NPC_PORT_RANGES` LPM key data (the LPM trie's `prefixlen` comes before it): an `endPort`
/// range split into aligned power-of-two blocks, each one prefix. Identity, peer, direction and
/// protocol are always matched in full ([`PORT_RANGE_FIXED_BITS`]); the port is big-endian so
/// that its high bits form the prefix.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRangeKey {
    pub identity: u32,
    pub peer: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub port_be: [u8; 2],
}
const _: () = assert!(size_of::<PortRangeKey>() == 12);
pub const PORT_RANGE_FIXED_BITS: u32 = 80;

/// `NPC_CONNTRACK` key: a connection's tuple in one scope (the host-side interface: each
/// enforcement point tracks its own connections, so the egress check at one pod never stands in
/// for the ingress check at another). Both directions of a connection share the entry: the key
/// names the lower (address, port) end `src` (see [`ConntrackKey::reversed`]), and
/// [`ConntrackValue::origin`] says which end opened it. One lookup per packet, either way.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackKey {
    pub ifindex: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(size_of::<ConntrackKey>() == 44);

impl ConntrackKey {
    /// Whether a packet from `src`:`sport` to `dst`:`dport` names its connection's ends the other
    /// way round from the key, i.e. (src, sport) sorts after (dst, dport). Addresses are given as
    /// their two native-endian words (the datapath loads them so); any fixed total order works,
    /// as long as the datapath and the agent (which rewrites older entries) share this one.
    #[inline(always)]
    pub fn reversed(src: [u64; 2], sport: u16, dst: [u64; 2], dport: u16) -> bool {
        if src[0] != dst[0] {
            return src[0] > dst[0];
        }
        if src[1] != dst[1] {
            return src[1] > dst[1];
        }
        sport > dport
    }

    /// [`Self::reversed`] for byte addresses.
    pub fn reversed_bytes(src: &[u8; 16], sport: u16, dst: &[u8; 16], dport: u16) -> bool {
        let words = |a: &[u8; 16]| {
            let (hi, lo) = a.split_at(8);
            [
                u64::from_ne_bytes(hi.try_into().unwrap_or_default()),
                u64::from_ne_bytes(lo.try_into().unwrap_or_default()),
            ]
        };
        Self::reversed(words(src), sport, words(dst), dport)
    }

    /// Is the key in the shared orientation? Entries written before it was introduced (one per
    /// opening tuple) may not be.
    pub fn is_normal(&self) -> bool {
        !Self::reversed_bytes(&self.src, self.sport, &self.dst, self.dport)
    }

    /// The same connection's key with its ends swapped.
    pub fn swapped(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// `NPC_CONNTRACK4` key: [`ConntrackKey`] for an IPv4 connection, in 20 bytes instead of 44. The
/// kernel hashes the whole key on every lookup and insert (jhash, a round per 12 bytes): the
/// smaller key costs a lookup ~12 ns here against ~20. Same scope, same orientation (the ends in
/// the order [`ConntrackKey::reversed`] gives their IPv4-mapped forms).
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConntrackKey4 {
    pub ifindex: u32,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ConntrackKey4>() == 20);

impl ConntrackKey4 {
    /// The key of an IPv4 connection (both ends IPv4-mapped), else `None`.
    pub fn from_mapped(key: &ConntrackKey) -> Option<Self> {
        let v4 = |a: &[u8; 16]| (a[..12] == V4_MAPPED_PREFIX).then(|| [a[12], a[13], a[14], a[15]]);
        Some(Self {
            ifindex: key.ifindex,
            src: v4(&key.src)?,
            dst: v4(&key.dst)?,
            sport: key.sport,
            dport: key.dport,
            protocol: key.protocol,
            _pad: [0; 3],
        })
    }

    /// The same key with IPv4-mapped addresses, as [`ConntrackKey`] (what `inspect` and the sweep
    /// read both tables as).
    pub fn mapped(&self) -> ConntrackKey {
        ConntrackKey {
            ifindex: self.ifindex,
            protocol: self.protocol,
            _pad: [0; 3],
            src: v4_mapped(self.src),
            dst: v4_mapped(self.dst),
            sport: self.sport,
            dport: self.dport,
        }
    }
}

/// The first 12 bytes of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// [`ConntrackValue::origin`]: which end of the key opened the connection.
pub mod ct_origin {
    /// The key's `src` end (every entry of the release before shared entries reads so).
    pub const SRC: u8 = 0;
    pub const DST: u8 = 1;
}

/// [`ConntrackValue::local`]: which end of the key is this interface's pod, checked when the
/// entry was made or last judged. The from-pod program passes a tracked packet without the
/// endpoint lookup and source validation only when it comes from that end (see the datapath's
/// `handle`).
pub mod ct_local {
    /// Not checked (an entry of an older release, or a connection into the pod to an address
    /// that is not one of the pod's): every packet out of the pod is validated.
    pub const UNCHECKED: u8 = 0;
    /// The key's `src` end.
    pub const SRC: u8 = 1;
    /// The key's `dst` end.
    pub const DST: u8 = 2;

    /// The [`ct_local`] value of the end [`super::ct_origin`] names.
    #[inline(always)]
    pub const fn of(origin: u8) -> u8 {
        if origin == super::ct_origin::DST { DST } else { SRC }
    }
}

/// Connection states kept in [`ConntrackValue::state`].
pub mod ct_state {
    /// UDP, SCTP, ICMP and other protocols without a tracked handshake.
    pub const OPEN: u8 = 0;
    pub const TCP_SYN_SENT: u8 = 1;
    pub const TCP_ESTABLISHED: u8 = 2;
    /// FIN seen in either direction.
    pub const TCP_CLOSING: u8 = 3;
    /// RST seen.
    pub const TCP_CLOSED: u8 = 4;
}

/// Idle timeouts per state (nanoseconds), as Cilium's defaults: an entry idle longer than its
/// state's timeout counts as gone, and the next packet is judged as a new connection.
pub mod ct_timeout {
    const SEC: u64 = 1_000_000_000;
    pub const TCP_SYN: u64 = 60 * SEC;
    pub const TCP_ESTABLISHED: u64 = 6 * 3600 * SEC;
    pub const TCP_CLOSING: u64 = 10 * SEC;
    pub const TCP_CLOSED: u64 = 10 * SEC;
    pub const OTHER: u64 = 60 * SEC;

    /// The idle timeout of an entry in `state` ([`super::ct_state`]).
    #[inline(always)]
    pub const fn of(state: u8) -> u64 {
        match state {
            super::ct_state::TCP_SYN_SENT => TCP_SYN,
            super::ct_state::TCP_ESTABLISHED => TCP_ESTABLISHED,
            super::ct_state::TCP_CLOSING => TCP_CLOSING,
            super::ct_state::TCP_CLOSED => TCP_CLOSED,
            _ => OTHER,
        }
    }
}

/// Which way the connection was opened, from the local pod's view: [`DIR_INGRESS`] (the peer
/// opened it) or [`DIR_EGRESS`] (the pod did). Re-checks after a policy change use it.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackValue {
    pub last_seen_ns: u64,
    /// The policy epoch ([`Config::epoch`]) the connection was last judged under.
    pub epoch: u32,
    pub state: u8,
    pub direction: u8,
    /// [`ct_origin`]: which end of the key sent the packet that opened the connection.
    pub origin: u8,
    /// [`ct_local`]: which end is the pod's own address (in the release before it, a zero pad).
    pub local: u8,
}
const _: () = assert!(size_of::<ConntrackValue>() == 16);

impl ConntrackValue {
    /// The opening packet's (src, dst, sport, dport) for an entry under `key`.
    pub fn opener(&self, key: &ConntrackKey) -> ([u8; 16], [u8; 16], u16, u16) {
        if self.origin == ct_origin::DST {
            (key.dst, key.src, key.dport, key.sport)
        } else {
            (key.src, key.dst, key.sport, key.dport)
        }
    }
}

/// `NPC_DROPS` key (per-CPU counters; the agent sums them).
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    pub direction: u8,
    pub protocol: u8,
    /// Host byte order; 0 for protocols without ports and for packets that could not be parsed.
    pub dport: u16,
}
const _: () = assert!(size_of::<DropKey>() == 4);

/// `NPC_PORT_LABELS` key: a (protocol, port) that `NPC_DROPS` counts under its own number. The
/// agent writes the ports policy, Services and local pods name; a dropped packet to any other
/// port (a port scan, the ephemeral port of a reply on a cut connection) counts under port 0, so
/// the drop counters' label space is bounded by what the cluster declares, not by what is sent.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortLabelKey {
    pub protocol: u8,
    pub _pad: u8,
    /// Host byte order.
    pub port: u16,
}
const _: () = assert!(size_of::<PortLabelKey>() == 4);

impl PortLabelKey {
    pub const fn new(protocol: u8, port: u16) -> Self {
        Self {
            protocol,
            _pad: 0,
            port,
        }
    }
}

/// A denied flow (its `NPC_DENIED` entry, keyed like conntrack) seen again within this long of
/// its last denied packet is the same connection: a SYN's retransmissions (1, 2, 4, ... 32 s
/// apart) count once in `NPC_DROPS`, every packet in `NPC_STATS`.
pub const DENIED_IDLE_NS: u64 = 60_000_000_000;

/// Why a packet was dropped (or, in audit mode, would have been).
pub mod drop_reason {
    pub const POLICY: u8 = 1;
    pub const UNPARSEABLE: u8 = 2;
    /// An established connection that a policy change no longer allows.
    pub const POLICY_CHANGED: u8 = 3;
    /// A frame that is neither IPv4, IPv6 nor ARP (VLAN-tagged, unknown ethertype) to or from a pod
    /// isolated in that direction.
    pub const NOT_IP: u8 = 4;
    /// A pod sent from an address that is not its own (source validation, every pod).
    pub const SPOOFED: u8 = 5;
    /// A later fragment whose first fragment was not seen or not allowed, or one that overlaps the
    /// transport header the first fragment was judged by.
    pub const FRAGMENT: u8 = 6;
}

/// Event kinds in `NPC_EVENTS`.
pub mod event_kind {
    pub const DROP: u8 = 1;
    pub const AUDIT: u8 = 2;
}

/// `NPC_EVENTS` ring buffer record.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ifindex: u32,
    pub local_identity: u32,
    pub peer_identity: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    pub kind: u8,
    pub reason: u8,
}
const _: () = assert!(size_of::<VerdictEvent>() == 52);

/// Log levels for the datapath's own debug logging (aya-log). Off by default.
pub mod log_level {
    pub const OFF: u32 = 0;
    pub const INFO: u32 = 1;
    pub const DEBUG: u32 = 2;
}

/// Enforcement modes.
pub mod mode {
    /// Drop what policy does not allow.
    pub const ENFORCE: u32 = 0;
    /// Count and report what would be dropped, but pass it.
    pub const AUDIT: u32 = 1;
}

/// `NPC_CONFIG[0]`: run-time knobs the agent changes without reloading programs.
#[repr(C)]
#[derive(NoUninit, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub log_level: u32,
    pub mode: u32,
    /// Bumped by the agent whenever a sync changes policy: connections tracked under an older
    /// epoch are re-checked on their next packet, so a tightened policy cuts them.
    pub epoch: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 16);

/// The IPv4-mapped IPv6 form of an IPv4 address, as every map stores it.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have no
    // implicit padding (derive(NoUninit) refuses to compile a type with padding).
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PortRangeKey {}
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackKey4 {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for DropKey {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for PortLabelKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of};

    use super::*;

    #[test]
    fn alignments_are_what_the_kernel_side_expects() {
        assert_eq!(align_of::<EndpointInfo>(), 4);
        assert_eq!(align_of::<PolicyKey>(), 4);
        assert_eq!(align_of::<ConntrackKey>(), 4);
        assert_eq!(align_of::<ConntrackValue>(), 8);
        assert_eq!(align_of::<DropKey>(), 2);
        assert_eq!(offset_of!(ConntrackKey, src), 8);
        assert_eq!(offset_of!(PortRangeKey, port_be), 10);
        assert_eq!(PORT_RANGE_FIXED_BITS as usize, offset_of!(PortRangeKey, port_be) * 8);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn v4_mapping_is_rfc4291() {
        assert_eq!(v4_mapped([10, 0, 0, 1])[10..], [0xff, 0xff, 10, 0, 0, 1]);
    }

    #[test]
    fn an_ipv4_conntrack_key_round_trips_and_an_ipv6_one_has_no_short_form() {
        let key = ConntrackKey {
            ifindex: 7,
            protocol: PROTO_TCP,
            _pad: [0; 3],
            src: v4_mapped([10, 0, 0, 1]),
            dst: v4_mapped([10, 0, 0, 2]),
            sport: 80,
            dport: 40000,
        };
        let short = ConntrackKey4::from_mapped(&key).expect("both ends are IPv4");
        assert_eq!((short.src, short.dst, short.ifindex), ([10, 0, 0, 1], [10, 0, 0, 2], 7));
        assert_eq!(short.mapped(), key);
        let mut v6 = key;
        v6.dst[0] = 0xfd;
        assert_eq!(ConntrackKey4::from_mapped(&v6), None);
    }
}
