//! Random small clusters as k8s-openapi objects, for property tests that hold npc's parser,
//! validator and compiler to the independent reference ([`super::reference`]).
//!
//! Vocabularies are tiny so that selectors, ipBlocks, named ports and addresses collide often.
//! Every object is one the API server (v1.33) would accept and store: policies are valid
//! (selector operators with the right values, `endPort` only with a numeric `port` and not below
//! it, `except` a strict subset of `cidr` in the same family, port names IANA_SVC_NAMEs, peers
//! with exactly one of ipBlock / selectors), container port names unique within a container, pods
//! with podIP == podIPs[0] and at most one address per family, whole-second timestamps.
//!
//! Three of those valid constructs were read differently by npc until the property tests
//! (`tests/semantics.rs`) found them; [`Config`] can still turn each off, to tell a regression
//! of one from another. [`cluster`] generates all of them.
//!
//! [`load`] and [`state`] hand a cluster to npc the way a user would: as YAML text read by the
//! files source, so that npc's own parsing, defaulting and validation are under test too.
//!
//! Only with the `scenario` feature (npc-policy's own tests turn it on; so does npc-integration).
use std::{net::IpAddr, path::Path};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
        },
        networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
            NetworkPolicyPort, NetworkPolicySpec,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use proptest::{collection::vec, option, prelude::*, sample::select};

use crate::{
    files::{self, Loaded},
    model::{ObjectRef, State},
    policy as model_policy,
    reference::{Cluster, LEGACY_ANNOTATION, NAMESPACE_NAME_LABEL},
};

/// The node the cluster is seen from, and the other one.
pub const NODE: &str = "n1";
pub const OTHER_NODE: &str = "n2";
/// `n1`'s addresses (`node_addrs` is the first, or both when the node is dual-stack); hostNetwork
/// pods on `n1` have them, those on `n2` have `n2`'s.
pub const NODE_ADDRS: [&str; 2] = ["10.0.0.254", "fd00::fe"];
pub const OTHER_NODE_ADDRS: [&str; 2] = ["10.0.0.253", "fd00::fd"];
/// Addresses no pod has: the outside world, and some inside the generated ipBlocks.
pub const OUTSIDE: [&str; 5] = ["192.0.2.1", "10.0.0.9", "10.0.0.200", "2001:db8::1", "fd00::9"];
/// The address that pods reuse (and its IPv6 twin).
pub const SHARED_ADDRS: [&str; 2] = ["10.0.0.100", "fd00::100"];
/// Ports worth asking about: declared ones, range edges and ports nobody declares.
pub const PORTS: [u16; 10] = [53, 80, 8080, 9090, 7777, 443, 50, 100, 101, 8081];
pub const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const BASE_TIME: i64 = 1_700_000_000;

/// Which API-valid constructs to generate. Every field defaults to `true`.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `policyTypes: []`, which the API server defaults like an omitted list (npc's policy.rs
    /// once read `Some([])` as isolating nothing).
    pub empty_policy_types: bool,
    /// The same port name in two containers of one pod (the API server only requires names to
    /// be unique within a container; npc's compiler once resolved a name to the first match).
    pub duplicate_port_names: bool,
    /// IPv4-mapped IPv6 ipBlocks (`::ffff:0:0/96`, `::ffff:10.0.0.0/120`, ...), which npc's
    /// compiler once stored in the same LPM keys as IPv4 prefixes.
    pub ipv4_mapped_blocks: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            empty_policy_types: true,
            duplicate_port_names: true,
            ipv4_mapped_blocks: true,
        }
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

fn time(offset: i64) -> Time {
    Time(Timestamp::from_second(BASE_TIME + offset).expect("timestamp in range"))
}

/// Optional values for each key, as a label map.
fn labels(
    pairs: &'static [(&'static str, &'static [&'static str])],
) -> BoxedStrategy<std::collections::BTreeMap<String, String>> {
    let per_key: Vec<_> = pairs
        .iter()
        .map(|(k, values)| option::of(select(values.to_vec())).prop_map(move |v| (*k, v)))
        .collect();
    per_key
        .prop_map(|kvs| kvs.into_iter().filter_map(|(k, v)| v.map(|v| (s(k), s(v)))).collect())
        .boxed()
}

const POD_LABELS: &[(&str, &[&str])] = &[("app", &["web", "db", "cli"]), ("tier", &["front", "back"])];
const NS_LABELS: &[(&str, &[&str])] = &[("team", &["x", "y"]), ("env", &["x", "y"])];
const NS_SELECTOR_KEYS: &[(&str, &[&str])] = &[
    ("team", &["x", "y"]),
    ("env", &["x", "y"]),
    (NAMESPACE_NAME_LABEL, &["a", "b", "c"]),
];

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

fn requirement(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = LabelSelectorRequirement> {
    (select(keys.to_vec()), 0..4u8, any::<bool>()).prop_flat_map(|((key, values), op, values_present)| {
        let chosen = proptest::sample::subsequence(values.to_vec(), 1..=values.len().min(2));
        chosen.prop_map(move |vals| {
            let (operator, values) = match op {
                0 => ("In", Some(vals.iter().map(|v| s(v)).collect())),
                1 => ("NotIn", Some(vals.iter().map(|v| s(v)).collect())),
                // Exists / DoesNotExist: values must be empty (missing or []).
                2 => ("Exists", values_present.then(Vec::new)),
                _ => ("DoesNotExist", values_present.then(Vec::new)),
            };
            LabelSelectorRequirement {
                key: s(key),
                operator: s(operator),
                values,
            }
        })
    })
}

fn selector(keys: &'static [(&'static str, &'static [&'static str])]) -> BoxedStrategy<LabelSelector> {
    let match_labels = prop_oneof![
        3 => Just(None),
        1 => Just(Some(Default::default())),
        4 => labels(keys).prop_map(Some),
    ];
    let match_expressions = prop_oneof![
        3 => Just(None),
        1 => Just(Some(Vec::new())),
        3 => vec(requirement(keys), 1..=2).prop_map(Some),
    ];
    (match_labels, match_expressions)
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// (cidr, except, is IPv4-mapped IPv6): all valid for the API server.
const IP_BLOCKS: &[(&str, &[&str], bool)] = &[
    ("10.0.0.0/24", &["10.0.0.0/30"], false),
    ("10.0.0.4/31", &[], false),
    ("10.0.0.5/30", &[], false), // host bits set: 10.0.0.4/30
    ("10.0.0.1/32", &[], false),
    ("10.0.0.96/27", &["10.0.0.100/32"], false),
    ("10.0.0.0/8", &[], false),
    ("0.0.0.0/0", &["10.0.0.0/29"], false),
    ("0.0.0.0/0", &["10.0.0.0/25", "192.0.2.0/24"], false),
    ("192.0.2.0/24", &[], false),
    ("10.0.0.254/32", &[], false),
    ("fd00::/64", &["fd00::/126"], false),
    ("fd00::3/127", &[], false), // host bits set: fd00::2/127
    ("fd00::/119", &["fd00::100/128"], false),
    ("::/0", &[], false),
    ("::/0", &["fd00::/125"], false),
    ("2001:db8::/32", &[], false),
    ("fd00::fe/128", &[], false),
    ("::ffff:0:0/96", &[], true),
    ("::ffff:10.0.0.0/104", &[], true),
    ("::ffff:10.0.0.0/120", &["::ffff:10.0.0.0/126"], true),
    ("::ffff:10.0.0.1/128", &[], true),
];

fn ip_block(cfg: Config) -> impl Strategy<Value = IPBlock> {
    let choices: Vec<_> = IP_BLOCKS
        .iter()
        .filter(|(_, _, mapped)| cfg.ipv4_mapped_blocks || !mapped)
        .collect();
    (select(choices), any::<bool>()).prop_map(|((cidr, except, _), empty_list)| IPBlock {
        cidr: s(cidr),
        except: if except.is_empty() {
            empty_list.then(Vec::new)
        } else {
            Some(except.iter().map(|e| s(e)).collect())
        },
    })
}

fn peer(cfg: Config) -> impl Strategy<Value = NetworkPolicyPeer> {
    let pods = || selector(POD_LABELS);
    let namespaces = || selector(NS_SELECTOR_KEYS);
    prop_oneof![
        3 => pods().prop_map(|p| NetworkPolicyPeer { pod_selector: Some(p), ..Default::default() }),
        2 => namespaces().prop_map(|n| NetworkPolicyPeer { namespace_selector: Some(n), ..Default::default() }),
        2 => (pods(), namespaces()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ip_block: None,
        }),
        3 => ip_block(cfg).prop_map(|b| NetworkPolicyPeer { ip_block: Some(b), ..Default::default() }),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = prop_oneof![
        2 => Just(None),
        1 => Just(Some(s("TCP"))),
        1 => Just(Some(s("UDP"))),
        1 => Just(Some(s("SCTP"))),
    ];
    let number = prop_oneof![
        1 => Just((None, None)),
        3 => select(vec![53, 80, 8080, 9090, 7777, 443]).prop_map(|p| (Some(IntOrString::Int(p)), None)),
        2 => select(vec![(50, 100), (80, 8080), (9090, 9090), (1, 65535), (53, 53), (101, 8081)])
            .prop_map(|(p, e)| (Some(IntOrString::Int(p)), Some(e))),
        3 => select(vec!["http", "dns", "metrics", "sctp", "nope"])
            .prop_map(|n| (Some(IntOrString::String(s(n))), None)),
    ];
    (protocol, number).prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
        protocol,
        port,
        end_port,
    })
}

/// `None`, `Some([])` or a short list.
fn list<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T>,
    weights: (u32, u32, u32),
) -> impl Strategy<Value = Option<Vec<T>>> {
    prop_oneof![
        weights.0 => Just(None),
        weights.1 => Just(Some(Vec::new())),
        weights.2 => vec(item, 1..=2).prop_map(Some),
    ]
}

fn rule(cfg: Config) -> impl Strategy<Value = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>)> {
    (list(peer(cfg), (1, 1, 4)), list(port(), (2, 1, 3)))
}

fn policy_types(cfg: Config) -> impl Strategy<Value = Option<Vec<String>>> {
    let mut choices = vec![
        (4, None),
        (2, Some(vec![s("Ingress")])),
        (2, Some(vec![s("Egress")])),
        (2, Some(vec![s("Ingress"), s("Egress")])),
        (1, Some(vec![s("Egress"), s("Ingress")])),
    ];
    if cfg.empty_policy_types {
        choices.push((1, Some(Vec::new())));
    }
    let total: u32 = choices.iter().map(|(w, _)| w).sum();
    (0..total).prop_map(move |mut n| {
        for (w, v) in &choices {
            if n < *w {
                return v.clone();
            }
            n -= w;
        }
        unreachable!()
    })
}

fn policy(cfg: Config, index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(NAMESPACES.to_vec()),
        selector(POD_LABELS),
        policy_types(cfg),
        list(rule(cfg), (1, 1, 3)),
        list(rule(cfg), (1, 1, 3)),
    )
        .prop_map(move |(ns, pod_selector, policy_types, ingress, egress)| NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("p{index}")),
                namespace: Some(s(ns)),
                creation_timestamp: Some(time(index as i64)),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(pod_selector),
                policy_types,
                ingress: ingress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            }),
        })
}

// ---------------------------------------------------------------------------------------------
// Pods
// ---------------------------------------------------------------------------------------------

/// Container ports: (name, port, protocol). At most one per name in a container.
const PORT_CHOICES: &[(Option<&str>, i32, &str)] = &[
    (Some("http"), 80, "TCP"),
    (Some("http"), 8080, "TCP"),
    (Some("dns"), 53, "UDP"),
    (Some("dns"), 53, "TCP"),
    (Some("metrics"), 9090, "TCP"),
    (Some("sctp"), 7777, "SCTP"),
    (None, 443, "TCP"),
    (None, 53, "UDP"),
];

fn container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    (
        proptest::sample::subsequence(PORT_CHOICES.to_vec(), 0..=4),
        any::<bool>(),
    )
        .prop_map(|(list, omit_tcp)| {
            let mut seen: Vec<&str> = Vec::new();
            let mut out = Vec::new();
            for (name, port, protocol) in list {
                if let Some(n) = name {
                    if seen.contains(&n) {
                        continue;
                    }
                    seen.push(n);
                }
                out.push(ContainerPort {
                    name: name.map(s),
                    container_port: port,
                    // TCP is the default; sometimes written, sometimes not.
                    protocol: (!(omit_tcp && protocol == "TCP")).then(|| s(protocol)),
                    ..Default::default()
                });
            }
            out
        })
}

#[derive(Clone, Debug)]
enum Addrs {
    None,
    V4,
    V6,
    DualV4First,
    DualV6First,
    Shared,
    SharedDual,
}

/// Everything drawn for one pod; its addresses are settled once the node's stack is known.
#[derive(Clone, Debug)]
struct PodDraft {
    namespace: &'static str,
    labels: std::collections::BTreeMap<String, String>,
    node: Option<&'static str>,
    phase: &'static str,
    host_network: bool,
    addrs: Addrs,
    only_pod_ip: bool,
    containers: Vec<Vec<ContainerPort>>,
    created: i64,
}

fn pod_draft(cfg: Config) -> impl Strategy<Value = PodDraft> {
    let containers = prop_oneof![
        3 => container_ports().prop_map(|c| vec![c]),
        1 => (container_ports(), container_ports(), any::<bool>()).prop_map(move |(a, mut b, echo)| {
            // Often the second container declares the first one's http on the other port.
            let first_http = a.iter().find(|p| p.name.as_deref() == Some("http")).map(|p| p.container_port);
            if echo && let Some(port) = first_http {
                b.retain(|p| p.name.as_deref() != Some("http"));
                b.push(ContainerPort {
                    name: Some(s("http")),
                    container_port: if port == 80 { 8080 } else { 80 },
                    protocol: Some(s("TCP")),
                    ..Default::default()
                });
            }
            if !cfg.duplicate_port_names {
                b.retain(|p| p.name.is_none() || !a.iter().any(|q| q.name == p.name));
            }
            vec![a, b]
        }),
    ];
    (
        select(NAMESPACES.to_vec()),
        labels(POD_LABELS),
        prop_oneof![6 => Just(Some(NODE)), 3 => Just(Some(OTHER_NODE)), 1 => Just(None)],
        prop_oneof![12 => Just("Running"), 1 => Just("Pending"), 1 => Just("Succeeded"), 1 => Just("Failed")],
        prop_oneof![9 => Just(false), 1 => Just(true)],
        prop_oneof![
            8 => Just(Addrs::V4),
            2 => Just(Addrs::V6),
            2 => Just(Addrs::DualV4First),
            1 => Just(Addrs::DualV6First),
            1 => Just(Addrs::None),
            2 => Just(Addrs::Shared),
            1 => Just(Addrs::SharedDual),
        ],
        prop_oneof![5 => Just(false), 1 => Just(true)],
        containers,
        0..4i64,
    )
        .prop_map(
            |(namespace, labels, node, phase, host_network, addrs, only_pod_ip, containers, created)| {
                let mut d = PodDraft {
                    namespace,
                    labels,
                    node,
                    phase,
                    host_network,
                    addrs,
                    only_pod_ip,
                    containers,
                    created,
                };
                // An unscheduled pod is Pending with no address; a pod without one is not Running.
                if d.node.is_none() {
                    d.phase = "Pending";
                    d.addrs = Addrs::None;
                }
                if matches!(d.addrs, Addrs::None) && d.phase == "Running" {
                    d.phase = "Pending";
                }
                d
            },
        )
}

fn build_pod(index: usize, d: &PodDraft, dual_stack_nodes: bool) -> Pod {
    let n = index + 1;
    let v4 = format!("10.0.0.{n}");
    let v6 = format!("fd00::{n:x}");
    let mut ips: Vec<String> = if d.host_network {
        // hostNetwork pods have their node's addresses.
        match (d.node, &d.addrs) {
            (None, _) | (_, Addrs::None) => vec![],
            (Some(node), _) => {
                let node_addrs = if node == NODE { NODE_ADDRS } else { OTHER_NODE_ADDRS };
                let count = if dual_stack_nodes { 2 } else { 1 };
                node_addrs[..count].iter().map(|a| s(a)).collect()
            }
        }
    } else {
        match d.addrs {
            Addrs::None => vec![],
            Addrs::V4 => vec![v4],
            Addrs::V6 => vec![v6],
            Addrs::DualV4First => vec![v4, v6],
            Addrs::DualV6First => vec![v6, v4],
            Addrs::Shared => vec![s(SHARED_ADDRS[0])],
            Addrs::SharedDual => vec![s(SHARED_ADDRS[0]), s(SHARED_ADDRS[1])],
        }
    };
    if d.only_pod_ip && ips.len() > 1 {
        ips.truncate(1);
    }
    let status = PodStatus {
        phase: Some(s(d.phase)),
        pod_ip: ips.first().cloned(),
        pod_ips: (!d.only_pod_ip && !ips.is_empty()).then(|| ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        host_ip: d.node.map(|node| {
            s(if node == NODE {
                NODE_ADDRS[0]
            } else {
                OTHER_NODE_ADDRS[0]
            })
        }),
        ..Default::default()
    };
    let containers = d
        .containers
        .iter()
        .enumerate()
        .map(|(i, ports)| Container {
            name: format!("c{i}"),
            image: Some(s("registry.k8s.io/pause:3.10")),
            ports: (!ports.is_empty()).then(|| ports.clone()),
            ..Default::default()
        })
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod{index}")),
            namespace: Some(s(d.namespace)),
            labels: (!d.labels.is_empty()).then(|| d.labels.clone()),
            creation_timestamp: Some(time(d.created * 60)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: d.node.map(s),
            host_network: d.host_network.then_some(true),
            containers,
            ..Default::default()
        }),
        status: Some(status),
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces and the cluster
// ---------------------------------------------------------------------------------------------

const LEGACY_VALUES: &[Option<&str>] = &[
    None,
    None,
    None,
    Some(r#"{"ingress":{"isolation":"DefaultDeny"}}"#),
    Some(r#"{ "ingress": { "isolation": "DefaultDeny" } }"#),
    Some(r#"{"ingress":{"isolation":"None"}}"#),
];

fn namespace(name: &'static str) -> impl Strategy<Value = Option<Namespace>> {
    let object = (
        labels(NS_LABELS),
        prop_oneof![4 => Just(true), 1 => Just(false)],
        select(LEGACY_VALUES.to_vec()),
    )
        .prop_map(move |(mut labels, name_label, legacy)| {
            // The API server writes the name label; hand-written files may not.
            if name_label {
                labels.insert(s(NAMESPACE_NAME_LABEL), s(name));
            }
            Namespace {
                metadata: ObjectMeta {
                    name: Some(s(name)),
                    labels: (!labels.is_empty()).then_some(labels),
                    annotations: legacy.map(|v| [(s(LEGACY_ANNOTATION), s(v))].into()),
                    creation_timestamp: Some(time(-3600)),
                    ..Default::default()
                },
                ..Default::default()
            }
        });
    prop_oneof![3 => object.prop_map(Some), 1 => Just(None)]
}

/// A random cluster as seen from node [`NODE`], with every construct of [`Config::default`].
pub fn cluster() -> impl Strategy<Value = Cluster> {
    cluster_with(Config::default())
}

pub fn cluster_with(cfg: Config) -> impl Strategy<Value = Cluster> {
    let namespaces = (namespace("a"), namespace("b"), namespace("c"));
    let pods = vec(pod_draft(cfg), 2..=8);
    let policies = (0..=4usize).prop_flat_map(move |n| (0..n).map(|i| policy(cfg, i)).collect::<Vec<_>>());
    let services = (0..=3usize).prop_flat_map(|n| (0..n).map(service).collect::<Vec<_>>());
    (namespaces, pods, policies, services, any::<bool>(), any::<bool>()).prop_map(
        |((a, b, c), drafts, policies, services, dual_stack_nodes, legacy)| {
            let node_addrs = NODE_ADDRS[..if dual_stack_nodes { 2 } else { 1 }]
                .iter()
                .map(|a| a.parse().expect("node address"))
                .collect();
            Cluster {
                namespaces: [a, b, c].into_iter().flatten().collect(),
                pods: drafts
                    .iter()
                    .enumerate()
                    .map(|(i, d)| build_pod(i, d, dual_stack_nodes))
                    .collect(),
                policies,
                services,
                node_name: s(NODE),
                node_addrs,
                legacy_default_deny: legacy,
            }
        },
    )
}

/// The VIPs Service `i` may have.
fn service_vips(i: usize) -> [String; 2] {
    [format!("10.96.0.{}", i + 1), format!("fd00:96::{}", i + 1)]
}

/// VIPs of the generated Services: 10.96.0.1-3 and fd00:96::1-3 (no pod or node has them).
pub const SERVICE_VIPS: usize = 3;

/// Service `i`: a one-pair selector over the pod labels, an IPv4 VIP (and sometimes an IPv6 one),
/// one or two ports whose targetPort is a number, a container port name or missing.
fn service(i: usize) -> impl Strategy<Value = Service> {
    let port = (
        select(vec![80, 53, 8080]),
        select(vec!["TCP", "UDP"]),
        prop_oneof![
            1 => Just(None),
            2 => select(PORTS.to_vec()).prop_map(|p| Some(IntOrString::Int(i32::from(p)))),
            2 => select(vec!["http", "dns", "metrics"]).prop_map(|n| Some(IntOrString::String(s(n)))),
        ],
    );
    (
        select(NAMESPACES.to_vec()),
        select(POD_LABELS.to_vec()).prop_flat_map(|(k, values)| select(values.to_vec()).prop_map(move |v| (k, v))),
        any::<bool>(),
        vec(port, 1..=2),
    )
        .prop_map(move |(ns, (key, value), dual, ports)| {
            let [v4, v6] = service_vips(i);
            let mut seen = Vec::new();
            let ports: Vec<ServicePort> = ports
                .into_iter()
                // (port, protocol) is unique within a Service.
                .filter(|(port, protocol, _)| {
                    let fresh = !seen.contains(&(*port, *protocol));
                    seen.push((*port, *protocol));
                    fresh
                })
                .enumerate()
                .map(|(j, (port, protocol, target))| ServicePort {
                    name: Some(format!("p{j}")),
                    port,
                    protocol: Some(s(protocol)),
                    target_port: target,
                    ..Default::default()
                })
                .collect();
            Service {
                metadata: ObjectMeta {
                    name: Some(format!("s{i}")),
                    namespace: Some(s(ns)),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ip: Some(v4.clone()),
                    cluster_ips: Some(if dual { vec![v4, v6] } else { vec![v4] }),
                    selector: Some([(s(key), s(value))].into()),
                    ports: Some(ports),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
}

/// Every address worth asking about: each pod's (finished and hostNetwork ones included), the
/// node's, the other node's and a few outside ones. Plain IPv4 and IPv6, sorted, no duplicates.
pub fn query_addresses(c: &Cluster) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = c.pods.iter().flat_map(crate::reference::pod_addresses).collect();
    out.extend(c.node_addrs.iter().copied());
    for i in 0..SERVICE_VIPS {
        out.extend(service_vips(i).iter().map(|a| a.parse::<IpAddr>().expect("VIP")));
    }
    out.extend(
        OUTSIDE
            .iter()
            .chain(NODE_ADDRS.iter())
            .chain(OTHER_NODE_ADDRS.iter())
            .map(|a| a.parse::<IpAddr>().expect("query address")),
    );
    out.sort();
    out.dedup();
    out
}

/// Holds what npc decided for one flow (its egress side at `src`, its ingress side at `dst`) to
/// the reference's verdict; a failure names the flow and carries the cluster's manifest.
pub fn agrees(
    c: &Cluster,
    (src, dst, protocol, port): (IpAddr, IpAddr, &str, u16),
    egress: bool,
    ingress: bool,
) -> Result<(), TestCaseError> {
    let want = crate::reference::allowed(c, src, dst, protocol, port);
    prop_assert_eq!(
        egress && ingress,
        want,
        "{} -> {} {}/{}: npc says egress {}, ingress {}\n{}",
        src,
        dst,
        protocol,
        port,
        egress,
        ingress,
        manifest(c)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Into npc: through the real files source
// ---------------------------------------------------------------------------------------------

/// The cluster as a multi-document YAML manifest, one document per object (namespaces, pods,
/// policies), exactly as k8s-openapi serializes them.
pub fn manifest(c: &Cluster) -> String {
    fn doc<T: k8s_openapi::serde::Serialize>(out: &mut String, object: &T) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(object).expect("k8s-openapi objects serialize"));
    }
    let mut out = String::new();
    for ns in &c.namespaces {
        doc(&mut out, ns);
    }
    for pod in &c.pods {
        doc(&mut out, pod);
    }
    for p in &c.policies {
        doc(&mut out, p);
    }
    for svc in &c.services {
        doc(&mut out, svc);
    }
    out
}

/// The cluster read by npc's files source ([`files::parse_str`] on [`manifest`]): policyTypes
/// defaulting, validation and the model conversion are the production code's.
pub fn load(c: &Cluster) -> Loaded {
    files::parse_str(Path::new("scenario.yaml"), &manifest(c))
}

/// The compiler's input for `c`: [`load`], then the node's name, addresses and the legacy flag.
/// Panics when npc rejects an object: the generator only makes objects the API server accepts.
pub fn state(c: &Cluster) -> State {
    let loaded = load(c);
    assert!(
        loaded.errors.is_empty(),
        "npc rejected API-valid objects: {:?}\n{}",
        loaded.errors,
        manifest(c)
    );
    state_of(&loaded, c)
}

/// [`Loaded::to_state`] with `c`'s node name, node addresses and legacy flag.
pub fn state_of(loaded: &Loaded, c: &Cluster) -> State {
    State {
        node_name: Some(c.node_name.clone()),
        node_addrs: c.node_addrs.clone(),
        legacy_default_deny: c.legacy_default_deny,
        ..loaded.to_state()
    }
}

/// `namespace/name` of a k8s object, as npc names it.
pub fn object_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace.as_deref().unwrap_or(files::DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------------------------
// Back out of npc: for states that only exist in npc's model (the lab's)
// ---------------------------------------------------------------------------------------------

/// npc's model written back as k8s-openapi objects, for the reference to judge a state that only
/// exists in the model (the lab's, with the addresses it gave its pods). Weaker than [`state`]:
/// the policies are npc's reading of them, so npc's parsing and defaulting are trusted here.
/// Every pod gets one container per declared port (names may repeat across containers), Running
/// or Succeeded as it is terminated, with `spec.nodeName` when it has a node; with
/// `state.node_name` None (every pod local) the cluster's node is [`LAB_NODE`] and every pod is
/// on it.
pub fn cluster_of_state(state: &State) -> Cluster {
    let node_name = state.node_name.clone().unwrap_or_else(|| s(LAB_NODE));
    let namespaces = state
        .namespaces
        .values()
        .map(|n| Namespace {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: Some(n.labels.clone()),
                annotations: Some(n.annotations.clone()),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let pods = state
        .pods
        .values()
        .map(|p| {
            let ips: Vec<PodIP> = p.ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect();
            Pod {
                metadata: ObjectMeta {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.clone()),
                    labels: Some(p.labels.clone()),
                    // npc reads a missing timestamp as 0.
                    creation_timestamp: (p.created != 0)
                        .then(|| Time(Timestamp::from_second(p.created).expect("timestamp in range"))),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    node_name: if state.node_name.is_some() {
                        p.node.clone()
                    } else {
                        Some(node_name.clone())
                    },
                    host_network: Some(p.host_network),
                    containers: p
                        .ports
                        .iter()
                        .enumerate()
                        .map(|(i, c)| Container {
                            name: format!("c{i}"),
                            ports: Some(vec![ContainerPort {
                                name: c.name.clone(),
                                container_port: i32::from(c.port),
                                protocol: Some(s(c.protocol.as_str())),
                                ..Default::default()
                            }]),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    phase: Some(s(if p.terminated { "Succeeded" } else { "Running" })),
                    pod_ip: ips.first().map(|ip| ip.ip.clone()),
                    pod_ips: Some(ips),
                    ..Default::default()
                }),
            }
        })
        .collect();
    Cluster {
        namespaces,
        pods,
        policies: state.policies.values().map(policy_of_model).collect(),
        // The lab's probes go to pods; its Services are not judged back through the reference.
        services: Vec::new(),
        node_name,
        node_addrs: state.node_addrs.clone(),
        legacy_default_deny: state.legacy_default_deny,
    }
}

/// A direction's rules written back, one k8s rule per model rule.
fn written<T>(rules: &Option<Vec<model_policy::Rule>>, rule: impl Fn(&model_policy::Rule) -> T) -> Option<Vec<T>> {
    rules.as_ref().map(|rules| rules.iter().map(rule).collect())
}

/// The node [`cluster_of_state`] puts every pod on when the state enforces all of them.
pub const LAB_NODE: &str = "lab";

fn selector_of_model(sel: &model_policy::Selector) -> LabelSelector {
    use model_policy::Operator;
    LabelSelector {
        match_labels: None,
        match_expressions: Some(
            sel.requirements
                .iter()
                .map(|r| {
                    let (operator, values) = match &r.op {
                        Operator::In(v) => ("In", Some(v.iter().cloned().collect())),
                        Operator::NotIn(v) => ("NotIn", Some(v.iter().cloned().collect())),
                        Operator::Exists => ("Exists", None),
                        Operator::DoesNotExist => ("DoesNotExist", None),
                    };
                    LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: s(operator),
                        values,
                    }
                })
                .collect(),
        ),
    }
}

fn policy_of_model(p: &model_policy::Policy) -> NetworkPolicy {
    use model_policy::{NamespaceScope, Peer, PortSpec};
    let peers = |rule: &model_policy::Rule| {
        rule.peers.as_ref().map(|peers| {
            peers
                .iter()
                .map(|peer| match peer {
                    Peer::IpBlock(b) => NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: b.cidr.to_string(),
                            except: Some(b.except.iter().map(ToString::to_string).collect()),
                        }),
                        ..Default::default()
                    },
                    Peer::Pods { namespaces, pods } => NetworkPolicyPeer {
                        pod_selector: Some(selector_of_model(pods)),
                        namespace_selector: match namespaces {
                            NamespaceScope::Own => None,
                            NamespaceScope::Selector(sel) => Some(selector_of_model(sel)),
                        },
                        ip_block: None,
                    },
                })
                .collect()
        })
    };
    let ports = |rule: &model_policy::Rule| {
        rule.ports.as_ref().map(|ports| {
            ports
                .iter()
                .map(|spec| match spec {
                    PortSpec::Number { protocol, port, end } => NetworkPolicyPort {
                        protocol: Some(s(protocol.as_str())),
                        port: port.map(|p| IntOrString::Int(i32::from(p))),
                        end_port: end.map(i32::from),
                    },
                    PortSpec::Named { protocol, name } => NetworkPolicyPort {
                        protocol: Some(s(protocol.as_str())),
                        port: Some(IntOrString::String(name.clone())),
                        end_port: None,
                    },
                })
                .collect()
        })
    };
    let mut types = Vec::new();
    if p.ingress.is_some() {
        types.push(s("Ingress"));
    }
    if p.egress.is_some() {
        types.push(s("Egress"));
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(p.id.name.clone()),
            namespace: Some(p.id.namespace.clone()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector_of_model(&p.pod_selector)),
            policy_types: Some(types),
            ingress: written(&p.ingress, |r| NetworkPolicyIngressRule {
                from: peers(r),
                ports: ports(r),
            }),
            egress: written(&p.egress, |r| NetworkPolicyEgressRule {
                to: peers(r),
                ports: ports(r),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{Direction, allowed, owner, service_egress_allows, side_allows};

    fn roundtrip<
        T: k8s_openapi::serde::Serialize + k8s_openapi::serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    >(
        v: &T,
    ) -> Result<(), TestCaseError> {
        let json = serde_json::to_string(v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: T = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(format!("{e}: {json}")))?;
        prop_assert_eq!(&back, v, "{}", json);
        Ok(())
    }

    /// The API server's checks that matter here (a subset of ValidateNetworkPolicy).
    fn api_valid(p: &NetworkPolicy) -> Result<(), String> {
        let spec = p.spec.as_ref().ok_or("spec")?;
        spec.pod_selector.as_ref().ok_or("podSelector is required")?;
        let check_sel = |sel: &LabelSelector| -> Result<(), String> {
            for e in sel.match_expressions.iter().flatten() {
                let n = e.values.as_ref().map_or(0, Vec::len);
                match e.operator.as_str() {
                    "In" | "NotIn" if n == 0 => return Err(format!("{} needs values", e.operator)),
                    "Exists" | "DoesNotExist" if n != 0 => return Err(format!("{} takes no values", e.operator)),
                    "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                    o => return Err(format!("operator {o}")),
                }
            }
            Ok(())
        };
        check_sel(spec.pod_selector.as_ref().unwrap())?;
        let rules: Vec<_> = crate::policy::ingress_rules(spec)
            .chain(crate::policy::egress_rules(spec))
            .collect();
        for peer in rules.iter().flat_map(|(peers, _)| peers.iter().copied().flatten()) {
            match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
                (Some(b), None, None) => {
                    let (net, len) = parse(&b.cidr)?;
                    for e in b.except.iter().flatten() {
                        let (enet, elen) = parse(e)?;
                        if enet.is_ipv4() != net.is_ipv4() || elen <= len || !inside(enet, net, len) {
                            return Err(format!("except {e} is not a strict subset of {}", b.cidr));
                        }
                    }
                }
                (None, p, n) if p.is_some() || n.is_some() => {
                    p.iter().chain(n.iter()).try_for_each(check_sel)?;
                }
                _ => return Err("a peer needs exactly one of ipBlock or selectors".into()),
            }
        }
        for port in rules.iter().flat_map(|(_, ports)| ports.iter().copied().flatten()) {
            if let Some(proto) = &port.protocol
                && !PROTOCOLS.contains(&proto.as_str())
            {
                return Err(format!("protocol {proto}"));
            }
            match (&port.port, port.end_port) {
                (Some(IntOrString::Int(p)), end) => {
                    if !(1..=65535).contains(p) || end.is_some_and(|e| e < *p || e > 65535) {
                        return Err(format!("port {p} end {end:?}"));
                    }
                }
                (Some(IntOrString::String(name)), None) => {
                    let ok = (1..=15).contains(&name.len())
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && name.bytes().any(|b| b.is_ascii_lowercase());
                    if !ok {
                        return Err(format!("port name {name}"));
                    }
                }
                (None, None) => {}
                _ => return Err("endPort needs a numeric port".into()),
            }
        }
        for t in spec.policy_types.iter().flatten() {
            if t != "Ingress" && t != "Egress" {
                return Err(format!("policy type {t}"));
            }
        }
        Ok(())
    }

    fn parse(cidr: &str) -> Result<(IpAddr, u32), String> {
        let (a, l) = cidr.split_once('/').ok_or(format!("cidr {cidr}"))?;
        Ok((
            a.parse().map_err(|_| format!("cidr {cidr}"))?,
            l.parse().map_err(|_| format!("cidr {cidr}"))?,
        ))
    }

    fn inside(addr: IpAddr, net: IpAddr, len: u32) -> bool {
        match (addr, net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => len == 0 || (u32::from(a) ^ u32::from(n)) >> (32 - len) == 0,
            (IpAddr::V6(a), IpAddr::V6(n)) => len == 0 || (u128::from(a) ^ u128::from(n)) >> (128 - len) == 0,
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn objects_survive_json(c in cluster()) {
            for ns in &c.namespaces {
                roundtrip(ns)?;
            }
            for pod in &c.pods {
                roundtrip(pod)?;
            }
            for p in &c.policies {
                roundtrip(p)?;
            }
            for svc in &c.services {
                roundtrip(svc)?;
            }
        }

        #[test]
        fn policies_are_api_valid(c in cluster()) {
            for p in &c.policies {
                if let Err(e) = api_valid(p) {
                    return Err(TestCaseError::fail(format!("{e}: {}", serde_json::to_string(p).unwrap())));
                }
            }
        }

        #[test]
        fn pods_are_realistic(c in cluster()) {
            for pod in &c.pods {
                let status = pod.status.as_ref().unwrap();
                let ips = status.pod_ips.as_deref().unwrap_or_default();
                if let Some(first) = ips.first() {
                    prop_assert_eq!(Some(&first.ip), status.pod_ip.as_ref());
                }
                prop_assert!(ips.len() <= 2);
                if ips.len() == 2 {
                    let a: IpAddr = ips[0].ip.parse().unwrap();
                    let b: IpAddr = ips[1].ip.parse().unwrap();
                    prop_assert_ne!(a.is_ipv4(), b.is_ipv4());
                }
                if status.phase.as_deref() == Some("Running") {
                    prop_assert!(status.pod_ip.is_some());
                }
                for container in &pod.spec.as_ref().unwrap().containers {
                    let names: Vec<_> = container.ports.iter().flatten().filter_map(|p| p.name.as_ref()).collect();
                    let mut dedup = names.clone();
                    dedup.sort();
                    dedup.dedup();
                    prop_assert_eq!(names.len(), dedup.len());
                }
            }
        }

        /// The reference answers every question without panicking, and the two sides compose.
        #[test]
        fn the_reference_answers(c in cluster()) {
            let addrs = query_addresses(&c);
            for src in &addrs {
                for dst in addrs.iter().filter(|d| *d != src && d.is_ipv4() == src.is_ipv4()) {
                    for protocol in PROTOCOLS {
                        for port in [80, 53] {
                            if service_egress_allows(&c, *src, *dst, protocol, port).is_some() {
                                continue; // judged by the backends (sentence 18), not by composition
                            }
                            let both = side_allows(&c, Direction::Egress, *src, *dst, protocol, port)
                                && side_allows(&c, Direction::Ingress, *dst, *src, protocol, port);
                            prop_assert_eq!(allowed(&c, *src, *dst, protocol, port), both);
                        }
                    }
                }
                if owner(&c, *src).is_none() {
                    prop_assert!(side_allows(&c, Direction::Egress, *src, addrs[0], "TCP", 80));
                }
            }
        }
    }

    /// The generator does reach the interesting corners (over many cases, not in each).
    #[test]
    fn the_generator_covers_the_corners() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = cluster();
        let (mut reuse, mut host, mut finished, mut v6only, mut mapped, mut empty_types, mut dup_names, mut legacy) =
            (false, false, false, false, false, false, false, false);
        for _ in 0..500 {
            let c = strategy.new_tree(&mut runner).unwrap().current();
            let all: Vec<IpAddr> = c.pods.iter().flat_map(crate::reference::pod_addresses).collect();
            let mut dedup = all.clone();
            dedup.sort();
            dedup.dedup();
            reuse |= dedup.len() < all.len();
            host |= c
                .pods
                .iter()
                .any(|p| p.spec.as_ref().unwrap().host_network == Some(true));
            finished |= c.pods.iter().any(|p| {
                matches!(
                    p.status.as_ref().unwrap().phase.as_deref(),
                    Some("Succeeded" | "Failed")
                )
            });
            v6only |= c.pods.iter().any(|p| {
                let a = crate::reference::pod_addresses(p);
                !a.is_empty() && a.iter().all(IpAddr::is_ipv6)
            });
            let json = serde_json::to_string(&c.policies).unwrap();
            mapped |= json.contains("::ffff:");
            empty_types |= json.contains(r#""policyTypes":[]"#);
            dup_names |= c.pods.iter().any(|p| {
                let spec = p.spec.as_ref().unwrap();
                spec.containers.len() == 2
                    && spec.containers[0].ports.iter().flatten().any(|a| {
                        a.name.is_some() && spec.containers[1].ports.iter().flatten().any(|b| b.name == a.name)
                    })
            });
            legacy |= c.legacy_default_deny
                && c.namespaces.iter().any(|n| {
                    n.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a[LEGACY_ANNOTATION].contains("DefaultDeny"))
                });
        }
        assert!(reuse && host && finished && v6only && mapped && empty_types && dup_names && legacy);
    }
}
