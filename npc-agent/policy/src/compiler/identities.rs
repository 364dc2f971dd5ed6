//! Identities: what policy can tell pods apart by, and which pod owns each address.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::cidrs::in_ipv4_space;
use crate::{
    model::{ContainerPort, Labels, NAMESPACE_NAME_LABEL, Pod, Protocol, State},
    policy::{Direction, IpBlock, Peer, PortSpec},
};

/// (namespace, labels, named ports): what policy can tell pods apart by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: Labels,
    /// Only named ports, sorted: unnamed ones never change a verdict.
    pub named_ports: Vec<ContainerPort>,
    /// The ipBlocks of egress rules with named ports that hold this address. Such a rule allows a
    /// pod only when its address is in the block *and* it declares the name, so the pods it
    /// allows must be told apart by address; every other ipBlock is matched through the LPM
    /// classes and needs no identity split. Empty in almost every cluster.
    pub named_port_blocks: Vec<IpBlock>,
}

impl IdentityKey {
    pub(super) fn of(pod: &Pod) -> Self {
        let mut named_ports: Vec<ContainerPort> = pod.ports.iter().filter(|p| p.name.is_some()).cloned().collect();
        named_ports.sort();
        named_ports.dedup();
        Self {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports,
            named_port_blocks: Vec::new(),
        }
    }

    /// Every port the pod declares under `name` for `protocol`: names are unique within a
    /// container only, so two containers may each declare one (the API server accepts it) and a
    /// named-port rule then allows both.
    pub(super) fn resolve<'a>(&'a self, name: &'a str, protocol: Protocol) -> impl Iterator<Item = u16> + 'a {
        self.named_ports
            .iter()
            .filter(move |p| p.name.as_deref() == Some(name) && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// Pods that take part in policy: running (not Succeeded/Failed) and not hostNetwork (those are
/// never enforced and, as peers, look like their node).
pub fn policy_pods(state: &State) -> impl Iterator<Item = &Pod> {
    state.pods.values().filter(|p| !p.terminated && !p.host_network)
}

/// Which policy pod owns each address: the newest (latest creation time; then the greatest
/// namespace/name, so the answer never depends on map order). A pod deleted while a newer one
/// reuses its address therefore never takes the address away from the new owner.
pub fn address_owners(state: &State) -> BTreeMap<IpAddr, &Pod> {
    let mut owners: BTreeMap<IpAddr, &Pod> = BTreeMap::new();
    for pod in policy_pods(state) {
        for ip in &pod.ips {
            let newer = owners
                .get(ip)
                .is_none_or(|old| (pod.created, pod.object_ref()) > (old.created, old.object_ref()));
            if newer {
                owners.insert(*ip, pod);
            }
        }
    }
    owners
}

pub(super) fn namespace_labels<'a>(state: &'a State, ns: &str, fallback: &'a mut Labels) -> &'a Labels {
    match state.namespaces.get(ns) {
        Some(n) => &n.labels,
        None => {
            fallback.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
            fallback
        }
    }
}

/// Egress ipBlock peers of rules that name a port: the only ipBlocks an identity must know its
/// addresses' membership of (see [`IdentityKey::named_port_blocks`]).
pub(super) fn named_port_egress_blocks(state: &State) -> BTreeSet<IpBlock> {
    let mut out = BTreeSet::new();
    for policy in state.policies.values() {
        for rule in policy.rules(Direction::Egress).unwrap_or_default() {
            let named = rule.ports.iter().flatten().any(|p| matches!(p, PortSpec::Named { .. }));
            if named {
                for peer in rule.peers.iter().flatten() {
                    match peer {
                        // An IPv4-mapped IPv6 block matches nothing (see `in_ipv4_space`).
                        Peer::IpBlock(b) if !in_ipv4_space(&b.cidr) => {
                            out.insert(b.clone());
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

/// Identity ids by namespace, so that a selector is tried on the namespaces first and on the pods
/// of matching namespaces only (1,000 policies × 10,000 identities would otherwise be ten million
/// label matches per compile). [`super::Incremental`] keeps one up to date as identities come and
/// go; the full compile builds it ([`by_namespace`]).
pub(super) type ByNamespace = BTreeMap<String, BTreeSet<u32>>;

pub(super) fn by_namespace(identities: &BTreeMap<u32, IdentityKey>) -> ByNamespace {
    let mut out = ByNamespace::new();
    for (id, key) in identities {
        match out.get_mut(&key.namespace) {
            Some(ids) => _ = ids.insert(*id),
            None => _ = out.insert(key.namespace.clone(), [*id].into()),
        }
    }
    out
}

/// What rule emission looks peers up in: every identity by namespace, and the local ones.
pub(super) struct IdentityIndex<'a> {
    state: &'a State,
    pub(super) identities: &'a BTreeMap<u32, IdentityKey>,
    pub(super) all: &'a ByNamespace,
    local: BTreeMap<&'a str, Vec<u32>>,
}

impl<'a> IdentityIndex<'a> {
    pub(super) fn new(
        state: &'a State,
        identities: &'a BTreeMap<u32, IdentityKey>,
        all: &'a ByNamespace,
        local: &BTreeSet<u32>,
    ) -> Self {
        let mut index = Self {
            state,
            identities,
            all,
            local: BTreeMap::new(),
        };
        for id in local {
            index
                .local
                .entry(identities[id].namespace.as_str())
                .or_default()
                .push(*id);
        }
        index
    }

    /// The namespaces that hold a local identity, in order.
    pub(super) fn local_namespaces(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.local.keys().copied()
    }

    pub(super) fn local_in(&self, namespace: &str) -> impl Iterator<Item = u32> + '_ {
        self.local.get(namespace).into_iter().flatten().copied()
    }

    /// Whether `namespace`'s labels (its name label alone when it is unknown) match `selector`.
    pub(super) fn namespace_matches(&self, namespace: &str, selector: &crate::policy::Selector) -> bool {
        let mut fallback = Labels::new();
        selector.matches(namespace_labels(self.state, namespace, &mut fallback))
    }
}
