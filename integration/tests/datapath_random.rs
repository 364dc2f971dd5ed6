//! The real datapath against the independent reference evaluator on random clusters: each case
//! generates a cluster as k8s objects, reads it through npc's files source, compiles it, syncs it
//! into the kernel maps with the real MapSync — every local pod behind an interface of its own,
//! in a network namespace this test makes — and runs crafted packets for a sample of (source,
//! destination, protocol, port) through both TC programs with BPF_PROG_TEST_RUN, each packet
//! arriving on the interface of the pod whose side it is (`__sk_buff.ifindex`). The kernel's
//! verdict must be the reference's.
use std::{collections::BTreeMap, net::IpAddr};

use npc_agent::{
    datapath::{Hook, ifindex_of},
    lab::netns::{self, Netns},
};
use npc_integration::{
    TestDatapath,
    packet::{self, L4, TCP_SYN},
    require_root, tag,
};
use npc_policy::{
    compiler,
    model::{ObjectRef, Protocol},
    reference::{self, Cluster},
    scenario,
};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{FileFailurePersistence, TestCaseResult, TestRunner},
};

const PASS: i32 = -1; // TC_ACT_UNSPEC
const SHOT: i32 = 2; // TC_ACT_SHOT
const SAMPLES: usize = 24;
/// One interface per pod the generator can make, and one with no pod behind it.
const INTERFACES: usize = 9;

/// The test's network namespace with [`INTERFACES`] veth pairs; removed on drop.
struct Net {
    ns: Netns,
    /// The host-side ends' ifindexes (in `ns`); the last one never has a pod.
    ifindexes: Vec<u32>,
}

impl Net {
    fn create() -> Self {
        let ns = Netns::create(&tag("dprand")).expect("a network namespace");
        let ifindexes = ns
            .run(|| {
                (0..INTERFACES)
                    .map(|i| {
                        let (host, pod) = (format!("npch{i}"), format!("npcp{i}"));
                        netns::add_veth(&host, &pod, None).expect("a veth pair");
                        netns::set_link_up(&host).expect("host end up");
                        netns::set_link_up(&pod).expect("pod end up");
                        ifindex_of(&host).expect("the host end's ifindex")
                    })
                    .collect()
            })
            .expect("in the test namespace");
        Self { ns, ifindexes }
    }

    fn spare(&self) -> u32 {
        *self.ifindexes.last().expect("interfaces")
    }

    /// One case: compile, sync every local pod behind its own interface, run the samples.
    fn check(&self, cluster: &Cluster, picks: &[(Index, Index, Index, Index)]) -> TestCaseResult {
        let compiled = compiler::compile(&scenario::state(cluster));
        let behind: BTreeMap<ObjectRef, u32> = compiled
            .maps
            .endpoints
            .keys()
            .cloned()
            .zip(self.ifindexes.iter().copied())
            .collect();
        assert!(behind.len() < INTERFACES, "more local pods than interfaces");
        self.ns
            .run(|| {
                let mut t = TestDatapath::load("random");
                t.dp.sync(&compiled.maps, |p| behind.get(p).copied()).expect("sync");
                let mut next_sport = 20000u16;
                let addrs = scenario::query_addresses(cluster);
                for (a, b, proto, port) in picks {
                    let src = *a.get(&addrs);
                    let same_family: Vec<IpAddr> = addrs
                        .iter()
                        .copied()
                        .filter(|d| *d != src && d.is_ipv4() == src.is_ipv4())
                        .collect();
                    let dst = *b.get(&same_family);
                    let protocol = *proto.get(&scenario::PROTOCOLS);
                    let port = *port.get(&scenario::PORTS);
                    // One enforcement point: the packet arrives on the interface of the pod that
                    // owns `local`; with no such pod here, on the interface with no pod (which
                    // must let it pass, as the reference lets that side allow everything).
                    let mut side = |hook: Hook, local: IpAddr| {
                        let pod = reference::owner(cluster, local).map(|p| scenario::object_ref(&p.metadata));
                        let ifindex = pod.and_then(|p| behind.get(&p).copied()).unwrap_or(self.spare());
                        // A fresh source port per packet, so no earlier conntrack entry answers.
                        next_sport += 1;
                        let sport = next_sport;
                        let l4 = match Protocol::parse(protocol).expect("a protocol") {
                            Protocol::Tcp => L4::Tcp {
                                sport,
                                dport: port,
                                flags: TCP_SYN,
                            },
                            Protocol::Udp => L4::Udp { sport, dport: port },
                            Protocol::Sctp => L4::Sctp { sport, dport: port },
                        };
                        let verdict =
                            t.dp.test_run_on(hook, &packet::ip(src, dst, l4), ifindex)
                                .expect("BPF_PROG_TEST_RUN");
                        match verdict {
                            PASS => true,
                            SHOT => false,
                            other => panic!("unexpected TC verdict {other}"),
                        }
                    };
                    let egress = side(Hook::FromPod, src);
                    let ingress = side(Hook::ToPod, dst);
                    scenario::agrees(cluster, (src, dst, protocol, port), egress, ingress)?;
                }
                Ok(())
            })
            .expect("in the test namespace")
    }
}

#[test]
fn kernel_verdicts_agree_with_the_reference() {
    require_root();
    let net = Net::create();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: npc_integration::cases(32),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    });
    let strategy = (
        scenario::cluster(),
        proptest::collection::vec(
            (any::<Index>(), any::<Index>(), any::<Index>(), any::<Index>()),
            SAMPLES,
        ),
    );
    let result = runner.run(&strategy, |(cluster, picks)| net.check(&cluster, &picks));
    drop(net);
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
}
