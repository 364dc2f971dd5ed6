//! Random clusters for property tests: a few namespaces, pods and policies drawn from small
//! vocabularies, so that selectors, ipBlocks and named ports collide often enough to matter.
use std::net::IpAddr;

use ipnet::IpNet;
use npc_agent::{
    model::{ContainerPort, Labels, Namespace, ObjectRef, Pod, Protocol, State},
    policy::{IpBlock, NamespaceScope, Operator, Peer, Policy, PortSpec, Requirement, Rule, Selector},
};
use proptest::{collection::vec, option, prelude::*, sample::subsequence};

pub const NODE: &str = "n1";
pub const NODE_ADDR: &str = "10.0.0.254";
/// Addresses no pod has: the outside world, and one inside the generated ipBlocks.
pub const OUTSIDE: [&str; 4] = ["192.0.2.1", "10.0.0.9", "2001:db8::1", "fd00::9"];
/// Ports queries are made on: declared ones, range edges and ports nobody declares.
pub const PORTS: [u16; 8] = [53, 80, 8080, 9090, 443, 7777, 50, 101];
pub const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

fn labels(pairs: &[(&'static str, &'static [&'static str])]) -> impl Strategy<Value = Labels> {
    let per_key: Vec<_> = pairs
        .iter()
        .map(|(k, values)| option::of(proptest::sample::select(values.to_vec())).prop_map(move |v| (*k, v)))
        .collect();
    per_key.prop_map(|kvs| {
        kvs.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string())))
            .collect()
    })
}

fn pod_labels() -> impl Strategy<Value = Labels> {
    labels(&[("app", &["web", "db", "cli"]), ("tier", &["front", "back"])])
}

fn selector(keys: &'static [&'static str], values: &'static [&'static str]) -> impl Strategy<Value = Selector> {
    let requirement = (
        proptest::sample::select(keys.to_vec()),
        0..4u8,
        subsequence(values.to_vec(), 1..=2),
    )
        .prop_map(|(key, op, vals)| {
            let vals = vals.into_iter().map(str::to_string).collect();
            Requirement {
                key: key.to_string(),
                op: match op {
                    0 => Operator::In(vals),
                    1 => Operator::NotIn(vals),
                    2 => Operator::Exists,
                    _ => Operator::DoesNotExist,
                },
            }
        });
    vec(requirement, 0..=2).prop_map(|requirements| Selector { requirements })
}

fn pod_selector() -> impl Strategy<Value = Selector> {
    selector(&["app", "tier"], &["web", "db", "cli", "front", "back"])
}

fn ns_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        selector(&["team", "env"], &["x", "y"]),
        proptest::sample::select(NAMESPACES.to_vec())
            .prop_map(|n| Selector::from_labels(&[(npc_agent::model::NAMESPACE_NAME_LABEL, n)])),
    ]
}

fn net(s: &str) -> IpNet {
    s.parse().expect("generator CIDR")
}

fn ip_block() -> impl Strategy<Value = IpBlock> {
    let blocks = vec![
        IpBlock {
            cidr: net("10.0.0.0/24"),
            except: vec![net("10.0.0.0/30")],
        },
        IpBlock {
            cidr: net("10.0.0.4/31"),
            except: vec![],
        },
        IpBlock {
            cidr: net("0.0.0.0/0"),
            except: vec![net("10.0.0.0/29")],
        },
        IpBlock {
            cidr: net("fd00::/64"),
            except: vec![net("fd00::/126")],
        },
        IpBlock {
            cidr: net("::/0"),
            except: vec![],
        },
        IpBlock {
            cidr: net("10.0.0.0/8"),
            except: vec![],
        },
    ];
    proptest::sample::select(blocks)
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        pod_selector().prop_map(|pods| Peer::Pods {
            namespaces: NamespaceScope::Own,
            pods
        }),
        (ns_selector(), pod_selector()).prop_map(|(ns, pods)| Peer::Pods {
            namespaces: NamespaceScope::Selector(ns),
            pods
        }),
        ip_block().prop_map(Peer::IpBlock),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    proptest::sample::select(PROTOCOLS.to_vec())
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        protocol().prop_map(|protocol| PortSpec::Number {
            protocol,
            port: None,
            end: None
        }),
        (protocol(), proptest::sample::select(vec![53u16, 80, 8080, 7777])).prop_map(|(protocol, p)| {
            PortSpec::Number {
                protocol,
                port: Some(p),
                end: None,
            }
        }),
        protocol().prop_map(|protocol| PortSpec::Number {
            protocol,
            port: Some(50),
            end: Some(100)
        }),
        (
            protocol(),
            proptest::sample::select(vec!["http", "dns", "metrics", "nope"])
        )
            .prop_map(|(protocol, name)| PortSpec::Named {
                protocol,
                name: name.to_string()
            }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (option::of(vec(peer(), 1..=2)), option::of(vec(port_spec(), 1..=2)))
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy(index: usize) -> impl Strategy<Value = Policy> {
    (
        proptest::sample::select(NAMESPACES.to_vec()),
        pod_selector(),
        option::of(vec(rule(), 0..=2)),
        option::of(vec(rule(), 0..=2)),
    )
        .prop_map(move |(ns, pod_selector, ingress, egress)| Policy {
            id: ObjectRef::new(ns, format!("p{index}")),
            pod_selector,
            ingress,
            egress,
        })
}

/// Ports a pod may declare; names are unique within a pod, as the API server requires.
fn container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    let choices = vec![
        (Some("http"), 80, Protocol::Tcp),
        (Some("dns"), 53, Protocol::Udp),
        (Some("metrics"), 9090, Protocol::Tcp),
        (None, 443, Protocol::Tcp),
        (Some("sctp"), 7777, Protocol::Sctp),
    ];
    let alt_http = (Some("http"), 8080, Protocol::Tcp);
    (subsequence(choices, 0..=4), any::<bool>()).prop_map(move |(mut list, alt)| {
        if alt && let Some(http) = list.iter_mut().find(|p| p.0 == Some("http")) {
            *http = alt_http;
        }
        list.into_iter()
            .map(|(name, port, protocol)| ContainerPort {
                name: name.map(str::to_string),
                port,
                protocol,
            })
            .collect()
    })
}

fn addresses(index: usize) -> impl Strategy<Value = Vec<IpAddr>> {
    // Mostly one address per pod; sometimes an IPv6 or dual-stack one, none yet, or one that
    // another pod also claims (address reuse).
    let v4: IpAddr = format!("10.0.0.{}", index + 1).parse().expect("v4");
    let v6: IpAddr = format!("fd00::{}", index + 1).parse().expect("v6");
    let shared: IpAddr = "10.0.0.100".parse().expect("shared");
    prop_oneof![
        4 => Just(vec![v4]),
        1 => Just(vec![v6]),
        2 => Just(vec![v4, v6]),
        1 => Just(vec![]),
        1 => Just(vec![shared]),
    ]
}

fn pod(index: usize) -> impl Strategy<Value = Pod> {
    (
        proptest::sample::select(NAMESPACES.to_vec()),
        pod_labels(),
        addresses(index),
        container_ports(),
        prop_oneof![8 => Just(NODE), 2 => Just("n2")],
        prop_oneof![9 => Just(false), 1 => Just(true)],
        prop_oneof![9 => Just(false), 1 => Just(true)],
        0..3i64,
    )
        .prop_map(
            move |(ns, labels, ips, ports, node, host_network, terminated, created)| Pod {
                namespace: ns.to_string(),
                name: format!("pod{index}"),
                labels,
                ips,
                node: Some(node.to_string()),
                host_network,
                terminated,
                ports,
                created,
            },
        )
}

/// A random cluster as seen from node [`NODE`].
pub fn state() -> impl Strategy<Value = State> {
    let namespaces = vec(
        (labels(&[("team", &["x", "y"]), ("env", &["x", "y"])]), any::<bool>()),
        2..=2,
    );
    let pods = (1..=6usize).prop_flat_map(|n| (0..n).map(pod).collect::<Vec<_>>());
    let policies = (0..=4usize).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>());
    (namespaces, pods, policies, any::<bool>(), any::<bool>()).prop_map(
        |(namespaces, pods, policies, node_addr, legacy)| {
            let mut state = State {
                node_name: Some(NODE.to_string()),
                legacy_default_deny: legacy,
                node_addrs: if node_addr {
                    vec![NODE_ADDR.parse().expect("node addr")]
                } else {
                    vec![]
                },
                ..State::default()
            };
            // Namespaces a and b exist (c only has pods: it has no object, just its name label).
            for ((labels, legacy_deny), name) in namespaces.into_iter().zip(["a", "b"]) {
                let mut annotations = Labels::new();
                if legacy_deny {
                    annotations.insert(
                        npc_agent::compiler::LEGACY_ANNOTATION.to_string(),
                        r#"{"ingress":{"isolation":"DefaultDeny"}}"#.to_string(),
                    );
                }
                state
                    .namespaces
                    .insert(name.to_string(), Namespace::new(name, labels, annotations));
            }
            for pod in pods {
                state.pods.insert(pod.object_ref(), pod);
            }
            for policy in policies {
                state.policies.insert(policy.id.clone(), policy);
            }
            state
        },
    )
}

/// Every address worth asking about: each pod's, the node's and a few outside ones.
pub fn query_addresses(state: &State) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = state.pods.values().flat_map(|p| p.ips.iter().copied()).collect();
    out.extend(OUTSIDE.iter().map(|a| a.parse::<IpAddr>().expect("outside addr")));
    out.push(NODE_ADDR.parse().expect("node addr"));
    out.sort();
    out.dedup();
    out
}
