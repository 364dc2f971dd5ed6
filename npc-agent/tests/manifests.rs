//! `kubectl apply -f manifests/` installs npc: every document there parses into its
//! k8s-openapi type, and the things that matter for safety and function are as they must be.
use std::path::Path;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;

#[derive(Default)]
struct Install {
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml_ng::Value, file: &Path) -> T {
    serde_path_to_error::deserialize(v).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn install() -> Install {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut out = Install::default();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("manifests/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = serde_yaml_ng::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            match v["kind"].as_str() {
                Some("ServiceAccount") => out.service_accounts.push(typed(v, &file)),
                Some("ClusterRole") => out.roles.push(typed(v, &file)),
                Some("ClusterRoleBinding") => out.bindings.push(typed(v, &file)),
                Some("DaemonSet") => out.daemonsets.push(typed(v, &file)),
                other => panic!("{}: unexpected kind {other:?}", file.display()),
            }
        }
    }
    out
}

#[test]
fn rbac_only_reads_pods_namespaces_policies_and_services() {
    let i = install();
    assert_eq!(i.roles.len(), 1);
    let mut granted = Vec::new();
    for rule in i.roles[0].rules.as_deref().unwrap_or_default() {
        assert_eq!(rule.verbs, ["get", "list", "watch"], "read-only verbs");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                granted.push(format!("{group}/{resource}"));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/namespaces",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "networking.k8s.io/networkpolicies"
        ]
    );
    let sa = &i.service_accounts[0];
    let binding = &i.bindings[0];
    assert_eq!(binding.role_ref.name, i.roles[0].metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_deref().unwrap()[0];
    assert_eq!(subject.name, sa.metadata.name.clone().unwrap());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn the_daemonset_runs_everywhere_with_least_privilege() {
    let i = install();
    let ds = &i.daemonsets[0];
    let spec = ds.spec.as_ref().unwrap();
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name, i.service_accounts[0].metadata.name);
    let tolerations = pod.tolerations.as_deref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint"
    );
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "never privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let mut added = caps.add.clone().unwrap();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"], "only what the datapath needs");
    // NODE_NAME from the downward API.
    let env = c.env.as_deref().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path,
        "spec.nodeName"
    );
    // The host's bpffs, so pins outlive the container.
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    let volume = pod
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(volume.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    // Probes on the agent's health endpoints, resources set.
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
    assert_eq!(c.args.as_deref().unwrap()[0], "run");
}
