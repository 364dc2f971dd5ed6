//! The control-plane scale benchmark (`cargo xtask bench scale`, issue 14): the node agent (the
//! real `npc-agent run` binary, in its own process) against the fake API server holding a
//! generated cluster: two pods on this node (a lab fabric: real interfaces to attach to), and
//! optionally more in the remote pod groups, the rest on other nodes; one policy per pod group, and optionally one Service per group (with its
//! EndpointSlice) that the local pods, isolated for egress, are judged against on every turn. Reports the time from the agent's start to
//! `/readyz` (first enforcement), its resident memory (VmRSS, and the peak VmHWM) once enforcing,
//! and edit → kernel map latencies: a policy edit that changes the local server's allowed port is
//! timed until the new allow entry is in the pinned `NPC_POLICY`, and a relabel of the local
//! client (out of the policy's reach, and back) until its allow entry goes (comes back); then a
//! second agent process over the first one's pins, timed to `/readyz` (an upgrade's restart).
use std::time::{Duration, Instant};

use npc_common::{DIR_INGRESS, PROTO_TCP, PolicyKey, map_names};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cluster::{Cluster, yaml};

/// One generated cluster size.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Size {
    pub pods: usize,
    pub namespaces: usize,
    pub policies: usize,
    /// Services (each over one pod group, with its EndpointSlice); with any, the local pods are
    /// isolated for egress (allowed to every pod), so every Service is judged on every turn, as
    /// for an egress-isolated pod of a real cluster.
    pub services: usize,
    /// Pods on this node beyond the server and the client (real interfaces, each in one of the
    /// remote pod groups, so the group's policy isolates it and its peers are the next group's
    /// pods): how the turn grows with what the node must enforce, not only with the cluster.
    pub local: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub size: Size,
    /// Agent process start → `/readyz` (first sync after the initial lists).
    pub start_to_enforcing_s: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Resident bytes per pod in the cluster (the whole process: stores, model, compiled maps).
    pub rss_bytes_per_pod: f64,
    /// The agent's own turn time (compile + map sync, its `npc_sync_duration_seconds`) up to
    /// `/readyz`: the part of start → enforcing that is not the API server's lists.
    pub first_sync_s: f64,
    /// Policy edit applied on the API server → its allow entry in the kernel map.
    pub policy_edit_ms: Vec<f64>,
    /// Pod relabel applied → the allow entry of its identity gone (or back) in the kernel map.
    pub relabel_ms: Vec<f64>,
    /// Local pods with an endpoint in the kernel once enforcing (2 + `size.local`).
    pub endpoints: usize,
    /// Allow entries for Service VIPs in the kernel once enforcing (one per Service and local
    /// pod identity when `size.services` are judged): that the Services are really judged.
    pub service_entries: usize,
    /// A second agent process started over the first one's pins (an upgrade or a crash): start
    /// → `/readyz`, and its first turn. Its links are pinned already, so it replaces the
    /// programs in place instead of attaching anew.
    pub restart_to_enforcing_s: f64,
    pub restart_first_sync_s: f64,
    /// Per edit and relabel: the agent's turn time (change in hand → kernel maps written),
    /// without the API server's delivery and the coalescing wait.
    pub turn_ms: Vec<f64>,
}

/// Between two edits: longer than the agent's coalescing window (100 ms), so that each edit is a
/// lone change on a quiet cluster (back-to-back edits are a burst, and wait the window out).
const QUIET: Duration = Duration::from_millis(250);

/// The agent's `npc_sync_duration_seconds` (sum, count).
fn sync_time(c: &Cluster) -> (f64, f64) {
    let text = c.agent_http_get(METRICS_PORT, "/metrics").unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("npc_sync_duration_seconds_sum"),
        value("npc_sync_duration_seconds_count"),
    )
}

const FABRIC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: local}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: local, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: local, labels: {app: client}}
spec: {containers: [{name: c}]}
"#;

const METRICS_PORT: u16 = 19656;

/// The local server's policy, admitting the client on `port`.
fn server_policy(port: u16) -> Value {
    yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: server-in, namespace: local}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: {port}}}]}}]\n"
    ))
}

/// The node's pods: the server and the client, and `size.local` more, each in a remote group
/// (`app: g<group>` in that group's namespace, with the group's named port) so that the group's
/// policy isolates it.
fn fabric(size: Size) -> String {
    let mut out = FABRIC.to_string();
    let namespaces: std::collections::BTreeSet<usize> = (0..size.local)
        .map(|k| local_group(size, k) % size.namespaces)
        .collect();
    for n in namespaces {
        out += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: s{n}, labels: {{team: t{}}}}}\n",
            n % 10
        );
    }
    for k in 0..size.local {
        let g = local_group(size, k);
        out += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: local{k}, namespace: s{}, labels: {{app: g{g}, tier: web}}}}\nspec: {{containers: [{{name: c, ports: [{{containerPort: 8080, name: http}}]}}]}}\n",
            g % size.namespaces
        );
    }
    out
}

/// The group of the k-th extra local pod: spread over the groups, so that each has its own
/// policy and peers.
fn local_group(size: Size, k: usize) -> usize {
    k * size.policies.max(1) / size.local.max(1)
}

/// The remote part of the cluster: namespaces, pods (group g = i % policies, in namespace
/// g % namespaces, on one of 50 other nodes) and one policy per group admitting the next group.
fn remote_objects(size: Size) -> Vec<Value> {
    let mut out: Vec<Value> = (0..size.namespaces)
        .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("s{n}"), "labels": {"team": format!("t{}", n % 10)}}}))
        .collect();
    for i in 0..size.pods {
        let group = i % size.policies;
        let ip = format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255);
        out.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": format!("s{}", group % size.namespaces),
                         "labels": {"app": format!("g{group}"), "tier": "web"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": format!("remote-{}", i % 50),
                     "containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }));
    }
    for g in 0..size.services.min(size.policies).min(65536) {
        let ns = format!("s{}", g % size.namespaces);
        let name = format!("g{g}");
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": format!("10.96.{}.{}", g >> 8, g & 255), "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
        }));
        // The group's pods: i ≡ g (mod policies).
        let endpoints: Vec<Value> = (g..size.pods)
            .step_by(size.policies)
            .map(|i| {
                json!({"addresses": [format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255)],
                            "conditions": {"ready": true}, "nodeName": format!("remote-{}", i % 50)})
            })
            .collect();
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }));
    }
    if size.services > 0 {
        out.push(yaml(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: all-out, namespace: local}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}}]}]\n",
        ));
    }
    for g in 0..size.policies {
        out.push(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("g{g}"), "namespace": format!("s{}", g % size.namespaces)},
            "spec": {"podSelector": {"matchLabels": {"app": format!("g{g}")}},
                     "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("g{}", (g + 1) % size.policies)}}}],
                                  "ports": [{"port": "http"}]}]},
        }));
    }
    out
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Polls `done` every millisecond until it holds; the elapsed time, or None past `deadline`.
fn time_until(deadline: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// After a quiet pause, applies one edit and times it until `done` holds in the kernel maps; the
/// agent's turn time for it goes to `turn_ms` (averaged over the turns it took).
fn timed_edit(
    c: &Cluster,
    apply: impl FnOnce(),
    done: impl FnMut() -> bool,
    turn_ms: &mut Vec<f64>,
) -> Option<Duration> {
    std::thread::sleep(QUIET);
    let before = sync_time(c);
    apply();
    let took = time_until(Duration::from_secs(60), done)?;
    time_until(Duration::from_secs(10), || sync_time(c).1 > before.1)?;
    let after = sync_time(c);
    turn_ms.push((after.0 - before.0) / (after.1 - before.1) * 1e3);
    Some(took)
}

/// Starts `npc-agent run` (logging to `log`) and waits for `/readyz`; the process and how long
/// that took.
fn start_agent(c: &Cluster, log: &str) -> (std::process::Child, Duration) {
    let start = Instant::now();
    let mut agent = c.spawn_agent_process(METRICS_PORT, log);
    c.wait_agent_process_ready(METRICS_PORT, &mut agent, log, Duration::from_secs(600));
    (agent, start.elapsed())
}

fn stop_agent(mut agent: std::process::Child) {
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
}

/// Measures one cluster size; `edits` policy edits and as many relabels.
pub fn run(size: Size, edits: usize) -> Row {
    let c = Cluster::new("scale", &fabric(size), &[]);
    c.api.apply(server_policy(80));
    for object in remote_objects(size) {
        c.api.apply(object);
    }
    let (agent, start_to_enforcing) = start_agent(&c, "agent.log");
    let (first_sync_s, _) = sync_time(&c);
    let (rss, peak) = (status_kib(agent.id(), "VmRSS:"), status_kib(agent.id(), "VmHWM:"));

    let pin = |name: &str| aya::maps::MapData::from_pin(c.pin_root.join(name)).expect("a pinned map");
    let policy: aya::maps::HashMap<_, PolicyKey, npc_common::PolicyValue> =
        aya::maps::Map::HashMap(pin(map_names::POLICY))
            .try_into()
            .expect("NPC_POLICY");
    let identities: aya::maps::HashMap<_, [u8; 16], u32> = aya::maps::Map::HashMap(pin(map_names::IDENTITIES))
        .try_into()
        .expect("NPC_IDENTITIES");
    let endpoints: aya::maps::HashMap<_, u32, npc_common::EndpointInfo> =
        aya::maps::Map::HashMap(pin(map_names::ENDPOINTS))
            .try_into()
            .expect("NPC_ENDPOINTS");
    let server = npc_policy::model::ObjectRef::new("local", "server");
    let (_, server_ifindex) = c.lab.veth(&server).expect("server veth");
    let server_identity = endpoints
        .get(&server_ifindex, 0)
        .expect("the server is enforced")
        .identity;
    let client_pod = c.pod("local/client");
    let client_addr = npc_policy::model::addr_bytes(client_pod.ips[0]);
    let client_identity = || identities.get(&client_addr, 0).ok();

    let key = |peer: u32, port: u16| PolicyKey {
        identity: server_identity,
        peer,
        port,
        protocol: PROTO_TCP,
        direction: DIR_INGRESS,
    };
    // May the client (by its identity now) open `port` on the server, by the kernel maps?
    let allowed = |port: u16| client_identity().is_some_and(|id| policy.get(&key(id, port), 0).is_ok());

    let enforced_endpoints = endpoints.keys().filter_map(Result::ok).count();
    let services = npc_common::FIRST_SERVICE_IDENTITY..npc_common::CIDR_CLASS_BASE;
    let service_entries = policy
        .keys()
        .filter_map(Result::ok)
        .filter(|k| services.contains(&k.peer))
        .count();
    let mut turn_ms = Vec::new();
    let mut policy_edit_ms = Vec::new();
    let mut port = 80;
    for i in 0..edits {
        port = 1000 + i as u16;
        let took = timed_edit(&c, || c.api.apply(server_policy(port)), || allowed(port), &mut turn_ms)
            .unwrap_or_else(|| panic!("the edit to port {port} never reached NPC_POLICY"));
        policy_edit_ms.push(took.as_secs_f64() * 1e3);
    }
    // Relabels, alternately out of the policy's reach and back: the allow entry for the client's
    // identity goes, then comes back (identity numbers may be reused, so the entry is the signal).
    let mut relabel_ms = Vec::new();
    for i in 0..edits {
        let back = i % 2 == 1;
        let mut relabelled = crate::cluster::pod_object(&client_pod);
        relabelled["metadata"]["labels"]["app"] = json!(if back { "client" } else { "outsider" });
        let took = timed_edit(&c, || c.api.apply(relabelled), || allowed(port) == back, &mut turn_ms)
            .unwrap_or_else(|| panic!("relabel {i} never reached the kernel maps"));
        relabel_ms.push(took.as_secs_f64() * 1e3);
    }
    stop_agent(agent);
    // The restart: a new process over the same pins, as after an upgrade.
    let (agent, restart_to_enforcing) = start_agent(&c, "agent-restarted.log");
    let (restart_first_sync_s, _) = sync_time(&c);
    stop_agent(agent);
    Row {
        size,
        start_to_enforcing_s: start_to_enforcing.as_secs_f64(),
        rss_mib: rss / 1024.0,
        peak_rss_mib: peak / 1024.0,
        rss_bytes_per_pod: rss * 1024.0 / (size.pods + 2) as f64,
        first_sync_s,
        policy_edit_ms,
        relabel_ms,
        restart_to_enforcing_s: restart_to_enforcing.as_secs_f64(),
        restart_first_sync_s,
        endpoints: enforced_endpoints,
        service_entries,
        turn_ms,
    }
}

/// The p-th percentile (0-100) of `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
}

/// The table `cargo xtask bench scale` prints.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:>8} {:>6} {:>8} {:>8} {:>7}  {:>14} {:>10} {:>16} {:>9} {:>9} {:>9}  {:>24}  {:>24}  {:>16}\n",
        "pods",
        "ns",
        "policies",
        "services",
        "on node",
        "start->enforce",
        "first turn",
        "restart (turn)",
        "RSS MiB",
        "peak MiB",
        "B/pod",
        "policy edit ms p50/p99/max",
        "relabel ms p50/p99/max",
        "turn ms p50/p99"
    );
    for r in rows {
        let stats = |v: &[f64]| {
            format!(
                "{:.0}/{:.0}/{:.0}",
                percentile(v, 50.0),
                percentile(v, 99.0),
                percentile(v, 100.0)
            )
        };
        out += &format!(
            "{:>8} {:>6} {:>8} {:>8} {:>7}  {:>13.2}s {:>9.2}s {:>16} {:>9.0} {:>9.0} {:>9.0}  {:>24}  {:>24}  {:>16}\n",
            r.size.pods,
            r.size.namespaces,
            r.size.policies,
            r.size.services,
            r.endpoints,
            r.start_to_enforcing_s,
            r.first_sync_s,
            format!("{:.2}s ({:.2}s)", r.restart_to_enforcing_s, r.restart_first_sync_s),
            r.rss_mib,
            r.peak_rss_mib,
            r.rss_bytes_per_pod,
            stats(&r.policy_edit_ms),
            stats(&r.relabel_ms),
            format!(
                "{:.1}/{:.1}",
                percentile(&r.turn_ms, 50.0),
                percentile(&r.turn_ms, 99.0)
            )
        );
    }
    out
}
