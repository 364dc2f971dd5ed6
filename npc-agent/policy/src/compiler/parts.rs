//! The policy rules' entries kept per policy, for [`super::Incremental`].
//!
//! A node with many local pods holds many entries (100 local identities, each allowed from a
//! few thousand peers, is ~400k), and emitting all of them again because one identity came or
//! went anywhere in the cluster costs about a second. So each policy of the local namespaces keeps
//! its own part (what [`emit_policy`] emits for it alone), a change re-emits only the parts it can
//! change, and the result is recomposed only for the local identities those parts select.
//!
//! Composition is exact: an entry's key starts with the local identity, and only the policies of
//! that identity's namespace select it, so a local identity's entries are the or-insert merge, in
//! policy order, of the parts of its namespace's policies, which is what emitting every policy in
//! order into one map gives (see [`Entries`]).
//!
//! A part is emitted again when any of these changed (what [`emit_policy`] reads):
//! - its policy (or, when the rule or identity numbering was redone, everything);
//! - the classes of one of its ipBlocks;
//! - which of its namespace's identities are local;
//! - any namespace, when it selects peers by namespace labels.
//!
//! An identity that comes or goes as a peer changes only the entries whose peer it is (an
//! identity is a peer id of its own, never reused while the numbering stands): those are added
//! ([`peers_for`]: what each rule emits for that one peer) or removed, in every part and in the
//! result, without emitting anything else again. A peer identity comes with every new pod
//! template (a rollout), so this is the common case.
use std::collections::{BTreeMap, BTreeSet};

use npc_common::{CIDR_CLASS_BASE, FIRST_SERVICE_IDENTITY, PolicyKey, PolicyValue, endpoint_flags};

use super::{
    Compiled, RuleRef,
    cidrs::CidrClasses,
    identities::{ByNamespace, IdentityIndex, IdentityKey, namespace_labels},
    legacy_isolated, policies_in,
    rules::{
        Entries, RangeKey, emit_policy, emit_selected, has_block_in, has_namespace_selector, peers_for, range_flags,
    },
};
use crate::{
    model::{ObjectRef, State, in_namespace},
    policy::IpBlock,
};

/// One policy's entries and flags, for the local identities it selects.
#[derive(Clone, Debug, Default)]
struct Part {
    selected: Vec<u32>,
    policy: BTreeMap<PolicyKey, PolicyValue>,
    port_ranges: BTreeMap<RangeKey, PolicyValue>,
    flags: BTreeMap<u32, u32>,
}

/// What changed since the last [`RuleParts::update`].
#[derive(Debug)]
pub(super) struct Changes<'a> {
    /// Identities or rules were renumbered (or nothing was emitted yet): every part is stale.
    pub(super) all: bool,
    /// Policies set or removed.
    pub(super) policies: &'a BTreeSet<ObjectRef>,
    /// ipBlocks whose classes changed.
    pub(super) blocks: &'a BTreeSet<IpBlock>,
    /// Identities that came (in `out.identities` now), and the ids of those that went.
    pub(super) added: &'a [(u32, IdentityKey)],
    pub(super) removed: &'a [u32],
    /// A namespace was set or removed.
    pub(super) namespaces: bool,
    /// The legacy isolation flag was switched.
    pub(super) legacy: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct RuleParts {
    /// Only policies that select a local identity have one.
    parts: BTreeMap<ObjectRef, Part>,
    /// The local identities' isolation flags, composed (what the endpoints carry).
    flags: BTreeMap<u32, u32>,
    local_ids: BTreeSet<u32>,
    /// The local identities whose port-range entries the last update changed.
    ranges_moved: BTreeSet<u32>,
}

impl RuleParts {
    pub(super) fn flags(&self) -> &BTreeMap<u32, u32> {
        &self.flags
    }

    /// Brings `out`'s policy and port-range entries up to date with `changes`; returns how many
    /// policies' parts were redone (emitted again, or dropped). The Service entries are left as
    /// they are (their peers are Service identities, which no rule entry has).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update(
        &mut self,
        state: &State,
        out: &mut Compiled,
        by_ns: &ByNamespace,
        local_ids: BTreeSet<u32>,
        classes: &CidrClasses,
        rule_ids: &BTreeMap<RuleRef, u32>,
        changes: &Changes,
        touched: &mut Touched,
    ) -> usize {
        let index = IdentityIndex::new(state, &out.identities, by_ns, &local_ids);
        let mut stale: BTreeSet<ObjectRef> = BTreeSet::new();
        let mut affected: BTreeSet<u32> = BTreeSet::new();
        if changes.all {
            *touched = None;
            self.parts.clear();
            out.maps.policy.clear();
            out.maps.port_ranges.clear();
            self.flags.clear();
            stale.extend(
                index
                    .local_namespaces()
                    .flat_map(|ns| policies_in(state, ns))
                    .map(|p| p.id.clone()),
            );
            affected.extend(&local_ids);
        } else {
            stale.extend(changes.policies.iter().cloned());
            // Local identities that came or went: the policies that selected them (so that their
            // parts drop its entries), and those of its namespace that may select it now.
            for id in self.local_ids.symmetric_difference(&local_ids) {
                affected.insert(*id);
                stale.extend(
                    self.parts
                        .iter()
                        .filter(|(_, p)| p.selected.contains(id))
                        .map(|(k, _)| k.clone()),
                );
                if let Some(key) = out.identities.get(id) {
                    stale.extend(policies_in(state, &key.namespace).map(|p| p.id.clone()));
                }
            }
            for name in self.parts.keys() {
                let Some(policy) = state.policies.get(name) else {
                    continue;
                };
                let moved = (!changes.blocks.is_empty() && has_block_in(policy, changes.blocks))
                    || (changes.namespaces && has_namespace_selector(policy));
                if moved {
                    stale.insert(name.clone());
                }
            }
            affected.extend(self.patch_peers(state, out, &stale, rule_ids, changes, touched));
        }

        let emitted = stale.len();
        for name in stale {
            if let Some(old) = self.parts.remove(&name) {
                affected.extend(old.selected);
            }
            let Some(policy) = state.policies.get(&name) else {
                continue;
            };
            let mut part = Part::default();
            part.selected = emit_policy(policy, &index, &out.identities, classes, rule_ids, &mut part.entries());
            if !part.selected.is_empty() {
                affected.extend(&part.selected);
                self.parts.insert(name, part);
            }
        }
        self.local_ids = local_ids;

        // Recompose the affected identities' entries, and the flags (every local identity's when
        // what the legacy isolation reads changed). Only the keys whose entry differs afterwards
        // are noted: the Service judgements (`services.rs`) judge again what those keys can
        // change, and a recomposed identity's entries are mostly what they were.
        self.ranges_moved.clear();
        let old_ranges: Vec<(RangeKey, PolicyValue)> = if affected.is_empty() {
            Vec::new()
        } else {
            let old = out
                .maps
                .port_ranges
                .iter()
                .filter(|(k, _)| affected.contains(&k.key.identity))
                .map(|(k, v)| (*k, *v))
                .collect();
            out.maps.port_ranges.retain(|k, _| !affected.contains(&k.key.identity));
            old
        };
        for id in &affected {
            let old: Vec<(PolicyKey, PolicyValue)> = rule_ranges(*id)
                .into_iter()
                .flat_map(|range| remove_entries(&mut out.maps.policy, range))
                .collect();
            if self.local_ids.contains(id) {
                for part in self.parts_selecting(&out.identities[id].namespace, *id) {
                    for range in rule_ranges(*id) {
                        for (k, v) in part.policy.range(range) {
                            out.maps.policy.entry(*k).or_insert(*v);
                        }
                    }
                    for (k, v) in part.port_ranges.iter().filter(|(k, _)| k.key.identity == *id) {
                        out.maps.port_ranges.entry(*k).or_insert(*v);
                    }
                }
            }
            if let Some(t) = touched {
                t.extend(
                    old.iter()
                        .filter(|(k, v)| out.maps.policy.get(k) != Some(v))
                        .map(|(k, _)| *k),
                );
                for range in rule_ranges(*id) {
                    t.extend(
                        out.maps
                            .policy
                            .range(range)
                            .filter(|(k, v)| old.binary_search_by_key(*k, |(o, _)| *o).map(|i| old[i].1) != Ok(**v))
                            .map(|(k, _)| *k),
                    );
                }
            }
        }
        for (k, v) in &old_ranges {
            if out.maps.port_ranges.get(k) != Some(v) {
                self.ranges_moved.insert(k.key.identity);
            }
        }
        for (k, v) in &out.maps.port_ranges {
            if affected.contains(&k.key.identity)
                && old_ranges.binary_search_by_key(k, |(o, _)| *o).map(|i| old_ranges[i].1) != Ok(*v)
            {
                self.ranges_moved.insert(k.key.identity);
            }
        }
        let reflag: Vec<u32> = if changes.all || changes.namespaces || changes.legacy {
            self.flags.clear();
            self.local_ids.iter().copied().collect()
        } else {
            affected.into_iter().collect()
        };
        for id in reflag {
            self.flags.remove(&id);
            let Some(key) = out.identities.get(&id).filter(|_| self.local_ids.contains(&id)) else {
                continue;
            };
            let mut flags = if legacy_isolated(state, &key.namespace) {
                endpoint_flags::INGRESS_ISOLATED
            } else {
                0
            };
            for part in self.parts_selecting(&key.namespace, id) {
                flags |= part.flags.get(&id).copied().unwrap_or(0);
            }
            if flags != 0 {
                self.flags.insert(id, flags);
            }
        }
        emitted
    }

    /// Removes the entries of the peers that went and adds those of the peers that came, in
    /// every part but the `stale` ones (emitted again whole) and in the result; returns the local
    /// identities to recompose: those whose range entries changed (and so maybe their range
    /// flags). Range entries with pod peers are rare (an endPort rule), so this is too.
    fn patch_peers(
        &mut self,
        state: &State,
        out: &mut Compiled,
        stale: &BTreeSet<ObjectRef>,
        rule_ids: &BTreeMap<RuleRef, u32>,
        changes: &Changes,
        touched: &mut Touched,
    ) -> BTreeSet<u32> {
        let mut recompose = BTreeSet::new();
        if !changes.removed.is_empty() {
            let gone: BTreeSet<u32> = changes.removed.iter().copied().collect();
            for (name, part) in &mut self.parts {
                if stale.contains(name) {
                    continue;
                }
                for local in &part.selected {
                    for peer in &gone {
                        remove_range(&mut part.policy, peer_range(*local, *peer));
                    }
                }
                let before = part.port_ranges.len();
                part.port_ranges.retain(|k, _| !gone.contains(&k.key.peer));
                if part.port_ranges.len() != before {
                    part.reflag_ranges();
                    recompose.extend(&part.selected);
                }
            }
            for local in &self.local_ids {
                for peer in &gone {
                    note(touched, remove_range(&mut out.maps.policy, peer_range(*local, *peer)));
                }
            }
        }
        for (id, key) in changes.added {
            let labels = namespace_labels(state, &key.namespace);
            // In policy order, so that a key two policies make keeps the first one's rule, as
            // when every policy is emitted in order.
            for (name, part) in &mut self.parts {
                if stale.contains(name) {
                    continue;
                }
                let Some(policy) = state.policies.get(name) else {
                    continue;
                };
                let mut add = Part::default();
                emit_selected(
                    policy,
                    &part.selected,
                    &out.identities,
                    rule_ids,
                    &mut add.entries(),
                    |rule| peers_for(policy, rule.peers.as_deref(), *id, key, &labels),
                );
                for (k, v) in add.policy {
                    part.policy.insert(k, v);
                    out.maps.policy.entry(k).or_insert(v);
                    note(touched, [k]);
                }
                if !add.port_ranges.is_empty() {
                    part.port_ranges.extend(add.port_ranges);
                    part.reflag_ranges();
                    recompose.extend(&part.selected);
                }
            }
        }
        recompose
    }

    /// The local identities whose port-range entries the last [`Self::update`] changed.
    pub(super) fn ranges_moved(&self) -> &BTreeSet<u32> {
        &self.ranges_moved
    }

    /// The parts of `namespace`'s policies that select `id`, in policy order.
    fn parts_selecting<'a>(&'a self, namespace: &'a str, id: u32) -> impl Iterator<Item = &'a Part> + 'a {
        in_namespace(&self.parts, namespace)
            .map(|(_, p)| p)
            .filter(move |p| p.selected.contains(&id))
    }
}

/// The policy keys of local identity `local` with peer `peer` (the first to the last).
fn peer_range(local: u32, peer: u32) -> std::ops::RangeInclusive<PolicyKey> {
    let first = PolicyKey {
        identity: local,
        peer,
        port: 0,
        protocol: 0,
        direction: 0,
    };
    first..=PolicyKey {
        port: u16::MAX,
        protocol: u8::MAX,
        direction: u8::MAX,
        ..first
    }
}

/// The keys of `maps.policy` a compile may have changed (None: any), for MapSync.
pub(super) type Touched = Option<BTreeSet<PolicyKey>>;

pub(super) fn note(touched: &mut Touched, keys: impl IntoIterator<Item = PolicyKey>) {
    if let Some(t) = touched {
        t.extend(keys);
    }
}

/// Every policy key of local identity `local` but its Service entries (a Service identity's peer
/// range, which `services.rs` keeps): what the policy rules make.
fn rule_ranges(local: u32) -> [std::ops::RangeInclusive<PolicyKey>; 2] {
    let below = PolicyKey {
        peer: FIRST_SERVICE_IDENTITY - 1,
        ..*peer_range(local, 0).end()
    };
    [
        *peer_range(local, 0).start()..=below,
        *peer_range(local, CIDR_CLASS_BASE).start()..=*peer_range(local, u32::MAX).end(),
    ]
}

/// Removes `range`'s keys from `map`, and returns them.
fn remove_range<V: Copy>(
    map: &mut BTreeMap<PolicyKey, V>,
    range: impl std::ops::RangeBounds<PolicyKey>,
) -> Vec<PolicyKey> {
    remove_entries(map, range).into_iter().map(|(k, _)| k).collect()
}

/// Removes `range`'s entries from `map`, and returns them (in key order).
fn remove_entries<V: Copy>(
    map: &mut BTreeMap<PolicyKey, V>,
    range: impl std::ops::RangeBounds<PolicyKey>,
) -> Vec<(PolicyKey, V)> {
    let gone: Vec<(PolicyKey, V)> = map.range(range).map(|(k, v)| (*k, *v)).collect();
    for (key, _) in &gone {
        map.remove(key);
    }
    gone
}

impl Part {
    fn entries(&mut self) -> Entries<'_> {
        Entries {
            policy: &mut self.policy,
            port_ranges: &mut self.port_ranges,
            flags: &mut self.flags,
        }
    }

    /// Sets the range flags from the range entries the part holds now.
    fn reflag_ranges(&mut self) {
        let ranges = endpoint_flags::INGRESS_RANGES | endpoint_flags::EGRESS_RANGES;
        for local in &self.selected {
            let now = range_flags(self.port_ranges.keys().filter(|k| k.key.identity == *local));
            if let Some(flags) = self.flags.get_mut(local) {
                *flags = (*flags & !ranges) | now;
            }
        }
    }
}
