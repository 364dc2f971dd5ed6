//! The compiler against the independent reference evaluator, on random clusters: each cluster is
//! generated as k8s-openapi objects, read by npc's files source (YAML text through
//! `files::parse_str`, so npc's parsing, defaulting and validation are under test too) and
//! compiled; the compiled maps, queried the way the datapath queries them
//! (`compiler::lookup`), must give the reference's verdict for every (source, destination,
//! protocol, port) over the cluster's query addresses. Pure: no kernel needed.
use std::{collections::BTreeMap, net::IpAddr};

use npc_policy::{
    compiler::{self, Compiled, Compiler},
    model::{ObjectRef, Protocol},
    policy::Direction,
    reference::{self, Cluster},
    scenario,
};
use proptest::prelude::*;

/// One enforcement point, read from the compiled maps: the pod the reference says owns `local`
/// judges (no owner: nothing enforces that side).
fn side(
    c: &Compiled,
    owners: &Owners,
    direction: Direction,
    local: IpAddr,
    peer: IpAddr,
    p: Protocol,
    port: u16,
) -> bool {
    match &owners[&local] {
        Some(pod) => compiler::lookup(c, pod, direction, peer, p.number(), port).allowed(),
        None => true,
    }
}

/// The reference's owner of each query address, asked once per cluster.
type Owners = BTreeMap<IpAddr, Option<ObjectRef>>;

fn check_all(c: &Compiled, cluster: &Cluster) -> Result<(), TestCaseError> {
    let addrs = scenario::query_addresses(cluster);
    let owners: Owners = addrs
        .iter()
        .map(|a| {
            (
                *a,
                reference::owner(cluster, *a).map(|pod| scenario::object_ref(&pod.metadata)),
            )
        })
        .collect();
    for src in &addrs {
        for dst in addrs.iter().filter(|d| *d != src && d.is_ipv4() == src.is_ipv4()) {
            for protocol in scenario::PROTOCOLS {
                let p = Protocol::parse(protocol).expect("a protocol");
                for port in scenario::PORTS {
                    let egress = side(c, &owners, Direction::Egress, *src, *dst, p, port);
                    let ingress = side(c, &owners, Direction::Ingress, *dst, *src, p, port);
                    scenario::agrees(cluster, (*src, *dst, protocol, port), egress, ingress)?;
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_the_reference(cluster in scenario::cluster()) {
        check_all(&compiler::compile(&scenario::state(&cluster)), &cluster)?;
    }

    /// A compiler that has numbered another cluster before (ids carried over, some retired) must
    /// still be exact: stable numbering never changes a verdict.
    #[test]
    fn a_warm_compiler_agrees_too(before in scenario::cluster(), cluster in scenario::cluster()) {
        let mut compiler = Compiler::default();
        compiler.compile(&scenario::state(&before));
        check_all(&compiler.compile(&scenario::state(&cluster)), &cluster)?;
    }
}

/// The conversion goes through the files source: what the generator writes is what npc reads.
#[test]
fn every_generated_object_is_read() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = scenario::cluster();
    for _ in 0..200 {
        let c = strategy.new_tree(&mut runner).expect("a cluster").current();
        let loaded = scenario::load(&c);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.namespaces.len(), c.namespaces.len());
        assert_eq!(loaded.pods.len(), c.pods.len());
        assert_eq!(loaded.policies.len(), c.policies.len());
        let state = scenario::state(&c);
        assert_eq!(state.node_name.as_deref(), Some(c.node_name.as_str()));
        assert_eq!(state.node_addrs, c.node_addrs);
        assert_eq!(state.legacy_default_deny, c.legacy_default_deny);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// npc's reading of a cluster, written back as objects (what the lab tests judge), means to the
    /// reference what the cluster itself means.
    #[test]
    fn the_model_written_back_means_the_same(cluster in scenario::cluster()) {
        let mut back = scenario::cluster_of_state(&scenario::state(&cluster));
        // Services are not written back (the lab's probes go to pods): keep the originals.
        back.services = cluster.services.clone();
        let addrs = scenario::query_addresses(&cluster);
        for src in &addrs {
            for dst in addrs.iter().filter(|d| *d != src && d.is_ipv4() == src.is_ipv4()) {
                for protocol in scenario::PROTOCOLS {
                    for port in [53, 80, 8080, 101] {
                        prop_assert_eq!(
                            reference::allowed(&back, *src, *dst, protocol, port),
                            reference::allowed(&cluster, *src, *dst, protocol, port),
                            "{} -> {} {}/{}", src, dst, protocol, port
                        );
                    }
                }
            }
        }
    }
}
