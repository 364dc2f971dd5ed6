//! Restarting the agent (gracefully, and with SIGKILL) must not cost a single packet: programs
//! and maps stay pinned and enforcing while no agent runs, the next agent adopts the numbering
//! and swaps its programs in atomically. A long-lived TCP stream and a stream of new connections
//! between an allowed pair must see zero failures; a blocked pair must see zero successes.
//! Then `npc-agent run --uninstall` removes everything.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use npc_agent::lab::netns;
use npc_integration::{
    cluster::{Cluster, yaml},
    npc_agent_bin, wait_for,
};
use npc_policy::model::Protocol;

const FABRIC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: app, labels: {app: server}}
spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: app, labels: {app: intruder}}
spec: {containers: [{name: c}]}
"#;

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-in, namespace: app}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}, {port: 7000}]}]\n";

const METRICS_PORT: u16 = 19655;

fn spawn_agent(c: &Cluster, log: &str) -> Child {
    c.spawn_agent_process(METRICS_PORT, log)
}

fn http_get(c: &Cluster, path: &str) -> Option<String> {
    c.agent_http_get(METRICS_PORT, path)
}

fn wait_ready(c: &Cluster, agent: &mut Child, log: &str) {
    c.wait_agent_process_ready(METRICS_PORT, agent, log, Duration::from_secs(120));
}

fn stop(agent: &mut Child, signal: i32) {
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(agent.id() as i32, signal) };
    assert!(
        wait_for(Duration::from_secs(15), || agent.try_wait().expect("status").is_some()),
        "the agent did not exit on signal {signal}"
    );
}

/// Traffic counters, shared with the threads that make the traffic.
#[derive(Default)]
struct Counters {
    stream_ok: AtomicU64,
    stream_failed: AtomicU64,
    new_ok: AtomicU64,
    new_failed: AtomicU64,
    blocked_ok: AtomicU64,
    blocked_tries: AtomicU64,
}

fn in_netns(ns: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        netns::enter(&ns).expect("enter pod namespace");
        f();
    })
}

/// The tc filters on one direction of a node-side interface (`tc filter show`, in the node's
/// namespace): one line per filter, the classifier's own line (no handle) left out.
fn tc_filters(c: &Cluster, ifname: &str, direction: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.lab.node_netns()))
        .args(["tc", "filter", "show", "dev", ifname, direction])
        .output()
        .expect("tc filter show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("filter") && l.contains(" handle "))
        .map(str::to_string)
        .collect()
}

/// Whether the interface has a clsact qdisc (in the node's namespace).
fn has_clsact(c: &Cluster, ifname: &str) -> bool {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.lab.node_netns()))
        .args(["tc", "qdisc", "show", "dev", ifname])
        .output()
        .expect("tc qdisc show");
    String::from_utf8_lossy(&out.stdout).contains("clsact")
}

/// The pods' node-side interfaces.
fn pod_veths(c: &Cluster) -> Vec<(String, u32)> {
    ["app/server", "app/client", "app/intruder"]
        .iter()
        .map(|p| {
            let (name, ifindex) = c.lab.veth(&p.parse_ref()).expect("veth");
            (name.to_string(), ifindex)
        })
        .collect()
}

/// Exactly one npc attachment per direction on every pod interface: on the clsact path one
/// filter per direction (a restart replaces, never adds); on TCX one pinned link per hook (tc
/// does not list TCX programs).
fn assert_one_attachment_each(c: &Cluster, when: &str) {
    for (ifname, ifindex) in pod_veths(c) {
        match npc_agent::datapath::AttachPath::current() {
            npc_agent::datapath::AttachPath::Clsact => {
                for dir in ["ingress", "egress"] {
                    let f = tc_filters(c, &ifname, dir);
                    assert_eq!(f.len(), 1, "{when}: {ifname} {dir} has {} filters: {f:#?}", f.len());
                }
            }
            npc_agent::datapath::AttachPath::Tcx => {
                for hook in ["from_pod", "to_pod"] {
                    let pin = c.pin_root.join(format!("links/if{ifindex}_{hook}"));
                    assert!(pin.exists(), "{when}: no link pinned at {}", pin.display());
                }
            }
        }
    }
}

/// The ids of the programs in npc's filters (`tc filter show` says `id N`).
fn filter_program_ids(c: &Cluster) -> Vec<u32> {
    pod_veths(c)
        .iter()
        .flat_map(|(ifname, _)| {
            ["ingress", "egress"]
                .into_iter()
                .flat_map(|dir| tc_filters(c, ifname, dir))
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "id")?;
            words.next()?.parse().ok()
        })
        .collect()
}

#[test]
fn agent_restarts_lose_no_connection_and_let_nothing_through() {
    let c = Cluster::new("restart", FABRIC, &[]);
    c.api.apply(yaml(POLICY));
    let server_ns = c
        .lab
        .pod_netns(&"app/server".parse_ref())
        .expect("server ns")
        .to_string();
    let client_ns = c
        .lab
        .pod_netns(&"app/client".parse_ref())
        .expect("client ns")
        .to_string();
    let intruder_ns = c
        .lab
        .pod_netns(&"app/intruder".parse_ref())
        .expect("intruder ns")
        .to_string();
    let server_ip = c.pod("app/server").ips[0];

    // A long-lived echo server on 7000 in the server pod.
    let stop_all = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let s = stop_all.clone();
    let echo = in_netns(&server_ns, move || {
        let listener = TcpListener::bind(("0.0.0.0", 7000)).expect("bind 7000");
        ready_tx.send(()).expect("ready");
        while !s.load(Ordering::Relaxed) {
            // Wait for a connection to accept, waking now and then to see the stop flag.
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            if let Ok((mut conn, _)) = listener.accept() {
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 64];
                    while !s.load(Ordering::Relaxed) {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e)
                                if e.kind() == std::io::ErrorKind::WouldBlock
                                    || e.kind() == std::io::ErrorKind::TimedOut => {}
                            Err(_) => break,
                        }
                    }
                });
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("echo server up");

    let mut agent = spawn_agent(&c, "agent-1.log");
    wait_ready(&c, &mut agent, "agent-1.log");
    assert_one_attachment_each(&c, "first agent");
    c.expect("allowed pair", "app/client", "app/server", 80, true);
    c.expect("blocked pair", "app/intruder", "app/server", 80, false);

    let n = Arc::new(Counters::default());
    let mut threads = Vec::new();
    {
        let (n, s) = (n.clone(), stop_all.clone());
        threads.push(in_netns(&client_ns, move || {
            let addr = SocketAddr::new(server_ip, 7000);
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("stream connects");
            conn.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            let mut buf = [0u8; 8];
            while !s.load(Ordering::Relaxed) {
                let ok =
                    conn.write_all(b"npc-ping").is_ok() && conn.read_exact(&mut buf).is_ok() && &buf == b"npc-ping";
                if ok {
                    n.stream_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    n.stream_failed.fetch_add(1, Ordering::Relaxed);
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                        Ok(c) => conn = c,
                        Err(_) => continue,
                    }
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                }
                // The stream's send rate (about 200 round trips a second), not a wait for anything.
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    {
        let (n, s) = (n.clone(), stop_all.clone());
        threads.push(in_netns(&client_ns, move || {
            while !s.load(Ordering::Relaxed) {
                if npc_agent::lab::connect(SocketAddr::new(server_ip, 80), Protocol::Tcp, Duration::from_secs(2)) {
                    n.new_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    n.new_failed.fetch_add(1, Ordering::Relaxed);
                }
                // The rate of new connections (about 100 a second), not a wait for anything.
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    {
        let (n, s) = (n.clone(), stop_all.clone());
        threads.push(in_netns(&intruder_ns, move || {
            while !s.load(Ordering::Relaxed) {
                n.blocked_tries.fetch_add(1, Ordering::Relaxed);
                if npc_agent::lab::connect(
                    SocketAddr::new(server_ip, 80),
                    Protocol::Tcp,
                    Duration::from_millis(300),
                ) {
                    n.blocked_ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let traffic flow for a while under each regime: progress is counted, not timed.
    let progress = |n: &Counters, what: &str| {
        let (s0, c0, b0) = (
            n.stream_ok.load(Ordering::Relaxed),
            n.new_ok.load(Ordering::Relaxed),
            n.blocked_tries.load(Ordering::Relaxed),
        );
        assert!(
            wait_for(Duration::from_secs(30), || {
                n.stream_ok.load(Ordering::Relaxed) >= s0 + 50
                    && n.new_ok.load(Ordering::Relaxed) >= c0 + 20
                    && n.blocked_tries.load(Ordering::Relaxed) >= b0 + 3
            }),
            "{what}: traffic made no progress"
        );
    };
    progress(&n, "first agent");

    // A graceful restart, with traffic flowing while no agent runs at all; then a crash.
    for (n_agent, signal, between) in [
        (2, libc::SIGTERM, "no agent running"),
        (3, libc::SIGKILL, "after SIGKILL"),
    ] {
        stop(&mut agent, signal);
        progress(&n, between);
        let log = format!("agent-{n_agent}.log");
        agent = spawn_agent(&c, &log);
        wait_ready(&c, &mut agent, &log);
        let which = format!("agent {n_agent}");
        assert_one_attachment_each(&c, &which);
        progress(&n, &which);
    }

    stop_all.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("traffic thread");
    }
    echo.join().expect("echo server");
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    assert_eq!(
        get(&n.stream_failed),
        0,
        "the long-lived stream broke ({} round trips ok)",
        get(&n.stream_ok)
    );
    assert_eq!(get(&n.new_failed), 0, "new connections failed ({} ok)", get(&n.new_ok));
    assert_eq!(
        get(&n.blocked_ok),
        0,
        "the blocked pair got through ({} tries)",
        get(&n.blocked_tries)
    );

    // /metrics is there and carries the headline counter.
    let metrics = http_get(&c, "/metrics").expect("metrics");
    assert!(
        metrics.contains("npc_blocked_connections_total{protocol=\"TCP\",dport=\"80\",direction=\"ingress\"}"),
        "{metrics}"
    );
    assert!(http_get(&c, "/healthz").is_some_and(|r| r.contains(" 200 ")));

    // Another tool's TC program on the same interface (here: a second datapath under its own pin
    // root, enforcing the same policy) must survive our uninstall, which comes after a crash.
    stop(&mut agent, libc::SIGKILL);
    let ours = filter_program_ids(&c);
    // (No dots: bpffs refuses names that contain one.)
    let other_root = std::path::PathBuf::from(format!("{}-other-tool", c.pin_root.display()));
    let (server_if, server_ifindex) = c.lab.veth(&"app/server".parse_ref()).expect("server veth");
    let server_if = server_if.to_string();
    let mut state = c.lab.state().clone();
    let policies = npc_policy::files::parse_str("p.yaml".as_ref(), POLICY);
    state.policies = policies.to_state().policies;
    let compiled = npc_policy::compiler::compile(&state);
    let server = "app/server".parse_ref();
    let mut other = netns::run_in(c.lab.node_netns(), || {
        let mut dp = npc_agent::datapath::Datapath::load(&other_root).expect("other tool loads");
        dp.attach(&server_if).expect("other tool attaches");
        dp
    })
    .expect("node namespace");
    other
        .sync(&compiled.maps, |p| (*p == server).then_some(server_ifindex))
        .expect("other tool syncs");

    // Uninstall: everything npc put on the node goes, nothing else.
    let out = Command::new(npc_agent_bin())
        .args(["run", "--uninstall", "--pin-root"])
        .arg(&c.pin_root)
        .output()
        .expect("run --uninstall");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!c.pin_root.exists(), "pins left after --uninstall");
    if npc_agent::datapath::AttachPath::current() == npc_agent::datapath::AttachPath::Clsact {
        // Only the other tool's filter is left, on the server's interface; no npc filter or
        // qdisc anywhere else, and the programs those filters held are gone.
        for (ifname, _) in pod_veths(&c) {
            let want = usize::from(ifname == server_if);
            for dir in ["ingress", "egress"] {
                let f = tc_filters(&c, &ifname, dir);
                assert_eq!(f.len(), want, "after --uninstall: {ifname} {dir}: {f:#?}");
            }
            if ifname != server_if {
                assert!(!has_clsact(&c, &ifname), "after --uninstall: clsact left on {ifname}");
            }
        }
        assert!(!ours.is_empty(), "no program ids in the filters");
        let loaded = npc_agent::datapath::loaded_program_ids();
        assert!(
            ours.iter().all(|id| !loaded.contains(id)),
            "npc's programs {ours:?} still loaded after --uninstall"
        );
    }
    assert!(
        !other.attached_ifindexes().is_empty(),
        "the other tool's link is still pinned"
    );
    // (Probes, not Cluster::expect: that proves a block by npc's drop counters, gone now.)
    assert!(
        !c.probe("app/intruder", "app/server", 80, Protocol::Tcp),
        "the other tool no longer blocks"
    );
    let connects = || c.probe("app/client", "app/server", 80, Protocol::Tcp);
    assert!(
        wait_for(Duration::from_secs(10), connects),
        "the other tool no longer allows"
    );
    drop(other);
    npc_agent::datapath::uninstall(&other_root).expect("remove the other tool");
    for (ifname, _) in pod_veths(&c) {
        for dir in ["ingress", "egress"] {
            let f = tc_filters(&c, &ifname, dir);
            assert!(f.is_empty(), "after both uninstalls: {ifname} {dir}: {f:#?}");
        }
    }
    let connects = || c.probe("app/intruder", "app/server", 80, Protocol::Tcp);
    assert!(
        wait_for(Duration::from_secs(10), connects),
        "after both are gone nothing is enforced"
    );
}

trait ParseRef {
    fn parse_ref(&self) -> npc_policy::model::ObjectRef;
}

impl ParseRef for str {
    fn parse_ref(&self) -> npc_policy::model::ObjectRef {
        npc_policy::model::ObjectRef::parse(self).expect("ns/name")
    }
}
