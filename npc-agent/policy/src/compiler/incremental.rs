//! Incremental compilation: a change costs what it can change, not what the cluster holds.
//!
//! A full compile walks every pod of the cluster (its identity key per address, the owner of each
//! address, the peer map `identities`) before it gets to the few local pods whose entries it
//! emits. At 100k pods that walk is the whole cost of every event. [`Incremental`] keeps the
//! walk's results and redoes them only for the pods that changed:
//!
//! - per pod: its identity keys (per address) and its claim on each address;
//! - per identity key: how many pods hold it, so a key is numbered when its first pod comes and
//!   freed when its last one goes, in the order the full compile would number it (new keys in
//!   key order), so that numbering, and so every map entry, is exactly the full compile's;
//! - per address: the pods claiming it, so its owner (the newest) is known without a walk.
//!
//! The allow entries and isolation flags are kept per policy (`parts.rs`): a policy edit, a
//! moved ipBlock class, a namespace change or a local identity coming or going emits the
//! policies it can change again (by the code the full compile runs, `rules::emit_policy`), and a
//! peer identity coming or going adds or removes the entries whose peer it is. When a policy
//! changes, the ipBlock classes are rebuilt and only that policy's rules are renumbered (freed,
//! or given the next ids in policy order, as a renumbering of every rule would); when the
//! named-port ipBlocks change (every pod's key may), or the node's name, or the id space runs
//! out, everything is recomputed. The Service entries are kept per Service and local identity,
//! and judged again when what the judgement reads changed ([`services::Judgements`]); the VIPs'
//! identities, the endpoints and the drop labels are emitted again on every compile: they depend
//! on the Services and the node's pods only.
//!
//! The full compile stays the reference: the property test below replays random event sequences
//! and asserts, after every step, that the result is *equal* to a full compile with the same
//! numbering history.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use npc_common::{PolicyKey, peer};

use super::{
    Compiled, Compiler, IdentityKey, RuleRef,
    cidrs::CidrClasses,
    identities::{ByNamespace, named_port_egress_blocks},
    parts::{Changes, RuleParts},
    pod_key_list, policy_rule_refs, rule_refs, rule_table,
    services::{self, Judgements, ServiceChanges},
};
use crate::{
    model::{Namespace, ObjectRef, Pod, State, addr_bytes},
    policy::{IpBlock, Policy},
    service::{Backend, Service},
};

/// What the last [`Incremental::compile`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Every pod was recomputed (the first compile, or something that changes every pod's key).
    pub full: bool,
    /// Pods whose identities and addresses were recomputed.
    pub pods: usize,
    /// Policies whose entries were emitted again (the others' were kept from the compile
    /// before).
    pub rules: usize,
    /// Service judgements made again: (Service and VIP family, egress-isolated local identity)
    /// pairs (the others were kept).
    pub services: usize,
    pub elapsed: Duration,
}

/// One pod's part of the identities: its key per address (shared with every pod of the same
/// identity: a key holds the pod's labels, ~1 KB, and most pods share theirs with their replicas).
#[derive(Clone, Debug)]
struct PodPart {
    keys: Vec<(Option<IpAddr>, Arc<IdentityKey>)>,
}

#[derive(Clone, Debug, Default)]
pub struct Incremental {
    compiler: Compiler,
    state: State,
    out: Compiled,
    /// The caches below match `state` (except for the pods in `dirty`).
    built: bool,
    dirty: BTreeSet<ObjectRef>,
    policies_changed: bool,
    named_port_blocks: BTreeSet<IpBlock>,
    pods: BTreeMap<ObjectRef, PodPart>,
    key_pods: BTreeMap<Arc<IdentityKey>, usize>,
    claims: BTreeMap<IpAddr, Vec<(i64, ObjectRef)>>,
    local: BTreeSet<ObjectRef>,
    /// Addresses whose `identities` entry may be the node's or a Service VIP's rather than a pod's:
    /// put back to the pod owner's (or removed) before the next compile sets them again.
    overlay: BTreeSet<IpAddr>,
    classes: Option<CidrClasses>,
    /// Identity ids by namespace (what rule emission looks peers up in), kept with `out.identities`.
    by_namespace: ByNamespace,
    /// Policies set or removed since the last compile: only their rules are renumbered.
    changed_policies: BTreeSet<ObjectRef>,
    /// The rule numbering (`compiler.rules`, `out.rules`) matches the policies in `state` but
    /// `changed_policies`; false before the first compile and after a `replace`.
    rules_numbered: bool,
    stats: CompileStats,
    /// Addresses whose owner the last compile may have changed (None: it recomputed them all).
    changed_owners: Option<Vec<IpAddr>>,
    /// Keys of `maps.identities` the last compile may have changed (None: any).
    changed_identities: Option<BTreeSet<[u8; 16]>>,
    /// Keys of `maps.policy` the last compile may have changed (None: any).
    changed_policy: Option<BTreeSet<PolicyKey>>,
    /// The policy rules' entries, kept per policy. Pod churn within existing identities (a
    /// rollout, a restart, a new address) leaves them as they were; what else changed is below.
    parts: RuleParts,
    /// Every part must be emitted again: identities or rules were renumbered.
    rules_reset: bool,
    namespaces_changed: bool,
    legacy_changed: bool,
    /// Identities that came since the last compile, and the ids of those that went.
    added_keys: Vec<(u32, IdentityKey)>,
    removed_ids: Vec<u32>,
    /// The Service entries, kept per Service and local identity.
    judgements: Judgements,
    /// Services set or removed, or whose endpoints changed, since the last compile.
    changed_services: BTreeSet<ObjectRef>,
    node_addrs_changed: bool,
}

impl Incremental {
    /// Starts from `compiler`'s numbering (a fresh one, or one adopted from the kernel maps).
    pub fn new(compiler: Compiler) -> Self {
        Self {
            compiler,
            ..Self::default()
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The last compile's result (empty before the first).
    pub fn compiled(&self) -> &Compiled {
        &self.out
    }

    pub fn stats(&self) -> CompileStats {
        self.stats
    }

    /// The addresses whose entry in [`Compiled::address_owners`] the last compile may have
    /// changed; None when it recomputed every one. Lets a reader keep a copy up to date without
    /// copying every address of the cluster on each compile.
    pub fn changed_owners(&self) -> Option<&[IpAddr]> {
        self.changed_owners.as_deref()
    }

    /// The keys of [`super::DesiredMaps::identities`] whose entry the last compile may have
    /// changed (added, removed or renumbered); None when any may have. MapSync diffs only these
    /// instead of the whole map (one entry per pod of the cluster).
    pub fn changed_identities(&self) -> Option<&BTreeSet<[u8; 16]>> {
        self.changed_identities.as_ref()
    }

    /// The keys of [`super::DesiredMaps::policy`] whose entry the last compile may have changed
    /// (None: any): MapSync diffs only these instead of every allow entry of the node.
    pub fn changed_policy(&self) -> Option<&BTreeSet<PolicyKey>> {
        self.changed_policy.as_ref()
    }

    /// Takes over a previous agent's numbering for the current state (see [`Compiler::adopt`]);
    /// the next compile is a full one.
    pub fn adopt(&mut self, identities: &BTreeMap<[u8; 16], u32>, cidrs: &BTreeMap<super::CidrKey, u32>) {
        self.compiler.adopt(&self.state, identities, cidrs);
        self.built = false;
        self.rules_reset = true;
        self.classes = None;
    }

    pub fn set_pod(&mut self, pod: Pod) {
        upsert(&mut self.state.pods, pod.object_ref(), pod, &mut self.dirty);
    }

    pub fn remove_pod(&mut self, pod: &ObjectRef) {
        remove(&mut self.state.pods, pod, &mut self.dirty);
    }

    pub fn set_policy(&mut self, policy: Policy) {
        if self.state.policies.get(&policy.id) != Some(&policy) {
            self.changed_policies.insert(policy.id.clone());
            self.state.policies.insert(policy.id.clone(), policy);
            self.policies_changed = true;
        }
    }

    pub fn remove_policy(&mut self, policy: &ObjectRef) {
        if self.state.policies.remove(policy).is_some() {
            self.changed_policies.insert(policy.clone());
            self.policies_changed = true;
        }
    }

    pub fn set_namespace(&mut self, ns: Namespace) {
        if self.state.namespaces.get(&ns.name) != Some(&ns) {
            self.state.namespaces.insert(ns.name.clone(), ns);
            self.namespaces_changed = true;
        }
    }

    pub fn remove_namespace(&mut self, name: &str) {
        if self.state.namespaces.remove(name).is_some() {
            self.namespaces_changed = true;
        }
    }

    pub fn set_service(&mut self, svc: Service) {
        upsert(
            &mut self.state.services,
            svc.object_ref(),
            svc,
            &mut self.changed_services,
        );
    }

    pub fn remove_service(&mut self, svc: &ObjectRef) {
        remove(&mut self.state.services, svc, &mut self.changed_services);
    }

    /// A Service's endpoints from its EndpointSlices (`None`: it has none, and gets them from its
    /// selector).
    pub fn set_backends(&mut self, svc: ObjectRef, backends: Option<Vec<Backend>>) {
        if self.state.service_backends.get(&svc) == backends.as_ref() {
            return;
        }
        match backends {
            Some(b) => self.state.service_backends.insert(svc.clone(), b),
            None => self.state.service_backends.remove(&svc),
        };
        self.changed_services.insert(svc);
    }

    /// The node this agent compiles for: which pods are local, its addresses, the legacy flag.
    pub fn set_node(&mut self, node_name: Option<String>, node_addrs: Vec<IpAddr>, legacy_default_deny: bool) {
        if self.state.node_name != node_name {
            self.state.node_name = node_name;
            self.built = false;
        }
        if self.state.node_addrs != node_addrs {
            self.state.node_addrs = node_addrs;
            self.node_addrs_changed = true;
        }
        if self.state.legacy_default_deny != legacy_default_deny {
            self.state.legacy_default_deny = legacy_default_deny;
            self.legacy_changed = true;
        }
    }

    /// Replaces the whole state, marking what differs (for sources that only know snapshots).
    pub fn replace(&mut self, state: State) {
        let State {
            namespaces,
            pods,
            policies,
            services,
            service_backends,
            node_addrs,
            node_name,
            legacy_default_deny,
        } = state;
        self.set_node(node_name, node_addrs, legacy_default_deny);
        for pod in &gone_keys(&self.state.pods, &pods) {
            self.remove_pod(pod);
        }
        for pod in pods.into_values() {
            self.set_pod(pod);
        }
        if self.state.policies != policies {
            self.state.policies = policies;
            self.policies_changed = true;
            self.rules_numbered = false;
        }
        if self.state.namespaces != namespaces {
            self.state.namespaces = namespaces;
            self.namespaces_changed = true;
        }
        for svc in &gone_keys(&self.state.services, &services) {
            self.remove_service(svc);
        }
        for svc in services.into_values() {
            self.set_service(svc);
        }
        for svc in gone_keys(&self.state.service_backends, &service_backends) {
            self.set_backends(svc, None);
        }
        for (svc, backends) in service_backends {
            self.set_backends(svc, Some(backends));
        }
    }

    /// Brings the result up to date with every change since the last compile.
    pub fn compile(&mut self) -> &Compiled {
        let start = std::time::Instant::now();
        if self.policies_changed {
            let blocks = named_port_egress_blocks(&self.state);
            if blocks != self.named_port_blocks {
                self.named_port_blocks = blocks;
                self.built = false;
            }
        }
        let was_local = self.dirty.iter().any(|p| self.local.contains(p));
        let policies_changed = self.policies_changed;
        // Not incremental on the first compile, or when the id space would run out.
        let incremental = self.built && self.update_pods();
        let local_changed = was_local || self.dirty.iter().any(|p| self.local.contains(p));
        // A Service without EndpointSlices picks its backends from its namespace's pods.
        let pod_namespaces: BTreeSet<String> = self.dirty.iter().map(|p| p.namespace.clone()).collect();
        let pods = if incremental {
            self.dirty.len()
        } else {
            self.changed_owners = None;
            self.rebuild_pods()
        };
        self.dirty.clear();
        self.stats = CompileStats {
            full: !incremental,
            pods,
            rules: 0,
            services: 0,
            elapsed: Duration::ZERO,
        };
        self.built = true;

        // The entries this compile may change: the pods' addresses whose owner may have changed,
        // and the overlay before and after (the only other writers of `maps.identities`).
        let mut touched: Option<BTreeSet<[u8; 16]>> =
            incremental.then(|| self.changed_owners.iter().flatten().map(|ip| addr_bytes(*ip)).collect());

        // The node's addresses and the VIPs, over the pods' entries (as the full compile orders
        // them): set again when one of them, or a pod's claim on one, changed.
        let overlay_stale = !incremental
            || self.node_addrs_changed
            || !self.changed_services.is_empty()
            || self.changed_owners.iter().flatten().any(|ip| self.overlay.contains(ip));
        if overlay_stale {
            for ip in std::mem::take(&mut self.overlay) {
                self.settle_address(ip);
                touched.iter_mut().for_each(|t| _ = t.insert(addr_bytes(ip)));
            }
            for ip in &self.state.node_addrs {
                self.out.maps.identities.insert(addr_bytes(*ip), peer::HOST);
                self.overlay.insert(*ip);
            }
            self.overlay
                .extend(self.state.services.values().flat_map(|s| s.vips.iter().copied()));
            if let Some(t) = &mut touched {
                t.extend(self.overlay.iter().map(|ip| addr_bytes(*ip)));
            }
        }
        self.node_addrs_changed = false;
        self.changed_identities = touched;

        let mut moved_blocks = BTreeSet::new();
        let mut classes_moved = false;
        if self.policies_changed || self.classes.is_none() {
            let classes = CidrClasses::build(self.state.policies.values(), &mut self.compiler.classes);
            match &self.classes {
                Some(old) => moved_blocks = old.moved_blocks(&classes),
                None => self.rules_reset = true,
            }
            classes_moved = self.out.maps.cidrs != classes.lpm;
            self.out.maps.cidrs = classes.lpm.clone();
            self.classes = Some(classes);
            if self.number_rules() {
                self.rules_reset = true;
            }
            self.policies_changed = false;
        }
        let local_ids: BTreeSet<u32> = self
            .local
            .iter()
            .flat_map(|pod| &self.pods[pod].keys)
            .map(|(_, key)| self.compiler.identities.ids[&**key])
            .collect();
        let out = &mut self.out;
        let mut touched = Some(BTreeSet::new());
        let changes = Changes {
            all: self.rules_reset,
            policies: &self.changed_policies,
            blocks: &moved_blocks,
            added: &self.added_keys,
            removed: &self.removed_ids,
            namespaces: self.namespaces_changed,
            legacy: self.legacy_changed,
        };
        self.stats.rules = self.parts.update(
            &self.state,
            out,
            &self.by_namespace,
            local_ids,
            self.classes.as_ref().expect("built above"),
            &self.compiler.rules.ids,
            &changes,
            &mut touched,
        );
        self.rules_reset = false;
        self.namespaces_changed = false;
        self.legacy_changed = false;
        self.added_keys.clear();
        self.removed_ids.clear();
        self.changed_policies.clear();
        out.maps.endpoints.clear();
        out.maps.sources.clear();
        // The Service numbering and the VIPs' entries change only with the Services (and the
        // overlay's other owners): 10k Services cost ~30 ms a compile to redo.
        let numbered = !self.changed_services.is_empty() || self.compiler.services.ids.is_empty();
        let service_ids = if numbered {
            self.compiler.number_services(&self.state)
        } else {
            &self.compiler.services.ids
        };
        if overlay_stale {
            out.services.clear();
            out.vip_owners.clear();
            services::emit_vips(&self.state, out, service_ids);
        }
        let service_changes = ServiceChanges {
            all: classes_moved,
            services: &self.changed_services,
            pod_namespaces: &pod_namespaces,
            identities: self.changed_identities.as_ref(),
            ranges: self.parts.ranges_moved(),
        };
        self.stats.services = self.judgements.update(
            &self.state,
            out,
            service_ids,
            self.parts.flags(),
            &service_changes,
            &mut touched,
        );
        Compiler::emit_endpoints(&self.state, out, &self.local, self.parts.flags());
        if !incremental || policies_changed || local_changed || !self.changed_services.is_empty() {
            let local = self.local.iter().filter_map(|name| self.state.pods.get(name));
            out.maps.port_labels = super::port_labels(&self.state, local);
        }
        self.changed_services.clear();
        self.changed_policy = touched;
        self.stats.elapsed = start.elapsed();
        &self.out
    }

    /// Recomputes every pod's part from scratch (what a full compile does).
    fn rebuild_pods(&mut self) -> usize {
        self.rules_reset = true;
        self.pods.clear();
        self.key_pods.clear();
        self.claims.clear();
        self.local.clear();
        self.overlay.clear();
        let out = &mut self.out;
        out.identities.clear();
        out.pod_identity.clear();
        out.address_owners.clear();
        out.maps.identities.clear();
        for pod in super::policy_pods(&self.state) {
            let part = claim(
                pod,
                &self.named_port_blocks,
                self.state.is_local(pod),
                &mut self.key_pods,
                &mut self.claims,
                &mut self.local,
            );
            self.pods.insert(pod.object_ref(), part);
        }
        let ids = self.compiler.identities.assign(self.key_pods.keys().map(|k| &**k));
        self.out.identities = ids.iter().map(|(key, id)| (*id, key.clone())).collect();
        self.by_namespace.clear();
        for key in self.key_pods.keys() {
            let id = ids[&**key];
            self.by_namespace
                .entry(key.namespace.clone())
                .or_default()
                .insert(id, key.clone());
        }
        for (pod, part) in &self.pods {
            self.out.pod_identity.insert(pod.clone(), ids[&*part.keys[0].1]);
        }
        let addrs: Vec<IpAddr> = self.claims.keys().copied().collect();
        for ip in addrs {
            self.settle_address(ip);
        }
        self.pods.len()
    }

    /// Recomputes the dirty pods' parts. False when the id space would run out (the caller
    /// rebuilds, renumbering from the start as the full compile does).
    fn update_pods(&mut self) -> bool {
        let mut keys: BTreeSet<IdentityKey> = BTreeSet::new();
        let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
        let dirty = std::mem::take(&mut self.dirty);
        for name in &dirty {
            if let Some(old) = self.pods.remove(name) {
                for (ip, key) in old.keys {
                    if let Some(n) = self.key_pods.get_mut(&*key) {
                        *n -= 1;
                        if *n == 0 {
                            self.key_pods.remove(&*key);
                        }
                    }
                    if let Some(ip) = ip {
                        if let Some(list) = self.claims.get_mut(&ip) {
                            list.retain(|(_, p)| p != name);
                        }
                        addrs.insert(ip);
                    }
                    keys.insert((*key).clone());
                }
                self.local.remove(name);
                self.out.pod_identity.remove(name);
            }
            let Some(pod) = self.state.pods.get(name).filter(|p| !p.terminated && !p.host_network) else {
                continue;
            };
            let part = claim(
                pod,
                &self.named_port_blocks,
                self.state.is_local(pod),
                &mut self.key_pods,
                &mut self.claims,
                &mut self.local,
            );
            keys.extend(part.keys.iter().map(|(_, k)| (**k).clone()));
            addrs.extend(part.keys.iter().filter_map(|(ip, _)| *ip));
            self.pods.insert(name.clone(), part);
        }
        self.dirty = dirty;

        // Number new keys and free dead ones as `Allocator::assign` over every live key would.
        let alloc = &mut self.compiler.identities;
        let fresh = keys
            .iter()
            .filter(|k| self.key_pods.contains_key(*k) && !alloc.ids.contains_key(*k))
            .count();
        if u64::from(alloc.next) + fresh as u64 > u64::from(alloc.limit) {
            return false;
        }
        for key in keys {
            match (self.key_pods.contains_key(&key), alloc.ids.get(&key).copied()) {
                (true, None) => {
                    let id = alloc.next;
                    alloc.next += 1;
                    alloc.ids.insert(key.clone(), id);
                    let (shared, _) = self.key_pods.get_key_value(&key).expect("live keys are counted");
                    let shared = shared.clone();
                    self.by_namespace
                        .entry(key.namespace.clone())
                        .or_default()
                        .insert(id, shared);
                    self.added_keys.push((id, key.clone()));
                    self.out.identities.insert(id, key);
                }
                (false, Some(id)) => {
                    alloc.ids.remove(&key);
                    if let Some(ids) = self.by_namespace.get_mut(&key.namespace) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.by_namespace.remove(&key.namespace);
                        }
                    }
                    self.out.identities.remove(&id);
                    self.removed_ids.push(id);
                }
                _ => {}
            }
        }
        for name in &self.dirty {
            if let Some(part) = self.pods.get(name) {
                self.out.pod_identity.insert(name.clone(), alloc.ids[&part.keys[0].1]);
            }
        }
        for ip in &addrs {
            self.settle_address(*ip);
        }
        self.changed_owners = Some(addrs.into_iter().collect());
        true
    }

    /// Numbers the changed policies' rules as `Allocator::assign` over every rule would: the
    /// rules that are gone are freed, new ones get the next ids in policy order (the changed
    /// policies are a subset of `state.policies`, in its order). Everything is renumbered before
    /// the first compile, after a `replace`, and when the id space would run out.
    fn number_rules(&mut self) -> bool {
        let changed = &self.changed_policies;
        let alloc = &mut self.compiler.rules;
        if self.rules_numbered {
            let mut fresh: Vec<RuleRef> = Vec::new();
            for id in changed {
                let live: Vec<RuleRef> = self
                    .state
                    .policies
                    .get(id)
                    .into_iter()
                    .flat_map(policy_rule_refs)
                    .collect();
                let first = RuleRef {
                    policy: id.clone(),
                    direction: crate::policy::Direction::Ingress,
                    index: 0,
                };
                let dead: Vec<RuleRef> = alloc
                    .ids
                    .range(first..)
                    .take_while(|(r, _)| r.policy == *id)
                    .filter(|(r, _)| !live.contains(r))
                    .map(|(r, _)| r.clone())
                    .collect();
                for rule in dead {
                    if let Some(n) = alloc.ids.remove(&rule) {
                        self.out.rules.remove(&n);
                    }
                }
                fresh.extend(live.into_iter().filter(|r| !alloc.ids.contains_key(r)));
            }
            if u64::from(alloc.next) + fresh.len() as u64 <= u64::from(alloc.limit) {
                for rule in fresh {
                    let n = alloc.next;
                    alloc.next += 1;
                    alloc.ids.insert(rule.clone(), n);
                    self.out.rules.insert(n, rule);
                }
                return false;
            }
        }
        let ids = alloc.assign(&rule_refs(&self.state));
        self.out.rules = rule_table(ids);
        self.rules_numbered = true;
        true
    }

    /// Sets `ip`'s owner and identity entry from the pods claiming it (the newest wins, as in
    /// [`super::address_owners`]), or removes them when no pod does.
    fn settle_address(&mut self, ip: IpAddr) {
        let owner = self
            .claims
            .get(&ip)
            .and_then(|list| list.iter().max())
            .map(|(_, pod)| pod.clone());
        match owner {
            Some(pod) => {
                let key = self.pods[&pod]
                    .keys
                    .iter()
                    .find(|(a, _)| *a == Some(ip))
                    .map(|(_, k)| k)
                    .expect("a claim comes from one of the pod's addresses");
                let id = self.compiler.identities.ids[&**key];
                self.out.maps.identities.insert(addr_bytes(ip), id);
                self.out.address_owners.insert(ip, pod);
            }
            None => {
                self.claims.remove(&ip);
                self.out.maps.identities.remove(&addr_bytes(ip));
                self.out.address_owners.remove(&ip);
            }
        }
    }
}

/// Sets `key` to `value`, noting it in `changed` when that changes anything.
fn upsert<V: PartialEq>(map: &mut BTreeMap<ObjectRef, V>, key: ObjectRef, value: V, changed: &mut BTreeSet<ObjectRef>) {
    if map.get(&key) != Some(&value) {
        map.insert(key.clone(), value);
        changed.insert(key);
    }
}

/// Removes `key`, noting it in `changed` when it was there.
fn remove<V>(map: &mut BTreeMap<ObjectRef, V>, key: &ObjectRef, changed: &mut BTreeSet<ObjectRef>) {
    if map.remove(key).is_some() {
        changed.insert(key.clone());
    }
}

/// The keys of `old` that `new` does not have.
fn gone_keys<V, W>(old: &BTreeMap<ObjectRef, V>, new: &BTreeMap<ObjectRef, W>) -> Vec<ObjectRef> {
    old.keys().filter(|k| !new.contains_key(*k)).cloned().collect()
}

/// Computes `pod`'s part, counting its keys and its claims on its addresses.
fn claim(
    pod: &Pod,
    named_port_blocks: &BTreeSet<IpBlock>,
    is_local: bool,
    key_pods: &mut BTreeMap<Arc<IdentityKey>, usize>,
    claims: &mut BTreeMap<IpAddr, Vec<(i64, ObjectRef)>>,
    local: &mut BTreeSet<ObjectRef>,
) -> PodPart {
    let me = pod.object_ref();
    let mut part = PodPart { keys: Vec::new() };
    for (ip, key) in pod_key_list(pod, named_port_blocks) {
        let key = match key_pods.get_key_value(&key) {
            Some((shared, _)) => shared.clone(),
            None => Arc::new(key),
        };
        *key_pods.entry(key.clone()).or_default() += 1;
        if let Some(ip) = ip {
            claims.entry(ip).or_default().push((pod.created, me.clone()));
        }
        part.keys.push((ip, key));
    }
    if is_local {
        local.insert(me);
    }
    part
}
