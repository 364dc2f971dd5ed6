//! An agent restart that cannot look a pod's interface up (issue 14, "never silently
//! unenforced"): the restarted agent keeps the interface it finds its programs and the pod's
//! endpoint on, instead of detaching it and deleting the endpoint, and attaches it properly once
//! the lookup works again. Real pods on a lab bridge, real traffic, blocks proven by the drop
//! counter (`Lab::probe`).
use std::{process::Command, time::Duration};

use npc_agent::lab::{Lab, LabOptions};
use npc_integration::{require_root, tag};
use npc_policy::{
    files,
    model::{ObjectRef, Protocol},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: r}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: r, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: r, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-in, namespace: r}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress: [{from: [{podSelector: {matchLabels: {app: nobody}}}]}]
"#;

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("run a command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip link set dev VETH type bridge_slave ARGS...` in the node namespace.
fn bridge_port(node: &str, veth: &str, args: &[&str]) {
    let mut all = vec!["ip", "-n", node, "link", "set", "dev", veth, "type", "bridge_slave"];
    all.extend_from_slice(args);
    run(&all);
}

#[test]
fn a_pod_whose_interface_cannot_be_looked_up_after_a_restart_stays_enforced() {
    require_root();
    let loaded = files::parse_str("cluster.yaml".as_ref(), CLUSTER);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut lab = Lab::up(LabOptions::new(&tag("restart")), &loaded).expect("lab up");
    let (server, client) = (ObjectRef::new("r", "server"), ObjectRef::new("r", "client"));
    let blocked = |lab: &Lab, when: &str| {
        let got = lab.probe(&client, &server, 8080, Protocol::Tcp).expect("probe");
        assert!(!got, "{when}: the client reached the isolated server");
    };
    blocked(&lab, "before the restart");

    // The bridge forgets the server's port and cannot learn it again (frames to it are still
    // flooded, so traffic flows): no lookup of its interface can succeed.
    let node = lab.node_netns().to_string();
    let (veth, ifindex) = lab.veth(&server).map(|(v, i)| (v.to_string(), i)).expect("server veth");
    bridge_port(&node, &veth, &["learning", "off"]);
    bridge_port(&node, &veth, &["fdb_flush"]);
    run(&["ip", "-n", &node, "neigh", "flush", "dev", "br0"]);

    lab.restart_agent(Duration::from_millis(300))
        .expect("restart the agent");
    let endpoints = lab.datapath().endpoints().expect("endpoints");
    assert!(
        endpoints.contains_key(&ifindex),
        "the unresolved server's endpoint was deleted: {endpoints:?}"
    );
    assert!(
        lab.datapath().attached_ifindexes().contains(&ifindex),
        "the unresolved server's interface was detached"
    );
    blocked(&lab, "after a restart that could not look the server up");

    // Learning again: the next quiet tick attaches it the normal way.
    bridge_port(&node, &veth, &["learning", "on"]);
    // (A few ticks at most: each waits up to 300 ms for the bridge to learn the port.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.enforcer_link(&server).is_none() && std::time::Instant::now() < deadline {
        lab.tick().expect("tick");
    }
    assert_eq!(
        lab.enforcer_link(&server).map(|l| l.ifindex),
        Some(ifindex),
        "attached once its interface could be looked up"
    );
    blocked(&lab, "after the interface was looked up");
}
