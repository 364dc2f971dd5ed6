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
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use npc_common::{
    CIDR_CLASS_BASE, EndpointInfo, FIRST_POD_IDENTITY, PORT_ANY, PORT_RANGE_FIXED_BITS, PROTO_ANY, PolicyKey,
    PolicyValue, PortRangeKey, endpoint_flags, peer,
};

use crate::{
    model::{ContainerPort, Labels, NAMESPACE_NAME_LABEL, ObjectRef, Pod, Protocol, State, addr_bytes},
    policy::{Direction, IpBlock, NamespaceScope, Peer, Policy, PortSpec},
};

/// The namespace annotation of the pre-v1 NetworkPolicy API (seed 000/001).
pub const LEGACY_ANNOTATION: &str = "net.beta.kubernetes.io/network-policy";

/// (namespace, labels, named ports): what policy can tell pods apart by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    /// Only named ports, sorted: unnamed ones never change a verdict.
    pub named_ports: Vec<ContainerPort>,
}

impl IdentityKey {
    fn of(pod: &Pod) -> Self {
        let mut named_ports: Vec<ContainerPort> = pod.ports.iter().filter(|p| p.name.is_some()).cloned().collect();
        named_ports.sort();
        named_ports.dedup();
        Self {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports,
        }
    }

    fn resolve(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// An LPM key as the kernel wants it: prefix length in bits over the 16-byte address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

impl CidrKey {
    pub fn of(net: IpNet) -> Self {
        let (prefix_len, addr) = match net {
            IpNet::V4(n) => (
                96 + u32::from(n.prefix_len()),
                npc_common::v4_mapped(n.network().octets()),
            ),
            IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
        };
        Self { prefix_len, addr }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub prefix_len: u32,
    pub key: PortRangeKey,
}

/// What the kernel maps should hold. Endpoints are keyed by pod: the attacher knows which
/// interface a pod is behind, the compiler does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub endpoints: BTreeMap<ObjectRef, EndpointInfo>,
    pub identities: BTreeMap<[u8; 16], u32>,
    pub cidrs: BTreeMap<CidrKey, u32>,
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    pub port_ranges: BTreeMap<RangeKey, PolicyValue>,
}

/// Where an allow entry came from (rule id `n` is `rules[n - 1]`; 0 is a built-in allow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: ObjectRef,
    pub direction: Direction,
    pub index: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub maps: DesiredMaps,
    pub rules: Vec<RuleRef>,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub pod_identity: BTreeMap<ObjectRef, u32>,
}

impl Compiled {
    pub fn rule(&self, id: u32) -> Option<&RuleRef> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }
}

/// A peer in a policy key: a pod identity, an ipBlock class, or anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerId {
    Any,
    Identity(u32),
    Class(u32),
}

impl PeerId {
    fn raw(self) -> u32 {
        match self {
            Self::Any => peer::ANY,
            Self::Identity(id) => id,
            Self::Class(c) => CIDR_CLASS_BASE | c,
        }
    }
}

/// Pods that take part in policy: running (not Succeeded/Failed) and not hostNetwork (those are
/// never enforced and, as peers, look like their node).
fn policy_pods(state: &State) -> impl Iterator<Item = &Pod> {
    state.pods.values().filter(|p| !p.terminated && !p.host_network)
}

fn namespace_labels<'a>(state: &'a State, ns: &str, fallback: &'a mut Labels) -> &'a Labels {
    match state.namespaces.get(ns) {
        Some(n) => &n.labels,
        None => {
            fallback.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
            fallback
        }
    }
}

pub fn compile(state: &State) -> Compiled {
    let mut out = Compiled::default();

    // Identities, numbered in sorted key order (deterministic).
    let keys: BTreeSet<IdentityKey> = policy_pods(state).map(IdentityKey::of).collect();
    let ids: BTreeMap<IdentityKey, u32> = keys.into_iter().zip(FIRST_POD_IDENTITY..).collect();
    for (key, id) in &ids {
        out.identities.insert(*id, key.clone());
    }
    let mut local_ids = BTreeSet::new();
    for pod in policy_pods(state) {
        let id = ids[&IdentityKey::of(pod)];
        out.pod_identity.insert(pod.object_ref(), id);
        if state.is_local(pod) {
            local_ids.insert(id);
        }
        for ip in &pod.ips {
            // Two pods claiming one address: the first in name order keeps it (deterministic).
            out.maps.identities.entry(addr_bytes(*ip)).or_insert(id);
        }
    }
    for ip in &state.node_addrs {
        out.maps.identities.insert(addr_bytes(*ip), peer::HOST);
    }

    let classes = CidrClasses::build(state.policies.values());
    out.maps.cidrs = classes.lpm.clone();

    // Isolation and allow entries.
    let mut flags: BTreeMap<u32, u32> = BTreeMap::new();
    if state.legacy_default_deny {
        for (id, key) in &out.identities {
            let legacy = state
                .namespaces
                .get(&key.namespace)
                .is_some_and(|ns| legacy_default_deny(&ns.annotations));
            if legacy && local_ids.contains(id) {
                *flags.entry(*id).or_default() |= endpoint_flags::INGRESS_ISOLATED;
            }
        }
    }
    for policy in state.policies.values() {
        let selected: Vec<u32> = local_ids
            .iter()
            .copied()
            .filter(|id| {
                let key = &out.identities[id];
                key.namespace == policy.id.namespace && policy.pod_selector.matches(&key.labels)
            })
            .collect();
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(direction) else { continue };
            let (isolated, ranged) = match direction {
                Direction::Ingress => (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES),
                Direction::Egress => (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES),
            };
            for id in &selected {
                *flags.entry(*id).or_default() |= isolated;
            }
            for (index, rule) in rules.iter().enumerate() {
                out.rules.push(RuleRef {
                    policy: policy.id.clone(),
                    direction,
                    index,
                });
                let rule_id = out.rules.len() as u32;
                if selected.is_empty() {
                    continue;
                }
                let peers = resolve_peers(state, policy, rule.peers.as_deref(), &ids, &classes);
                for local in &selected {
                    let emitted = emit_rule(
                        &mut out.maps,
                        *local,
                        direction,
                        &peers,
                        rule.ports.as_deref(),
                        &out.identities,
                        rule_id,
                    );
                    if emitted.ranges {
                        *flags.entry(*local).or_default() |= ranged;
                    }
                }
            }
        }
    }

    for pod in policy_pods(state).filter(|p| state.is_local(p)) {
        let id = out.pod_identity[&pod.object_ref()];
        out.maps.endpoints.insert(
            pod.object_ref(),
            EndpointInfo {
                identity: id,
                flags: flags.get(&id).copied().unwrap_or(0),
                addr: pod.ips.first().map(|ip| addr_bytes(*ip)).unwrap_or([0; 16]),
            },
        );
    }
    out
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

fn resolve_peers(
    state: &State,
    policy: &Policy,
    peers: Option<&[Peer]>,
    ids: &BTreeMap<IdentityKey, u32>,
    classes: &CidrClasses,
) -> BTreeSet<PeerId> {
    let Some(peers) = peers else {
        return [PeerId::Any].into();
    };
    let mut out = BTreeSet::new();
    for p in peers {
        match p {
            Peer::Pods { namespaces, pods } => {
                for (key, id) in ids {
                    let ns_ok = match namespaces {
                        NamespaceScope::Own => key.namespace == policy.id.namespace,
                        NamespaceScope::Selector(sel) => {
                            let mut fallback = Labels::new();
                            sel.matches(namespace_labels(state, &key.namespace, &mut fallback))
                        }
                    };
                    if ns_ok && pods.matches(&key.labels) {
                        out.insert(PeerId::Identity(*id));
                    }
                }
            }
            Peer::IpBlock(block) => out.extend(classes.classes_of(block).map(PeerId::Class)),
        }
    }
    out
}

struct Emitted {
    ranges: bool,
}

fn emit_rule(
    maps: &mut DesiredMaps,
    local: u32,
    direction: Direction,
    peers: &BTreeSet<PeerId>,
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
        for p in peers {
            exact(*p, PROTO_ANY, PORT_ANY);
        }
        return emitted;
    };
    for spec in ports {
        match spec {
            PortSpec::Number {
                protocol, port: None, ..
            } => {
                for p in peers {
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
                    for p in peers {
                        exact(*p, protocol.number(), *start);
                    }
                    continue;
                }
                for p in peers {
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
                    if let Some(port) = identities[&local].resolve(name, *protocol) {
                        for p in peers {
                            exact(*p, protocol.number(), port);
                        }
                    }
                }
                // Egress: on the peer pod. "Anyone" means every pod that declares the name;
                // an ipBlock peer carries no port names, so it matches nothing here.
                Direction::Egress => {
                    for p in peers {
                        let candidates: Vec<u32> = match p {
                            PeerId::Identity(id) => vec![*id],
                            PeerId::Any => identities.keys().copied().collect(),
                            PeerId::Class(_) => Vec::new(),
                        };
                        for id in candidates {
                            if let Some(port) = identities[&id].resolve(name, *protocol) {
                                exact(PeerId::Identity(id), protocol.number(), port);
                            }
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

/// The LPM contents and, for each ipBlock, the classes that contain it.
struct CidrClasses {
    lpm: BTreeMap<CidrKey, u32>,
    /// class id → set of block indices.
    members: Vec<BTreeSet<usize>>,
    blocks: Vec<IpBlock>,
}

impl CidrClasses {
    fn build<'a>(policies: impl Iterator<Item = &'a Policy>) -> Self {
        let mut blocks: Vec<IpBlock> = Vec::new();
        for policy in policies {
            for direction in [Direction::Ingress, Direction::Egress] {
                for rule in policy.rules(direction).unwrap_or_default() {
                    for peer in rule.peers.iter().flatten() {
                        if let Peer::IpBlock(b) = peer
                            && !blocks.contains(b)
                        {
                            blocks.push(b.clone());
                        }
                    }
                }
            }
        }
        let prefixes: BTreeSet<IpNet> = blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
            .collect();
        let mut class_ids: BTreeMap<BTreeSet<usize>, u32> = BTreeMap::new();
        let mut members = Vec::new();
        let mut lpm = BTreeMap::new();
        for prefix in prefixes {
            let set: BTreeSet<usize> = blocks
                .iter()
                .enumerate()
                .filter(|(_, b)| b.cidr.contains(&prefix) && !b.except.iter().any(|e| e.contains(&prefix)))
                .map(|(i, _)| i)
                .collect();
            let next = class_ids.len() as u32;
            let class = *class_ids.entry(set.clone()).or_insert_with(|| {
                members.push(set);
                next
            });
            lpm.insert(CidrKey::of(prefix), class);
        }
        Self { lpm, members, blocks }
    }

    fn classes_of<'a>(&'a self, block: &'a IpBlock) -> impl Iterator<Item = u32> + 'a {
        let index = self.blocks.iter().position(|b| b == block);
        self.members
            .iter()
            .enumerate()
            .filter(move |(_, m)| index.is_some_and(|i| m.contains(&i)))
            .map(|(c, _)| c as u32)
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
) -> Option<u32> {
    let maps = &compiled.maps;
    let endpoint = maps.endpoints.get(local)?;
    let addr = addr_bytes(peer_addr);
    let peer_identity = maps.identities.get(&addr).copied();
    if direction == Direction::Ingress && peer_identity == Some(peer::HOST) {
        return Some(0);
    }
    let (isolated, ranged) = match direction {
        Direction::Ingress => (endpoint_flags::INGRESS_ISOLATED, endpoint_flags::INGRESS_RANGES),
        Direction::Egress => (endpoint_flags::EGRESS_ISOLATED, endpoint_flags::EGRESS_RANGES),
    };
    if endpoint.flags & isolated == 0 {
        return Some(0);
    }
    let class = maps
        .cidrs
        .iter()
        .filter(|(k, _)| prefix_matches(k, &addr))
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, c)| CIDR_CLASS_BASE | c);
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
                return Some(v.rule);
            }
        }
        if endpoint.flags & ranged != 0 {
            let hit = maps.port_ranges.iter().find(|(k, _)| {
                k.key.identity == endpoint.identity
                    && k.key.peer == peer
                    && k.key.direction == dir
                    && k.key.protocol == protocol
                    && {
                        let bits = k.prefix_len - PORT_RANGE_FIXED_BITS;
                        let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                        u16::from_be_bytes(k.key.port_be) & mask == port & mask
                    }
            });
            if let Some((_, v)) = hit {
                return Some(v.rule);
            }
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifests;

    /// Builds a State from YAML, all pods local.
    fn state(yaml: &str) -> State {
        let loaded = manifests::parse_str(Path::new("test.yaml"), yaml);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        State {
            namespaces: loaded.namespaces.into_iter().map(|n| (n.name.clone(), n)).collect(),
            pods: loaded.pods.into_iter().map(|p| (p.object_ref(), p)).collect(),
            policies: loaded.policies.into_iter().map(|p| (p.id.clone(), p)).collect(),
            ..State::default()
        }
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
        .is_some()
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
        let egress = |ip: &str| lookup(&c, &web, Direction::Egress, ip.parse().unwrap(), TCP, 5432).is_some();
        assert!(egress("10.0.0.2"));
        assert!(!egress("10.0.1.1"));
    }

    #[test]
    fn compile_is_deterministic() {
        let y = base()
            + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: a}\nspec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}\n";
        assert_eq!(compile(&state(&y)).maps, compile(&state(&y)).maps);
    }
}
