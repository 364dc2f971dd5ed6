//! Datapath benchmark (`cargo xtask bench`): nanoseconds per packet for the TC programs in the
//! real kernel, measured with BPF_PROG_TEST_RUN against maps filled by the real compiler and
//! MapSync for a 10,000-pod cluster. The kernel times the program itself (no syscall cost).
//!
//! Steady-state cases repeat one packet a million times. "New connection" cases cannot: the
//! first allowed packet creates a conntrack entry that every repeat would then hit, so they run
//! 20,000 packets with distinct source ports once each and report the mean kernel time, minus
//! the fixed cost of timing a single run (calibrated on a packet the program ignores).
//!
//! Needs root and BPF, like the datapath tests.
use std::{net::IpAddr, time::Duration};

use npc_agent::datapath::Hook;
use npc_integration::packet::{self, L4, TCP_ACK, TCP_SYN};
use npc_integration::{TestDatapath, compile_for};
use npc_policy::files as manifests;
use npc_policy::model::ObjectRef;

const PASS: i32 = -1; // TC_ACT_UNSPEC: pass (to the next program, if any)
const SHOT: i32 = 2; // TC_ACT_SHOT

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
    /// Like Steady, with the server's endpoint entry removed first.
    Unenforced,
}

fn main() {
    // `cargo bench` passes `--bench`; run by hand without it, the binary makes a quick run.
    let benching = std::env::args().any(|a| a == "--bench");
    let (mut repeat, fresh): (u32, u16) = if benching { (1_000_000, 20_000) } else { (1_000, 100) };
    // For profiling one case under `perf record -a`: `NPC_BENCH_CASE` (part of its name) runs
    // only the matching cases, `NPC_BENCH_REPEAT` repeats steady packets longer than a million.
    let only = std::env::var("NPC_BENCH_CASE").ok();
    if let Some(n) = std::env::var("NPC_BENCH_REPEAT").ok().and_then(|n| n.parse().ok()) {
        repeat = n;
    }
    let mut t = TestDatapath::load("bench");
    let dp = &mut t.dp;
    let compiled = compile_for("n0", &[("bench.yaml", &cluster(10_000))]);
    let server = ObjectRef::new("srv", "server");
    // Calibration, before any endpoint exists: a packet on an interface that is not a pod's, timed
    // once per run and a million times in a row. The difference is what a single run costs the
    // kernel's timer beyond the program; it is taken off the "new connection" figures below.
    let probe_packet = packet::tcp(
        "10.0.0.1".parse().expect("ip"),
        "10.1.0.7".parse().expect("ip"),
        1,
        2,
        TCP_SYN,
    );
    let steady = dp.bench_run(Hook::FromPod, &probe_packet, repeat).expect("bench run");
    let single: Duration = (0..fresh)
        .map(|_| dp.bench_run(Hook::FromPod, &probe_packet, 1).expect("bench run"))
        .sum::<Duration>()
        / u32::from(fresh);
    let overhead = single.saturating_sub(steady);
    dp.sync(&compiled.maps, |p| (*p == server).then_some(1)).expect("sync");

    let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
    let server_ip = ip("10.0.0.1");
    let client = ip("10.1.0.7");
    let outside = ip("172.20.0.9");
    // Every case says the verdict it times, and is checked for it before it is timed: a
    // benchmark of a packet that was silently dropped (or passed) measures the wrong path.
    let cases: Vec<(&str, Hook, Vec<u8>, Kind, i32)> = vec![
        (
            "new TCP connection allowed (pod identity, named port): policy lookups + conntrack insert",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::tcp(client, server_ip, sport, 80, TCP_SYN)
            })),
            PASS,
        ),
        (
            "new TCP connection allowed by an endPort range (LPM)",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::tcp(client, server_ip, sport, 9050, TCP_SYN)
            })),
            PASS,
        ),
        (
            "new UDP flow allowed by an ipBlock (LPM class)",
            Hook::ToPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::ip(outside, server_ip, L4::Udp { sport, dport: 53 })
            })),
            PASS,
        ),
        (
            "established TCP (conntrack hit)",
            Hook::ToPod,
            packet::tcp(client, server_ip, 1000, 80, TCP_ACK),
            Kind::Steady,
            PASS,
        ),
        (
            "denied TCP (every lookup misses; counted; event emitted)",
            Hook::ToPod,
            packet::tcp(ip("192.0.2.1"), server_ip, 40002, 22, TCP_SYN),
            Kind::Steady,
            SHOT,
        ),
        (
            "new connection out of a pod not isolated for egress (tracked for its replies)",
            Hook::FromPod,
            vec![],
            Kind::Fresh(Box::new(move |sport| {
                packet::tcp(server_ip, client, sport, 443, TCP_SYN)
            })),
            PASS,
        ),
        (
            "established TCP out of a pod (the reply direction; source validated)",
            Hook::FromPod,
            packet::tcp(server_ip, client, 80, 1000, TCP_ACK),
            Kind::Steady,
            PASS,
        ),
        (
            "forged source out of a pod (source validation drops it; counted; event emitted)",
            Hook::FromPod,
            packet::tcp(ip("10.1.0.8"), client, 80, 1000, TCP_ACK),
            Kind::Steady,
            SHOT,
        ),
        (
            "a packet on an interface that is not a pod's (parsed, conntrack and endpoint lookups miss)",
            Hook::FromPod,
            packet::tcp(server_ip, client, 40003, 443, TCP_SYN),
            Kind::Unenforced,
            PASS,
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
    println!(
        "(new-connection cases run once per packet; the kernel timer's {} ns per single run is taken off)",
        overhead.as_nanos()
    );
    // The floor: the empty program on the established case's packet, a million times.
    let floor = dp
        .bench_floor(&packet::tcp(client, server_ip, 1000, 80, TCP_ACK), repeat)
        .expect("bench the empty program");
    println!("{:>8}  {:>8}  case", "ns/pkt", "floor+");
    println!("{:>8}  {:>8}  the empty program (the floor)", floor.as_nanos(), 0);
    for (name, hook, pkt, kind, verdict) in &cases {
        if only.as_ref().is_some_and(|only| !name.contains(only.as_str())) {
            continue;
        }
        let check = |dp: &npc_agent::datapath::Datapath, pkt: &[u8]| {
            let got = dp.test_run(*hook, pkt).expect("test run");
            assert_eq!(
                got, *verdict,
                "{name}: the packet it times gets verdict {got}, not {verdict}"
            );
        };
        let per_packet = match kind {
            Kind::Steady => {
                check(dp, pkt);
                dp.bench_run(*hook, pkt, repeat).expect("bench run")
            }
            Kind::Unenforced => {
                dp.sync(&compiled.maps, |_| None).expect("sync without endpoints");
                check(dp, pkt);
                dp.bench_run(*hook, pkt, repeat).expect("bench run")
            }
            Kind::Fresh(make) => {
                // A source port the timed packets never use: the first packet of a new flow.
                check(dp, &make(19_999));
                // The median of ten batches' means: single runs are at the mercy of every
                // interrupt, and one bad batch should not move the figure.
                let batch = (fresh / 10).max(1);
                let mut means: Vec<Duration> = (0..fresh / batch)
                    .map(|b| {
                        let total: Duration = (0..batch)
                            .map(|i| {
                                dp.bench_run(*hook, &make(20_000 + b * batch + i), 1)
                                    .expect("bench run")
                            })
                            .sum();
                        total / u32::from(batch)
                    })
                    .collect();
                means.sort();
                means[means.len() / 2].saturating_sub(overhead)
            }
        };
        // New-connection figures are on the steady scale too (the single-run timer cost is
        // taken off), so every row compares with the same floor.
        let above = per_packet.as_nanos() as i128 - floor.as_nanos() as i128;
        println!("{:>8}  {above:>8}  {name}", per_packet.as_nanos());
    }
    for (program, count) in dp.verified_instructions() {
        let count = count.map_or_else(|| "not reported by this kernel".to_string(), |n| n.to_string());
        println!("verifier: {program} accepted after {count} instructions walked (limit 1000000)");
    }
    if only.is_none() {
        lab_matrix();
    }
}

/// How long a lab takes to probe a 9-pod matrix on 2 ports x 2 protocols (288 probes, a third
/// of them blocked and so waiting out the probe timeout), and to come up and go down.
fn lab_matrix() {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: m}\n");
    for i in 1..=9 {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: m, labels: {{app: a{}}}}}\nspec: {{containers: [{{name: c, ports: [{{containerPort: 80}}, {{containerPort: 80, protocol: UDP}}, {{containerPort: 81}}, {{containerPort: 81, protocol: UDP}}]}}]}}\n",
            i % 3
        );
    }
    y += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: m}\nspec:\n  podSelector: {matchLabels: {app: a1}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a2}}}]}]\n";
    let loaded = manifests::parse_str("nine.yaml".as_ref(), &y);
    let start = std::time::Instant::now();
    let lab = npc_agent::lab::Lab::up(
        npc_agent::lab::LabOptions::new(&npc_integration::tag("benchlab")),
        &loaded,
    )
    .expect("lab up");
    let up = start.elapsed();
    let start = std::time::Instant::now();
    let probes = lab.probe_all().expect("probes");
    let probing = start.elapsed();
    let start = std::time::Instant::now();
    drop(lab);
    let down = start.elapsed();
    println!(
        "lab: 9 pods up in {:.2} s; {} probes (2 ports x TCP/UDP) in {:.2} s; down in {:.2} s",
        up.as_secs_f64(),
        probes.len(),
        probing.as_secs_f64(),
        down.as_secs_f64()
    );
}
