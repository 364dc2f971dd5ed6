//! The reference evaluator: NetworkPolicy semantics written straight from the API reference, with
//! no identities, no classes, no maps and no cleverness. It is slow on purpose (it walks every
//! policy for every question) and exists so that the compiler and the datapath can be tested
//! against something obviously right.
//!
//! The sentences it implements, from the networking.k8s.io/v1 reference:
//! - A pod is isolated for ingress (egress) when a NetworkPolicy in its namespace selects it and
//!   has Ingress (Egress) in its policyTypes. A non-isolated pod allows everything.
//! - An isolated pod allows a connection when at least one rule of one of those policies matches
//!   it (the union). A rule matches when a peer matches (no peers: every peer) and a port matches
//!   (no ports: every port and protocol).
//! - A peer `podSelector` alone selects pods in the policy's namespace; with `namespaceSelector`
//!   the pods must be in a selected namespace too; `namespaceSelector` alone = every pod of the
//!   selected namespaces. `ipBlock` matches addresses in `cidr` and in no `except`.
//! - A named port is resolved on the destination pod: for ingress the isolated pod itself, for
//!   egress the peer (only pods declare names, so any other peer never matches it).
//! - Traffic from the node to its pods is always allowed (kubelet probes). hostNetwork pods are
//!   never isolated and, as peers, are just their (node's) address. Finished pods do not exist.
//! - (npc) The owner of an address is the newest running pod that has it.
use std::net::IpAddr;

use crate::{
    compiler::legacy_default_deny,
    model::{Labels, NAMESPACE_NAME_LABEL, Pod, Protocol, State},
    policy::{Direction, NamespaceScope, Peer, PortSpec, Rule},
};

/// The pod that owns `addr`, if any: running, not hostNetwork, newest (then greatest name).
pub fn owner(state: &State, addr: IpAddr) -> Option<&Pod> {
    state
        .pods
        .values()
        .filter(|p| !p.terminated && !p.host_network && p.ips.contains(&addr))
        .max_by(|a, b| (a.created, a.object_ref()).cmp(&(b.created, b.object_ref())))
}

/// Is a connection from `src` to `dst` on `protocol`/`port` allowed, by both the source pod's
/// egress policy and the destination pod's ingress policy (each only where it is enforced)?
pub fn allowed(state: &State, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> bool {
    side_allows(state, Direction::Egress, src, dst, protocol, port)
        && side_allows(state, Direction::Ingress, dst, src, protocol, port)
}

/// The verdict of one enforcement point: the pod at `local` (if it is one of ours) judging a
/// connection with `peer` in `direction`.
pub fn side_allows(
    state: &State,
    direction: Direction,
    local: IpAddr,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(pod) = owner(state, local) else {
        return true;
    };
    if !state.is_local(pod) {
        return true;
    }
    let policies: Vec<&[Rule]> = state
        .policies
        .values()
        .filter(|p| p.id.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
        .filter_map(|p| p.rules(direction))
        .collect();
    let legacy = direction == Direction::Ingress
        && state.legacy_default_deny
        && state
            .namespaces
            .get(&pod.namespace)
            .is_some_and(|ns| legacy_default_deny(&ns.annotations));
    if policies.is_empty() && !legacy {
        return true;
    }
    if direction == Direction::Ingress && state.node_addrs.contains(&peer) {
        return true;
    }
    let peer_pod = owner(state, peer);
    // Which pod a named port is looked up on: the destination.
    let named_on = match direction {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer_pod,
    };
    state
        .policies
        .values()
        .filter(|p| p.id.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
        .filter_map(|p| p.rules(direction).map(|rules| (p, rules)))
        .any(|(policy, rules)| {
            rules.iter().any(|rule| {
                let peer_ok = match &rule.peers {
                    None => true,
                    Some(peers) => peers.iter().any(|p| match p {
                        Peer::IpBlock(block) => block.contains(peer),
                        Peer::Pods { namespaces, pods } => peer_pod.is_some_and(|pp| {
                            let ns_ok = match namespaces {
                                NamespaceScope::Own => pp.namespace == policy.id.namespace,
                                NamespaceScope::Selector(sel) => sel.matches(&namespace_labels(state, &pp.namespace)),
                            };
                            ns_ok && pods.matches(&pp.labels)
                        }),
                    }),
                };
                let port_ok = match &rule.ports {
                    None => true,
                    Some(ports) => ports.iter().any(|spec| match spec {
                        PortSpec::Number {
                            protocol: p,
                            port: None,
                            ..
                        } => *p == protocol,
                        PortSpec::Number {
                            protocol: p,
                            port: Some(start),
                            end,
                        } => *p == protocol && *start <= port && port <= end.unwrap_or(*start),
                        PortSpec::Named { protocol: p, name } => {
                            *p == protocol
                                && named_on.is_some_and(|d| {
                                    d.ports.iter().any(|c| {
                                        c.name.as_deref() == Some(name.as_str())
                                            && c.protocol == protocol
                                            && c.port == port
                                    })
                                })
                        }
                    }),
                };
                peer_ok && port_ok
            })
        })
}

/// A namespace's labels; one that has no object still has its name label (the API server adds it
/// to every namespace).
fn namespace_labels(state: &State, name: &str) -> Labels {
    match state.namespaces.get(name) {
        Some(ns) => ns.labels.clone(),
        None => [(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into(),
    }
}
