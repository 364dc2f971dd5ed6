//! Compiler benchmark (`cargo xtask bench`, or `cargo bench -p npc-agent --bench compile`):
//! full compile time, entries produced and peak memory at 1k / 10k / 50k pods, memory per pod
//! in the model, and what one incremental change (a pod relabelled, a policy edited) costs in
//! time and in kernel map writes.
//!
//! The cluster is synthetic but shaped like real ones: 10 pods per namespace in 4 deployments,
//! 100 pods per node (the agent compiles for one node), one policy per namespace with pod,
//! namespace and ipBlock peers, numbered and named ports and an endPort range.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use npc_policy::compiler::{Compiled, Compiler, Incremental};
use npc_policy::model::{ContainerPort, Labels, Namespace, ObjectRef, Pod, Protocol, State};
use npc_policy::policy::{IpBlock, NamespaceScope, Peer, Policy, PortSpec, Rule, Selector};
use npc_policy::service::{Service, ServicePort, TargetPort};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result, its time, and the heap it needed at peak beyond what was live
/// before (what it returns included).
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let out = black_box(f());
    let elapsed = start.elapsed();
    (out, elapsed, PEAK.load(Ordering::Relaxed) - base)
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn sel(pairs: &[(&str, &str)]) -> Selector {
    Selector::from_labels(pairs)
}

const PODS_PER_NAMESPACE: usize = 10;
const PODS_PER_NODE: usize = 100;

/// One Service per namespace (`--services`), selecting the namespace's app1 pods on port 80 →
/// `grpc`: the local app0 pods are isolated for egress, so each is judged against every one.
fn add_services(state: &mut State) {
    let names: Vec<String> = state.namespaces.keys().cloned().collect();
    for (n, ns) in names.into_iter().enumerate() {
        let svc = Service {
            namespace: ns,
            name: "app1".into(),
            vips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a60_0000 + n as u32 + 1,
            ))],
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                target: TargetPort::Name("grpc".into()),
            }],
            selector: Some(labels(&[("app", "a1".to_string())])),
            node_local: false,
            headless: false,
        };
        state.services.insert(svc.object_ref(), svc);
    }
}

fn cluster(pods: usize) -> State {
    let namespaces = pods / PODS_PER_NAMESPACE;
    let nodes = pods.div_ceil(PODS_PER_NODE);
    let mut state = State {
        node_name: Some("node-0".into()),
        node_addrs: vec!["192.168.0.1".parse().expect("literal")],
        ..State::default()
    };
    let envs = ["prod", "staging", "dev"];
    for n in 0..namespaces {
        let name = format!("ns-{n}");
        let ns_labels = labels(&[("team", format!("t{}", n % 20)), ("env", envs[n % 3].to_string())]);
        state
            .namespaces
            .insert(name.clone(), Namespace::new(name, ns_labels, Labels::new()));
    }
    for i in 0..pods {
        let n = i / PODS_PER_NAMESPACE;
        let app = i % 4;
        let mut ports = vec![ContainerPort {
            name: Some("metrics".into()),
            port: 9100,
            protocol: Protocol::Tcp,
        }];
        ports.push(ContainerPort {
            name: Some(if app == 1 { "grpc" } else { "http" }.into()),
            port: if app == 1 { 9090 } else { 8080 },
            protocol: Protocol::Tcp,
        });
        let pod = Pod {
            namespace: format!("ns-{n}"),
            name: format!("app{app}-{i:x}"),
            labels: labels(&[
                ("app", format!("a{app}")),
                (
                    "pod-template-hash",
                    format!("{:08x}", (n * 4 + app).wrapping_mul(2_654_435_761)),
                ),
            ]),
            ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 + i as u32 + 1,
            ))],
            // Round-robin placement: every node gets pods of every namespace.
            node: Some(format!("node-{}", i % nodes)),
            host_network: false,
            terminated: false,
            ports,
            created: 0,
            source_prefixes: Vec::new(),
            ignored: Vec::new(),
        };
        state.pods.insert(pod.object_ref(), pod);
    }
    for n in 0..namespaces {
        let policy = policy(n);
        state.policies.insert(policy.id.clone(), policy);
    }
    state
}

fn policy(n: usize) -> Policy {
    let tcp = |port: u16| PortSpec::Number {
        protocol: Protocol::Tcp,
        port: Some(port),
        end: None,
    };
    Policy {
        id: ObjectRef::new(format!("ns-{n}"), "app0-access"),
        pod_selector: sel(&[("app", "a0")]),
        ingress: Some(vec![
            Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Own,
                    pods: sel(&[("app", "a1")]),
                }]),
                ports: Some(vec![PortSpec::Named {
                    protocol: Protocol::Tcp,
                    name: "http".into(),
                }]),
            },
            Rule {
                peers: Some(vec![
                    Peer::Pods {
                        namespaces: NamespaceScope::Selector(sel(&[("team", &format!("t{}", n % 20))])),
                        pods: sel(&[("app", "a2")]),
                    },
                    Peer::IpBlock(IpBlock {
                        cidr: format!("172.{}.0.0/16", 16 + n % 16).parse().expect("literal"),
                        except: vec![format!("172.{}.1.0/24", 16 + n % 16).parse().expect("literal")],
                    }),
                ]),
                ports: Some(vec![tcp(8080), tcp(9100)]),
            },
        ]),
        egress: Some(vec![
            Rule {
                peers: Some(vec![Peer::Pods {
                    namespaces: NamespaceScope::Selector(sel(&[("env", "prod")])),
                    pods: sel(&[("app", "a3")]),
                }]),
                ports: Some(vec![PortSpec::Number {
                    protocol: Protocol::Udp,
                    port: Some(53),
                    end: None,
                }]),
            },
            Rule {
                peers: Some(vec![Peer::IpBlock(IpBlock {
                    cidr: "10.0.0.0/8".parse().expect("literal"),
                    except: vec!["10.1.0.0/16".parse().expect("literal")],
                })]),
                ports: Some(vec![PortSpec::Number {
                    protocol: Protocol::Tcp,
                    port: Some(8000),
                    end: Some(8100),
                }]),
            },
        ]),
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes --bench; a size list may follow (e.g. `-- 1000 5000`).
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    // `cargo bench` passes `--bench`; run by hand without it, the binary makes a quick run.
    let benching = std::env::args().any(|a| a == "--bench");
    let services = std::env::args().any(|a| a == "--services");
    let sizes = match (sizes.is_empty(), benching) {
        (false, _) => sizes,
        (true, true) => vec![1_000, 10_000, 50_000],
        (true, false) => vec![1_000],
    };
    println!(
        "compiler benchmark: 10 pods/namespace, 1 policy/namespace, {}100 pods/node, compiled for one node",
        if services { "1 Service/namespace, " } else { "" }
    );
    println!(
        "{:>7} {:>6} {:>7} {:>10} {:>11} {:>9} {:>8} {:>9} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "pods",
        "ns",
        "policy",
        "model B/pod",
        "compile ms",
        "peak MiB",
        "idents",
        "entries",
        "relabel ms",
        "relabel Δ",
        "edit ms",
        "edit Δ",
        "inc rel ms",
        "inc edit ms",
        "inc churn ms",
    );
    for pods in sizes {
        let (state, _, model_bytes) = measure(|| {
            let mut state = cluster(pods);
            if services {
                add_services(&mut state);
            }
            state
        });
        let mut compiler = Compiler::default();
        let (compiled, compile_time, peak): (Compiled, _, _) = measure(|| compiler.compile(&state));
        let entries = compiled.maps.entry_count();

        // One local pod relabelled (its deployment changes app): only its entries move.
        let mut relabelled = state.clone();
        let local = relabelled
            .pods
            .values_mut()
            .find(|p| p.node.as_deref() == Some("node-0") && p.labels["app"] == "a0")
            .expect("a local app0 pod");
        local.labels.insert("app".into(), "a3".into());
        let (after_relabel, relabel_time, _) = measure(|| compiler.compile(&relabelled));
        let relabel_diff = compiled.maps.diff_count(&after_relabel.maps);

        // One policy edited (a port added to one rule).
        let mut edited = relabelled.clone();
        // The policy of a namespace that still has a local app0 pod, so the edit matters here.
        let ns = edited
            .pods
            .values()
            .find(|p| p.node.as_deref() == Some("node-0") && p.labels["app"] == "a0")
            .expect("another local app0 pod")
            .namespace
            .clone();
        let id = ObjectRef::new(ns, "app0-access");
        let mut p = edited.policies[&id].clone();
        if let Some(rules) = p.ingress.as_mut() {
            rules[1].ports.get_or_insert_with(Vec::new).push(PortSpec::Number {
                protocol: Protocol::Tcp,
                port: Some(8443),
                end: None,
            });
        }
        edited.policies.insert(id, p);
        let (after_edit, edit_time, _) = measure(|| compiler.compile(&edited));
        let edit_diff = after_relabel.maps.diff_count(&after_edit.maps);

        // The same two changes through the agent's incremental compiler.
        let mut inc = Incremental::default();
        inc.replace(state.clone());
        inc.compile();
        let pod = relabelled
            .pods
            .values()
            .find(|p| state.pods.get(&p.object_ref()) != Some(*p));
        inc.set_pod(pod.expect("the relabelled pod").clone());
        let (_, inc_relabel_time, _) = measure(|| inc.compile().maps.entry_count());
        let policy = edited
            .policies
            .values()
            .find(|p| relabelled.policies.get(&p.id) != Some(*p));
        inc.set_policy(policy.expect("the edited policy").clone());
        let (inc_entries, inc_edit_time, _) = measure(|| inc.compile().maps.entry_count());
        assert_eq!(
            inc_entries,
            after_edit.maps.entry_count(),
            "incremental and full agree in size"
        );
        // A pod on another node restarted with a new address (rollout churn): no identity changes.
        let mut moved = edited
            .pods
            .values()
            .find(|p| p.node.as_deref() != Some("node-0"))
            .expect("a remote pod")
            .clone();
        moved.ips = vec!["10.255.255.1".parse().expect("literal")];
        inc.set_pod(moved);
        let (_, inc_churn_time, _) = measure(|| inc.compile().maps.entry_count());

        println!(
            "{:>7} {:>6} {:>7} {:>11} {:>11.1} {:>9.1} {:>8} {:>9} {:>10.1} {:>10} {:>9.1} {:>10} {:>9.2} {:>9.2} {:>9.2}",
            pods,
            state.namespaces.len(),
            state.policies.len(),
            model_bytes / pods,
            ms(compile_time),
            mib(peak),
            compiled.identities.len(),
            entries,
            ms(relabel_time),
            relabel_diff,
            ms(edit_time),
            edit_diff,
            ms(inc_relabel_time),
            ms(inc_edit_time),
            ms(inc_churn_time),
        );
    }
    println!(
        "(relabel/edit ms: a full compile; inc: the agent's incremental compiler, same change; inc churn: a remote pod's new address; Δ = kernel map entries a sync writes or deletes for that change; model B/pod = heap of the compiler's \
         input per pod; peak = heap a full compile needs at its high-water mark)"
    );
    store_memory();
}

/// What the agent's pod store costs per pod: a realistic Pod as the API server sends it, kept
/// whole versus stripped the way the kube source strips it before storing.
fn store_memory() {
    let full = || -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "catalogue-6d8b9c7f5-x2x9q", "namespace": "sock-shop", "uid": "0f4c6a4e-3b0e-4c1e-9a61-5d1b0b8f7e21",
                "resourceVersion": "123456", "creationTimestamp": "2026-01-01T00:00:00Z", "generateName": "catalogue-6d8b9c7f5-",
                "labels": {"name": "catalogue", "pod-template-hash": "6d8b9c7f5"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "catalogue-6d8b9c7f5", "uid": "x", "controller": true}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:name": {}}}, "f:spec": {"f:containers": {"k:{\"name\":\"catalogue\"}": {".": {}, "f:image": {}, "f:ports": {}}}}}}]
            },
            "spec": {
                "nodeName": "node-17", "serviceAccountName": "default", "restartPolicy": "Always",
                "containers": [{"name": "catalogue", "image": "weaveworksdemos/catalogue:0.3.5", "command": ["/app"], "args": ["-port=80"],
                                "ports": [{"containerPort": 80, "name": "http"}],
                                "env": [{"name": "ZIPKIN", "value": "http://zipkin:9411/api/v1/spans"}],
                                "resources": {"limits": {"cpu": "200m", "memory": "200Mi"}, "requests": {"cpu": "100m", "memory": "100Mi"}},
                                "livenessProbe": {"httpGet": {"path": "/health", "port": 80}, "initialDelaySeconds": 300},
                                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
                "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
            },
            "status": {
                "phase": "Running", "podIP": "10.244.17.23", "podIPs": [{"ip": "10.244.17.23"}], "hostIP": "192.168.1.17",
                "qosClass": "Burstable", "startTime": "2026-01-01T00:00:00Z",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "containerStatuses": [{"name": "catalogue", "ready": true, "restartCount": 0, "image": "weaveworksdemos/catalogue:0.3.5",
                                       "imageID": "docker-pullable://weaveworksdemos/catalogue@sha256:abc", "containerID": "containerd://def",
                                       "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]
            }
        }))
        .expect("a valid Pod")
    };
    const N: usize = 1000;
    let (whole, _, whole_bytes) = measure(|| (0..N).map(|_| full()).collect::<Vec<_>>());
    drop(whole);
    let (stripped, _, stripped_bytes) = measure(|| {
        (0..N)
            .map(|_| {
                let mut p = full();
                npc_agent::source::kube::strip_pod(&mut p);
                p
            })
            .collect::<Vec<_>>()
    });
    drop(stripped);
    println!(
        "agent pod store: {} B/pod as the API server sends a pod, {} B/pod stripped (kube_source::strip_pod)",
        whole_bytes / N,
        stripped_bytes / N
    );
}
