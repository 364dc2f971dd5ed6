//! Rule emission: one policy rule's peers and ports become allow entries.
use std::collections::{BTreeMap, BTreeSet};

use npc_common::{
    CIDR_CLASS_BASE, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PolicyKey, PolicyValue, PortRangeKey, peer,
};

use super::{
    DesiredMaps,
    cidrs::CidrClasses,
    identities::{IdentityIndex, IdentityKey},
};
use crate::policy::{Direction, IpBlock, NamespaceScope, Peer, Policy, PortSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub prefix_len: u32,
    pub key: PortRangeKey,
}

/// A peer in a policy key: a pod identity, an ipBlock class, or anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PeerId {
    Any,
    Identity(u32),
    Class(u32),
}

impl PeerId {
    pub(super) fn raw(self) -> u32 {
        match self {
            Self::Any => peer::ANY,
            Self::Identity(id) => id,
            Self::Class(c) => CIDR_CLASS_BASE | c,
        }
    }
}

/// A rule's peers, resolved: the peer ids for map keys, and the ipBlocks (which a named egress
/// port needs, to find the pods inside them).
pub(super) struct Peers<'a> {
    pub(super) ids: BTreeSet<PeerId>,
    pub(super) blocks: Vec<&'a IpBlock>,
}

pub(super) fn resolve_peers<'a>(
    policy: &Policy,
    peers: Option<&'a [Peer]>,
    index: &IdentityIndex,
    classes: &CidrClasses,
) -> Peers<'a> {
    let Some(peers) = peers else {
        return Peers {
            ids: [PeerId::Any].into(),
            blocks: Vec::new(),
        };
    };
    let mut out = Peers {
        ids: BTreeSet::new(),
        blocks: Vec::new(),
    };
    for p in peers {
        match p {
            Peer::Pods { namespaces, pods } => {
                let mut add = |(id, key): (u32, &IdentityKey)| {
                    if pods.matches(&key.labels) {
                        out.ids.insert(PeerId::Identity(id));
                    }
                };
                match namespaces {
                    NamespaceScope::Own => index.in_namespace(&policy.id.namespace).for_each(&mut add),
                    NamespaceScope::Selector(sel) => {
                        for (labels, ids) in index.namespaces() {
                            if sel.matches(labels) {
                                ids.iter().for_each(|(id, key)| add((*id, key)));
                            }
                        }
                    }
                }
            }
            Peer::IpBlock(block) => {
                out.ids.extend(classes.classes_of(block).map(PeerId::Class));
                out.blocks.push(block);
            }
        }
    }
    out
}

pub(super) struct Emitted {
    pub(super) ranges: bool,
}

pub(super) fn emit_rule(
    maps: &mut DesiredMaps,
    local: u32,
    direction: Direction,
    peers: &Peers,
    ports: Option<&[PortSpec]>,
    identities: &BTreeMap<u32, IdentityKey>,
    rule: u32,
) -> Emitted {
    let mut emitted = Emitted { ranges: false };
    let value = PolicyValue { rule };
    let dir = direction.as_u8();
    let mut exact = |peer: PeerId, protocol: u8, port: u16| {
        maps.policy
            .entry(PolicyKey {
                identity: local,
                peer: peer.raw(),
                port,
                protocol,
                direction: dir,
            })
            .or_insert(value);
    };
    let Some(ports) = ports else {
        for p in &peers.ids {
            exact(*p, PROTO_ANY, PORT_ANY);
        }
        return emitted;
    };
    for spec in ports {
        match spec {
            PortSpec::Number {
                protocol, port: None, ..
            } => {
                for p in &peers.ids {
                    exact(*p, protocol.number(), PORT_ANY);
                }
            }
            PortSpec::Number {
                protocol,
                port: Some(start),
                end,
            } => {
                let end = end.unwrap_or(*start);
                if end == *start {
                    for p in &peers.ids {
                        exact(*p, protocol.number(), *start);
                    }
                    continue;
                }
                for p in &peers.ids {
                    for (block, bits) in port_blocks(*start, end) {
                        let key = PortRangeKey {
                            identity: local,
                            peer: p.raw(),
                            direction: dir,
                            protocol: protocol.number(),
                            port_be: block.to_be_bytes(),
                        };
                        maps.port_ranges
                            .entry(RangeKey {
                                prefix_len: PORT_RANGE_FIXED_BITS + bits,
                                key,
                            })
                            .or_insert(value);
                        emitted.ranges = true;
                    }
                }
            }
            PortSpec::Named { protocol, name } => match direction {
                // Ingress: the name is looked up on the destination, the local pod.
                Direction::Ingress => {
                    for port in identities[&local].resolve(name, *protocol) {
                        for p in &peers.ids {
                            exact(*p, protocol.number(), port);
                        }
                    }
                }
                // Egress: on the peer, which must then be a pod (only pods declare port names).
                // "Anyone" means every pod that declares the name; an ipBlock means every pod
                // whose address is in the block, which its identity records.
                Direction::Egress => {
                    let mut candidates: BTreeSet<u32> = BTreeSet::new();
                    for p in &peers.ids {
                        match p {
                            PeerId::Identity(id) => {
                                candidates.insert(*id);
                            }
                            PeerId::Any => candidates.extend(identities.keys().copied()),
                            PeerId::Class(_) => {}
                        }
                    }
                    for block in &peers.blocks {
                        candidates.extend(
                            identities
                                .iter()
                                .filter(|(_, k)| k.named_port_blocks.contains(block))
                                .map(|(id, _)| *id),
                        );
                    }
                    for id in candidates {
                        for port in identities[&id].resolve(name, *protocol) {
                            exact(PeerId::Identity(id), protocol.number(), port);
                        }
                    }
                }
            },
        }
    }
    emitted
}

/// Splits the inclusive range [start, end] into aligned power-of-two blocks:
/// (first port of the block, prefix bits of the 16-bit port that are fixed).
pub fn port_blocks(start: u16, end: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        let mut size = 1u32;
        while size < 65536 && lo % (size * 2) == 0 && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}
