//! Seed 002's walk-through with real sockets through real veths, through the http-echo Service
//! (name resolved by the lab's cluster DNS, DNAT by kube-proxy's rules), applied live to one lab;
//! and a broken policy that must not stop the others.
use std::path::{Path, PathBuf};

use npc_agent::lab::walkthrough::{self, STEPS};
use npc_agent::lab::{Lab, LabOptions};
use npc_common::{DIR_INGRESS, DropKey, PROTO_TCP};
use npc_integration::{require_root, tag};
use npc_policy::files as manifests;
use npc_policy::model::{ObjectRef, Protocol, addr_bytes};

fn walkthrough_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/walkthrough")
}

#[test]
fn seed_walkthrough_enforces_each_step_live() {
    require_root();
    let dir = walkthrough_dir();
    let mut lab: Option<Lab> = None;
    let http_echo_drops = DropKey {
        direction: DIR_INGRESS,
        protocol: PROTO_TCP,
        dport: 80,
    };
    for (i, step) in STEPS.iter().enumerate() {
        let loaded = walkthrough::load_step(&dir, step).expect("walk-through manifests parse");
        match lab.as_mut() {
            None => lab = Some(Lab::up(LabOptions::new(&tag("walk")), &loaded).expect("lab up")),
            Some(lab) => {
                lab.apply(&loaded).expect("live apply");
            }
        }
        let lab = lab.as_ref().unwrap();
        let before = lab.datapath().drop_count(http_echo_drops);
        // As the seed's wget: the name through the kube-dns ClusterIP, then the Service's.
        let (_, allowed) = walkthrough::wget(lab).expect("wget");
        // And the pod directly, which the Service must agree with.
        let direct = lab
            .probe(&walkthrough::busybox(), &walkthrough::http_echo(), 80, Protocol::Tcp)
            .unwrap();
        assert_eq!(direct, allowed, "step {}: the pod and its Service disagree", i + 1);
        assert_eq!(allowed, step.expected_allowed, "step {}: {}", i + 1, step.title);
        let after = lab.datapath().drop_count(http_echo_drops);
        if step.expected_allowed {
            assert_eq!(after, before, "step {}: an allowed request dropped packets", i + 1);
        } else {
            assert!(after > before, "step {}: a blocked request was not counted", i + 1);
        }
    }
}

#[test]
fn a_broken_policy_is_reported_and_the_others_still_apply() {
    require_root();
    let dir = walkthrough_dir();
    let mut loaded = walkthrough::load_step(&dir, &STEPS[0]).unwrap();
    // Document 0 is fine (deny-all); document 1 has an invalid CIDR.
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all-by-default, namespace: ns-1}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: broken, namespace: ns-1}
spec:
  podSelector: {}
  ingress:
    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]
"#;
    let extra = manifests::parse_str(Path::new("policies.yaml"), text);
    assert_eq!(extra.policies.len(), 1, "the good policy survives");
    assert_eq!(extra.errors.len(), 1);
    let err = extra.errors[0].to_string();
    for needle in [
        "policies.yaml",
        "document 1",
        "ns-1/broken",
        "spec.ingress[0].from[0].ipBlock.cidr",
        "10.0.0.0/33",
    ] {
        assert!(err.contains(needle), "error {err:?} should name {needle:?}");
    }
    loaded.extend(extra);
    let lab = Lab::up(LabOptions::new(&tag("broken")), &loaded).expect("lab up");
    let allowed = lab
        .probe(&walkthrough::busybox(), &walkthrough::http_echo(), 80, Protocol::Tcp)
        .unwrap();
    assert!(!allowed, "deny-all must be enforced although another policy is broken");
}

#[test]
fn lab_leaves_nothing_behind() {
    require_root();
    let t = tag("clean");
    let loaded = walkthrough::load_step(&walkthrough_dir(), &STEPS[0]).unwrap();
    let opts = LabOptions::new(&t);
    let pin_root = opts.pin_root.clone();
    let lab = Lab::up(opts, &loaded).expect("lab up");
    assert!(!npc_agent::lab::netns::list_with_prefix(&t).is_empty());
    drop(lab);
    assert!(
        npc_agent::lab::netns::list_with_prefix(&t).is_empty(),
        "namespaces left behind"
    );
    assert!(!pin_root.exists(), "pins left behind in {}", pin_root.display());
}

#[test]
fn pinned_ipv6_and_dual_stack_pods_are_enforced() {
    require_root();
    // six/server (fd00:6::10 only), friend (dual stack), stranger (fd00:6::30), v4only (app friend,
    // no address); server-in lets friends in on 80 and fd00:6::30 on UDP 53.
    let yaml = include_str!("fixtures/dual-stack.yaml");
    let loaded = manifests::parse_str(Path::new("six.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let lab = Lab::up(LabOptions::new(&tag("six")), &loaded).expect("lab up");
    let probes = lab.probe_all().expect("probes");
    let result = |from: &str, port: u16| {
        probes
            .iter()
            .find(|p| p.from == format!("six/{from}") && p.to == "six/server" && p.port == port)
            .map(|p| p.result.as_str())
    };
    assert_eq!(result("friend", 80), Some("allowed"), "dual-stack friend, over IPv6");
    assert_eq!(result("friend", 53), Some("blocked"));
    assert_eq!(result("stranger", 80), Some("blocked"));
    assert_eq!(result("stranger", 53), Some("allowed"), "the IPv6 ipBlock");
    assert_eq!(result("v4only", 80), None, "no common family: not probed");
}

/// A lab that is one node of a larger cluster (`LabOptions::node_name`, what the traffic bench's
/// peers use): a pod on another node is compiled (its address has an identity, and a policy
/// admitting it has its allow entry) but is neither wired nor probed; one without a pinned
/// address is refused, by name.
#[test]
fn a_lab_node_compiles_pods_of_other_nodes_without_wiring_them() {
    require_root();
    let pods = "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: here, namespace: n, labels: {app: here}}\nspec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: there, namespace: n, labels: {app: there}}\nspec: {nodeName: elsewhere, containers: [{name: c}]}\nstatus: {podIP: 10.99.0.9}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: n}\nspec:\n  podSelector: {matchLabels: {app: here}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: there}}}], ports: [{port: 80}]}]\n";
    let loaded = manifests::parse_str("remote.yaml".as_ref(), pods);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut opts = LabOptions::new(&tag("remote"));
    opts.node_name = Some("lab-node".into());
    let lab = Lab::up(opts.clone(), &loaded).expect("lab up");
    let (here, there) = (ObjectRef::new("n", "here"), ObjectRef::new("n", "there"));
    assert!(lab.pod_netns(&here).is_some(), "the local pod is wired");
    assert!(lab.pod_netns(&there).is_none(), "the other node's pod is not");
    let probed: Vec<String> = lab.record().pods.iter().map(|p| p.id.clone()).collect();
    assert_eq!(probed, ["n/here"], "only this node's pods are probed");
    let (identities, _) = lab.datapath().kernel_numbering().expect("NPC_IDENTITIES");
    let peer = *identities
        .get(&addr_bytes("10.99.0.9".parse().expect("address")))
        .expect("the other node's pod has an identity");
    let (entries, _) = lab.datapath().policy_entries().expect("NPC_POLICY");
    assert!(
        entries.iter().any(|(k, _)| k.peer == peer && k.port == 80),
        "the policy admits the other node's pod: {entries:?}"
    );
    drop(lab);

    let unpinned = pods.replace("status: {podIP: 10.99.0.9}\n", "");
    let loaded = manifests::parse_str("remote.yaml".as_ref(), &unpinned);
    let refused = Lab::up(opts, &loaded)
        .err()
        .expect("a pod elsewhere with no address is refused");
    assert!(
        refused.to_string().contains("n/there") && refused.to_string().contains("status.podIP"),
        "{refused}"
    );
}
