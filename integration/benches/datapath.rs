//! Datapath benchmark (`cargo xtask bench`): nanoseconds per packet for the TC programs in the
//! real kernel, measured with BPF_PROG_TEST_RUN against maps filled by the real compiler and
//! MapSync for a 10,000-pod cluster. The kernel times the program itself (no syscall cost).
//!
//! Steady-state cases repeat one packet a million times. "New connection" cases cannot: the
//! first allowed packet creates a conntrack entry that every repeat would then hit, so they run
//! 20,000 packets with distinct source ports once each and report the mean kernel time.
//!
//! Needs root and BPF, like the datapath tests.
use std::{net::IpAddr, time::Duration};

use npc_agent::{
    compiler,
    datapath::Hook,
    manifests,
    model::{ObjectRef, State},
    packet::{self, L4, TCP_ACK, TCP_SYN},
};
use npc_integration::TestDatapath;

fn cluster(pods: usize) -> String {
    // One server with a policy; many client pods in other namespaces fill the identity map.
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: srv, labels: {team: a}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: srv, labels: {app: server}}\nspec: {nodeName: n0, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: in, namespace: srv}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n    - from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {app: client}}}]\n      ports: [{port: http}, {port: 9000, endPort: 9100}]\n    - from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.16.1.0/24]}}]\n",
    );
    for i in 0..pods {
        let ns = i / 10;
        if i % 10 == 0 {
            y += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: c{ns}, labels: {{team: b}}}}\n");
        }
        let ip = std::net::Ipv4Addr::from(0x0a01_0000u32 + i as u32);
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: c{ns}, labels: {{app: client, v: '{}'}}}}\nspec: {{nodeName: n{}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n",
            i % 7,
            i % 100 + 1
        );
    }
    y
}

enum Kind {
    /// The same packet over and over (conntrack hits, denials, unenforced directions).
    Steady,
    /// A new flow per packet: (build the packet for source port `sport`).
    Fresh(Box<dyn Fn(u16) -> Vec<u8>>),
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: a quick smoke run then.
    let benching = std::env::args().any(|a| a == "--bench");
    let (repeat, fresh): (u32, u16) = if benching { (1_000_000, 20_000) } else { (1_000, 100) };
    let mut t = TestDatapath::load("bench");
    let dp = &mut t.dp;
    let loaded = manifests::parse_str("bench.yaml".as_ref(), &cluster(10_000));
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let state = State {
        node_name: Some("n0".into()),
        ..loaded.to_state()
    };
    let compiled = compiler::compile(&state);
    let server = ObjectRef::new("srv", "server");
    dp.sync(&compiled.maps, |p| (*p == server).then_some(1)).expect("sync");

    let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
    let server_ip = ip("10.0.0.1");
    let client = ip("10.1.0.7");
    let outside = ip("172.20.0.9");
    let cases: Vec<(&str, Hook, Vec<u8>, Kind)> = vec![
        (
            "new TCP connection allowed (pod identity, named port): policy lookups + conntrack insert",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::tcp(client, server_ip, sport, 80, TCP_SYN)
            })),
        ),
        (
            "new TCP connection allowed by an endPort range (LPM)",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::tcp(client, server_ip, sport, 9050, TCP_SYN)
            })),
        ),
        (
            "new UDP flow allowed by an ipBlock (LPM class)",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::ip(outside, server_ip, L4::Udp { sport, dport: 53 })
            })),
        ),
        (
            "established TCP (conntrack hit)",
            Hook::ToPod,
            packet::tcp(client, server_ip, 1000, 80, TCP_ACK),
            Kind::Steady,
        ),
        (
            "denied TCP (every lookup misses; counted; event emitted)",
            Hook::ToPod,
            packet::tcp(ip("192.0.2.1"), server_ip, 40002, 22, TCP_SYN),
            Kind::Steady,
        ),
        (
            "not isolated for egress (endpoint lookup only)",
            Hook::FromPod,
            packet::tcp(server_ip, client, 40003, 443, TCP_SYN),
            Kind::Steady,
        ),
    ];
    // The established case needs its connection first.
    dp.test_run(Hook::ToPod, &packet::tcp(client, server_ip, 1000, 80, TCP_SYN))
        .expect("test run");
    println!(
        "datapath benchmark: BPF_PROG_TEST_RUN, {} identities, {} policy entries, kernel {}",
        compiled.maps.identities.len(),
        compiled.maps.policy.len(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!("{:>8}  case", "ns/pkt");
    for (name, hook, pkt, kind) in &cases {
        let per_packet = match kind {
            Kind::Steady => dp.bench_run(*hook, pkt, repeat).expect("bench run"),
            Kind::Fresh(make) => {
                let mut total = Duration::ZERO;
                for i in 0..fresh {
                    total += dp.bench_run(*hook, &make(20_000 + i), 1).expect("bench run");
                }
                total / u32::from(fresh)
            }
        };
        println!("{:>8}  {name}", per_packet.as_nanos());
    }
}
