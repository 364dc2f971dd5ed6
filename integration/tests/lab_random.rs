//! Random clusters in the lab: real pods in network namespaces, real sockets through the real
//! datapath, attached by the netlink attacher; every probe must give the verdict of the
//! independent reference evaluator, judging the generated objects with the addresses the lab
//! gave the pods.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::{PodIP, PodStatus};
use npc_agent::lab::{Lab, LabOptions};
use npc_integration::{require_root, tag};
use npc_policy::{
    model::ObjectRef,
    reference::{self, Cluster, Direction},
    scenario,
};
use proptest::{prelude::*, test_runner::FileFailurePersistence};

/// The parts of a random cluster a lab can build: every pod on the lab's one node, running, not
/// hostNetwork, without an address (the lab gives each one in 10.0.0.0/24, so the generated
/// ipBlocks and excepts bite), declaring each (port, protocol) once and no SCTP (the lab's
/// listeners bind each declared port; no SCTP sockets on these kernels).
fn lab_cluster(c: &Cluster) -> Cluster {
    let mut c = c.clone();
    c.node_name = scenario::LAB_NODE.to_string();
    for pod in &mut c.pods {
        let spec = pod.spec.as_mut().expect("generated pods have a spec");
        spec.node_name = Some(scenario::LAB_NODE.to_string());
        spec.host_network = None;
        let mut seen = BTreeSet::new();
        for container in &mut spec.containers {
            if let Some(ports) = container.ports.as_mut() {
                ports.retain(|p| {
                    let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                    protocol != "SCTP" && seen.insert((p.container_port, protocol))
                });
            }
        }
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
    }
    c
}

/// What the reference says of one attempt through a Service: the egress verdict at the VIP, then
/// the ingress verdict at the backend kube-proxy picks at random. `None` when backends disagree
/// on ingress (either outcome is right). A backend that is the client itself is reached
/// masqueraded, from the node, which ingress always admits.
fn through_service(c: &Cluster, src: IpAddr, vip: IpAddr, protocol: &str, port: u16) -> Option<bool> {
    if !reference::service_egress_allows(c, src, vip, protocol, port).expect("a Service port") {
        return Some(false);
    }
    let ingress: Vec<bool> = reference::vip_backends(c, vip, protocol, port)
        .expect("a Service port")
        .iter()
        .map(|(backend, target)| {
            *backend == src || reference::side_allows(c, Direction::Ingress, *backend, src, protocol, *target)
        })
        .collect();
    match (ingress.iter().all(|a| *a), ingress.iter().any(|a| *a)) {
        (true, _) => Some(true),
        (false, false) => Some(false),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: npc_integration::cases(8),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn lab_probes_agree_with_the_reference(generated in scenario::cluster()) {
        require_root();
        let mut cluster = lab_cluster(&generated);
        let mut opts = LabOptions::new(&tag("rand"));
        opts.pod_cidr = "10.0.0.0/24".parse().expect("cidr");
        opts.legacy_default_deny = cluster.legacy_default_deny;
        let loaded = scenario::load(&cluster);
        prop_assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let lab = Lab::up(opts, &loaded).expect("lab up");
        let probes = lab.probe_all().expect("probes");
        // The reference judges the objects with the lab's addresses and node.
        let lab_state = lab.state();
        for pod in &mut cluster.pods {
            let ips = &lab_state.pods[&scenario::object_ref(&pod.metadata)].ips;
            let status = pod.status.as_mut().expect("status");
            status.pod_ip = ips.first().map(ToString::to_string);
            status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
        }
        cluster.node_addrs = lab_state.node_addrs.clone();
        let record = lab.record();
        for p in &probes {
            let addr = |id: &str| lab_state.pods[&ObjectRef::parse(id).expect("ns/name")].ips[0];
            let want = match p.to.strip_prefix("svc/") {
                None => Some(reference::allowed(&cluster, addr(&p.from), addr(&p.to), &p.protocol, p.port)),
                Some(_) => {
                    let src = lab_state.pods[&ObjectRef::parse(&p.from).expect("ns/name")]
                        .ips
                        .iter()
                        .copied()
                        .find(IpAddr::is_ipv4)
                        .expect("Service probes come from IPv4 pods");
                    let vip = record.services.iter().find(|s| s.id == p.to).expect("a probed Service").vip;
                    through_service(&cluster, src, vip, &p.protocol, p.port)
                }
            };
            if let Some(want) = want {
                prop_assert_eq!(p.result == "allowed", want, "{} -> {} {}/{}\n{}", p.from, p.to, p.protocol, p.port, scenario::manifest(&cluster));
            }
        }
    }
}
