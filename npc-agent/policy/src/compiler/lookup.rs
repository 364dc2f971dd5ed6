//! The datapath's lookups, in user space: what one enforcement point decides for one packet, read
//! from compiled maps (explain, and the tests against the reference evaluator).
use std::net::IpAddr;

use npc_common::{
    CIDR_CLASS_BASE, EndpointInfo, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PolicyKey, PortRangeKey, endpoint_flags,
    peer,
};

use super::{CidrKey, Compiled, DesiredMaps, RangeKey};
use crate::{
    model::{ObjectRef, addr_bytes},
    policy::Direction,
};

/// What one enforcement point decides for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The pod has no endpoint here (not local, hostNetwork, finished): nothing is enforced.
    NotEnforced,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// Ingress from the pod's own node, always allowed.
    FromNode,
    /// Allowed by rule `rule` (see [`Compiled::rule`]).
    Allowed {
        rule: u32,
    },
    Denied,
}

impl Verdict {
    pub fn allowed(self) -> bool {
        !matches!(self, Self::Denied)
    }
}

/// Answers "is this allowed" from compiled maps exactly as the datapath does (same lookups, same
/// order). Used by explain and by the tests that compare the compiler with the reference evaluator.
pub fn lookup(
    compiled: &Compiled,
    local: &ObjectRef,
    direction: Direction,
    peer_addr: IpAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let Some(endpoint) = compiled.maps.endpoints.get(local) else {
        return Verdict::NotEnforced;
    };
    lookup_endpoint(&compiled.maps, endpoint, direction, peer_addr, protocol, port)
}

/// [`lookup`] for an endpoint given by its map value (the compiler asks before the endpoint is in
/// the maps).
pub(super) fn lookup_endpoint(
    maps: &DesiredMaps,
    endpoint: &EndpointInfo,
    direction: Direction,
    peer_addr: IpAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let addr = addr_bytes(peer_addr);
    let peer_identity = maps.identities.get(&addr).copied();
    lookup_peer(
        maps,
        endpoint,
        direction,
        peer_identity,
        || class_of(maps, &addr),
        protocol,
        port,
    )
}

/// [`lookup_endpoint`] for a peer given by its identity entry and (asked for only when needed)
/// its class: what the datapath decides depends on the address through these two alone.
pub(super) fn lookup_peer(
    maps: &DesiredMaps,
    endpoint: &EndpointInfo,
    direction: Direction,
    peer_identity: Option<u32>,
    class: impl FnOnce() -> Option<u32>,
    protocol: u8,
    port: u16,
) -> Verdict {
    let (isolated, ranged) = match direction {
        Direction::Ingress => (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES),
        Direction::Egress => (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES),
    };
    if endpoint.flags & isolated == 0 {
        return Verdict::NotIsolated;
    }
    if direction == Direction::Ingress && peer_identity == Some(peer::HOST) {
        return Verdict::FromNode;
    }
    let class = class();
    let dir = direction.as_u8();
    for peer in [peer_identity, class, Some(peer::ANY)].into_iter().flatten() {
        for (protocol, port) in [(protocol, port), (protocol, PORT_ANY), (PROTO_ANY, PORT_ANY)] {
            let key = PolicyKey {
                identity: endpoint.identity,
                peer,
                port,
                protocol,
                direction: dir,
            };
            if let Some(v) = maps.policy.get(&key) {
                return Verdict::Allowed { rule: v.rule };
            }
        }
        if endpoint.flags & ranged != 0 {
            // The range entries are prefixes of the port (aligned blocks, `rules::port_blocks`),
            // so at most one per prefix length holds it: an exact lookup per length, shortest
            // first (the map's order). A walk of every range entry made judging 10k Services
            // for a node's pods take seconds.
            let hit = (0..=16u32).find_map(|bits| {
                let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                let key = RangeKey {
                    prefix_len: PORT_RANGE_FIXED_BITS + bits,
                    key: PortRangeKey {
                        identity: endpoint.identity,
                        peer,
                        direction: dir,
                        protocol,
                        port_be: (port & mask).to_be_bytes(),
                    },
                };
                maps.port_ranges.get(&key)
            });
            if let Some(v) = hit {
                return Verdict::Allowed { rule: v.rule };
            }
        }
    }
    Verdict::Denied
}

/// The peer id of `addr`'s ipBlock class (its longest matching prefix's), if any.
pub(super) fn class_of(maps: &DesiredMaps, addr: &[u8; 16]) -> Option<u32> {
    maps.cidrs
        .iter()
        .filter(|(k, _)| prefix_matches(k, addr))
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, c)| CIDR_CLASS_BASE | c)
}

fn prefix_matches(key: &CidrKey, addr: &[u8; 16]) -> bool {
    let a = u128::from_be_bytes(key.addr);
    let b = u128::from_be_bytes(*addr);
    let mask = if key.prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - key.prefix_len)
    };
    a & mask == b & mask
}
