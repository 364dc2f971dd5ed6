//! A one-node "cluster" for node-agent tests: the lab's fabric (node namespace, bridge, pods with
//! listeners; no in-process agent), a fake API server inside the node namespace serving those
//! pods, and the real agent (`npc-agent run`'s code, or the binary) enforcing on the node.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use npc_agent::lab::netns;
use npc_agent::lab::{Lab, LabOptions};
use npc_agent::node::agent::{self, AgentOptions};
use npc_agent::node::metrics::Metrics;
use npc_agent::node::wake::Timing;
use npc_policy::files as manifests;
use npc_policy::model::{ObjectRef, Pod, Protocol};
use serde_json::{Value, json};

use crate::Stoppable;
use crate::fake_api::FakeApi;
use crate::require_root;
use crate::tag;
use crate::wait_for;

pub const NODE: &str = "lab-node";

pub struct Cluster {
    // Drop order: the agent, then the API server, then the fabric.
    agent: Option<Stoppable<anyhow::Result<()>>>,
    pub metrics: Metrics,
    pub api: FakeApi,
    pub lab: Lab,
    pub dir: PathBuf,
    pub pin_root: PathBuf,
}

/// The API objects for a lab's namespaces and pods (pods on [`NODE`], with their lab addresses).
pub fn objects(lab: &Lab) -> Vec<Value> {
    let state = lab.state();
    let mut out: Vec<Value> = state
        .namespaces
        .values()
        .map(|ns| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns.name, "labels": ns.labels}})
        })
        .collect();
    out.extend(state.pods.values().map(pod_object));
    out
}

pub fn pod_object(pod: &Pod) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"containerPort": p.port, "protocol": p.protocol.as_str()});
            if let Some(name) = &p.name {
                v["name"] = json!(name);
            }
            v
        })
        .collect();
    let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels,
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox", "ports": ports}]},
        "status": {"phase": "Running", "podIP": pod.ips.first().map(IpAddr::to_string), "podIPs": ips},
    })
}

/// A NetworkPolicy (or any object) from YAML.
pub fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("test YAML")
}

impl Cluster {
    /// Builds the fabric for `manifests` (namespaces and pods; policies are the API's business)
    /// and starts the fake API server in the node namespace, serving every namespace and pod
    /// except those in `unannounced` (the test adds them later).
    pub fn new(name: &str, yaml_text: &str, unannounced: &[&str]) -> Self {
        require_root();
        let name = tag(name);
        let loaded = manifests::parse_str("cluster.yaml".as_ref(), yaml_text);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let mut opts = LabOptions::new(&name);
        opts.enforce = false;
        let lab = Lab::up(opts, &loaded).expect("lab fabric");
        let api = netns::run_in(lab.node_netns(), FakeApi::start).expect("enter the node namespace");
        for object in objects(&lab) {
            let id = format!(
                "{}/{}",
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("")
            );
            if !unannounced.contains(&id.as_str()) {
                api.apply(object);
            }
        }
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let _ = std::fs::remove_dir_all(&pin_root);
        Self {
            agent: None,
            metrics: Metrics::new(),
            api,
            lab,
            dir,
            pin_root,
        }
    }

    pub fn options(&self) -> AgentOptions {
        AgentOptions {
            kubeconfig: Some(self.api.kubeconfig(&self.dir)),
            node_name: NODE.into(),
            metrics_addr: "127.0.0.1:0".parse().expect("addr"),
            pin_root: self.pin_root.clone(),
            legacy_default_deny: false,
            timing: Timing {
                coalesce: Duration::from_millis(50),
                lone: Duration::from_millis(5),
                resync: Duration::from_millis(500),
            },
        }
    }

    /// Runs the agent in-process, in the node namespace, and waits for its first sync.
    pub fn start_agent(&mut self) {
        let opts = self.options();
        let (m, node) = (self.metrics.clone(), self.lab.node_netns().to_string());
        self.agent = Some(Stoppable::spawn(move |stop| {
            netns::enter(&node)?;
            agent::run_with(opts, stop, m)
        }));
        let metrics = self.metrics.clone();
        assert!(
            wait_for(Duration::from_secs(30), || metrics.is_ready()),
            "the agent never became ready"
        );
    }

    /// `npc-agent run` (the binary) in the node's network namespace (nsenter: the agent works
    /// wherever it starts), serving its metrics on `metrics_port`; stderr goes to `log` in the
    /// scratch dir.
    pub fn spawn_agent_process(&self, metrics_port: u16, log: &str) -> std::process::Child {
        let log = std::fs::File::create(self.dir.join(log)).expect("agent log");
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.lab.node_netns()))
            .arg(crate::npc_agent_bin())
            .args(["run", "--kubeconfig"])
            .arg(self.api.kubeconfig(&self.dir))
            .args(["--node-name", NODE, "--pin-root"])
            .arg(&self.pin_root)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn npc-agent run (needs nsenter from util-linux)")
    }

    /// GET a path of the agent process's HTTP server, from inside the node namespace.
    pub fn agent_http_get(&self, metrics_port: u16, path: &str) -> Option<String> {
        use std::io::{Read as _, Write as _};
        netns::run_in(self.lab.node_netns(), || {
            let mut s = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                Duration::from_millis(500),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
        .ok()
        .flatten()
    }

    /// Waits (up to `deadline`) for the agent process's `/readyz`; panics with its log if it
    /// exits or never gets there.
    pub fn wait_agent_process_ready(
        &self,
        metrics_port: u16,
        agent: &mut std::process::Child,
        log: &str,
        deadline: Duration,
    ) {
        let log = || std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let ready = wait_for(deadline, || {
            assert!(
                agent.try_wait().expect("agent status").is_none(),
                "the agent exited:\n{}",
                log()
            );
            self.agent_http_get(metrics_port, "/readyz")
                .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
        });
        assert!(ready, "the agent never became ready:\n{}", log());
    }

    pub fn stop_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop_and_join().expect("agent ran cleanly");
        }
    }

    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> bool {
        self.lab
            .probe(
                &ObjectRef::parse(from).expect("ns/name"),
                &ObjectRef::parse(to).expect("ns/name"),
                port,
                protocol,
            )
            .expect("probe")
    }

    /// Waits until a probe gives `allowed` (the agent applies changes asynchronously). A block
    /// is proven by the agent's datapath: one more probe must move its drop counter for the port.
    pub fn expect(&self, what: &str, from: &str, to: &str, port: u16, allowed: bool) {
        assert!(
            wait_for(Duration::from_secs(20), || self.probe(from, to, port, Protocol::Tcp)
                == allowed),
            "{what}: {from} -> {to}:{port} never became {}",
            if allowed { "allowed" } else { "blocked" }
        );
        if !allowed {
            let drops = || -> u64 {
                npc_agent::datapath::pinned_drops(&self.pin_root)
                    .expect("read the agent's drop counters")
                    .iter()
                    // Under port 0 when no policy, Service or pod names the port (a label bound).
                    .filter(|(k, _)| (k.dport == port || k.dport == 0) && k.protocol == npc_common::PROTO_TCP)
                    .map(|(_, v)| *v)
                    .sum()
            };
            let before = drops();
            assert!(
                !self.probe(from, to, port, Protocol::Tcp),
                "{what}: {from} -> {to}:{port} got through"
            );
            assert!(
                drops() > before,
                "{what}: {from} -> {to}:{port} timed out but the datapath counted no drop (a broken fabric?)"
            );
        }
    }

    pub fn pod(&self, id: &str) -> Pod {
        self.lab.state().pods[&ObjectRef::parse(id).expect("ns/name")].clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.agent.take());
        let _ = npc_agent::datapath::uninstall(&self.pin_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
