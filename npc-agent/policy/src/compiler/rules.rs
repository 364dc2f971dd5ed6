//! Rule emission: one policy rule's peers and ports become allow entries.
use std::collections::{BTreeMap, BTreeSet};

use npc_common::{
    CIDR_CLASS_BASE, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PolicyKey, PolicyValue, PortRangeKey, endpoint_flags,
    peer,
};

use super::{
    RuleRef,
    cidrs::CidrClasses,
    identities::{IdentityIndex, IdentityKey},
};
use crate::{
    model::Labels,
    policy::{Direction, IpBlock, NamespaceScope, Peer, Policy, PortSpec, Rule},
};

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
    /// Emit only the entries whose peer is this identity (see [`peers_for`]).
    pub(super) only: Option<u32>,
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
            only: None,
        };
    };
    let mut out = Peers {
        ids: BTreeSet::new(),
        blocks: Vec::new(),
        only: None,
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

/// Where allow entries go: the result's maps (the full compile), or one policy's own
/// ([`super::Incremental`] keeps them per policy). Entries go in with `or_insert` and flags with
/// `|=`, so emitting policies in order into one set is the same as emitting each into its own and
/// merging those in order.
#[derive(Debug)]
pub(super) struct Entries<'a> {
    pub(super) policy: &'a mut BTreeMap<PolicyKey, PolicyValue>,
    pub(super) port_ranges: &'a mut BTreeMap<RangeKey, PolicyValue>,
    pub(super) flags: &'a mut BTreeMap<u32, u32>,
}

/// One policy's isolation flags and allow entries, for the local identities it selects (which it
/// returns: `index` knows which are local).
pub(super) fn emit_policy(
    policy: &Policy,
    index: &IdentityIndex,
    identities: &BTreeMap<u32, IdentityKey>,
    classes: &CidrClasses,
    rule_ids: &BTreeMap<RuleRef, u32>,
    into: &mut Entries,
) -> Vec<u32> {
    let selected: Vec<u32> = index
        .local_in(&policy.id.namespace)
        .filter(|id| policy.pod_selector.matches(&identities[id].labels))
        .collect();
    emit_selected(policy, &selected, identities, rule_ids, into, |rule| {
        resolve_peers(policy, rule.peers.as_deref(), index, classes)
    });
    selected
}

/// `policy`'s flags and entries for the local identities in `selected`, each rule's peers from
/// `peers_of` (all of them, or as far as one identity is concerned: [`peers_for`]).
pub(super) fn emit_selected<'a>(
    policy: &'a Policy,
    selected: &[u32],
    identities: &BTreeMap<u32, IdentityKey>,
    rule_ids: &BTreeMap<RuleRef, u32>,
    into: &mut Entries,
    peers_of: impl Fn(&'a Rule) -> Peers<'a>,
) {
    if selected.is_empty() {
        return;
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        let Some(rules) = policy.rules(direction) else { continue };
        let (isolated, ranged) = match direction {
            Direction::Ingress => (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES),
            Direction::Egress => (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES),
        };
        for id in selected {
            *into.flags.entry(*id).or_default() |= isolated;
        }
        for (i, rule) in rules.iter().enumerate() {
            let rule_id = rule_ids[&RuleRef {
                policy: policy.id.clone(),
                direction,
                index: i,
            }];
            let peers = peers_of(rule);
            for local in selected {
                let emitted = emit_rule(
                    into,
                    *local,
                    direction,
                    &peers,
                    rule.ports.as_deref(),
                    identities,
                    rule_id,
                );
                if emitted.ranges {
                    *into.flags.entry(*local).or_default() |= ranged;
                }
            }
        }
    }
}

/// The range flag of each direction, as [`emit_selected`] sets it: some range entry was made.
pub(super) fn range_flags<'a>(ranges: impl Iterator<Item = &'a RangeKey>) -> u32 {
    ranges.fold(0, |flags, k| {
        flags
            | if k.key.direction == Direction::Ingress.as_u8() {
                endpoint_flags::INGRESS_RANGES
            } else {
                endpoint_flags::EGRESS_RANGES
            }
    })
}

/// Whether a rule of `policy` has an ipBlock peer in `blocks`.
pub(super) fn has_block_in(policy: &Policy, blocks: &BTreeSet<IpBlock>) -> bool {
    [Direction::Ingress, Direction::Egress].into_iter().any(|direction| {
        policy.rules(direction).unwrap_or_default().iter().any(|rule| {
            rule.peers
                .iter()
                .flatten()
                .any(|peer| matches!(peer, Peer::IpBlock(b) if blocks.contains(b)))
        })
    })
}

/// Whether a rule of `policy` selects peers by their namespace's labels.
pub(super) fn has_namespace_selector(policy: &Policy) -> bool {
    [Direction::Ingress, Direction::Egress].into_iter().any(|direction| {
        policy.rules(direction).unwrap_or_default().iter().any(|rule| {
            rule.peers.iter().flatten().any(|peer| {
                matches!(
                    peer,
                    Peer::Pods {
                        namespaces: NamespaceScope::Selector(_),
                        ..
                    }
                )
            })
        })
    })
}

/// A rule's peers as far as one identity is concerned: the entries [`emit_rule`] makes with them
/// are exactly those of the whole rule whose peer is `id` (an identity that came: the entries it
/// adds; one that went: those it takes away). `namespace_labels` are its namespace's labels.
pub(super) fn peers_for<'a>(
    policy: &Policy,
    peers: Option<&'a [Peer]>,
    id: u32,
    key: &IdentityKey,
    namespace_labels: &Labels,
) -> Peers<'a> {
    let mut out = Peers {
        ids: BTreeSet::new(),
        blocks: Vec::new(),
        only: Some(id),
    };
    let Some(peers) = peers else {
        out.ids.insert(PeerId::Any);
        return out;
    };
    for p in peers {
        match p {
            Peer::Pods { namespaces, pods } => {
                let in_scope = match namespaces {
                    NamespaceScope::Own => key.namespace == policy.id.namespace,
                    NamespaceScope::Selector(sel) => sel.matches(namespace_labels),
                };
                if in_scope && pods.matches(&key.labels) {
                    out.ids.insert(PeerId::Identity(id));
                }
            }
            Peer::IpBlock(block) => out.blocks.push(block),
        }
    }
    out
}

pub(super) struct Emitted {
    pub(super) ranges: bool,
}

pub(super) fn emit_rule(
    maps: &mut Entries,
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
    let wanted = |peer: PeerId| peers.only.is_none_or(|only| peer == PeerId::Identity(only));
    let mut exact = |peer: PeerId, protocol: u8, port: u16| {
        if !wanted(peer) {
            return;
        }
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
                for p in peers.ids.iter().filter(|p| wanted(**p)) {
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
                            PeerId::Any => match peers.only {
                                Some(only) => _ = candidates.insert(only),
                                None => candidates.extend(identities.keys().copied()),
                            },
                            PeerId::Class(_) => {}
                        }
                    }
                    for block in &peers.blocks {
                        match peers.only {
                            Some(only) => {
                                if identities[&only].named_port_blocks.contains(block) {
                                    candidates.insert(only);
                                }
                            }
                            None => candidates.extend(
                                identities
                                    .iter()
                                    .filter(|(_, k)| k.named_port_blocks.contains(block))
                                    .map(|(id, _)| *id),
                            ),
                        }
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
