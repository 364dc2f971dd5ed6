//! Identities: what policy can tell pods apart by, and which pod owns each address.
use std::{
    borrow::Cow,
    cell::OnceCell,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
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

/// Identities by namespace, so that a selector is tried on the namespaces first and on the pods
/// of matching namespaces only (1,000 policies × 10,000 identities would otherwise be ten million
/// label matches per compile). [`super::Incremental`] keeps one up to date as identities come and
/// go (its keys are the ones its pods share, so it costs no copy); the full compile builds one.
pub(super) type ByNamespace = BTreeMap<String, BTreeMap<u32, Arc<IdentityKey>>>;

/// A namespace's labels: its own, or its name label alone while the Namespace is unknown.
pub(super) fn namespace_labels<'a>(state: &'a State, namespace: &str) -> Cow<'a, Labels> {
    match state.namespaces.get(namespace) {
        Some(ns) => Cow::Borrowed(&ns.labels),
        None => unknown_namespace_labels(namespace),
    }
}

fn unknown_namespace_labels(namespace: &str) -> Cow<'static, Labels> {
    Cow::Owned(Labels::from([(
        NAMESPACE_NAME_LABEL.to_string(),
        namespace.to_string(),
    )]))
}

/// What rule emission looks peers up in: every identity by namespace, and the local ones.
pub(super) struct IdentityIndex<'a> {
    state: &'a State,
    all: &'a ByNamespace,
    local: BTreeMap<&'a str, Vec<u32>>,
    /// Every namespace that holds an identity, with its labels: made by the first namespace
    /// selector that needs it (one merge of two sorted maps), then shared by every rule.
    labelled: OnceCell<Vec<NamespaceIdentities<'a>>>,
}

type NamespaceIdentities<'a> = (Cow<'a, Labels>, &'a BTreeMap<u32, Arc<IdentityKey>>);

impl<'a> IdentityIndex<'a> {
    pub(super) fn new(
        state: &'a State,
        identities: &BTreeMap<u32, IdentityKey>,
        all: &'a ByNamespace,
        local: &BTreeSet<u32>,
    ) -> Self {
        let mut index = Self {
            state,
            all,
            local: BTreeMap::new(),
            labelled: OnceCell::new(),
        };
        for id in local {
            let ns = identities[id].namespace.as_str();
            let (ns, _) = all
                .get_key_value(ns)
                .expect("every identity is in its namespace's list");
            index.local.entry(ns.as_str()).or_default().push(*id);
        }
        index
    }

    /// The identities of `namespace`.
    pub(super) fn in_namespace(&self, namespace: &str) -> impl Iterator<Item = (u32, &'a IdentityKey)> + use<'a> {
        self.all
            .get(namespace)
            .into_iter()
            .flatten()
            .map(|(id, key)| (*id, &**key))
    }

    /// Every namespace's labels (its name label alone when it is unknown) with its identities.
    pub(super) fn namespaces(&self) -> &[NamespaceIdentities<'a>] {
        self.labelled.get_or_init(|| {
            let mut known = self.state.namespaces.iter().peekable();
            self.all
                .iter()
                .map(|(ns, ids)| {
                    while known.next_if(|(name, _)| name.as_str() < ns.as_str()).is_some() {}
                    let labels = match known.peek() {
                        Some((name, n)) if *name == ns => Cow::Borrowed(&n.labels),
                        _ => unknown_namespace_labels(ns),
                    };
                    (labels, ids)
                })
                .collect()
        })
    }

    /// The namespaces that hold a local identity, in order.
    pub(super) fn local_namespaces(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.local.keys().copied()
    }

    pub(super) fn local_in(&self, namespace: &str) -> impl Iterator<Item = u32> + '_ {
        self.local.get(namespace).into_iter().flatten().copied()
    }
}
