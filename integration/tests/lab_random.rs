//! Random clusters in the lab: real pods in network namespaces, real sockets through the real
//! datapath, attached by the netlink attacher; every probe must give the reference verdict.
use npc_agent::{
    lab::{Lab, LabOptions},
    manifests::Loaded,
    model::{Protocol, State},
    reference,
};
use npc_integration::{require_root, scenario, tag};
use proptest::{prelude::*, test_runner::FileFailurePersistence};

/// The parts of a random cluster a lab can build: every pod local, running, in its own network
/// namespace, with a lab address (10.0.0.0/24, so the generated ipBlocks and excepts bite), and
/// TCP/UDP listeners (no SCTP sockets on these kernels).
fn lab_manifests(state: &State) -> Loaded {
    let pods = state
        .pods
        .values()
        .cloned()
        .map(|mut p| {
            p.node = None;
            p.host_network = false;
            p.terminated = false;
            p.ips.clear();
            p.ports.retain(|c| c.protocol != Protocol::Sctp);
            p
        })
        .collect();
    Loaded {
        namespaces: state.namespaces.values().cloned().collect(),
        pods,
        policies: state.policies.values().cloned().collect(),
        errors: Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 8,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn lab_probes_agree_with_the_reference(state in scenario::state()) {
        require_root();
        let mut opts = LabOptions::new(&tag("rand"));
        opts.pod_cidr = "10.0.0.0/24".parse().expect("cidr");
        opts.legacy_default_deny = state.legacy_default_deny;
        let lab = Lab::up(opts, &lab_manifests(&state)).expect("lab up");
        let probes = lab.probe_all().expect("probes");
        let lab_state = lab.state();
        for p in &probes {
            let addr = |id: &str| lab_state.pods[&npc_agent::model::ObjectRef::parse(id).expect("ns/name")].ips[0];
            let protocol = Protocol::parse(&p.protocol).expect("protocol");
            let want = reference::allowed(lab_state, addr(&p.from), addr(&p.to), protocol, p.port);
            prop_assert_eq!(p.result == "allowed", want, "{} -> {} {}/{}", p.from, p.to, p.protocol, p.port);
        }
    }
}
