//! The real datapath against the reference evaluator on random clusters: each case compiles a
//! random cluster, syncs it into the kernel maps with the real MapSync, and runs crafted packets
//! for a sample of (source, destination, protocol, port) through both TC programs with
//! BPF_PROG_TEST_RUN. The kernel's verdict must be the reference verdict.
use std::net::IpAddr;

use npc_agent::{
    compiler,
    datapath::Hook,
    model::{Protocol, State},
    packet::{self, L4, TCP_SYN},
    reference,
};
use npc_integration::{TestDatapath, scenario};
use proptest::{prelude::*, sample::Index, test_runner::FileFailurePersistence};

const PASS: i32 = -1; // TC_ACT_UNSPEC
const SHOT: i32 = 2; // TC_ACT_SHOT
const SAMPLES: usize = 12;

struct Fixture {
    t: TestDatapath,
    next_sport: u16,
}

impl Fixture {
    fn new() -> Self {
        Self {
            t: TestDatapath::load("random"),
            next_sport: 20000,
        }
    }

    /// One enforcement point's verdict: the pod owning `local` put behind ifindex 1 (where test
    /// runs deliver packets), the packet run through the hook for `hook`.
    fn side(
        &mut self,
        state: &State,
        compiled: &compiler::Compiled,
        hook: Hook,
        (src, dst): (IpAddr, IpAddr),
        protocol: Protocol,
        port: u16,
    ) -> bool {
        let local = match hook {
            Hook::FromPod => src,
            Hook::ToPod => dst,
        };
        let Some(pod) = reference::owner(state, local).map(|p| p.object_ref()) else {
            return true;
        };
        if !compiled.maps.endpoints.contains_key(&pod) {
            return true; // not local: another node's agent judges it
        }
        self.t
            .dp
            .sync(&compiled.maps, |p| (*p == pod).then_some(1))
            .expect("sync");
        // A fresh source port per packet, so no earlier conntrack entry can answer for it.
        self.next_sport += 1;
        let sport = self.next_sport;
        let l4 = match protocol {
            Protocol::Tcp => L4::Tcp {
                sport,
                dport: port,
                flags: TCP_SYN,
            },
            Protocol::Udp => L4::Udp { sport, dport: port },
            Protocol::Sctp => L4::Sctp { sport, dport: port },
        };
        match self
            .t
            .dp
            .test_run(hook, &packet::ip(src, dst, l4))
            .expect("BPF_PROG_TEST_RUN")
        {
            PASS => true,
            SHOT => false,
            other => panic!("unexpected TC verdict {other}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn kernel_verdicts_agree_with_the_reference(
        state in scenario::state(),
        picks in proptest::collection::vec((any::<Index>(), any::<Index>(), any::<Index>(), any::<Index>()), SAMPLES),
    ) {
        let mut fx = Fixture::new();
        let compiled = compiler::compile(&state);
        let addrs = scenario::query_addresses(&state);
        for (a, b, proto, port) in picks {
            let src = *a.get(&addrs);
            let same_family: Vec<IpAddr> = addrs.iter().copied().filter(|d| *d != src && d.is_ipv4() == src.is_ipv4()).collect();
            let dst = *b.get(&same_family);
            let protocol = *proto.get(&scenario::PROTOCOLS);
            let port = *port.get(&scenario::PORTS);
            let want = reference::allowed(&state, src, dst, protocol, port);
            let egress = fx.side(&state, &compiled, Hook::FromPod, (src, dst), protocol, port);
            let ingress = fx.side(&state, &compiled, Hook::ToPod, (src, dst), protocol, port);
            prop_assert_eq!(egress && ingress, want, "{} -> {} {}/{} (egress {}, ingress {})", src, dst, protocol, port, egress, ingress);
        }
    }
}
