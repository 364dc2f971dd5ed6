//! Restarting the agent (gracefully, and with SIGKILL) must not cost a single packet: programs
//! and maps stay pinned and enforcing while no agent runs, the next agent adopts the numbering
//! and swaps its programs in atomically. A long-lived TCP stream and a stream of new connections
//! between an allowed pair must see zero failures; a blocked pair must see zero successes.
//! Then `npc-agent run --uninstall` removes everything.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use npc_agent::{model::Protocol, netns};
use npc_integration::{
    cluster::{Cluster, NODE, yaml},
    npc_agent_bin, wait_for,
};

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

/// `npc-agent run` in the node's network namespace (nsenter: the agent works wherever it starts).
fn spawn_agent(c: &Cluster, log: &str) -> Child {
    let log = std::fs::File::create(c.dir.join(log)).expect("agent log");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.lab.node_netns()))
        .arg(npc_agent_bin())
        .args(["run", "--kubeconfig"])
        .arg(c.api.kubeconfig(&c.dir))
        .args(["--node-name", NODE, "--pin-root"])
        .arg(&c.pin_root)
        .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn npc-agent run (needs nsenter from util-linux)")
}

/// GET a path of the agent's HTTP server, from inside the node namespace.
fn http_get(c: &Cluster, path: &str) -> Option<String> {
    netns::run_in(c.lab.node_netns(), || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)),
            Duration::from_millis(500),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })
    .ok()
    .flatten()
}

fn wait_ready(c: &Cluster, agent: &mut Child) {
    let ready = wait_for(Duration::from_secs(30), || {
        assert!(agent.try_wait().expect("agent status").is_none(), "the agent exited");
        http_get(c, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
    });
    assert!(ready, "the agent never became ready");
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
    wait_ready(&c, &mut agent);
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

    // Graceful restart, with traffic flowing while no agent runs at all.
    stop(&mut agent, libc::SIGTERM);
    progress(&n, "no agent running");
    let mut agent = spawn_agent(&c, "agent-2.log");
    wait_ready(&c, &mut agent);
    progress(&n, "second agent");

    // Crash and restart.
    stop(&mut agent, libc::SIGKILL);
    progress(&n, "after SIGKILL");
    let mut agent = spawn_agent(&c, "agent-3.log");
    wait_ready(&c, &mut agent);
    progress(&n, "third agent");

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
    // root, enforcing the same policy) must survive our uninstall.
    stop(&mut agent, libc::SIGTERM);
    // (No dots: bpffs refuses names that contain one.)
    let other_root = std::path::PathBuf::from(format!("{}-other-tool", c.pin_root.display()));
    let (server_if, server_ifindex) = c.lab.veth(&"app/server".parse_ref()).expect("server veth");
    let server_if = server_if.to_string();
    let mut state = c.lab.state().clone();
    let policies = npc_agent::manifests::parse_str("p.yaml".as_ref(), POLICY);
    state.policies = policies.to_state().policies;
    let compiled = npc_agent::compiler::compile(&state);
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
    assert!(
        !other.attached_ifindexes().is_empty(),
        "the other tool's link is still pinned"
    );
    c.expect("the other tool still enforces", "app/intruder", "app/server", 80, false);
    c.expect("the other tool still enforces", "app/client", "app/server", 80, true);
    drop(other);
    npc_agent::datapath::uninstall(&other_root).expect("remove the other tool");
    c.expect(
        "after both are gone nothing is enforced",
        "app/intruder",
        "app/server",
        80,
        true,
    );
}

trait ParseRef {
    fn parse_ref(&self) -> npc_agent::model::ObjectRef;
}

impl ParseRef for str {
    fn parse_ref(&self) -> npc_agent::model::ObjectRef {
        npc_agent::model::ObjectRef::parse(self).expect("ns/name")
    }
}
