//! The compiler against the reference evaluator, on random clusters: the compiled maps, queried
//! the way the datapath queries them, must give the reference verdict for every (source,
//! destination, port, protocol). Pure: no kernel needed.
use std::net::IpAddr;

use npc_agent::{
    compiler::{self, Compiled, Compiler},
    model::{Protocol, State},
    policy::Direction,
    reference,
};
use npc_integration::scenario;
use proptest::prelude::*;

/// Both enforcement points, read from the compiled maps.
fn compiled_allows(c: &Compiled, state: &State, src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> bool {
    let side = |direction, local: IpAddr, peer: IpAddr| match reference::owner(state, local) {
        Some(pod) => compiler::lookup(c, &pod.object_ref(), direction, peer, protocol.number(), port).allowed(),
        None => true,
    };
    side(Direction::Egress, src, dst) && side(Direction::Ingress, dst, src)
}

fn check_all(c: &Compiled, state: &State) -> Result<(), TestCaseError> {
    let addrs = scenario::query_addresses(state);
    for src in &addrs {
        for dst in addrs.iter().filter(|d| *d != src && d.is_ipv4() == src.is_ipv4()) {
            for protocol in scenario::PROTOCOLS {
                for port in scenario::PORTS {
                    let want = reference::allowed(state, *src, *dst, protocol, port);
                    let got = compiled_allows(c, state, *src, *dst, protocol, port);
                    prop_assert_eq!(got, want, "{} -> {} {}/{}", src, dst, protocol, port);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_the_reference(state in scenario::state()) {
        check_all(&compiler::compile(&state), &state)?;
    }

    /// A compiler that has numbered another cluster before (ids carried over, some retired) must
    /// still be exact: stable numbering never changes a verdict.
    #[test]
    fn a_warm_compiler_agrees_too(before in scenario::state(), state in scenario::state()) {
        let mut compiler = Compiler::default();
        compiler.compile(&before);
        check_all(&compiler.compile(&state), &state)?;
    }
}
