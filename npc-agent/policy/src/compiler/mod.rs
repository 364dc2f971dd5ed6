//! The policy compiler: a pure function from [`State`] to the map contents the datapath reads.
//!
//! No kernel, no I/O, no clock: NetworkPolicy semantics live here, and most tests are here.
//!
//! - **Identity** = (namespace, labels, named container ports). Pods sharing one share policy
//!   entries; a peer address maps to its pod's identity in `identities`.
//! - **ipBlock classes**: every `cidr` and `except` prefix goes into the LPM trie. Which ipBlocks an
//!   address is in depends only on its longest matching inserted prefix P (block B = (C, E) holds
//!   the address iff P ⊆ C and P ⊄ e for every e in E, because prefixes that contain one address
//!   are nested). So each inserted prefix maps to one class: the set of blocks, deduplicated.
//! - **Entries** are allows keyed by (local identity, direction, peer, protocol, port); the datapath
//!   tries the peer's identity, its class and the wildcard peer. Only identities with a pod on this
//!   node get entries.

mod cidrs;
mod identities;
mod incremental;
mod lookup;
mod numbering;
mod parts;
mod rules;
mod services;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use npc_common::{
    CIDR_CLASS_BASE, EndpointInfo, FIRST_POD_IDENTITY, FIRST_SERVICE_IDENTITY, PolicyKey, PolicyValue, PortLabelKey,
    capacity, endpoint_flags, peer,
};

use self::{
    cidrs::CidrClasses,
    identities::{IdentityIndex, named_port_egress_blocks},
    numbering::Allocator,
    rules::{Entries, emit_policy},
};
pub use self::{
    cidrs::CidrKey,
    identities::{IdentityKey, address_owners, policy_pods},
    incremental::{CompileStats, Incremental},
    lookup::{Verdict, lookup},
    rules::{RangeKey, port_blocks},
    services::{PartlyAllowed, ServiceKey},
};
use crate::{
    model::{Labels, ObjectRef, Pod, State, addr_bytes, in_namespace},
    policy::{Direction, IpBlock, Policy, Rule},
};

/// The namespace annotation of the pre-v1 NetworkPolicy API (seed 000/001).
pub const LEGACY_ANNOTATION: &str = "net.beta.kubernetes.io/network-policy";

/// What the kernel maps should hold. Endpoints are keyed by pod: the attacher knows which
/// interface a pod is behind, the compiler does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<ObjectRef, EndpointInfo>,
    pub identities: BTreeMap<[u8; 16], u32>,
    pub cidrs: BTreeMap<CidrKey, u32>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub port_ranges: BTreeMap<RangeKey, PolicyValue>,
    /// Extra prefixes local pods may send from (their source-prefixes annotation), per pod; the
    /// sync keys them by the pod's interface.
    pub sources: BTreeMap<ObjectRef, BTreeSet<CidrKey>>,
    /// The ports the drop counters count under their own number ([`port_labels`]).
    pub port_labels: BTreeSet<PortLabelKey>,
}

impl DesiredMaps {
    pub fn entry_count(&self) -> usize {
        self.endpoints.len()
            + self.identities.len()
            + self.cidrs.len()
            + self.policy.len()
            + self.port_ranges.len()
            + self.sources.values().map(BTreeSet::len).sum::<usize>()
            + self.port_labels.len()
    }

    /// How many entries differ between two map sets (added, removed or changed): the work a sync
    /// from `self` to `other` does in the kernel.
    pub fn diff_count(&self, other: &Self) -> usize {
        fn diff<K: Ord, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
            let changed_or_removed = a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count();
            let added = b.keys().filter(|k| !a.contains_key(*k)).count();
            changed_or_removed + added
        }
        diff(&self.endpoints, &other.endpoints)
            + diff(&self.identities, &other.identities)
            + diff(&self.cidrs, &other.cidrs)
            + diff(&self.policy, &other.policy)
            + diff(&self.port_ranges, &other.port_ranges)
            + diff(&self.sources, &other.sources)
            + self.port_labels.symmetric_difference(&other.port_labels).count()
    }
}

/// Where an allow entry came from: rule `index` of the policy's ingress or egress list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleRef {
    pub policy: ObjectRef,
    pub direction: Direction,
    pub index: usize,
}

/// Rule id 0 in a policy value: allowed by a built-in rule (the node may always reach its pods).
pub const BUILTIN_RULE: u32 = 0;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub maps: DesiredMaps,
    /// Rule ids (the values of policy entries) → where they come from.
    pub rules: BTreeMap<u32, RuleRef>,
    pub identities: BTreeMap<u32, IdentityKey>,
    /// Each policy pod's identity (the one of its first address; the one its endpoint carries).
    pub pod_identity: BTreeMap<ObjectRef, u32>,
    /// Which pod owns each address ([`address_owners`]).
    pub address_owners: BTreeMap<IpAddr, ObjectRef>,
    /// Service identities → their Service.
    pub services: BTreeMap<u32, ObjectRef>,
    /// Which Service each VIP belongs to.
    pub vip_owners: BTreeMap<IpAddr, ObjectRef>,
    /// Service ports whose backends a local identity may reach only some of (refused: see
    /// `compiler/services.rs`).
    pub partly_allowed: Vec<PartlyAllowed>,
}

impl Compiled {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        self.rules.get(&id)
    }
}

/// The compiler with memory: identities, ipBlock classes and rule ids keep their numbers across
/// compiles. `compile` is still a pure function of (this numbering, State).
#[derive(Clone, Debug)]
pub struct Compiler {
    identities: Allocator<IdentityKey>,
    classes: Allocator<BTreeSet<IpBlock>>,
    rules: Allocator<RuleRef>,
    services: Allocator<ServiceKey>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self {
            identities: Allocator::new(FIRST_POD_IDENTITY, FIRST_SERVICE_IDENTITY - 1),
            classes: Allocator::new(0, CIDR_CLASS_BASE - 1),
            rules: Allocator::new(BUILTIN_RULE + 1, u32::MAX),
            services: Allocator::new(FIRST_SERVICE_IDENTITY, CIDR_CLASS_BASE - 1),
        }
    }
}

/// A pod's identity key for each of its addresses (one, without an address, for a pod that has
/// none yet): `nblocks` are the named-port egress ipBlocks ([`named_port_egress_blocks`]).
fn pod_key_list(pod: &Pod, nblocks: &BTreeSet<IpBlock>) -> Vec<(Option<IpAddr>, IdentityKey)> {
    let key_of = |ip: Option<IpAddr>| {
        let mut key = IdentityKey::of(pod);
        if let Some(ip) = ip {
            key.named_port_blocks = nblocks.iter().filter(|b| b.contains(ip)).cloned().collect();
        }
        key
    };
    if pod.ips.is_empty() {
        vec![(None, key_of(None))]
    } else {
        pod.ips.iter().map(|ip| (Some(*ip), key_of(Some(*ip)))).collect()
    }
}

/// One policy's rules, in the order new ones are numbered: ingress, then egress, by index.
fn policy_rule_refs(policy: &Policy) -> impl Iterator<Item = RuleRef> + '_ {
    [Direction::Ingress, Direction::Egress]
        .into_iter()
        .flat_map(move |direction| {
            (0..policy.rules(direction).map_or(0, <[Rule]>::len)).map(move |index| RuleRef {
                policy: policy.id.clone(),
                direction,
                index,
            })
        })
}

/// Every rule of every policy, in policy order (new rules get ids in this order).
fn rule_refs(state: &State) -> Vec<RuleRef> {
    state.policies.values().flat_map(policy_rule_refs).collect()
}

/// `namespace`'s policies, in order.
fn policies_in<'a>(state: &'a State, namespace: &'a str) -> impl Iterator<Item = &'a Policy> + 'a {
    in_namespace(&state.policies, namespace).map(|(_, p)| p)
}

/// Whether the legacy annotation isolates `namespace`'s pods for ingress (when enabled).
fn legacy_isolated(state: &State, namespace: &str) -> bool {
    state.legacy_default_deny
        && state
            .namespaces
            .get(namespace)
            .is_some_and(|ns| legacy_default_deny(&ns.annotations))
}

/// Rule ids → rules, for [`Compiled::rules`].
fn rule_table(ids: &BTreeMap<RuleRef, u32>) -> BTreeMap<u32, RuleRef> {
    ids.iter().map(|(rule, id)| (*id, rule.clone())).collect()
}

/// Compiles with a fresh numbering (tests, explain, one-shot tools).
pub fn compile(state: &State) -> Compiled {
    Compiler::default().compile(state)
}

impl Compiler {
    pub fn compile(&mut self, state: &State) -> Compiled {
        let mut out = Compiled::default();

        // Identities: one per distinct (namespace, labels, named ports, named-port ipBlocks) of
        // each address of each policy pod (a pod without an address yet still has one).
        let nblocks = named_port_egress_blocks(state);
        let mut pod_keys: BTreeMap<ObjectRef, Vec<(Option<IpAddr>, IdentityKey)>> = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for pod in policy_pods(state) {
            let list = pod_key_list(pod, &nblocks);
            keys.extend(list.iter().map(|(_, k)| k.clone()));
            pod_keys.insert(pod.object_ref(), list);
        }
        let ids = self.identities.assign(&keys).clone();
        for (key, id) in &ids {
            out.identities.insert(*id, key.clone());
        }

        let mut local_ids = BTreeSet::new();
        for pod in policy_pods(state) {
            let list = &pod_keys[&pod.object_ref()];
            out.pod_identity.insert(pod.object_ref(), ids[&list[0].1]);
            if state.is_local(pod) {
                local_ids.extend(list.iter().map(|(_, k)| ids[k]));
            }
        }
        for (ip, pod) in address_owners(state) {
            let key = pod_keys[&pod.object_ref()]
                .iter()
                .find(|(a, _)| *a == Some(ip))
                .map(|(_, k)| k)
                .expect("every address of a policy pod has a key");
            out.maps.identities.insert(addr_bytes(ip), ids[key]);
            out.address_owners.insert(ip, pod.object_ref());
        }
        for ip in &state.node_addrs {
            out.maps.identities.insert(addr_bytes(*ip), peer::HOST);
        }

        let classes = CidrClasses::build(state.policies.values(), &mut self.classes);
        let rule_ids = self.rules.assign(&rule_refs(state));
        out.rules = rule_table(rule_ids);
        let local_pods = policy_pods(state)
            .filter(|p| state.is_local(p))
            .map(Pod::object_ref)
            .collect();
        // The index's keys are the numbering's own, moved (not copied) now that it is done.
        let mut by_ns = identities::ByNamespace::new();
        for (key, id) in ids {
            by_ns
                .entry(key.namespace.clone())
                .or_default()
                .insert(id, Arc::new(key));
        }
        let flags = Self::emit_rules(state, &mut out, &by_ns, &local_ids, &classes, rule_ids);
        self.emit_rest(state, &mut out, &local_pods, &flags);
        out
    }

    /// The ipBlock trie, and the local identities' isolation flags (returned) and allow
    /// entries: what depends on the policies, the namespaces and the set of identities, but not
    /// on which pod has which address ([`Incremental`] keeps it while those stay the same).
    fn emit_rules(
        state: &State,
        out: &mut Compiled,
        by_ns: &identities::ByNamespace,
        local_ids: &BTreeSet<u32>,
        classes: &CidrClasses,
        rule_ids: &BTreeMap<RuleRef, u32>,
    ) -> BTreeMap<u32, u32> {
        out.maps.cidrs = classes.lpm.clone();
        let index = IdentityIndex::new(state, &out.identities, by_ns, local_ids);

        // Isolation and allow entries.
        let mut flags: BTreeMap<u32, u32> = BTreeMap::new();
        for id in local_ids {
            if legacy_isolated(state, &out.identities[id].namespace) {
                *flags.entry(*id).or_default() |= endpoint_flags::INGRESS_ISOLATED;
            }
        }
        // Only a policy in a local identity's namespace can select one.
        let local_policies = index.local_namespaces().flat_map(|ns| policies_in(state, ns));
        let mut entries = Entries {
            policy: &mut out.maps.policy,
            port_ranges: &mut out.maps.port_ranges,
            flags: &mut flags,
        };
        for policy in local_policies {
            emit_policy(policy, &index, &out.identities, classes, rule_ids, &mut entries);
        }

        flags
    }

    /// Services (judged by their backends' addresses and the allow entries), endpoints and drop
    /// labels: what the full compile emits after the rules.
    fn emit_rest(
        &mut self,
        state: &State,
        out: &mut Compiled,
        local_pods: &BTreeSet<ObjectRef>,
        flags: &BTreeMap<u32, u32>,
    ) {
        let service_ids = self.number_services(state);
        services::emit_vips(state, out, service_ids);
        services::emit_services(state, out, service_ids, flags);
        Self::emit_endpoints(state, out, local_pods, flags);
        out.maps.port_labels = port_labels(state, local_pods.iter().filter_map(|name| state.pods.get(name)));
    }

    /// The Service identities: one per Service and family of its VIPs.
    fn number_services(&mut self, state: &State) -> &BTreeMap<ServiceKey, u32> {
        self.services.assign(&services::service_keys(state))
    }

    /// The local pods' endpoints and source prefixes.
    fn emit_endpoints(state: &State, out: &mut Compiled, local_pods: &BTreeSet<ObjectRef>, flags: &BTreeMap<u32, u32>) {
        // This node's policy pods, in name order (without a walk of every pod in the cluster).
        let local = || local_pods.iter().filter_map(|name| state.pods.get(name));
        for pod in local() {
            // Two local pods reporting one address (a terminating pod whose address the CNI
            // already gave a new one): the interface behind it is the newest pod's, and so is
            // the endpoint. A pod that owns none of its addresses any more gets none (its
            // endpoint would otherwise win or lose the shared interface by name order); the
            // enforcer attaches each pod by an address it owns.
            let me = pod.object_ref();
            if !pod.ips.is_empty() && pod.ips.iter().all(|ip| out.address_owners.get(ip) != Some(&me)) {
                continue;
            }
            let id = out.pod_identity[&pod.object_ref()];
            let mut pod_flags = flags.get(&id).copied().unwrap_or(0);
            if !pod.source_prefixes.is_empty() {
                pod_flags |= endpoint_flags::EXTRA_SOURCES;
                let prefixes = pod.source_prefixes.iter().map(|n| CidrKey::of(*n)).collect();
                out.maps.sources.insert(pod.object_ref(), prefixes);
            }
            out.maps.endpoints.insert(
                pod.object_ref(),
                EndpointInfo::new(
                    id,
                    pod_flags,
                    &pod.ips.iter().map(|ip| addr_bytes(*ip)).collect::<Vec<_>>(),
                ),
            );
        }
    }
}

/// The ports the drop counters keep apart (`NPC_PORT_LABELS`): every port a policy names (a
/// range by its ends), every Service port and numbered target port, every port a local pod
/// declares. Any other port a dropped packet goes to (a port scan, the ephemeral port of a reply
/// on a cut connection) counts under port 0, so the counters' label space stays what the cluster
/// declares. Capped at the map's capacity (the lowest protocol and port numbers kept).
pub fn port_labels<'a>(state: &State, local_pods: impl Iterator<Item = &'a Pod>) -> BTreeSet<PortLabelKey> {
    let mut out = BTreeSet::new();
    for policy in state.policies.values() {
        for direction in [Direction::Ingress, Direction::Egress] {
            for rule in policy.rules(direction).unwrap_or_default() {
                for spec in rule.ports.iter().flatten() {
                    if let crate::policy::PortSpec::Number {
                        protocol,
                        port: Some(port),
                        end,
                    } = spec
                    {
                        out.insert(PortLabelKey::new(protocol.number(), *port));
                        if let Some(end) = end {
                            out.insert(PortLabelKey::new(protocol.number(), *end));
                        }
                    }
                }
            }
        }
    }
    for svc in state.services.values() {
        for port in &svc.ports {
            out.insert(PortLabelKey::new(port.protocol.number(), port.port));
            if let crate::service::TargetPort::Number(target) = port.target {
                out.insert(PortLabelKey::new(port.protocol.number(), target));
            }
        }
    }
    for pod in local_pods {
        for port in &pod.ports {
            out.insert(PortLabelKey::new(port.protocol.number(), port.port));
        }
    }
    out.into_iter().take(capacity::PORT_LABELS as usize).collect()
}

/// `{"ingress":{"isolation":"DefaultDeny"}}` in the legacy annotation.
pub fn legacy_default_deny(annotations: &Labels) -> bool {
    annotations
        .get(LEGACY_ANNOTATION)
        .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
        .and_then(|v| {
            v.pointer("/ingress/isolation")
                .and_then(|i| i.as_str())
                .map(|s| s == "DefaultDeny")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::files;

    /// Builds a State from YAML, all pods local.
    fn state(yaml: &str) -> State {
        let loaded = files::parse_str(Path::new("test.yaml"), yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.to_state()
    }

    fn pod(ns: &str, name: &str, labels: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    }

    fn ns(name: &str, labels: &str) -> String {
        format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n")
    }

    fn allowed(c: &Compiled, to: (&str, &str), from_ip: &str, proto: u8, port: u16) -> bool {
        lookup(
            c,
            &ObjectRef::new(to.0, to.1),
            Direction::Ingress,
            from_ip.parse().unwrap(),
            proto,
            port,
        )
        .allowed()
    }

    fn base() -> String {
        [
            ns("a", "team: x"),
            ns("b", "team: y"),
            pod("a", "web", "app: web", "10.0.0.1"),
            pod("a", "db", "app: db", "10.0.0.2"),
            pod("b", "web", "app: web", "10.0.1.1"),
            pod("b", "cli", "app: cli, tier: front", "10.0.1.2"),
        ]
        .concat()
    }

    const TCP: u8 = npc_common::PROTO_TCP;
    const UDP: u8 = npc_common::PROTO_UDP;

    #[test]
    fn no_policy_means_not_isolated() {
        let c = compile(&state(&base()));
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", TCP, 1));
        assert_eq!(c.maps.endpoints[&ObjectRef::new("a", "db")].flags, 0);
    }

    #[test]
    fn deny_all_isolates_and_allows_nothing() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: a}\nspec: {podSelector: {}}\n";
        let c = compile(&state(&y));
        assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 80));
        assert!(!allowed(&c, ("a", "web"), "10.0.1.2", UDP, 53));
        // Other namespaces are untouched.
        assert!(allowed(&c, ("b", "web"), "10.0.0.2", TCP, 80));
    }

    #[test]
    fn pod_selector_only_means_own_namespace() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n";
        let c = compile(&state(&y));
        assert!(allowed(&c, ("a", "db"), "10.0.0.1", TCP, 5432), "a/web is in a");
        assert!(!allowed(&c, ("a", "db"), "10.0.1.1", TCP, 5432), "b/web is not");
    }

    #[test]
    fn namespace_and_pod_selector_in_one_peer_is_and() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: y}}, podSelector: {matchLabels: {app: cli}}}]}]\n";
        let c = compile(&state(&y));
        assert!(allowed(&c, ("a", "db"), "10.0.1.2", TCP, 1));
        assert!(
            !allowed(&c, ("a", "db"), "10.0.1.1", TCP, 1),
            "b/web is team y but not app=cli"
        );
        assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 1));
    }

    #[test]
    fn two_peers_are_or_and_two_policies_are_a_union() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p1, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: y}}}, {podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n"
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p2, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: 53, protocol: UDP}]}]\n";
        let c = compile(&state(&y));
        assert!(allowed(&c, ("a", "db"), "10.0.1.1", TCP, 5432));
        assert!(allowed(&c, ("a", "db"), "10.0.0.1", TCP, 5432));
        assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 5433));
        assert!(
            allowed(&c, ("a", "db"), "192.0.2.9", UDP, 53),
            "p2: any source on UDP 53"
        );
        assert!(!allowed(&c, ("a", "db"), "192.0.2.9", TCP, 53));
    }

    #[test]
    fn match_expressions_select_pods() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [db]}]}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}, {key: app, operator: NotIn, values: [db]}]}}]}]\n";
        let c = compile(&state(&y));
        assert!(allowed(&c, ("a", "db"), "10.0.0.1", TCP, 1), "a/web: no tier, not db");
        assert!(
            allowed(&c, ("a", "db"), "10.0.1.1", TCP, 1),
            "b/web too (all namespaces)"
        );
        assert!(!allowed(&c, ("a", "db"), "10.0.1.2", TCP, 1), "b/cli has a tier");
        assert!(allowed(&c, ("a", "web"), "192.0.2.1", TCP, 1), "a/web is not selected");
    }

    #[test]
    fn ip_block_with_except_uses_longest_prefix_classes() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.17.0.0/16]}}, {ipBlock: {cidr: 172.17.1.0/24}}]}]\n";
        let c = compile(&state(&y));
        assert!(allowed(&c, ("a", "db"), "172.16.5.5", TCP, 1));
        assert!(!allowed(&c, ("a", "db"), "172.17.5.5", TCP, 1), "in the except");
        assert!(
            allowed(&c, ("a", "db"), "172.17.1.9", TCP, 1),
            "except, but in the second block"
        );
        assert!(!allowed(&c, ("a", "db"), "10.1.1.1", TCP, 1));
    }

    #[test]
    fn named_ports_resolve_on_the_destination_and_ranges_cover_end_port() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: http}, {port: 9000, endPort: 9010}]}]\n";
        let c = compile(&state(&y));
        assert!(
            allowed(&c, ("a", "db"), "192.0.2.1", TCP, 8080),
            "http = 8080 on the destination"
        );
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        for port in [9000, 9005, 9010] {
            assert!(allowed(&c, ("a", "db"), "192.0.2.1", TCP, port), "{port} in range");
        }
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 9011));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 8999));
    }

    #[test]
    fn port_blocks_are_aligned_and_cover_exactly() {
        for (start, end) in [
            (1u16, 1u16),
            (9000, 9010),
            (0, 65535),
            (1, 65535),
            (1023, 1025),
            (32768, 60999),
        ] {
            let blocks = port_blocks(start, end);
            let mut covered = Vec::new();
            for (first, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*first) % size, 0, "block {first}/{bits} is aligned");
                covered.extend(u32::from(*first)..u32::from(*first) + size);
            }
            let want: Vec<u32> = (u32::from(start)..=u32::from(end)).collect();
            assert_eq!(covered, want, "[{start}, {end}]");
        }
    }

    #[test]
    fn node_addresses_are_always_allowed_in() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: a}\nspec: {podSelector: {}}\n";
        let mut s = state(&y);
        s.node_addrs = vec!["10.0.255.1".parse().unwrap()];
        let c = compile(&s);
        assert!(allowed(&c, ("a", "db"), "10.0.255.1", TCP, 8080));
        assert!(!allowed(&c, ("a", "db"), "10.0.255.2", TCP, 8080));
    }

    #[test]
    fn egress_policy_types_are_inferred_from_rules() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: e, namespace: a}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n";
        let c = compile(&state(&y));
        let web = ObjectRef::new("a", "web");
        let flags = c.maps.endpoints[&web].flags;
        assert_eq!(
            flags & endpoint_flags::INGRESS_ISOLATED,
            endpoint_flags::INGRESS_ISOLATED
        );
        assert_eq!(flags & endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_ISOLATED);
        let egress = |ip: &str| lookup(&c, &web, Direction::Egress, ip.parse().unwrap(), TCP, 5432).allowed();
        assert!(egress("10.0.0.2"));
        assert!(!egress("10.0.1.1"));
    }

    #[test]
    fn compile_is_deterministic() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}\n";
        assert_eq!(compile(&state(&y)).maps, compile(&state(&y)).maps);
    }

    fn np(ns: &str, name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
        )
    }

    fn egress_allowed(c: &Compiled, from: (&str, &str), to_ip: &str, proto: u8, port: u16) -> bool {
        lookup(
            c,
            &ObjectRef::new(from.0, from.1),
            Direction::Egress,
            to_ip.parse().unwrap(),
            proto,
            port,
        )
        .allowed()
    }

    const SCTP: u8 = npc_common::PROTO_SCTP;

    #[test]
    fn empty_rule_empty_list_and_missing_section() {
        // `ingress: [{}]`: one rule with no peers and no ports = allow everything.
        let c = compile(&state(
            &(base() + &np("a", "p", "  podSelector: {}\n  ingress: [{}]\n")),
        ));
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", UDP, 9));
        assert_eq!(
            c.maps.endpoints[&ObjectRef::new("a", "db")].flags & endpoint_flags::INGRESS_ISOLATED,
            endpoint_flags::INGRESS_ISOLATED
        );
        // `from: []` (an empty list) is the same as no `from`: every source, on the rule's ports.
        let c = compile(&state(
            &(base()
                + &np(
                    "a",
                    "p",
                    "  podSelector: {}\n  ingress: [{from: [], ports: [{port: 80}]}]\n",
                )),
        ));
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 81));
        // `ingress: []` (no rules) isolates and allows nothing.
        let c = compile(&state(&(base() + &np("a", "p", "  podSelector: {}\n  ingress: []\n"))));
        assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 80));
        // A missing egress section with policyTypes [Ingress] leaves egress open.
        let c = compile(&state(
            &(base() + &np("a", "p", "  podSelector: {}\n  policyTypes: [Ingress]\n")),
        ));
        assert!(egress_allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
    }

    #[test]
    fn explicit_policy_types() {
        // Egress only: ingress stays open even though the policy has no ingress rules.
        let c = compile(&state(
            &(base() + &np("a", "p", "  podSelector: {}\n  policyTypes: [Egress]\n")),
        ));
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        assert!(!egress_allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        // Ingress only, with egress rules written: the egress rules are ignored, egress is open.
        let c = compile(&state(
            &(base()
                + &np(
                    "a",
                    "p",
                    "  podSelector: {}\n  policyTypes: [Ingress]\n  egress: [{ports: [{port: 1}]}]\n",
                )),
        ));
        assert!(egress_allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80));
        // Both, no rules: nothing in or out.
        let c = compile(&state(
            &(base() + &np("a", "p", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n")),
        ));
        assert!(!egress_allowed(&c, ("a", "db"), "10.0.0.1", TCP, 8080));
        assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 8080));
    }

    #[test]
    fn udp_sctp_and_protocol_wide_ports() {
        let spec = "  podSelector: {}\n  ingress: [{ports: [{port: 53, protocol: UDP}, {protocol: SCTP}]}]\n";
        let c = compile(&state(&(base() + &np("a", "p", spec))));
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", UDP, 53));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 53));
        assert!(
            allowed(&c, ("a", "db"), "192.0.2.1", SCTP, 1),
            "a port entry without a port = every SCTP port"
        );
        assert!(allowed(&c, ("a", "db"), "192.0.2.1", SCTP, 65535));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", UDP, 54));
    }

    #[test]
    fn named_ports_match_only_the_declared_protocol_and_name() {
        // Every base pod declares http = 8080/TCP.
        let spec = "  podSelector: {}\n  ingress: [{ports: [{port: http, protocol: UDP}, {port: nope}]}]\n";
        let c = compile(&state(&(base() + &np("a", "p", spec))));
        for (proto, port) in [(UDP, 8080), (TCP, 8080), (TCP, 80)] {
            assert!(!allowed(&c, ("a", "db"), "192.0.2.1", proto, port), "{proto}/{port}");
        }
    }

    #[test]
    fn egress_named_ports_resolve_on_the_peer() {
        let extra = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: alt, namespace: a, labels: {app: alt}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 9999}]}]}\nstatus: {podIP: 10.0.0.3}\n";
        let spec =
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]\n";
        let c = compile(&state(&(base() + extra + &np("a", "p", spec))));
        assert!(
            egress_allowed(&c, ("a", "web"), "10.0.0.2", TCP, 8080),
            "db's http is 8080"
        );
        assert!(!egress_allowed(&c, ("a", "web"), "10.0.0.2", TCP, 9999));
        assert!(
            egress_allowed(&c, ("a", "web"), "10.0.0.3", TCP, 9999),
            "alt's http is 9999"
        );
        assert!(!egress_allowed(&c, ("a", "web"), "10.0.0.3", TCP, 8080));
        assert!(
            !egress_allowed(&c, ("a", "web"), "192.0.2.1", TCP, 8080),
            "not a pod: no names"
        );

        // With an ipBlock peer: pods inside the block that declare the name, and nothing else.
        let spec = "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}], ports: [{port: http}]}]\n";
        let c = compile(&state(&(base() + extra + &np("a", "p", spec))));
        assert!(egress_allowed(&c, ("a", "web"), "10.0.0.2", TCP, 8080));
        assert!(egress_allowed(&c, ("a", "web"), "10.0.0.3", TCP, 9999));
        assert!(!egress_allowed(&c, ("a", "web"), "10.0.0.3", TCP, 8080));
        assert!(
            !egress_allowed(&c, ("a", "web"), "10.0.1.1", TCP, 8080),
            "b/web declares http but is outside"
        );
        assert!(
            !egress_allowed(&c, ("a", "web"), "10.0.0.9", TCP, 8080),
            "inside, but no pod"
        );
    }

    #[test]
    fn ipv6_blocks_and_pod_addresses() {
        let v6 = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: six, namespace: a, labels: {app: six}}\nspec: {containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.6}, {ip: 'fd00::6'}]}\n";
        let spec = "  podSelector: {matchLabels: {app: six}}\n  ingress: [{from: [{ipBlock: {cidr: 'fd00::/64', except: ['fd00::/120']}}, {ipBlock: {cidr: '::/0'}}], ports: [{port: 22}]}, {from: [{ipBlock: {cidr: 10.0.0.0/24}}], ports: [{port: 80}]}]\n";
        let c = compile(&state(&(base() + v6 + &np("a", "p", spec))));
        assert!(allowed(&c, ("a", "six"), "fd00::1:1", TCP, 22));
        assert!(
            allowed(&c, ("a", "six"), "fd00::1", TCP, 22),
            "excepted from the first, in ::/0"
        );
        assert!(
            !allowed(&c, ("a", "six"), "10.9.9.9", TCP, 22),
            "an IPv6 block never matches IPv4"
        );
        assert!(
            allowed(&c, ("a", "six"), "10.0.0.1", TCP, 80),
            "ipBlocks match pod addresses too"
        );
        assert!(!allowed(&c, ("a", "six"), "10.0.1.1", TCP, 80));
        // Dual stack: both addresses carry the pod's identity.
        let six = c.pod_identity[&ObjectRef::new("a", "six")];
        for ip in ["10.0.0.6", "fd00::6"] {
            assert_eq!(c.maps.identities[&addr_bytes(ip.parse().unwrap())], six, "{ip}");
        }
    }

    /// IPv4-mapped IPv6 blocks share their keys with IPv4 prefixes: they must neither hold IPv4
    /// addresses nor take over an IPv4 prefix's class (`::ffff:10.0.0.0/104` is 10.0.0.0/8's
    /// key). They match nothing (docs/semantics.md, "IPv4-mapped IPv6 ipBlocks").
    #[test]
    fn ipv4_mapped_ipv6_blocks_never_touch_ipv4() {
        for mapped in [
            "::ffff:0:0/96",
            "::ffff:10.0.0.0/104",
            "::ffff:10.0.0.0/120",
            "::ffff:10.0.0.1/128",
        ] {
            // Alone: no IPv4 address is in it.
            let spec = format!(
                "  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: '{mapped}'}}}}]}}]\n"
            );
            let c = compile(&state(&(base() + &np("a", "p", &spec))));
            assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 80), "{mapped}");
            assert!(c.maps.cidrs.is_empty(), "{mapped} is not in the trie");
            // With the IPv4 block of the same key, in another rule: the IPv4 one still works
            // (and its port), the mapped one still allows nothing.
            let spec = format!(
                "  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: '{mapped}'}}}}]}}, {{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.0.0.1/32]}}}}], ports: [{{port: 80}}]}}]\n"
            );
            let c = compile(&state(&(base() + &np("a", "p", &spec))));
            assert!(allowed(&c, ("a", "db"), "10.0.1.1", TCP, 80), "{mapped}");
            assert!(!allowed(&c, ("a", "db"), "10.0.1.1", TCP, 81), "{mapped}");
            assert!(!allowed(&c, ("a", "db"), "10.0.0.1", TCP, 80), "{mapped}: the except");
            // As an egress named-port peer: no pod is inside it.
            let spec = format!(
                "  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: '{mapped}'}}}}], ports: [{{port: http}}]}}]\n"
            );
            let c = compile(&state(&(base() + &np("a", "p", &spec))));
            assert!(!egress_allowed(&c, ("a", "web"), "10.0.0.2", TCP, 8080), "{mapped}");
        }
        // An IPv4-mapped except of a real IPv6 block removes nothing and touches no IPv4 key.
        let spec = "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: '::/0', except: ['::ffff:10.0.0.0/104']}}, {ipBlock: {cidr: 10.0.0.0/8}}], ports: [{port: 80}]}]\n";
        let c = compile(&state(&(base() + &np("a", "p", spec))));
        assert!(allowed(&c, ("a", "db"), "10.0.0.1", TCP, 80));
        assert!(allowed(&c, ("a", "db"), "fd00::1", TCP, 80));
        assert!(!allowed(&c, ("a", "db"), "192.0.2.1", TCP, 80), "::/0 holds no IPv4");
    }

    /// Port names are unique per container only: two containers of one pod may both declare
    /// `http`, and a rule naming it allows both ports, on ingress and on egress.
    #[test]
    fn a_port_name_declared_twice_in_a_pod_allows_every_port() {
        let twice = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: two, namespace: a, labels: {app: two}}\nspec: {containers: [{name: c1, ports: [{name: http, containerPort: 80}]}, {name: c2, ports: [{name: http, containerPort: 8080}, {name: http-udp, containerPort: 8080, protocol: UDP}]}]}\nstatus: {podIP: 10.0.0.4}\n";
        let spec = "  podSelector: {matchLabels: {app: two}}\n  ingress: [{ports: [{port: http}]}]\n";
        let c = compile(&state(&(base() + twice + &np("a", "p", spec))));
        for port in [80, 8080] {
            assert!(allowed(&c, ("a", "two"), "192.0.2.1", TCP, port), "{port}");
        }
        assert!(!allowed(&c, ("a", "two"), "192.0.2.1", TCP, 81));
        assert!(!allowed(&c, ("a", "two"), "192.0.2.1", UDP, 8080));
        let spec = "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: two}}}], ports: [{port: http}]}]\n";
        let c = compile(&state(&(base() + twice + &np("a", "p", spec))));
        for port in [80, 8080] {
            assert!(egress_allowed(&c, ("a", "web"), "10.0.0.4", TCP, port), "{port}");
        }
        assert!(!egress_allowed(&c, ("a", "web"), "10.0.0.4", TCP, 81));
        assert!(
            !egress_allowed(&c, ("a", "web"), "10.0.0.2", TCP, 8080),
            "db is not app=two"
        );
    }

    #[test]
    fn host_network_terminated_and_addressless_pods() {
        let extra = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: hn, namespace: a, labels: {app: web}}\nspec: {hostNetwork: true, containers: [{name: c}]}\nstatus: {podIP: 10.0.255.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: done, namespace: a, labels: {app: web}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.7, phase: Succeeded}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: a, labels: {app: web}}\nspec: {containers: [{name: c}]}\n";
        let spec = "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n";
        let c = compile(&state(&(base() + extra + &np("a", "p", spec))));
        assert!(
            !c.maps.endpoints.contains_key(&ObjectRef::new("a", "hn")),
            "hostNetwork: never enforced"
        );
        assert!(
            !c.maps.endpoints.contains_key(&ObjectRef::new("a", "done")),
            "finished: gone"
        );
        assert!(
            !allowed(&c, ("a", "db"), "10.0.255.1", TCP, 1),
            "a hostNetwork peer is not an app=web pod"
        );
        assert!(
            !allowed(&c, ("a", "db"), "10.0.0.7", TCP, 1),
            "a finished pod's address is nobody's"
        );
        assert!(allowed(&c, ("a", "db"), "10.0.0.1", TCP, 1));
        // A pod without an address yet is an endpoint (enforced as soon as it is attached).
        assert_eq!(c.maps.endpoints[&ObjectRef::new("a", "new")].addrs, [[0; 16]; 2]);
    }

    #[test]
    fn the_source_prefixes_annotation_flags_the_endpoint_and_a_bad_prefix_is_reported_not_fatal() {
        let y = ns("a", "")
            + &pod("a", "plain", "app: x", "10.0.0.4")
            + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: gw, namespace: a, annotations: {npc.dev/source-prefixes: '10.8.1.2/16, fd00:8::1/64,nonsense'}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.5}\n";
        let loaded = files::parse_str(Path::new("test.yaml"), &y);
        let [error] = loaded.errors.as_slice() else {
            panic!("one error expected: {:?}", loaded.errors);
        };
        assert_eq!(error.object.as_deref(), Some("Pod a/gw"));
        assert_eq!(error.field, "metadata.annotations[npc.dev/source-prefixes]");
        assert!(error.message.contains("\"nonsense\""), "{}", error.message);
        // The pod is kept, with the prefixes that parse (truncated to their network).
        let c = compile(&loaded.to_state());
        let gw = ObjectRef::new("a", "gw");
        assert_ne!(c.maps.endpoints[&gw].flags & endpoint_flags::EXTRA_SOURCES, 0);
        let want: BTreeSet<CidrKey> = ["10.8.0.0/16", "fd00:8::/64"]
            .iter()
            .map(|n| CidrKey::of(n.parse().unwrap()))
            .collect();
        assert_eq!(c.maps.sources[&gw], want);
        let plain = ObjectRef::new("a", "plain");
        assert_eq!(c.maps.endpoints[&plain].flags & endpoint_flags::EXTRA_SOURCES, 0);
        assert!(!c.maps.sources.contains_key(&plain));
    }

    #[test]
    fn legacy_namespace_annotation_isolates_ingress_when_enabled() {
        let y = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: old, annotations: {net.beta.kubernetes.io/network-policy: '{\"ingress\":{\"isolation\":\"DefaultDeny\"}}'}}\n".to_string()
            + &pod("old", "app", "app: x", "10.0.2.1");
        let mut s = state(&y);
        assert!(
            allowed(&compile(&s), ("old", "app"), "192.0.2.1", TCP, 80),
            "off by default"
        );
        s.legacy_default_deny = true;
        let c = compile(&s);
        assert!(!allowed(&c, ("old", "app"), "192.0.2.1", TCP, 80));
        assert!(egress_allowed(&c, ("old", "app"), "192.0.2.1", TCP, 80), "ingress only");
    }

    #[test]
    fn an_address_belongs_to_the_newest_pod() {
        let mut s = state(&base());
        let mut old = s.pods[&ObjectRef::new("b", "cli")].clone();
        old.name = "zz-old".into();
        old.ips = vec!["10.0.0.2".parse().unwrap()]; // a/db's address, reused
        old.created = 100;
        s.pods.insert(old.object_ref(), old);
        s.pods.get_mut(&ObjectRef::new("a", "db")).unwrap().created = 200;
        let c = compile(&s);
        let db = c.pod_identity[&ObjectRef::new("a", "db")];
        assert_eq!(c.maps.identities[&addr_bytes("10.0.0.2".parse().unwrap())], db);
        // Both pods are local (one interface behind the address): the endpoint is the newest
        // pod's, whichever name sorts last.
        assert!(c.maps.endpoints.contains_key(&ObjectRef::new("a", "db")));
        assert!(
            !c.maps.endpoints.contains_key(&ObjectRef::new("b", "zz-old")),
            "{:?}",
            c.maps.endpoints.keys().collect::<Vec<_>>()
        );
        // Deleting the old pod leaves the new owner's entry alone.
        s.pods.remove(&ObjectRef::new("b", "zz-old"));
        assert_eq!(
            compile(&s).maps.identities[&addr_bytes("10.0.0.2".parse().unwrap())],
            db
        );
    }

    #[test]
    fn a_restarted_compiler_adopts_the_kernel_numbering() {
        let y = base()
            + &np(
                "a",
                "p",
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.1.0/24]}}, {podSelector: {}}]}]\n",
            );
        let s = state(&y);
        // The old agent saw another cluster first, so its numbers differ from a fresh compile's.
        let mut old = Compiler::default();
        old.compile(&state(&(base() + &pod("0z", "z", "app: z", "10.9.9.9"))));
        let before = old.compile(&s).maps;
        let mut restarted = Compiler::default();
        assert_ne!(
            restarted.clone().compile(&s).maps,
            before,
            "numberings differ without adoption"
        );
        restarted.adopt(&s, &before.identities, &before.cidrs);
        let after = restarted.compile(&s).maps;
        assert_eq!(after.identities, before.identities);
        assert_eq!(after.cidrs, before.cidrs);
        assert_eq!(after.endpoints, before.endpoints);
        assert_eq!(
            after.policy.keys().collect::<Vec<_>>(),
            before.policy.keys().collect::<Vec<_>>()
        );
        // New identities still get numbers nobody has.
        let mut grown = s.clone();
        let mut extra = grown.pods[&ObjectRef::new("a", "web")].clone();
        extra.name = "web2".into();
        extra.labels.insert("v".into(), "2".into());
        extra.ips = vec!["10.0.0.77".parse().unwrap()];
        grown.pods.insert(extra.object_ref(), extra);
        let ids = restarted.compile(&grown).maps.identities;
        let distinct: BTreeSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "no two identities share a number");
    }

    #[test]
    fn one_change_touches_only_what_depends_on_it() {
        // 50 namespaces of 20 pods, a policy per namespace allowing its own "web" pods in.
        let mut y = String::new();
        for n in 0..50 {
            y += &ns(&format!("n{n}"), "team: x");
            y += &np(
                &format!("n{n}"),
                "p",
                "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n",
            );
            for i in 0..20 {
                let app = if i % 2 == 0 { "web" } else { "db" };
                y += &pod(
                    &format!("n{n}"),
                    &format!("p{i}"),
                    &format!("app: {app}, i: '{i}'"),
                    &format!("10.{n}.0.{}", i + 1),
                );
            }
        }
        let mut s = state(&y);
        let mut compiler = Compiler::default();
        let before = compiler.compile(&s).maps;
        assert!(before.entry_count() > 2000);
        // Relabel one pod.
        s.pods
            .get_mut(&ObjectRef::new("n7", "p0"))
            .unwrap()
            .labels
            .insert("app".into(), "cli".into());
        let after = compiler.compile(&s).maps;
        let diff = before.diff_count(&after);
        assert!((1..=20).contains(&diff), "relabelling one pod changed {diff} entries");
        // Edit one policy.
        let id = ObjectRef::new("n3", "p");
        let mut policy = s.policies[&id].clone();
        policy.ingress.as_mut().unwrap()[0].ports = None;
        s.policies.insert(id, policy);
        let edited = compiler.compile(&s).maps;
        let diff = after.diff_count(&edited);
        // Its 10 × 10 (db, web) entries on port 5432 go, the same pairs on every port come.
        assert!((1..=200).contains(&diff), "editing one policy changed {diff} entries");
        // A fresh compiler numbers differently but means the same: a restart rewrites maps once.
        assert_eq!(compile(&s).maps.entry_count(), edited.entry_count());
    }
}
