//! Stable numbering: identities, ipBlock classes and rule ids keep their numbers from one compile
//! to the next (and across an agent restart, by adopting what the kernel maps hold).
use std::collections::{BTreeMap, BTreeSet};

use npc_common::{CIDR_CLASS_BASE, FIRST_POD_IDENTITY, FIRST_SERVICE_IDENTITY};

use super::{CidrKey, Compiler, IdentityKey, ServiceKey};
use crate::{
    model::{State, addr_from_bytes},
    policy::IpBlock,
};

/// Hands out ids that stay the same for the same key from one compile to the next, so that a
/// change to one pod or policy changes only the map entries that depend on it. Ids are never
/// reused while the compiler lives: an id that meant something else a moment ago could otherwise
/// match a stale entry between two sync steps.
#[derive(Clone, Debug)]
pub(super) struct Allocator<K: Ord> {
    pub(super) ids: BTreeMap<K, u32>,
    pub(super) next: u32,
    pub(super) first: u32,
    pub(super) limit: u32,
}

impl<K: Ord + Clone> Allocator<K> {
    pub(super) fn new(first: u32, limit: u32) -> Self {
        Self {
            ids: BTreeMap::new(),
            next: first,
            first,
            limit,
        }
    }

    /// Keeps only `live` keys (in the order given) and numbers new ones. When the id space runs
    /// out (after billions of churned keys), everything is renumbered from the start: a one-off
    /// full rewrite of the maps, still correct.
    pub(super) fn assign<'a>(&mut self, live: impl IntoIterator<Item = &'a K>) -> &BTreeMap<K, u32>
    where
        K: 'a,
    {
        let live: Vec<&K> = live.into_iter().collect();
        let mut ids = BTreeMap::new();
        let fresh = live.iter().filter(|k| !self.ids.contains_key(*k)).count();
        if u64::from(self.next) + fresh as u64 > u64::from(self.limit) {
            self.ids.clear();
            self.next = self.first;
        }
        for key in live {
            let id = match self.ids.get(key) {
                Some(id) => *id,
                None => {
                    let id = self.next;
                    self.next += 1;
                    id
                }
            };
            ids.insert(key.clone(), id);
        }
        self.ids = ids;
        &self.ids
    }
}

impl Compiler {
    /// Takes over the numbering a previous agent left in the kernel maps (`identities`: address →
    /// identity, `cidrs`: prefix → class), so that a restarted agent's first sync rewrites only
    /// what changed while it was away. Without this, every identity would be renumbered and the
    /// sync would, for a moment, have peers under new numbers next to endpoints under old ones:
    /// new connections between them would be refused until it completed.
    pub fn adopt(&mut self, state: &State, identities: &BTreeMap<[u8; 16], u32>, cidrs: &BTreeMap<CidrKey, u32>) {
        let mut fresh_compiler = Compiler::default();
        let fresh = fresh_compiler.compile(state);
        let mut taken = BTreeSet::new();
        let mut ids: BTreeMap<IdentityKey, u32> = BTreeMap::new();
        for (addr, fresh_id) in &fresh.maps.identities {
            let (Some(key), Some(old)) = (fresh.identities.get(fresh_id), identities.get(addr)) else {
                continue;
            };
            let valid = (FIRST_POD_IDENTITY..FIRST_SERVICE_IDENTITY).contains(old);
            if valid && !ids.contains_key(key) && taken.insert(*old) {
                ids.insert(key.clone(), *old);
            }
        }
        self.identities.next = taken
            .last()
            .map_or(FIRST_POD_IDENTITY, |m| m + 1)
            .max(self.identities.next);
        self.identities.ids = ids;

        // Service identities, by the VIPs that carry them.
        let mut taken = BTreeSet::new();
        let mut services: BTreeMap<ServiceKey, u32> = BTreeMap::new();
        for (addr, fresh_id) in &fresh.maps.identities {
            let (Some(svc), Some(old)) = (fresh.services.get(fresh_id), identities.get(addr)) else {
                continue;
            };
            let key = (svc.clone(), addr_from_bytes(*addr).is_ipv4());
            let valid = (FIRST_SERVICE_IDENTITY..CIDR_CLASS_BASE).contains(old);
            if valid && !services.contains_key(&key) && taken.insert(*old) {
                services.insert(key, *old);
            }
        }
        self.services.next = taken
            .last()
            .map_or(FIRST_SERVICE_IDENTITY, |m| m + 1)
            .max(self.services.next);
        self.services.ids = services;

        let set_of: BTreeMap<u32, &BTreeSet<IpBlock>> =
            fresh_compiler.classes.ids.iter().map(|(set, id)| (*id, set)).collect();
        let mut taken = BTreeSet::new();
        let mut classes: BTreeMap<BTreeSet<IpBlock>, u32> = BTreeMap::new();
        for (prefix, fresh_class) in &fresh.maps.cidrs {
            let (Some(set), Some(old)) = (set_of.get(fresh_class), cidrs.get(prefix)) else {
                continue;
            };
            if !classes.contains_key(*set) && taken.insert(*old) {
                classes.insert((*set).clone(), *old);
            }
        }
        self.classes.next = taken.last().map_or(0, |m| m + 1).max(self.classes.next);
        self.classes.ids = classes;
    }
}
