//! The real-traffic benchmark (`cargo xtask bench traffic`, issue 13): two lab pods on one node
//! bridge, short TCP connections and one bulk TCP stream between them, each mode in turn:
//!
//! - **none**: the fabric alone (no programs, no rules);
//! - **hooks**: npc's programs attached to both pods' interfaces with no endpoint in the maps
//!   (each run parses the packet, and its conntrack and endpoint lookups miss): what the TC
//!   hooks themselves cost, with the programs' first steps;
//! - **npc** with P policies selecting the server (one of them admits the client);
//! - **iptables**: the same policies rendered as weave-npc renders them (an ESTABLISHED accept
//!   first, then one rule per policy rule matching ipsets of pod addresses, in one chain on the
//!   bridge's FORWARD path with br_netfilter on), the iptables enforcer baseline.
//!
//! Modes are interleaved, each measured `repeats` times; the report gives medians, spreads and
//! ratios to **none**. The load generator is ours: a client thread pinned to CPU 0 opens, reads
//! one byte from and closes connections as fast as it can; the server's threads are pinned to the
//! last CPU. The bulk stream writes 128 KiB buffers for the duration; the server counts bytes.
//! Every mode also proves its enforcement is what it says: a port no policy allows is refused
//! under npc and iptables (and its drop counted), and open under none and hooks.
//!
//! Where npc's programs are attached (hooks and npc), a last phase of each measurement runs the
//! connection load again with the kernel's run-time statistics on, and reports the programs' own
//! time: nanoseconds per run, runs per connection, and their share of a CPU. It is a phase of its
//! own because the statistics cost every run two clock reads, which the timed phases must not
//! pay. Where the rates are within their noise of each other, this is the instrument that still
//! resolves a datapath change.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use npc_agent::lab::{Lab, LabOptions, netns};
use npc_policy::{files, model::ObjectRef};
use serde::Serialize;

/// The server's ports: short connections, the bulk stream, and one no policy allows.
pub const CONNECT_PORT: u16 = 8000;
pub const BULK_PORT: u16 = 5201;
pub const BLOCKED_PORT: u16 = 8001;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcer {
    None,
    /// npc's programs attached, every pod unenforced (no endpoint entries).
    Hooks,
    Npc,
    Iptables,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub policies: Vec<usize>,
    /// Peer pods on other nodes (in the cluster, not on this host), each size run with the
    /// largest policy count: what a real cluster's identities and allow entries add.
    pub peers: Vec<usize>,
    pub repeats: usize,
    pub duration: Duration,
    /// Whether the iptables baseline modes run.
    pub iptables: bool,
    /// How long each measurement waits for the machine to go quiet (see [`wait_until_quiet`]);
    /// `None` measures at once.
    pub quiet_deadline: Option<Duration>,
    pub tag: String,
}

impl Options {
    /// The full benchmark. `NPC_TRAFFIC_POLICIES` (say `1,1000`), `NPC_TRAFFIC_REPEATS` and
    /// `NPC_TRAFFIC_SECONDS` narrow or lengthen it, `NPC_TRAFFIC_PEERS` (say `1000,10000`; `0`
    /// for none) sets the peer pods on other nodes (an A/B of one change wants more repeats of
    /// fewer modes); `NPC_TRAFFIC_NO_IPTABLES=1` leaves the iptables modes out.
    pub fn full(tag: &str) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: u64| {
            env(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|e| panic!("{name}={v:?} is not a whole number: {e}"))
            })
        };
        let list = |name: &str, default: &[usize]| {
            env(name).map_or_else(
                || default.to_vec(),
                |v| {
                    v.split(',')
                        .filter(|p| !p.trim().is_empty())
                        .map(|p| p.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?}: {p:?}: {e}")))
                        .collect()
                },
            )
        };
        Self {
            policies: list("NPC_TRAFFIC_POLICIES", &[1, 100, 1000]),
            // 0 is the policies' own row: `NPC_TRAFFIC_PEERS=0` runs no peer rows.
            peers: list("NPC_TRAFFIC_PEERS", &[1000, 10_000])
                .into_iter()
                .filter(|&n| n > 0)
                .collect(),
            repeats: number("NPC_TRAFFIC_REPEATS", 5) as usize,
            duration: Duration::from_secs(number("NPC_TRAFFIC_SECONDS", 3)),
            iptables: env("NPC_TRAFFIC_NO_IPTABLES").is_none(),
            quiet_deadline: Some(QUIET_DEADLINE),
            tag: tag.into(),
        }
    }

    /// What `cargo xtask test` runs: every field produced, enforcement checked, nothing timed
    /// that matters.
    pub fn quick(tag: &str) -> Self {
        Self {
            policies: vec![1, 100],
            peers: vec![200],
            repeats: 1,
            duration: Duration::from_millis(200),
            iptables: true,
            // Nothing it times matters, and under `cargo xtask test` the machine is never quiet.
            quiet_deadline: None,
            tag: tag.into(),
        }
    }
}

/// One mode's measurements.
#[derive(Clone, Debug, Serialize)]
pub struct ModeResult {
    pub enforcer: Enforcer,
    pub policies: usize,
    /// Peer pods on other nodes in the cluster.
    pub peers: usize,
    /// New connections per second, one figure per repeat.
    pub connections_per_second: Vec<f64>,
    /// Bulk throughput, bits per second, one figure per repeat.
    pub bulk_bits_per_second: Vec<f64>,
    /// Whether the blocked port was refused (true under npc and iptables, false under none).
    pub blocked_port_refused: bool,
    /// Drops counted for the blocked port: npc's drop counter, or the iptables DROP rule's.
    pub blocked_port_drops: u64,
    /// Pod addresses in npc's `NPC_IDENTITIES` (the two lab pods and every peer; 0 for the other
    /// enforcers): that the peers are really in what npc enforces with.
    pub identity_addresses: usize,
    /// Measurements that began without the machine going quiet first (see [`wait_until_quiet`]).
    pub began_busy: usize,
    /// npc's programs under the connection load (hooks and npc; empty for the others).
    pub programs: Vec<ProgramTime>,
    /// The programs' time together over the load's wall time, per repeat: the share of one CPU
    /// they took (of the two both pods' packets run on).
    pub program_cpu_share: Vec<f64>,
    /// The path probes under the same load, when the programs were built with them (`cargo
    /// xtask bench traffic --profile-paths`); else empty.
    pub paths: Vec<PathTime>,
}

/// One path probe (`npc_common::path_profile`) under the connection load, per repeat.
#[derive(Clone, Debug, Serialize)]
pub struct PathTime {
    pub probe: String,
    /// Mean nanoseconds per firing (the probe's own clock reads included).
    pub ns_per_firing: Vec<f64>,
    /// Firings per connection made.
    pub fired_per_connection: Vec<f64>,
}

/// One program's own time under the connection load, from the kernel's run-time statistics
/// (`run_time_ns` and `run_cnt`, summed over both pods' interfaces).
#[derive(Clone, Debug, Serialize)]
pub struct ProgramTime {
    pub program: String,
    /// Mean nanoseconds per run, one figure per repeat (the statistics' clock reads included).
    pub ns_per_run: Vec<f64>,
    /// Runs per connection made (its packets both ways, at both pods' interfaces), per repeat.
    pub runs_per_connection: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub enforcer: Enforcer,
    pub policies: usize,
    pub peers: usize,
    pub connections_per_second_median: f64,
    pub connections_per_second_spread: (f64, f64),
    pub connections_vs_none: f64,
    pub bulk_gbits_median: f64,
    pub bulk_gbits_spread: (f64, f64),
    pub bulk_vs_none: f64,
    /// Each program's medians over repeats (hooks and npc rows; else empty).
    pub programs: Vec<ProgramRow>,
    /// Median over repeats of all the programs' time per connection, in ns.
    pub program_ns_per_connection: Option<f64>,
    /// Median over repeats of [`ModeResult::program_cpu_share`].
    pub program_cpu_share: Option<f64>,
    /// The path probes' medians over repeats (builds with the probes only).
    pub paths: Vec<PathRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PathRow {
    pub probe: String,
    pub ns_per_firing: f64,
    pub fired_per_connection: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramRow {
    pub program: String,
    pub ns_per_run: f64,
    pub runs_per_connection: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub duration_seconds: f64,
    pub repeats: usize,
    /// Measurements, across all modes, that began without the machine going quiet first.
    pub began_busy: usize,
    pub results: Vec<ModeResult>,
    pub rows: Vec<Row>,
}

/// The cluster: namespace bench, pods server and client, and `policies` NetworkPolicies that all
/// select the server. The last one admits the client on the two measured ports (so an iptables
/// chain walks every other rule first, as it would for the unluckiest policy); the others admit
/// `app: peer-N` pods, each on its own port: `peers` pods on other nodes (spread over those
/// policies' selectors and eight `shard` labels, so up to eight identities per selector), or,
/// with none, nobody.
pub fn cluster(policies: usize, peers: usize) -> String {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\nspec: {containers: [{name: s}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench, labels: {app: client}}\nspec: {containers: [{name: c}]}\n",
    );
    for i in 0..policies {
        let (from, ports) = if i + 1 == policies {
            (
                "client".to_string(),
                format!("[{{port: {CONNECT_PORT}}}, {{port: {BULK_PORT}}}]"),
            )
        } else {
            (format!("peer-{i}"), format!("[{{port: {}}}]", 10_000 + i))
        };
        y += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i:04}, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}], ports: {ports}}}]\n"
        );
    }
    for k in 0..peers {
        let group = peer_group(policies, k).map_or_else(|| "none".to_string(), |g| g.to_string());
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: peer{k}, namespace: bench, labels: {{app: peer-{group}, shard: s{}}}}}\nspec: {{nodeName: remote-{}, containers: [{{name: c}}]}}\nstatus: {{podIP: {}}}\n",
            k % 8,
            k % 50,
            peer_addr(k)
        );
    }
    y
}

/// The lab's node name when the cluster has peers on other nodes.
const NODE: &str = "bench-node";

/// The policy whose selector the k-th peer matches (none when the only policy is the client's).
fn peer_group(policies: usize, k: usize) -> Option<usize> {
    (policies > 1).then(|| k % (policies - 1))
}

/// The k-th peer's address (10.99.0.0/16 and up; the lab's pods are in 10.244.0.0/16).
fn peer_addr(k: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a63_0000 + k as u32)
}

/// weave-npc's rendering of `cluster(policies, peers)`, for iptables-restore and ipset restore:
/// one ipset per policy's peer selector (the client's for the last), one for the server, an
/// ESTABLISHED accept first, one ACCEPT per policy rule, then DROP for the server.
pub fn weave_npc_rules(policies: usize, peers: usize, server: IpAddr, client: IpAddr) -> (String, String) {
    let mut sets = format!("create npc-bench-server hash:ip family inet\nadd npc-bench-server {server}\n");
    let mut rules = String::from(
        "*filter\n:NPC-BENCH - [0:0]\n-A FORWARD -o br0 -j NPC-BENCH\n-A NPC-BENCH -m state --state RELATED,ESTABLISHED -j ACCEPT\n",
    );
    for i in 0..policies {
        let set = format!("npc-bench-p{i}");
        sets += &format!("create {set} hash:ip family inet\n");
        let ports = if i + 1 == policies {
            sets += &format!("add {set} {client}\n");
            vec![CONNECT_PORT, BULK_PORT]
        } else if peers > 0 {
            // The selector's pods on other nodes: those with `peer_group(policies, k) == Some(i)`.
            for k in (i..peers).step_by(policies - 1) {
                sets += &format!("add {set} {}\n", peer_addr(k));
            }
            vec![10_000 + i as u16]
        } else {
            // No peer pods in the cluster: a few addresses each all the same, as real selectors
            // hold.
            for k in 0..4 {
                sets += &format!("add {set} {}\n", peer_addr(i * 4 + k));
            }
            vec![10_000 + i as u16]
        };
        for port in ports {
            rules += &format!(
                "-A NPC-BENCH -p tcp --dport {port} -m set --match-set {set} src -m set --match-set npc-bench-server dst -j ACCEPT\n"
            );
        }
    }
    rules += "-A NPC-BENCH -m set --match-set npc-bench-server dst -j DROP\nCOMMIT\n";
    (sets, rules)
}

/// Runs the benchmark.
pub fn run(opts: &Options) -> Report {
    let mut modes = vec![(Enforcer::None, 0, 0), (Enforcer::Hooks, 0, 0)];
    let largest = opts.policies.iter().copied().max().unwrap_or(1);
    let sizes = opts
        .policies
        .iter()
        .map(|&p| (p, 0))
        .chain(opts.peers.iter().map(|&n| (largest, n)));
    for (p, n) in sizes {
        modes.push((Enforcer::Npc, p, n));
        if opts.iptables {
            modes.push((Enforcer::Iptables, p, n));
        }
    }
    let mut results: Vec<ModeResult> = modes
        .iter()
        .map(|&(enforcer, policies, peers)| ModeResult {
            enforcer,
            policies,
            peers,
            connections_per_second: Vec::new(),
            bulk_bits_per_second: Vec::new(),
            blocked_port_refused: false,
            blocked_port_drops: 0,
            identity_addresses: 0,
            began_busy: 0,
            programs: Vec::new(),
            program_cpu_share: Vec::new(),
            paths: Vec::new(),
        })
        .collect();
    for _ in 0..opts.repeats {
        for result in results.iter_mut() {
            measure(opts, result);
        }
    }
    let rows = rows(&results);
    Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: cpus(),
        duration_seconds: opts.duration.as_secs_f64(),
        repeats: opts.repeats,
        began_busy: results.iter().map(|r| r.began_busy).sum(),
        results,
        rows,
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One repeat of one mode: a lab of its own (so no mode inherits another's state).
fn measure(opts: &Options, result: &mut ModeResult) {
    let policies = result.policies.max(1);
    let loaded = files::parse_str("bench.yaml".as_ref(), &cluster(policies, result.peers));
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut lab_opts = LabOptions::new(&opts.tag);
    // The peers are on other nodes: in the cluster the agent compiles, not wired here.
    lab_opts.node_name = Some(NODE.into());
    lab_opts.enforce = matches!(result.enforcer, Enforcer::Npc | Enforcer::Hooks);
    let mut lab = Lab::up(lab_opts, &loaded).expect("lab up");
    if result.enforcer == Enforcer::Hooks {
        // Attached, then emptied: the programs find no endpoint and pass everything.
        lab.datapath_mut()
            .sync(&Default::default(), |_| None)
            .expect("empty the maps");
        let attached = lab.datapath().attached_ifindexes().len();
        assert_eq!(
            attached, 2,
            "the hooks mode measures both pods' interfaces with programs on them"
        );
    }
    let (server, client) = (ObjectRef::new("bench", "server"), ObjectRef::new("bench", "client"));
    let (server_ns, client_ns) = (
        lab.pod_netns(&server).expect("server").to_string(),
        lab.pod_netns(&client).expect("client").to_string(),
    );
    let server_ip = lab.pod(&server).expect("server").ips[0];
    let client_ip = lab.pod(&client).expect("client").ips[0];
    if result.enforcer == Enforcer::Iptables {
        let (sets, rules) = weave_npc_rules(policies, result.peers, server_ip, client_ip);
        restore_in(lab.node_netns(), "ipset", &["restore"], &sets);
        restore_in(lab.node_netns(), "iptables-restore", &["--noflush"], &rules);
    }
    let servers = Servers::start(&server_ns);

    // The fabric carries traffic first (the allowed port, retried until a deadline): on a busy
    // CI machine a fresh lab's first SYN can take longer than the refusal probe's timeout, and
    // a slow fabric must not read as a refused port (CI saw "none" refuse the blocked port once).
    let fabric_works = crate::wait_for(Duration::from_secs(10), || {
        connects(
            &client_ns,
            SocketAddr::new(server_ip, CONNECT_PORT),
            Duration::from_secs(1),
        )
    });
    assert!(
        fabric_works,
        "{:?} with {} policies: the allowed port never connected in 10 s (a broken fabric)",
        result.enforcer, result.policies
    );
    // The enforcement is what the mode says: the blocked port is refused, and counted. Where
    // nothing enforces, the fabric is known to work, so a generous timeout costs nothing; where
    // something does, the drop counter below is what proves the refusal, not the timeout.
    let probe_timeout = match result.enforcer {
        Enforcer::None | Enforcer::Hooks => Duration::from_secs(5),
        Enforcer::Npc | Enforcer::Iptables => Duration::from_millis(500),
    };
    let refused = !connects(&client_ns, SocketAddr::new(server_ip, BLOCKED_PORT), probe_timeout);
    let drops = match result.enforcer {
        Enforcer::Npc => lab
            .datapath()
            .drops()
            .expect("drop counters")
            .iter()
            // Under port 0 when nothing the cluster declares names the port (a label bound).
            .filter(|(k, _)| k.protocol == npc_common::PROTO_TCP && (k.dport == BLOCKED_PORT || k.dport == 0))
            .map(|(_, v)| *v)
            .sum(),
        Enforcer::Iptables => iptables_drop_packets(lab.node_netns()),
        Enforcer::None | Enforcer::Hooks => 0,
    };
    result.blocked_port_refused = refused;
    result.blocked_port_drops = drops;
    if result.enforcer == Enforcer::Npc {
        result.identity_addresses = lab.datapath().kernel_numbering().expect("NPC_IDENTITIES").0.len();
    }

    // The last mode's teardown (its namespaces and maps are freed by kernel workers after the lab
    // is gone) and this one's setup must not run into the measurement.
    if opts.quiet_deadline.is_some_and(|d| !wait_until_quiet(d)) {
        result.began_busy += 1;
    }
    let rate = connection_rate(&client_ns, SocketAddr::new(server_ip, CONNECT_PORT), opts.duration);
    if opts.quiet_deadline.is_some_and(|d| !wait_until_quiet(d)) {
        result.began_busy += 1;
    }
    let bulk = bulk_rate(
        &client_ns,
        SocketAddr::new(server_ip, BULK_PORT),
        opts.duration,
        &servers,
    );
    result.connections_per_second.push(rate);
    result.bulk_bits_per_second.push(bulk);
    if matches!(result.enforcer, Enforcer::Npc | Enforcer::Hooks) {
        if opts.quiet_deadline.is_some_and(|d| !wait_until_quiet(d)) {
            result.began_busy += 1;
        }
        program_time(
            &lab,
            &client_ns,
            SocketAddr::new(server_ip, CONNECT_PORT),
            opts.duration,
            result,
        );
    }
    servers.stop();
    drop(lab);
}

/// How long a measurement of the full benchmark waits for the machine to go quiet before it
/// begins anyway (and is counted in [`ModeResult::began_busy`]).
const QUIET_DEADLINE: Duration = Duration::from_secs(10);
/// Quiet: all CPUs together busy less than this share of the time over [`QUIET_WINDOW`].
const QUIET_BUSY: f64 = 0.10;
const QUIET_WINDOW: Duration = Duration::from_millis(300);

/// Waits until the machine has been quiet for [`QUIET_WINDOW`], or `deadline` passes (false).
/// Kernel workers free a lab's namespaces and BPF maps for a while after it is gone, and these
/// two vCPUs feel it: a measurement begun during that time reads low whatever its mode.
pub fn wait_until_quiet(deadline: Duration) -> bool {
    let mut samples: std::collections::VecDeque<(Instant, CpuTimes)> = std::collections::VecDeque::new();
    crate::wait_for(deadline, || {
        let now = (Instant::now(), CpuTimes::read());
        samples.push_back(now);
        // The oldest sample still at least a window back is the window's start.
        while samples.len() > 1 && now.0.duration_since(samples[1].0) >= QUIET_WINDOW {
            samples.pop_front();
        }
        let (start, before) = samples[0];
        now.0.duration_since(start) >= QUIET_WINDOW && now.1.busy_share_since(&before) < QUIET_BUSY
    })
}

/// The machine's CPU time from `/proc/stat`'s first line, in clock ticks.
#[derive(Clone, Copy, Default)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    fn parse(stat: &str) -> Self {
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is counted in user).
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        Self {
            busy: total.saturating_sub(idle),
            total,
        }
    }

    fn busy_share_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 1.0;
        }
        self.busy.saturating_sub(before.busy) as f64 / total as f64
    }
}

/// Pins the calling thread to one CPU (the benchmark's two ends on different CPUs).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The server's threads: one accepting short connections (one byte, then close), one sinking
/// the bulk stream.
struct Servers {
    netns: String,
    stop: Arc<AtomicBool>,
    bulk_bytes: Arc<AtomicU64>,
    /// Bulk streams the server has read to their end.
    streams_done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(netns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bulk_bytes = Arc::new(AtomicU64::new(0));
        let streams_done = Arc::new(AtomicU64::new(0));
        let (connect, bulk, blocked) = netns::run_in(netns, || {
            let bind = |port| TcpListener::bind(("0.0.0.0", port)).expect("bind a bench port");
            (bind(CONNECT_PORT), bind(BULK_PORT), bind(BLOCKED_PORT))
        })
        .expect("enter the server's namespace");
        let last = cpus() - 1;
        let mut threads = Vec::new();
        // Blocking accepts (a polling loop would add its sleep to every connection and flatter
        // the enforcers' ratios); `stop` wakes them with one connection each.
        for (listener, sink) in [(connect, false), (bulk, true), (blocked, false)] {
            let (stop, bytes, done) = (stop.clone(), bulk_bytes.clone(), streams_done.clone());
            threads.push(std::thread::spawn(move || {
                pin_to(last);
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) if sink => {
                            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                            let mut buf = vec![0u8; 1 << 17];
                            while !stop.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                    Err(_) => break,
                                }
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((mut conn, _)) => {
                            let _ = conn.write_all(b"x");
                        }
                        Err(_) => {}
                    }
                }
            }));
        }
        Self {
            netns: netns.to_string(),
            stop,
            bulk_bytes,
            streams_done,
            threads,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        netns::run_in(&self.netns, || {
            for port in [CONNECT_PORT, BULK_PORT, BLOCKED_PORT] {
                let _ = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1));
            }
        })
        .expect("enter the server's namespace");
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from `netns` to `to` is accepted within `timeout`.
pub fn connects(netns: &str, to: SocketAddr, timeout: Duration) -> bool {
    netns::run_in(netns, || TcpStream::connect_timeout(&to, timeout).is_ok()).expect("enter the namespace")
}

/// The connection load again, with the kernel's run-time statistics on for its length (they go
/// off when the descriptor `enable_stats` returns is closed): npc's programs' own time.
fn program_time(lab: &Lab, netns: &str, to: SocketAddr, duration: Duration, result: &mut ModeResult) {
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .expect("turn on the kernel's BPF run-time statistics (BPF_ENABLE_STATS: root, Linux 5.8+)");
    let before = lab.datapath().program_runs().expect("the programs' statistics");
    let paths_before = lab.datapath().path_profile().expect("the path probes");
    let (connections, elapsed) = connection_load(netns, to, duration);
    let after = lab.datapath().program_runs().expect("the programs' statistics");
    let paths_after = lab.datapath().path_profile().expect("the path probes");
    drop(stats);
    assert!(connections > 0, "no connection completed under the statistics");
    if let (Some(b), Some(a)) = (paths_before, paths_after) {
        for (slot, ((runs_b, ns_b), (runs_a, ns_a))) in b.iter().zip(&a).enumerate() {
            if result.paths.len() <= slot {
                result.paths.push(PathTime {
                    probe: npc_common::path_profile::NAMES[slot].to_string(),
                    ns_per_firing: Vec::new(),
                    fired_per_connection: Vec::new(),
                });
            }
            let (fired, ns) = (runs_a - runs_b, ns_a - ns_b);
            let path = &mut result.paths[slot];
            path.ns_per_firing
                .push(if fired == 0 { 0.0 } else { ns as f64 / fired as f64 });
            path.fired_per_connection.push(fired as f64 / connections as f64);
        }
    }
    let mut total = Duration::ZERO;
    for (b, a) in before.iter().zip(&after) {
        let runs = a.runs - b.runs;
        let time = a.run_time - b.run_time;
        total += time;
        let at = match result.programs.iter().position(|p| p.program == a.program) {
            Some(at) => at,
            None => {
                result.programs.push(ProgramTime {
                    program: a.program.to_string(),
                    ns_per_run: Vec::new(),
                    runs_per_connection: Vec::new(),
                });
                result.programs.len() - 1
            }
        };
        let program = &mut result.programs[at];
        program.ns_per_run.push(if runs == 0 {
            0.0
        } else {
            time.as_nanos() as f64 / runs as f64
        });
        program.runs_per_connection.push(runs as f64 / connections as f64);
    }
    result
        .program_cpu_share
        .push(total.as_secs_f64() / elapsed.as_secs_f64());
}

/// New connections per second from `netns` to `to` for `duration`, from one thread on CPU 0.
fn connection_rate(netns: &str, to: SocketAddr, duration: Duration) -> f64 {
    let (connections, elapsed) = connection_load(netns, to, duration);
    connections as f64 / elapsed.as_secs_f64()
}

/// Connections made from `netns` to `to` in about `duration` (one thread on CPU 0, each opened,
/// read one byte from and closed), and the time they took.
fn connection_load(netns: &str, to: SocketAddr, duration: Duration) -> (u64, Duration) {
    netns::run_in(netns, || {
        pin_to(0);
        let (start, mut done) = (Instant::now(), 0u64);
        let mut buf = [0u8; 1];
        while start.elapsed() < duration {
            let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
                continue;
            };
            if conn.read_exact(&mut buf).is_ok() {
                done += 1;
            }
        }
        (done, start.elapsed())
    })
    .expect("enter the client's namespace")
}

/// Bulk throughput (bits per second) of one stream from `netns` to `to` for `duration`, as the
/// server counted it.
fn bulk_rate(netns: &str, to: SocketAddr, duration: Duration, servers: &Servers) -> f64 {
    let (counted, done) = (&servers.bulk_bytes, &servers.streams_done);
    let (before, done_before) = (counted.load(Ordering::Relaxed), done.load(Ordering::Relaxed));
    let elapsed = netns::run_in(netns, || {
        pin_to(0);
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(1)).expect("the bulk port is open");
        let buf = vec![0u8; 1 << 17];
        let start = Instant::now();
        while start.elapsed() < duration {
            if conn.write_all(&buf).is_err() {
                break;
            }
        }
        let elapsed = start.elapsed();
        let _ = conn.shutdown(std::net::Shutdown::Write);
        elapsed
    })
    .expect("enter the client's namespace");
    // The server may still be reading the last buffers: wait until it has read to the end.
    let finished = crate::wait_for(Duration::from_secs(10), || done.load(Ordering::Relaxed) > done_before);
    assert!(finished, "the server never read the bulk stream to its end");
    (counted.load(Ordering::Relaxed) - before) as f64 * 8.0 / elapsed.as_secs_f64()
}

fn restore_in(netns: &str, program: &str, args: &[&str], input: &str) {
    let input = input.to_string();
    let (program, args): (String, Vec<String>) = (program.into(), args.iter().map(|s| s.to_string()).collect());
    let out = netns::run_in(netns, move || {
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {program} (cargo xtask setup installs it): {e}"));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write rules");
        child.wait_with_output().expect("wait")
    })
    .expect("enter the node namespace");
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Packets the weave-npc chain's final DROP rule counted.
fn iptables_drop_packets(netns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables", "-L", "NPC-BENCH", "-v", "-x", "-n"])
        .output()
        .expect("iptables -L");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// A mode's ratio to none: the median, over rounds, of its figure over none's in the same round.
/// Each round measures every mode once, within a minute or so; a machine that slows down over
/// the run (a neighbour's load on the host) moves none and the mode together, where a ratio of
/// whole-run medians would set the fast rounds of one against the slow rounds of the other.
fn paired_ratio(mode: &[f64], none: &[f64]) -> f64 {
    let ratios: Vec<f64> = mode
        .iter()
        .zip(none)
        .filter(|(_, n)| **n > 0.0)
        .map(|(m, n)| m / n)
        .collect();
    median(&ratios)
}

fn rows(results: &[ModeResult]) -> Vec<Row> {
    let none = results
        .iter()
        .find(|r| r.enforcer == Enforcer::None)
        .expect("a none mode");
    results
        .iter()
        .map(|r| {
            let (c, b) = (median(&r.connections_per_second), median(&r.bulk_bits_per_second));
            let (blo, bhi) = spread(&r.bulk_bits_per_second);
            Row {
                enforcer: r.enforcer,
                policies: r.policies,
                peers: r.peers,
                connections_per_second_median: c,
                connections_per_second_spread: spread(&r.connections_per_second),
                connections_vs_none: paired_ratio(&r.connections_per_second, &none.connections_per_second),
                bulk_gbits_median: b / 1e9,
                bulk_gbits_spread: (blo / 1e9, bhi / 1e9),
                bulk_vs_none: paired_ratio(&r.bulk_bits_per_second, &none.bulk_bits_per_second),
                programs: r
                    .programs
                    .iter()
                    .map(|p| ProgramRow {
                        program: p.program.clone(),
                        ns_per_run: median(&p.ns_per_run),
                        runs_per_connection: median(&p.runs_per_connection),
                    })
                    .collect(),
                program_ns_per_connection: (!r.programs.is_empty()).then(|| {
                    let per_repeat: Vec<f64> = (0..r.program_cpu_share.len())
                        .map(|i| {
                            r.programs
                                .iter()
                                .map(|p| p.ns_per_run[i] * p.runs_per_connection[i])
                                .sum()
                        })
                        .collect();
                    median(&per_repeat)
                }),
                program_cpu_share: (!r.program_cpu_share.is_empty()).then(|| median(&r.program_cpu_share)),
                paths: r
                    .paths
                    .iter()
                    .map(|p| PathRow {
                        probe: p.probe.clone(),
                        ns_per_firing: median(&p.ns_per_firing),
                        fired_per_connection: median(&p.fired_per_connection),
                    })
                    .collect(),
            }
        })
        .collect()
}

fn enforcer_name(enforcer: Enforcer) -> &'static str {
    match enforcer {
        Enforcer::None => "none",
        Enforcer::Hooks => "hooks",
        Enforcer::Npc => "npc",
        Enforcer::Iptables => "iptables",
    }
}

impl Report {
    /// The table `cargo xtask bench traffic` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "traffic benchmark: kernel {}, {} CPUs, {} repeats of {:.1} s per mode, modes interleaved\n",
            self.kernel, self.cpus, self.repeats, self.duration_seconds
        );
        if self.began_busy > 0 {
            out += &format!(
                "({} measurements began before the machine went quiet: other load was running)\n",
                self.began_busy
            );
        }
        out += &format!(
            "{:<9} {:>8} {:>6} {:>12} {:>19} {:>8} {:>10} {:>15} {:>8}\n",
            "enforcer", "policies", "peers", "conn/s", "(min-max)", "vs none", "bulk Gb/s", "(min-max)", "vs none"
        );
        for r in &self.rows {
            let enforcer = enforcer_name(r.enforcer);
            out += &format!(
                "{:<9} {:>8} {:>6} {:>12.0} {:>9.0}-{:<9.0} {:>8.2} {:>10.2} {:>7.2}-{:<7.2} {:>8.2}\n",
                enforcer,
                r.policies,
                r.peers,
                r.connections_per_second_median,
                r.connections_per_second_spread.0,
                r.connections_per_second_spread.1,
                r.connections_vs_none,
                r.bulk_gbits_median,
                r.bulk_gbits_spread.0,
                r.bulk_gbits_spread.1,
                r.bulk_vs_none
            );
        }
        out + &self.program_table() + &self.path_table()
    }

    /// Where the programs' time goes, for builds with the path probes (else nothing).
    fn path_table(&self) -> String {
        let mut out = String::new();
        for r in self.rows.iter().filter(|r| !r.paths.is_empty()) {
            out += &format!(
                "path probes, {} with {} policies and {} peers (ns per firing incl. the probe's own ~30-40 ns; firings per connection; ns per connection):\n",
                enforcer_name(r.enforcer),
                r.policies,
                r.peers
            );
            for p in r.paths.iter().filter(|p| p.fired_per_connection > 0.0) {
                out += &format!(
                    "  {:<45} {:>7.0} x {:>5.2} = {:>6.0}\n",
                    p.probe,
                    p.ns_per_firing,
                    p.fired_per_connection,
                    p.ns_per_firing * p.fired_per_connection
                );
            }
        }
        out
    }

    /// The programs' own time under the connection load, for the rows that have programs.
    fn program_table(&self) -> String {
        let with: Vec<&Row> = self.rows.iter().filter(|r| !r.programs.is_empty()).collect();
        let Some(first) = with.first() else {
            return String::new();
        };
        let mut out = String::from(
            "npc's programs under the connection load (kernel run-time statistics, a phase of its own):\n",
        );
        out += &format!("{:<9} {:>8} {:>6}", "enforcer", "policies", "peers");
        for p in &first.programs {
            out += &format!(
                " {:>25}",
                format!("{} ns/run x runs/conn", p.program.trim_start_matches("npc_"))
            );
        }
        out += &format!(" {:>8} {:>9}\n", "ns/conn", "CPU share");
        for r in with {
            out += &format!("{:<9} {:>8} {:>6}", enforcer_name(r.enforcer), r.policies, r.peers);
            for p in &r.programs {
                out += &format!(" {:>25}", format!("{:.0} x {:.1}", p.ns_per_run, p.runs_per_connection));
            }
            out += &format!(
                " {:>8.0} {:>9.3}\n",
                r.program_ns_per_connection.unwrap_or(0.0),
                r.program_cpu_share.unwrap_or(0.0)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::CpuTimes;

    #[test]
    fn busy_share_counts_everything_but_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let before = CpuTimes::parse("cpu  100 0 50 800 10 0 40 0 0 0\ncpu0 50 0 25 400 5 0 20 0 0 0\n");
        let after = CpuTimes::parse("cpu  110 0 55 880 20 0 45 0 0 0\ncpu0 55 0 27 440 10 0 22 0 0 0\n");
        assert_eq!((before.busy, before.total), (190, 1000));
        // 20 busy ticks (user 10, system 5, softirq 5) of 110.
        let share = after.busy_share_since(&before);
        assert!((share - 20.0 / 110.0).abs() < 1e-9, "{share}");
        // No time passed (or an unreadable /proc/stat): never quiet.
        assert_eq!(after.busy_share_since(&after), 1.0);
        assert_eq!(CpuTimes::parse("").busy_share_since(&CpuTimes::default()), 1.0);
    }

    #[test]
    fn ratios_pair_each_round_with_none_in_the_same_round() {
        // The machine speeds up over the run; the mode is 10% below none in two rounds of three,
        // and a fluke 25% above in the other. Paired: 0.9. Whole-run medians would say 25 / 20.
        let none = [10.0, 20.0, 30.0];
        let mode = [9.0, 25.0, 27.0];
        assert!((super::paired_ratio(&mode, &none) - 0.9).abs() < 1e-9);
        // A round none did not measure (0) does not count.
        assert!((super::paired_ratio(&[9.5, 1.0], &[10.0, 0.0]) - 0.95).abs() < 1e-9);
        assert_eq!(super::paired_ratio(&[], &[]), 0.0);
    }
}
