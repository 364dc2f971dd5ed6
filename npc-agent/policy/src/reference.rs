//! An independent reference evaluator for networking.k8s.io/v1 NetworkPolicy, working directly on
//! k8s-openapi objects. It shares no code with npc's parser, validator or compiler: label selectors,
//! CIDR containment, policyTypes defaulting, named-port resolution and address ownership are all
//! written out here, slowly and obviously (every question walks every object).
//!
//! `cargo test -p npc-policy` (tests/semantics.rs) holds the compiler to it on random clusters
//! from [`crate::scenario`], and npc-integration holds the kernel datapath and the lab to it.
//!
//! It assumes API-valid objects (as the API server would store them). Anything it cannot read (an
//! unparseable CIDR, an unknown operator or protocol) matches nothing rather than panicking.
//!
//! The sentences implemented, from the API reference and npc's docs/semantics.md:
//!
//! 1. A pod's addresses are `status.podIPs[].ip`, or `status.podIP` when `podIPs` is missing or
//!    empty. A pod whose `status.phase` is Succeeded or Failed does not exist for policy.
//! 2. A hostNetwork pod is never enforced and, as a peer, is just an address: it never matches a
//!    pod selector (only ipBlocks, and the node rule below, see it).
//! 3. The owner of an address is the newest existing non-hostNetwork pod that has it: latest
//!    `metadata.creationTimestamp` (missing = oldest), then the greater (namespace, name).
//! 4. Only local pods (`spec.nodeName == node_name`) are enforced: a side whose local address has
//!    no owner, or whose owner runs elsewhere, allows everything.
//! 5. A pod is isolated for a direction when a policy in its namespace selects it
//!    (`spec.podSelector`) and that direction is in the policy's policyTypes. policyTypes missing or
//!    empty (`len == 0`, as the API server's SetDefaults_NetworkPolicy tests it) defaults to
//!    [Ingress], plus Egress when `spec.egress` has at least one rule.
//! 6. Legacy (only with `legacy_default_deny`): a Namespace object annotated
//!    `net.beta.kubernetes.io/network-policy` with JSON whose `ingress.isolation` is "DefaultDeny"
//!    isolates its pods for ingress (with no rules of its own).
//! 7. A pod that is not isolated in a direction allows everything in it. An isolated pod allows
//!    the union of the rules of the policies that select it and have that type.
//! 8. Ingress from any of the node's addresses is always allowed for an isolated pod.
//! 9. A rule matches when one of its peers matches (`from`/`to` missing or empty: every peer) and
//!    one of its ports matches (`ports` missing or empty: every port of every protocol).
//! 10. Peer `podSelector` alone: pods in the policy's namespace; `namespaceSelector` alone: every
//!     pod in the selected namespaces; both: the pod's namespace is selected AND the pod is
//!     selected. A peer that is an address with no owner pod never matches these.
//! 11. Peer `ipBlock`: the address is inside `cidr` and inside no `except`. A CIDR with host bits
//!     set means its network. Pod addresses are matched too. An IPv4 block never holds an IPv6
//!     address and vice versa; IPv4-mapped IPv6 prefixes (`::ffff:0:0/96`) are IPv6 blocks and
//!     never hold an IPv4 address.
//! 12. Namespace labels: those of the Namespace object, plus `kubernetes.io/metadata.name=<name>`
//!     (which the API server sets and which overrides anything written there); a namespace with
//!     no object has just that label.
//! 13. Label selectors: every `matchLabels` pair AND every `matchExpressions` requirement (In,
//!     NotIn, Exists, DoesNotExist; NotIn also matches when the key is absent). `{}` selects all.
//! 14. Ports: protocol defaults to TCP and must equal the packet's; a number matches that port, or
//!     [port, endPort] when endPort is set; no port matches every port of the protocol.
//! 15. A named port resolves on the destination pod (ingress: the local isolated pod; egress: the
//!     peer's owner pod): it matches when one of the pod's `spec.containers[].ports[]` has that
//!     name, the same protocol (default TCP) and `containerPort` equal to the packet's port. A peer
//!     with no owner pod never matches a named port.
//! 16. A Service's VIPs are its `spec.clusterIPs` (or `spec.clusterIP`), `spec.externalIPs` and
//!     `status.loadBalancer.ingress[].ip` ("None" and "" are not addresses). A connection from a pod
//!     to a VIP on one of the Service's ports (same protocol, default TCP) is sent by kube-proxy
//!     to one backend on that backend's target port.
//! 17. The backends: with a selector (non-empty), one per address of every existing pod in the
//!     Service's namespace whose labels hold every selector pair; its target port is `targetPort`
//!     (a number; a name: the pod's container port of that name and protocol, the pod is no
//!     backend for that port without one; missing: the Service port). npc's EndpointSlice
//!     reading is not under test here: the generator makes only selector Services.
//! 18. Egress to a VIP on a Service port is allowed when egress to the VIP address itself is (as
//!     for any address), or when there is at least one backend of the VIP's family and egress to
//!     every one of them, on its target port, is allowed (fail-closed when only some are).
use std::net::IpAddr;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        networking::v1::{IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// Everything the reference reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    pub services: Vec<Service>,
    /// Pods with `spec.nodeName == node_name` are local (enforced by this node).
    pub node_name: String,
    /// This node's addresses: ingress from them to a local pod is always allowed.
    pub node_addrs: Vec<IpAddr>,
    /// Honour the pre-v1 `net.beta.kubernetes.io/network-policy` namespace annotation.
    pub legacy_default_deny: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
pub const LEGACY_ANNOTATION: &str = "net.beta.kubernetes.io/network-policy";

type Map = std::collections::BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------------
// Pods (sentences 1-4)
// ---------------------------------------------------------------------------------------------

fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("")
}

/// Sentence 1: `status.podIPs[].ip`, else `status.podIP`; unparseable entries are skipped.
pub fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let mut texts: Vec<&str> = Vec::new();
    if let Some(status) = &pod.status {
        if let Some(list) = &status.pod_ips {
            for entry in list {
                texts.push(entry.ip.as_str());
            }
        }
        if texts.is_empty()
            && let Some(ip) = &status.pod_ip
        {
            texts.push(ip.as_str());
        }
    }
    let mut out = Vec::new();
    for t in texts {
        if let Ok(addr) = t.parse::<IpAddr>()
            && !out.contains(&addr)
        {
            out.push(addr);
        }
    }
    out
}

/// Sentence 1: Succeeded and Failed pods do not exist for policy.
fn pod_exists(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !(phase == Some("Succeeded") || phase == Some("Failed"))
}

fn is_host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

/// Sentence 3: the newest existing non-hostNetwork pod that has `addr`.
pub fn owner(c: &Cluster, addr: IpAddr) -> Option<&Pod> {
    let mut best: Option<&Pod> = None;
    for pod in &c.pods {
        if !pod_exists(pod) || is_host_network(pod) || !pod_addresses(pod).contains(&addr) {
            continue;
        }
        best = match best {
            None => Some(pod),
            Some(old) => {
                if newer(pod, old) {
                    Some(pod)
                } else {
                    Some(old)
                }
            }
        };
    }
    best
}

/// Is `a` newer than `b`: later creationTimestamp (a missing one is the oldest), then the greater
/// (namespace, name).
fn newer(a: &Pod, b: &Pod) -> bool {
    let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
    if ta != tb {
        return ta > tb;
    }
    (pod_namespace(a), pod_name(a)) > (pod_namespace(b), pod_name(b))
}

/// Sentence 4.
fn is_local(c: &Cluster, pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(c.node_name.as_str())
}

// ---------------------------------------------------------------------------------------------
// Labels and selectors (sentences 12-13)
// ---------------------------------------------------------------------------------------------

/// Sentence 12.
fn namespace_labels(c: &Cluster, name: &str) -> Map {
    let mut labels = Map::new();
    if let Some(ns) = c.namespaces.iter().find(|n| n.metadata.name.as_deref() == Some(name))
        && let Some(l) = &ns.metadata.labels
    {
        labels = l.clone();
    }
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    labels
}

/// Sentence 13.
pub fn selector_matches(sel: &LabelSelector, labels: &Map) -> bool {
    if let Some(pairs) = &sel.match_labels {
        for (k, v) in pairs {
            if labels.get(k) != Some(v) {
                return false;
            }
        }
    }
    if let Some(exprs) = &sel.match_expressions {
        for e in exprs {
            let values: Vec<String> = e.values.clone().unwrap_or_default();
            let have = labels.get(&e.key);
            let ok = match e.operator.as_str() {
                "In" => match have {
                    Some(v) => values.contains(v),
                    None => false,
                },
                "NotIn" => match have {
                    Some(v) => !values.contains(v),
                    None => true,
                },
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

fn pod_labels(pod: &Pod) -> Map {
    pod.metadata.labels.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// CIDRs (sentence 11)
// ---------------------------------------------------------------------------------------------

/// A parsed CIDR: the family, the network bits (host bits cleared) and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cidr {
    V4 { bits: u32, len: u32 },
    V6 { bits: u128, len: u32 },
}

fn mask32(len: u32) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

fn mask128(len: u32) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len) }
}

fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 3 {
        return None;
    }
    let len: u32 = len.parse().ok()?;
    // The text decides the family: "::ffff:10.0.0.0" is an IPv6 address.
    match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if len <= 32 => Some(Cidr::V4 {
            bits: u32::from(a) & mask32(len),
            len,
        }),
        IpAddr::V6(a) if len <= 128 => Some(Cidr::V6 {
            bits: u128::from(a) & mask128(len),
            len,
        }),
        _ => None,
    }
}

fn cidr_contains(cidr: Cidr, addr: IpAddr) -> bool {
    match (cidr, addr) {
        (Cidr::V4 { bits, len }, IpAddr::V4(a)) => u32::from(a) & mask32(len) == bits,
        (Cidr::V6 { bits, len }, IpAddr::V6(a)) => u128::from(a) & mask128(len) == bits,
        // Never across families, IPv4-mapped IPv6 prefixes included.
        _ => false,
    }
}

/// Sentence 11.
fn ip_block_matches(block: &IPBlock, addr: IpAddr) -> bool {
    let Some(cidr) = parse_cidr(&block.cidr) else {
        return false;
    };
    if !cidr_contains(cidr, addr) {
        return false;
    }
    for e in block.except.iter().flatten() {
        match parse_cidr(e) {
            Some(except) if cidr_contains(except, addr) => return false,
            Some(_) => {}
            // An unreadable except: the policy would have been rejected; match nothing.
            None => return false,
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Policies (sentences 5-10, 14-15)
// ---------------------------------------------------------------------------------------------

fn policy_namespace(p: &NetworkPolicy) -> &str {
    p.metadata.namespace.as_deref().unwrap_or("default")
}

/// Sentence 5: (isolates for ingress, isolates for egress), after API-server defaulting.
pub fn policy_types(p: &NetworkPolicy) -> (bool, bool) {
    let Some(spec) = &p.spec else {
        return (false, false);
    };
    let types: Vec<String> = spec.policy_types.clone().unwrap_or_default();
    if types.is_empty() {
        let egress_rules = spec.egress.as_ref().map_or(0, Vec::len);
        return (true, egress_rules > 0);
    }
    (
        types.iter().any(|t| t == "Ingress"),
        types.iter().any(|t| t == "Egress"),
    )
}

fn selects(p: &NetworkPolicy, pod: &Pod) -> bool {
    if policy_namespace(p) != pod_namespace(pod) {
        return false;
    }
    let Some(spec) = &p.spec else {
        return false;
    };
    // spec.podSelector is required; a missing one is read as {} (what a decoder would give).
    let empty = LabelSelector::default();
    selector_matches(spec.pod_selector.as_ref().unwrap_or(&empty), &pod_labels(pod))
}

/// Sentence 6.
fn legacy_isolated(c: &Cluster, namespace: &str) -> bool {
    if !c.legacy_default_deny {
        return false;
    }
    let Some(ns) = c
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(namespace))
    else {
        return false;
    };
    let Some(text) = ns.metadata.annotations.as_ref().and_then(|a| a.get(LEGACY_ANNOTATION)) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return false;
    };
    value
        .get("ingress")
        .and_then(|i| i.get("isolation"))
        .and_then(|v| v.as_str())
        == Some("DefaultDeny")
}

/// The (peers, ports) of each rule of `p` in `direction` (only when `p` has that type).
fn rules_of(p: &NetworkPolicy, direction: Direction) -> Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> {
    let Some(spec) = &p.spec else {
        return Vec::new();
    };
    if !has_type(p, direction) {
        return Vec::new();
    }
    let rule = |peers: &Option<Vec<NetworkPolicyPeer>>, ports: &Option<Vec<NetworkPolicyPort>>| {
        (peers.clone().unwrap_or_default(), ports.clone().unwrap_or_default())
    };
    match direction {
        Direction::Ingress => spec.ingress.iter().flatten().map(|r| rule(&r.from, &r.ports)).collect(),
        Direction::Egress => spec.egress.iter().flatten().map(|r| rule(&r.to, &r.ports)).collect(),
    }
}

fn has_type(p: &NetworkPolicy, direction: Direction) -> bool {
    let (ingress, egress) = policy_types(p);
    match direction {
        Direction::Ingress => ingress,
        Direction::Egress => egress,
    }
}

/// Sentence 10 and 11: does `peer` (address `addr`, owned by `peer_pod`) match?
fn peer_matches(c: &Cluster, policy_ns: &str, peer: &NetworkPolicyPeer, addr: IpAddr, peer_pod: Option<&Pod>) -> bool {
    if let Some(block) = &peer.ip_block {
        return ip_block_matches(block, addr);
    }
    if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        return false; // rejected by the API server
    }
    let Some(pp) = peer_pod else {
        return false;
    };
    let ns = pod_namespace(pp);
    let ns_ok = match &peer.namespace_selector {
        None => ns == policy_ns,
        Some(sel) => selector_matches(sel, &namespace_labels(c, ns)),
    };
    let pod_ok = match &peer.pod_selector {
        None => true,
        Some(sel) => selector_matches(sel, &pod_labels(pp)),
    };
    ns_ok && pod_ok
}

/// Sentence 15: does `pod` declare `name` for `protocol` on `port`?
fn declares(pod: &Pod, name: &str, protocol: &str, port: u16) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    for container in &spec.containers {
        for cp in container.ports.iter().flatten() {
            let cp_protocol = cp.protocol.as_deref().unwrap_or("TCP");
            if cp.name.as_deref() == Some(name) && cp_protocol == protocol && cp.container_port == i32::from(port) {
                return true;
            }
        }
    }
    false
}

/// Sentences 14 and 15.
fn port_matches(spec: &NetworkPolicyPort, protocol: &str, port: u16, named_on: Option<&Pod>) -> bool {
    let want_protocol = spec.protocol.as_deref().unwrap_or("TCP");
    if want_protocol != protocol {
        return false;
    }
    match &spec.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let start = *n;
            let end = spec.end_port.unwrap_or(start);
            start <= i32::from(port) && i32::from(port) <= end
        }
        Some(IntOrString::String(name)) => match named_on {
            Some(pod) => declares(pod, name, protocol, port),
            None => false,
        },
    }
}

/// The verdict of one enforcement point: the pod owning `local` judging a connection with `peer`
/// in `direction` (`local` is the destination for ingress, the source for egress).
pub fn side_allows(c: &Cluster, direction: Direction, local: IpAddr, peer: IpAddr, protocol: &str, port: u16) -> bool {
    // Sentence 4.
    let Some(pod) = owner(c, local) else {
        return true;
    };
    if !is_local(c, pod) {
        return true;
    }
    // Sentences 5-7.
    let selecting: Vec<&NetworkPolicy> = c
        .policies
        .iter()
        .filter(|p| selects(p, pod) && has_type(p, direction))
        .collect();
    let legacy = direction == Direction::Ingress && legacy_isolated(c, pod_namespace(pod));
    if selecting.is_empty() && !legacy {
        return true;
    }
    // Sentence 8.
    if direction == Direction::Ingress && c.node_addrs.contains(&peer) {
        return true;
    }
    let peer_pod = owner(c, peer);
    let named_on = match direction {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer_pod,
    };
    // Sentences 7, 9.
    for policy in selecting {
        for (peers, ports) in rules_of(policy, direction) {
            let peer_ok = peers.is_empty()
                || peers
                    .iter()
                    .any(|p| peer_matches(c, policy_namespace(policy), p, peer, peer_pod));
            let port_ok = ports.is_empty() || ports.iter().any(|s| port_matches(s, protocol, port, named_on));
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Services (sentences 16-18)
// ---------------------------------------------------------------------------------------------

/// Sentence 16.
fn vips(svc: &Service) -> Vec<IpAddr> {
    let mut texts: Vec<String> = Vec::new();
    if let Some(spec) = &svc.spec {
        match &spec.cluster_ips {
            Some(list) if !list.is_empty() => texts.extend(list.iter().cloned()),
            _ => texts.extend(spec.cluster_ip.iter().cloned()),
        }
        texts.extend(spec.external_ips.iter().flatten().cloned());
    }
    if let Some(lb) = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()) {
        for ingress in lb.ingress.iter().flatten() {
            texts.extend(ingress.ip.iter().cloned());
        }
    }
    texts.iter().filter_map(|t| t.parse().ok()).collect()
}

/// Sentence 17: (backend address, target port) for one Service port.
fn service_backends(c: &Cluster, svc: &Service, port: &k8s_openapi::api::core::v1::ServicePort) -> Vec<(IpAddr, u16)> {
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let mut out = Vec::new();
    for pod in &c.pods {
        if pod_namespace(pod) != namespace || !pod_exists(pod) {
            continue;
        }
        let labels = pod_labels(pod);
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let target = match &port.target_port {
            None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod.spec.iter().flat_map(|s| &s.containers).find_map(|container| {
                container.ports.iter().flatten().find_map(|cp| {
                    (cp.name.as_deref() == Some(name.as_str()) && cp.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then(|| u16::try_from(cp.container_port).ok())
                        .flatten()
                })
            }),
        };
        if let Some(target) = target {
            for addr in pod_addresses(pod) {
                out.push((addr, target));
            }
        }
    }
    out
}

/// Sentences 16-17: the (backend address, target port) pairs a connection to `vip`:`port` may be
/// sent to, of the VIP's family; `None` when `vip` is no Service's VIP or `port` none of its ports.
pub fn vip_backends(c: &Cluster, vip: IpAddr, protocol: &str, port: u16) -> Option<Vec<(IpAddr, u16)>> {
    for svc in &c.services {
        if !vips(svc).contains(&vip) {
            continue;
        }
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        for sp in ports.into_iter().flatten() {
            if sp.protocol.as_deref().unwrap_or("TCP") == protocol && sp.port == i32::from(port) {
                let backends = service_backends(c, svc, sp);
                return Some(
                    backends
                        .into_iter()
                        .filter(|(a, _)| a.is_ipv4() == vip.is_ipv4())
                        .collect(),
                );
            }
        }
    }
    None
}

/// Sentence 18: the egress verdict at `src` for a connection to `vip`:`port`, when `vip` is a
/// Service's VIP and `port` one of its ports; `None` when it is not (an address like any other).
pub fn service_egress_allows(c: &Cluster, src: IpAddr, vip: IpAddr, protocol: &str, port: u16) -> Option<bool> {
    let backends = vip_backends(c, vip, protocol, port)?;
    if side_allows(c, Direction::Egress, src, vip, protocol, port) {
        return Some(true);
    }
    Some(
        !backends.is_empty()
            && backends
                .iter()
                .all(|(addr, target)| side_allows(c, Direction::Egress, src, *addr, protocol, *target)),
    )
}

/// A VIP owns no pod, so its ingress side allows everything; its egress side is sentence 18.
pub fn allowed(c: &Cluster, src: IpAddr, dst: IpAddr, protocol: &str, port: u16) -> bool {
    let egress = service_egress_allows(c, src, dst, protocol, port)
        .unwrap_or_else(|| side_allows(c, Direction::Egress, src, dst, protocol, port));
    egress && side_allows(c, Direction::Ingress, dst, src, protocol, port)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{Container, ContainerPort, PodIP, PodSpec, PodStatus},
            networking::v1::{NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicySpec},
        },
        apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> Option<Map> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: map(labels),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A running pod on n1 with one address.
    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], addr: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: map(labels),
                creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_000).unwrap())),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(addr.into()),
                pod_ips: Some(vec![PodIP { ip: addr.into() }]),
                ..Default::default()
            }),
        }
    }

    fn with_ports(mut p: Pod, ports: &[(&str, i32, &str)]) -> Pod {
        p.spec.as_mut().unwrap().containers[0].ports = Some(
            ports
                .iter()
                .map(|(n, port, proto)| ContainerPort {
                    name: Some(n.to_string()),
                    container_port: *port,
                    protocol: Some(proto.to_string()),
                    ..Default::default()
                })
                .collect(),
        );
        p
    }

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: map(pairs),
            match_expressions: None,
        }
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
        }
    }

    fn pods_peer(pods: Option<LabelSelector>, namespaces: Option<LabelSelector>) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            pod_selector: pods,
            namespace_selector: namespaces,
            ip_block: None,
        }
    }

    fn block(cidr: &str, except: &[&str]) -> NetworkPolicyPeer {
        NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.into(),
                except: (!except.is_empty()).then(|| except.iter().map(|e| e.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    fn port(proto: Option<&str>, port: Option<IntOrString>, end: Option<i32>) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: proto.map(str::to_string),
            port,
            end_port: end,
        }
    }

    fn ingress(
        from: Option<Vec<NetworkPolicyPeer>>,
        ports: Option<Vec<NetworkPolicyPort>>,
    ) -> NetworkPolicyIngressRule {
        NetworkPolicyIngressRule { from, ports }
    }

    fn egress(to: Option<Vec<NetworkPolicyPeer>>, ports: Option<Vec<NetworkPolicyPort>>) -> NetworkPolicyEgressRule {
        NetworkPolicyEgressRule { to, ports }
    }

    fn policy(
        ns: &str,
        name: &str,
        selector: LabelSelector,
        types: Option<&[&str]>,
        ing: Option<Vec<NetworkPolicyIngressRule>>,
        eg: Option<Vec<NetworkPolicyEgressRule>>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector),
                policy_types: types.map(|t| t.iter().map(|s| s.to_string()).collect()),
                ingress: ing,
                egress: eg,
            }),
        }
    }

    /// `a/<name>`: a/db (app=db) takes ingress on every port from `peers`.
    fn db_from(name: &str, peers: Vec<NetworkPolicyPeer>) -> NetworkPolicy {
        policy(
            "a",
            name,
            sel(&[("app", "db")]),
            None,
            Some(vec![ingress(Some(peers), None)]),
            None,
        )
    }

    /// `a/deny`: every pod of a isolated both ways, with no rules.
    fn deny_all_in_a() -> NetworkPolicy {
        policy(
            "a",
            "deny",
            LabelSelector::default(),
            Some(&["Ingress", "Egress"]),
            None,
            None,
        )
    }

    fn cluster(namespaces: Vec<Namespace>, pods: Vec<Pod>, policies: Vec<NetworkPolicy>) -> Cluster {
        Cluster {
            namespaces,
            pods,
            policies,
            services: Vec::new(),
            node_name: "n1".into(),
            node_addrs: vec![ip("10.0.0.254")],
            legacy_default_deny: false,
        }
    }

    /// a/web (10.0.0.1), a/db (10.0.0.2), b/cli (10.0.0.3).
    fn three_pods() -> Vec<Pod> {
        vec![
            pod("a", "web", &[("app", "web")], "10.0.0.1"),
            pod("a", "db", &[("app", "db")], "10.0.0.2"),
            pod("b", "cli", &[("app", "cli")], "10.0.0.3"),
        ]
    }

    const WEB: &str = "10.0.0.1";
    const DB: &str = "10.0.0.2";
    const CLI: &str = "10.0.0.3";

    fn can(c: &Cluster, src: &str, dst: &str, proto: &str, port: u16) -> bool {
        allowed(c, ip(src), ip(dst), proto, port)
    }

    #[test]
    fn no_policy_allows_everything() {
        let c = cluster(vec![], three_pods(), vec![]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(can(&c, "192.0.2.1", WEB, "UDP", 53));
    }

    #[test]
    fn isolation_and_empty_rules() {
        // ingress: [] with Ingress isolation allows nothing; only the selected pod is isolated.
        let deny = policy("a", "deny", sel(&[("app", "db")]), None, Some(vec![]), None);
        let c = cluster(vec![], three_pods(), vec![deny]);
        assert!(!can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, CLI, DB, "TCP", 80));
        assert!(
            can(&c, DB, WEB, "TCP", 80),
            "web is not selected; db's egress is not isolated"
        );
        // ingress: [{}] allows everything.
        let all = policy(
            "a",
            "all",
            sel(&[("app", "db")]),
            None,
            Some(vec![ingress(None, None)]),
            None,
        );
        let c = cluster(vec![], three_pods(), vec![all]);
        assert!(can(&c, CLI, DB, "SCTP", 9));
        // Empty from and ports lists mean every peer / every port too.
        let empty = policy(
            "a",
            "e",
            sel(&[("app", "db")]),
            None,
            Some(vec![ingress(Some(vec![]), Some(vec![]))]),
            None,
        );
        let c = cluster(vec![], three_pods(), vec![empty]);
        assert!(can(&c, CLI, DB, "UDP", 1234));
    }

    #[test]
    fn policies_in_other_namespaces_do_not_select() {
        let deny = policy("b", "deny", LabelSelector::default(), None, Some(vec![]), None);
        let c = cluster(vec![], three_pods(), vec![deny]);
        assert!(can(&c, CLI, DB, "TCP", 80));
        assert!(!can(&c, WEB, CLI, "TCP", 80));
    }

    #[test]
    fn union_of_policies() {
        let from_web = db_from("p1", vec![pods_peer(Some(sel(&[("app", "web")])), None)]);
        let udp53 = policy(
            "a",
            "p2",
            LabelSelector::default(),
            Some(&["Ingress"]),
            Some(vec![ingress(
                None,
                Some(vec![port(Some("UDP"), Some(IntOrString::Int(53)), None)]),
            )]),
            None,
        );
        let c = cluster(vec![], three_pods(), vec![from_web, udp53]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(can(&c, CLI, DB, "UDP", 53));
        assert!(!can(&c, CLI, DB, "TCP", 53));
        assert!(!can(&c, DB, WEB, "TCP", 80), "web is isolated by p2 only");
    }

    #[test]
    fn pod_selector_alone_is_the_policy_namespace() {
        let b_web = pod("b", "bweb", &[("app", "web")], "10.0.0.4");
        let mut pods = three_pods();
        pods.push(b_web);
        let p = db_from("p", vec![pods_peer(Some(sel(&[("app", "web")])), None)]);
        let c = cluster(vec![], pods, vec![p]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, "10.0.0.4", DB, "TCP", 80));
    }

    #[test]
    fn namespace_and_pod_selectors_and() {
        let mut pods = three_pods();
        pods.push(pod("b", "bweb", &[("app", "web")], "10.0.0.4"));
        pods.push(pod("c", "cweb", &[("app", "web")], "10.0.0.5"));
        let namespaces = vec![ns("a", &[]), ns("b", &[("team", "x")]), ns("c", &[("team", "y")])];
        let both = db_from(
            "p",
            vec![pods_peer(Some(sel(&[("app", "web")])), Some(sel(&[("team", "x")])))],
        );
        let c = cluster(namespaces.clone(), pods.clone(), vec![both]);
        assert!(can(&c, "10.0.0.4", DB, "TCP", 80), "b/web: both match");
        assert!(!can(&c, CLI, DB, "TCP", 80), "b/cli: namespace only");
        assert!(!can(&c, "10.0.0.5", DB, "TCP", 80), "c/web: pod only");
        assert!(
            !can(&c, WEB, DB, "TCP", 80),
            "a/web: pod only (own namespace not implied)"
        );
        // namespaceSelector alone: every pod there.
        let ns_only = db_from("p", vec![pods_peer(None, Some(sel(&[("team", "x")])))]);
        let c = cluster(namespaces, pods, vec![ns_only]);
        assert!(can(&c, CLI, DB, "TCP", 80));
        assert!(can(&c, "10.0.0.4", DB, "TCP", 80));
        assert!(!can(&c, "10.0.0.5", DB, "TCP", 80));
    }

    #[test]
    fn namespace_name_label_with_and_without_object() {
        let mut pods = three_pods();
        pods.push(pod("c", "cweb", &[("app", "web")], "10.0.0.5"));
        let by_name = |n: &str| db_from("p", vec![pods_peer(None, Some(sel(&[(NAMESPACE_NAME_LABEL, n)])))]);
        // c has no object; b has one without the label written, which the API server would add;
        // a has one whose label is wrong, which the API server would overwrite.
        let namespaces = vec![ns("b", &[]), ns("a", &[(NAMESPACE_NAME_LABEL, "zzz")])];
        let c = cluster(namespaces.clone(), pods.clone(), vec![by_name("c")]);
        assert!(can(&c, "10.0.0.5", DB, "TCP", 80));
        assert!(!can(&c, CLI, DB, "TCP", 80));
        let c = cluster(namespaces.clone(), pods.clone(), vec![by_name("b")]);
        assert!(can(&c, CLI, DB, "TCP", 80));
        let c = cluster(namespaces.clone(), pods.clone(), vec![by_name("a")]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        let c = cluster(namespaces, pods, vec![by_name("zzz")]);
        assert!(!can(&c, WEB, DB, "TCP", 80));
    }

    #[test]
    fn selector_operators() {
        let l = map(&[("app", "web"), ("tier", "front")]).unwrap();
        assert!(selector_matches(&LabelSelector::default(), &l));
        assert!(selector_matches(&LabelSelector::default(), &Map::new()));
        assert!(selector_matches(&expr("app", "In", &["web", "db"]), &l));
        assert!(!selector_matches(&expr("app", "In", &["db"]), &l));
        assert!(!selector_matches(&expr("zone", "In", &["db"]), &l));
        assert!(selector_matches(&expr("app", "NotIn", &["db"]), &l));
        assert!(!selector_matches(&expr("app", "NotIn", &["web"]), &l));
        assert!(
            selector_matches(&expr("zone", "NotIn", &["web"]), &l),
            "NotIn matches an absent key"
        );
        assert!(selector_matches(&expr("tier", "Exists", &[]), &l));
        assert!(!selector_matches(&expr("zone", "Exists", &[]), &l));
        assert!(selector_matches(&expr("zone", "DoesNotExist", &[]), &l));
        assert!(!selector_matches(&expr("app", "DoesNotExist", &[]), &l));
        // matchLabels AND matchExpressions.
        let mut both = sel(&[("app", "web")]);
        both.match_expressions = expr("tier", "In", &["back"]).match_expressions;
        assert!(!selector_matches(&both, &l));
        both.match_expressions = expr("tier", "In", &["front"]).match_expressions;
        assert!(selector_matches(&both, &l));
        assert!(!selector_matches(&sel(&[("app", "web"), ("tier", "back")]), &l));
    }

    #[test]
    fn ip_block_except_and_host_bits() {
        let p = db_from("p", vec![block("10.0.0.7/24", &["10.0.0.3/31"])]);
        let c = cluster(vec![], three_pods(), vec![p]);
        assert!(can(&c, WEB, DB, "TCP", 80), "pod addresses match ipBlocks");
        assert!(!can(&c, CLI, DB, "TCP", 80), "10.0.0.3 is in the except 10.0.0.2/31");
        assert!(can(&c, "10.0.0.200", DB, "TCP", 80), "10.0.0.7/24 means 10.0.0.0/24");
        assert!(!can(&c, "10.0.1.1", DB, "TCP", 80));
        assert!(!can(&c, "192.0.2.1", DB, "TCP", 80));
    }

    #[test]
    fn cidr_containment() {
        let has = |c: &str, a: &str| cidr_contains(parse_cidr(c).unwrap(), ip(a));
        assert!(has("0.0.0.0/0", "255.255.255.255"));
        assert!(has("10.0.0.1/32", "10.0.0.1"));
        assert!(!has("10.0.0.1/32", "10.0.0.0"));
        assert!(has("10.0.0.4/31", "10.0.0.5"));
        assert!(!has("10.0.0.4/31", "10.0.0.6"));
        assert!(has("::/0", "fd00::1"));
        assert!(has("fd00::/64", "fd00::ffff:1"));
        assert!(!has("fd00::/64", "fd00:0:0:1::1"));
        assert!(has("fd00::5/127", "fd00::4"));
        assert!(!has("::/0", "10.0.0.1"));
        assert!(!has("0.0.0.0/0", "fd00::1"));
        assert!(!has("::ffff:0:0/96", "10.0.0.1"));
        assert!(!has("::ffff:10.0.0.0/104", "10.0.0.1"));
        assert!(has("::ffff:10.0.0.0/104", "::ffff:10.0.0.1"), "it is an IPv6 block");
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("10.0.0.0").is_none());
        assert!(parse_cidr("fd00::/129").is_none());
        assert!(parse_cidr("10.0.0.0/+8").is_none());
    }

    #[test]
    fn families_never_mix() {
        let mut pods = three_pods();
        pods.push(pod("a", "v6", &[("app", "cli")], "fd00::1"));
        let allow = |cidr: &str| {
            policy(
                "a",
                "p",
                sel(&[("app", "db")]),
                None,
                Some(vec![ingress(Some(vec![block(cidr, &[])]), None)]),
                Some(vec![]),
            )
        };
        for cidr in ["::/0", "::ffff:0:0/96", "::ffff:10.0.0.0/104", "::ffff:10.0.0.0/120"] {
            let c = cluster(vec![], pods.clone(), vec![allow(cidr)]);
            assert!(!can(&c, WEB, DB, "TCP", 80), "{cidr} holds no IPv4 address");
        }
        let c = cluster(vec![], pods.clone(), vec![allow("0.0.0.0/0")]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(!side_allows(&c, Direction::Ingress, ip(DB), ip("fd00::1"), "TCP", 80));
        let c = cluster(vec![], pods, vec![allow("::/0")]);
        assert!(side_allows(&c, Direction::Ingress, ip(DB), ip("fd00::1"), "TCP", 80));
    }

    #[test]
    fn ports_protocols_and_ranges() {
        let p = policy(
            "a",
            "p",
            sel(&[("app", "db")]),
            None,
            Some(vec![ingress(
                None,
                Some(vec![
                    port(None, Some(IntOrString::Int(80)), None),
                    port(Some("UDP"), Some(IntOrString::Int(50)), Some(100)),
                    port(Some("SCTP"), None, None),
                ]),
            )]),
            None,
        );
        let c = cluster(vec![], three_pods(), vec![p]);
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, WEB, DB, "TCP", 81));
        assert!(can(&c, WEB, DB, "UDP", 80), "in the UDP range");
        assert!(can(&c, WEB, DB, "UDP", 50));
        assert!(can(&c, WEB, DB, "UDP", 100));
        assert!(!can(&c, WEB, DB, "UDP", 49));
        assert!(!can(&c, WEB, DB, "UDP", 101));
        assert!(!can(&c, WEB, DB, "TCP", 50));
        assert!(can(&c, WEB, DB, "SCTP", 1));
        assert!(can(&c, WEB, DB, "SCTP", 65535));
    }

    #[test]
    fn named_ports_ingress_resolve_on_the_local_pod() {
        let pods = vec![
            with_ports(pod("a", "web", &[("app", "web")], WEB), &[("http", 8080, "TCP")]),
            with_ports(
                pod("a", "db", &[("app", "db")], DB),
                &[("http", 80, "TCP"), ("dns", 53, "UDP")],
            ),
        ];
        let p = policy(
            "a",
            "p",
            LabelSelector::default(),
            None,
            Some(vec![ingress(
                None,
                Some(vec![
                    port(None, Some(IntOrString::String("http".into())), None),
                    port(Some("TCP"), Some(IntOrString::String("dns".into())), None),
                ]),
            )]),
            None,
        );
        let c = cluster(vec![], pods, vec![p]);
        assert!(can(&c, WEB, DB, "TCP", 80), "db's http is 80");
        assert!(!can(&c, WEB, DB, "TCP", 8080), "web's http is not db's");
        assert!(can(&c, DB, WEB, "TCP", 8080));
        assert!(!can(&c, DB, WEB, "TCP", 80));
        assert!(
            !can(&c, WEB, DB, "TCP", 53),
            "dns is declared for UDP, the rule asks TCP"
        );
        assert!(!can(&c, WEB, DB, "UDP", 53));
    }

    #[test]
    fn named_ports_egress_resolve_on_the_peer() {
        let pods = vec![
            with_ports(pod("a", "web", &[("app", "web")], WEB), &[("http", 8080, "TCP")]),
            with_ports(pod("a", "db", &[("app", "db")], DB), &[("http", 80, "TCP")]),
        ];
        let p = policy(
            "a",
            "p",
            sel(&[("app", "web")]),
            Some(&["Egress"]),
            None,
            Some(vec![egress(
                Some(vec![block("0.0.0.0/0", &[])]),
                Some(vec![port(None, Some(IntOrString::String("http".into())), None)]),
            )]),
        );
        let c = cluster(vec![], pods, vec![p]);
        assert!(can(&c, WEB, DB, "TCP", 80), "db declares http=80 and is in the block");
        assert!(
            !can(&c, WEB, DB, "TCP", 8080),
            "web's own http does not count on egress"
        );
        assert!(
            !can(&c, WEB, "192.0.2.1", "TCP", 80),
            "a non-pod peer never matches a name"
        );
        assert!(!can(&c, WEB, "10.0.0.254", "TCP", 80), "neither does the node");
        assert!(
            can(&c, DB, WEB, "TCP", 1),
            "db's egress is not isolated; web's ingress neither"
        );
    }

    #[test]
    fn the_node_may_always_reach_its_pods() {
        let deny = deny_all_in_a();
        let c = cluster(vec![], three_pods(), vec![deny]);
        assert!(side_allows(
            &c,
            Direction::Ingress,
            ip(DB),
            ip("10.0.0.254"),
            "TCP",
            8080
        ));
        assert!(
            !side_allows(&c, Direction::Egress, ip(DB), ip("10.0.0.254"), "TCP", 8080),
            "egress to the node is not special"
        );
        assert!(
            !side_allows(&c, Direction::Ingress, ip(DB), ip("10.0.0.253"), "TCP", 8080),
            "another node is not"
        );
    }

    #[test]
    fn host_network_pods() {
        let mut host = pod("a", "host", &[("app", "web")], "10.0.0.254");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut other_host = pod("a", "host2", &[("app", "web")], "10.0.0.253");
        other_host.spec.as_mut().unwrap().host_network = Some(true);
        let mut pods = three_pods();
        pods.push(host);
        pods.push(other_host);
        let p = policy(
            "a",
            "p",
            LabelSelector::default(),
            Some(&["Ingress", "Egress"]),
            Some(vec![ingress(
                Some(vec![pods_peer(Some(sel(&[("app", "web")])), None)]),
                None,
            )]),
            None,
        );
        let c = cluster(vec![], pods, vec![p]);
        assert!(owner(&c, ip("10.0.0.253")).is_none());
        assert!(
            !can(&c, "10.0.0.253", DB, "TCP", 80),
            "a hostNetwork peer does not match pod selectors"
        );
        assert!(!can(&c, WEB, DB, "TCP", 80), "web's egress is isolated with no rules");
        assert!(side_allows(&c, Direction::Ingress, ip(DB), ip(WEB), "TCP", 80));
        assert!(
            side_allows(&c, Direction::Egress, ip("10.0.0.253"), ip(DB), "TCP", 80),
            "never enforced"
        );
        assert!(
            side_allows(&c, Direction::Ingress, ip("10.0.0.253"), ip(DB), "TCP", 80),
            "never enforced"
        );
    }

    #[test]
    fn only_local_pods_are_enforced() {
        let mut pods = three_pods();
        pods[1].spec.as_mut().unwrap().node_name = Some("n2".into());
        let deny = deny_all_in_a();
        let c = cluster(vec![], pods, vec![deny]);
        assert!(side_allows(&c, Direction::Ingress, ip(DB), ip(CLI), "TCP", 80));
        assert!(side_allows(&c, Direction::Egress, ip(DB), ip(CLI), "TCP", 80));
        assert!(!side_allows(&c, Direction::Ingress, ip(WEB), ip(CLI), "TCP", 80));
        assert!(
            side_allows(&c, Direction::Ingress, ip("10.0.0.77"), ip(CLI), "TCP", 80),
            "no owner"
        );
    }

    #[test]
    fn address_reuse_the_newest_owns() {
        let at = |s: i64| Some(Time(Timestamp::from_second(s).unwrap()));
        let mut old = pod("a", "zzz-old", &[("app", "db")], "10.0.0.9");
        old.metadata.creation_timestamp = at(100);
        let mut new = pod("a", "aaa-new", &[("app", "web")], "10.0.0.9");
        new.metadata.creation_timestamp = at(200);
        let c = cluster(vec![], vec![old.clone(), new.clone()], vec![]);
        assert_eq!(pod_name(owner(&c, ip("10.0.0.9")).unwrap()), "aaa-new");
        // A finished newer pod does not take the address.
        let mut done = new.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let c = cluster(vec![], vec![old.clone(), done], vec![]);
        assert_eq!(pod_name(owner(&c, ip("10.0.0.9")).unwrap()), "zzz-old");
        // Same time: the greater namespace/name.
        let mut tie = new.clone();
        tie.metadata.creation_timestamp = at(100);
        let c = cluster(vec![], vec![tie.clone(), old.clone()], vec![]);
        assert_eq!(pod_name(owner(&c, ip("10.0.0.9")).unwrap()), "zzz-old");
        let mut tie_b = tie.clone();
        tie_b.metadata.namespace = Some("b".into());
        let c = cluster(vec![], vec![old.clone(), tie_b], vec![]);
        assert_eq!(pod_namespace(owner(&c, ip("10.0.0.9")).unwrap()), "b");
        // Missing timestamp: the oldest.
        let mut untimed = new.clone();
        untimed.metadata.creation_timestamp = None;
        let c = cluster(vec![], vec![untimed, old.clone()], vec![]);
        assert_eq!(pod_name(owner(&c, ip("10.0.0.9")).unwrap()), "zzz-old");
        // Verdicts follow the owner: a policy selecting app=web isolates 10.0.0.9 only when new owns it.
        let deny = policy("a", "deny", sel(&[("app", "web")]), None, Some(vec![]), None);
        let c = cluster(vec![], vec![old.clone(), new], vec![deny.clone()]);
        assert!(!can(&c, WEB, "10.0.0.9", "TCP", 80));
        let c = cluster(vec![], vec![old], vec![deny]);
        assert!(can(&c, WEB, "10.0.0.9", "TCP", 80));
    }

    #[test]
    fn addresses_from_pod_ips_else_pod_ip() {
        let mut p = pod("a", "x", &[], "10.0.0.1");
        p.status.as_mut().unwrap().pod_ips =
            Some(vec![PodIP { ip: "10.0.0.1".into() }, PodIP { ip: "fd00::1".into() }]);
        assert_eq!(pod_addresses(&p), vec![ip("10.0.0.1"), ip("fd00::1")]);
        p.status.as_mut().unwrap().pod_ips = Some(vec![]);
        assert_eq!(pod_addresses(&p), vec![ip("10.0.0.1")]);
        p.status.as_mut().unwrap().pod_ips = None;
        assert_eq!(pod_addresses(&p), vec![ip("10.0.0.1")]);
        p.status = None;
        assert!(pod_addresses(&p).is_empty());
    }

    #[test]
    fn dual_stack_pod_is_one_pod() {
        let mut web = pod("a", "web", &[("app", "web")], WEB);
        web.status.as_mut().unwrap().pod_ips = Some(vec![PodIP { ip: WEB.into() }, PodIP { ip: "fd00::1".into() }]);
        let mut db = pod("a", "db", &[("app", "db")], DB);
        db.status.as_mut().unwrap().pod_ips = Some(vec![PodIP { ip: DB.into() }, PodIP { ip: "fd00::2".into() }]);
        let p = db_from("p", vec![pods_peer(Some(sel(&[("app", "web")])), None)]);
        let c = cluster(vec![], vec![web, db], vec![p]);
        assert!(can(&c, "fd00::1", "fd00::2", "TCP", 80));
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, "fd00::9", "fd00::2", "TCP", 80));
    }

    #[test]
    fn legacy_annotation() {
        let mut a = ns("a", &[]);
        a.metadata.annotations = map(&[(LEGACY_ANNOTATION, r#"{ "ingress": { "isolation": "DefaultDeny" } }"#)]);
        let mut b = ns("b", &[]);
        b.metadata.annotations = map(&[(LEGACY_ANNOTATION, r#"{"ingress":{"isolation":"None"}}"#)]);
        let mut c = cluster(vec![a, b], three_pods(), vec![]);
        assert!(can(&c, WEB, DB, "TCP", 80), "only honoured with legacy_default_deny");
        c.legacy_default_deny = true;
        assert!(!can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, CLI, WEB, "TCP", 80));
        assert!(can(&c, WEB, CLI, "TCP", 80), "b is not DefaultDeny");
        assert!(can(&c, DB, "192.0.2.1", "TCP", 80), "ingress only");
        assert!(
            side_allows(&c, Direction::Ingress, ip(DB), ip("10.0.0.254"), "TCP", 80),
            "node"
        );
        // Policies add to it.
        c.policies
            .push(db_from("p", vec![pods_peer(Some(LabelSelector::default()), None)]));
        assert!(can(&c, WEB, DB, "TCP", 80));
        assert!(!can(&c, CLI, DB, "TCP", 80));
        assert!(!can(&c, DB, WEB, "TCP", 80));
    }

    #[test]
    fn policy_types_defaulting() {
        let eg = || Some(vec![egress(Some(vec![block("192.0.2.0/24", &[])]), None)]);
        let ing = || Some(vec![ingress(Some(vec![block("192.0.2.0/24", &[])]), None)]);
        let p = |types: Option<&[&str]>, i, e| policy("a", "p", LabelSelector::default(), types, i, e);
        assert_eq!(policy_types(&p(None, None, None)), (true, false));
        assert_eq!(policy_types(&p(None, None, Some(vec![]))), (true, false));
        assert_eq!(policy_types(&p(None, None, eg())), (true, true));
        assert_eq!(
            policy_types(&p(Some(&[]), ing(), eg())),
            (true, true),
            "[] is defaulted too"
        );
        assert_eq!(policy_types(&p(Some(&[]), None, None)), (true, false));
        assert_eq!(policy_types(&p(Some(&["Egress"]), ing(), None)), (false, true));
        assert_eq!(policy_types(&p(Some(&["Ingress"]), None, eg())), (true, false));
        // Verdicts: egress rules without an Egress type are ignored...
        let c = cluster(vec![], three_pods(), vec![p(Some(&["Ingress"]), ing(), eg())]);
        assert!(side_allows(&c, Direction::Egress, ip(WEB), ip(DB), "TCP", 80));
        assert!(!side_allows(&c, Direction::Ingress, ip(DB), ip(WEB), "TCP", 80));
        // ...and omitted types with egress rules isolate egress.
        let c = cluster(vec![], three_pods(), vec![p(None, None, eg())]);
        assert!(!side_allows(&c, Direction::Egress, ip(WEB), ip(DB), "TCP", 80));
        assert!(side_allows(&c, Direction::Egress, ip(WEB), ip("192.0.2.7"), "TCP", 80));
        // Egress-only: ingress stays open.
        let c = cluster(vec![], three_pods(), vec![p(Some(&["Egress"]), ing(), eg())]);
        assert!(side_allows(&c, Direction::Ingress, ip(DB), ip(WEB), "TCP", 80));
    }

    #[test]
    fn peer_without_owner_matches_only_ip_blocks() {
        let p = db_from(
            "p",
            vec![pods_peer(
                Some(LabelSelector::default()),
                Some(LabelSelector::default()),
            )],
        );
        let c = cluster(vec![], three_pods(), vec![p]);
        assert!(can(&c, CLI, DB, "TCP", 80), "every pod of every namespace");
        assert!(!can(&c, "192.0.2.1", DB, "TCP", 80));
    }
}
