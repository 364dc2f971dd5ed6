//! The lab: the real datapath on one host, no cluster.
//!
//! A node network namespace holds a bridge (no route anywhere else: nothing leaks off the
//! machine); each Pod gets a namespace and a veth to the bridge, and listeners on its declared
//! container ports (TCP: accept, reply, close; UDP: echo). The agent's datapath attaches to the
//! host-side veths inside the node namespace and enforces exactly as on a node.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::{
    attacher::{AttachError, Attacher},
    compiler,
    datapath::{Datapath, DatapathError, SyncStats},
    manifests::Loaded,
    model::{ObjectRef, Pod, Protocol, State},
    netns::{self, Netns, NetnsError},
};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("{0}")]
    Setup(String),
    #[error("lab state {path}: {message}")]
    Record { path: PathBuf, message: String },
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Prefix of every namespace and pin directory this lab creates.
    pub tag: String,
    pub pod_cidr: Ipv4Net,
    pub pin_root: PathBuf,
    pub legacy_default_deny: bool,
    /// Run the in-process agent (the default). Without it the lab is only the fabric (node,
    /// bridge, pods, listeners): for tests that run `npc-agent run` against it instead.
    pub enforce: bool,
    /// How long a probe waits before calling a connection blocked.
    pub probe_timeout: Duration,
}

impl LabOptions {
    /// Where a lab named `tag` pins its maps, programs and links.
    pub fn pin_root_of(tag: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/npc-lab-{tag}"))
    }

    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_string(),
            pod_cidr: "10.244.0.0/16".parse().expect("valid literal"),
            pin_root: Self::pin_root_of(tag),
            legacy_default_deny: false,
            enforce: true,
            probe_timeout: Duration::from_millis(1500),
        }
    }
}

struct LabPod {
    ns: Netns,
    veth: String,
    ifindex: u32,
}

/// Listener threads of one pod; stopped and joined on drop.
struct Listeners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct Lab {
    opts: LabOptions,
    // Field order is drop order: listeners before the namespaces they live in.
    listeners: BTreeMap<ObjectRef, Listeners>,
    pods: BTreeMap<ObjectRef, LabPod>,
    /// None when the lab does not enforce (`LabOptions::enforce`).
    datapath: Option<Datapath>,
    attacher: Attacher,
    node: Netns,
    state: State,
    compiler: compiler::Compiler,
    addresses: AddressPool,
    node_addr: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub result: String,
}

impl Lab {
    /// Builds the node, the pods and their listeners, loads the datapath and applies `loaded`.
    pub fn up(opts: LabOptions, loaded: &Loaded) -> Result<Self, LabError> {
        let node = Netns::create(&format!("{}-node", opts.tag))?;
        netns::ip(&["-n", node.name(), "link", "add", "br0", "type", "bridge"])?;
        let addresses = AddressPool::new(opts.pod_cidr);
        let node_addr = addresses.node_addr();
        let node_cidr = format!("{node_addr}/{}", opts.pod_cidr.prefix_len());
        netns::ip(&["-n", node.name(), "addr", "add", &node_cidr, "dev", "br0"])?;
        netns::ip(&["-n", node.name(), "link", "set", "br0", "up"])?;
        let datapath = if opts.enforce {
            let _ = std::fs::remove_dir_all(&opts.pin_root);
            Some(Datapath::load(&opts.pin_root)?)
        } else {
            None
        };
        // The node agent's view: netlink in the node namespace, as on a Kubernetes node.
        let attacher = node.run(Attacher::new)??;
        let state = State {
            node_addrs: vec![node_addr],
            legacy_default_deny: opts.legacy_default_deny,
            ..State::default()
        };
        let mut lab = Self {
            opts,
            listeners: BTreeMap::new(),
            pods: BTreeMap::new(),
            datapath,
            attacher,
            node,
            state,
            compiler: compiler::Compiler::default(),
            addresses,
            node_addr,
        };
        lab.apply(loaded)?;
        Ok(lab)
    }

    pub fn node_addr(&self) -> IpAddr {
        self.node_addr
    }

    /// The in-process agent's datapath (panics for a lab made with `enforce: false`).
    pub fn datapath(&self) -> &Datapath {
        self.datapath.as_ref().expect("this lab does not enforce")
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("this lab does not enforce")
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn pod(&self, id: &ObjectRef) -> Option<&Pod> {
        self.state.pods.get(id)
    }

    /// Makes the lab match `loaded`: new pods are wired up, gone pods torn down, label and policy
    /// changes compiled and synced into the running datapath (nothing restarts).
    pub fn apply(&mut self, loaded: &Loaded) -> Result<SyncStats, LabError> {
        let mut state = State {
            node_addrs: self.state.node_addrs.clone(),
            legacy_default_deny: self.state.legacy_default_deny,
            ..State::default()
        };
        for ns in &loaded.namespaces {
            state.namespaces.insert(ns.name.clone(), ns.clone());
        }
        for policy in &loaded.policies {
            state.policies.insert(policy.id.clone(), policy.clone());
        }
        let wanted: BTreeSet<ObjectRef> = loaded.pods.iter().map(Pod::object_ref).collect();
        let gone: Vec<ObjectRef> = self.pods.keys().filter(|p| !wanted.contains(*p)).cloned().collect();
        for id in gone {
            self.listeners.remove(&id);
            if let Some(pod) = self.pods.remove(&id)
                && let Some(dp) = self.datapath.as_mut()
            {
                let _ = dp.detach(pod.ifindex);
            }
        }
        for pod in &loaded.pods {
            let id = pod.object_ref();
            let mut pod = pod.clone();
            // Keep the address a pod already has; otherwise its pinned one; otherwise the next free.
            pod.ips = match self.state.pods.get(&id) {
                Some(existing) if self.pods.contains_key(&id) => existing.ips.clone(),
                _ if !pod.ips.is_empty() => pod.ips.clone(),
                _ => {
                    let taken = |ip: &IpAddr| {
                        loaded
                            .pods
                            .iter()
                            .chain(self.state.pods.values())
                            .chain(state.pods.values())
                            .any(|p| p.ips.contains(ip))
                    };
                    vec![self.addresses.allocate(taken).ok_or_else(|| {
                        LabError::Setup(format!("--pod-cidr {} has no free address left", self.opts.pod_cidr))
                    })?]
                }
            };
            if let Some(wired) = self.pods.get(&id) {
                if self.state.pods.get(&id).is_some_and(|old| old.ports != pod.ports) {
                    // Declared ports changed: new listeners (the old ones stop first).
                    self.listeners.remove(&id);
                    let listeners = start_listeners(wired.ns.name(), &pod)?;
                    self.listeners.insert(id.clone(), listeners);
                }
            } else {
                self.wire(&pod)?;
            }
            state.pods.insert(id, pod);
        }
        self.state = state;
        let compiled = self.compiler.compile(&self.state);
        let ifindexes: BTreeMap<ObjectRef, u32> = self.pods.iter().map(|(k, p)| (k.clone(), p.ifindex)).collect();
        match self.datapath.as_mut() {
            Some(dp) => Ok(dp.sync(&compiled.maps, |pod| ifindexes.get(pod).copied())?),
            None => Ok(SyncStats::default()),
        }
    }

    /// A namespace, a veth into the bridge, addresses, listeners, and our programs on the veth.
    fn wire(&mut self, pod: &Pod) -> Result<(), LabError> {
        let index = self.pods.len() + self.listeners.len() + self.addresses.used();
        let ns = Netns::create(&format!("{}-{}-{}", self.opts.tag, pod.namespace, pod.name))?;
        let veth = format!("lxc{:08x}", fxhash(&format!("{}/{}/{index}", pod.namespace, pod.name)));
        let node = self.node.name().to_string();
        netns::ip(&[
            "-n",
            &node,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        netns::ip(&["-n", &node, "link", "set", &veth, "master", "br0", "up"])?;
        for addr in &pod.ips {
            let cidr = match addr {
                IpAddr::V4(_) => format!("{addr}/{}", self.opts.pod_cidr.prefix_len()),
                IpAddr::V6(_) => format!("{addr}/64"),
            };
            netns::ip(&["-n", ns.name(), "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
        }
        netns::ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
        for addr in pod.ips.iter().filter(|a| a.is_ipv6()) {
            // The node has no IPv6 address of its own on the bridge: a host route (and the
            // bridge's link-local address for neighbour discovery) reaches pinned IPv6 pods.
            netns::ip(&[
                "-n",
                &node,
                "-6",
                "route",
                "replace",
                &format!("{addr}/128"),
                "dev",
                "br0",
            ])?;
        }
        let listeners = start_listeners(ns.name(), pod)?;
        self.listeners.insert(pod.object_ref(), listeners);
        // Found the way a node finds it (route, neighbour, bridge FDB), never by the name we
        // just gave it.
        let primary = pod
            .ips
            .iter()
            .find(|a| a.is_ipv4())
            .or(pod.ips.first())
            .copied()
            .ok_or_else(|| LabError::Setup(format!("pod {}/{} has no address", pod.namespace, pod.name)))?;
        let link = self.attacher.resolve(primary, Duration::from_secs(3))?;
        if link.name != veth {
            return Err(LabError::Setup(format!(
                "the attacher found {} for {primary}, but the lab wired {veth}",
                link.name
            )));
        }
        let ifindex = match self.datapath.as_mut() {
            Some(datapath) => self.node.run(|| datapath.attach(&link.name))??,
            None => link.ifindex,
        };
        self.pods.insert(pod.object_ref(), LabPod { ns, veth, ifindex });
        Ok(())
    }

    /// The host-side interface of a pod.
    pub fn veth(&self, id: &ObjectRef) -> Option<(&str, u32)> {
        self.pods.get(id).map(|p| (p.veth.as_str(), p.ifindex))
    }

    /// Network namespace name of a pod.
    pub fn pod_netns(&self, id: &ObjectRef) -> Option<&str> {
        self.pods.get(id).map(|p| p.ns.name())
    }

    pub fn node_netns(&self) -> &str {
        self.node.name()
    }

    /// What `lab probe` and `lab down` need to know about this lab.
    pub fn record(&self) -> LabRecord {
        LabRecord {
            pid: std::process::id(),
            tag: self.opts.tag.clone(),
            pin_root: self.opts.pin_root.clone(),
            node_netns: self.node.name().to_string(),
            probe_timeout_ms: self.opts.probe_timeout.as_millis() as u64,
            pods: self
                .state
                .pods
                .values()
                .filter_map(|p| {
                    let wired = self.pods.get(&p.object_ref())?;
                    Some(RecordPod {
                        id: p.object_ref().to_string(),
                        netns: wired.ns.name().to_string(),
                        ips: p.ips.clone(),
                        ports: p.ports.iter().map(|c| (c.port, c.protocol.to_string())).collect(),
                    })
                })
                .collect(),
        }
    }

    /// Every ordered pair of distinct pods, on every port/protocol the destination declares;
    /// run concurrently.
    pub fn probe_all(&self) -> Result<Vec<Probe>, LabError> {
        self.record().probe_all()
    }

    /// One probe from `from` to `to`.
    pub fn probe(&self, from: &ObjectRef, to: &ObjectRef, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        self.record().probe(&from.to_string(), &to.to_string(), port, protocol)
    }

    pub fn pin_root(&self) -> &Path {
        &self.opts.pin_root
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.listeners.clear();
        let ifindexes: Vec<u32> = self.pods.values().map(|p| p.ifindex).collect();
        if let Some(dp) = self.datapath.as_mut() {
            for i in ifindexes {
                let _ = dp.detach(i);
            }
        }
        self.pods.clear();
        if self.datapath.is_some() {
            let _ = std::fs::remove_dir_all(&self.opts.pin_root);
        }
    }
}

/// A running lab as `lab up` writes it down for `lab probe` and `lab down` (other processes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabRecord {
    pub pid: u32,
    pub tag: String,
    pub pin_root: PathBuf,
    pub node_netns: String,
    pub probe_timeout_ms: u64,
    pub pods: Vec<RecordPod>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordPod {
    /// `ns/name`.
    pub id: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    /// (port, "TCP" | "UDP" | "SCTP").
    pub ports: Vec<(u16, String)>,
}

impl LabRecord {
    /// Where the record of the lab named `tag` lives.
    pub fn path(tag: &str) -> PathBuf {
        PathBuf::from(format!("/run/npc/lab-{tag}.json"))
    }

    pub fn load(tag: &str) -> Result<Option<Self>, LabError> {
        let path = Self::path(tag);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| LabError::Record {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::Record {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// Writes the record atomically (a reader never sees half of it).
    pub fn save(&self) -> Result<(), LabError> {
        let path = Self::path(&self.tag);
        let err = |e: std::io::Error| LabError::Record {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(err)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serialisable")).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }

    /// Is the process that wrote this record still running?
    pub fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(self.pid as i32, 0) == 0 }
    }

    fn pod(&self, id: &str) -> Result<&RecordPod, LabError> {
        self.pods
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| LabError::Setup(format!("no pod {id} in the lab")))
    }

    /// One probe: a TCP connection that gets the listener's reply, or a UDP echo, within the
    /// probe timeout, from inside the source pod's namespace.
    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        let src = self.pod(from)?;
        let dst = self.pod(to)?;
        let addr =
            probe_addr(src, dst).ok_or_else(|| LabError::Setup(format!("{from} and {to} share no address family")))?;
        let timeout = Duration::from_millis(self.probe_timeout_ms);
        Ok(netns::run_in(&src.netns, || {
            connect(SocketAddr::new(addr, port), protocol, timeout)
        })?)
    }

    /// Every ordered pair of distinct pods, on every port/protocol the destination declares
    /// (SCTP aside: no SCTP sockets on these kernels; the datapath tests cover it), concurrently.
    pub fn probe_all(&self) -> Result<Vec<Probe>, LabError> {
        let mut plan = Vec::new();
        for dst in &self.pods {
            for (port, protocol) in &dst.ports {
                let Some(protocol) = Protocol::parse(protocol).filter(|p| *p != Protocol::Sctp) else {
                    continue;
                };
                // Pairs that share no address family (an IPv6-only pod and an IPv4-only one)
                // cannot talk at all: nothing to probe.
                for src in self
                    .pods
                    .iter()
                    .filter(|s| s.id != dst.id && probe_addr(s, dst).is_some())
                {
                    plan.push((src.id.as_str(), dst.id.as_str(), *port, protocol));
                }
            }
        }
        plan.sort();
        plan.dedup();
        let results: Vec<Result<bool, LabError>> = std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .iter()
                .map(|(from, to, port, protocol)| s.spawn(move || self.probe(from, to, *port, *protocol)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("a probe thread panicked".into())))
                })
                .collect()
        });
        plan.into_iter()
            .zip(results)
            .map(|((from, to, port, protocol), ok)| {
                Ok(Probe {
                    from: from.to_string(),
                    to: to.to_string(),
                    port,
                    protocol: protocol.to_string(),
                    result: if ok? { "allowed" } else { "blocked" }.to_string(),
                })
            })
            .collect()
    }
}

/// The destination address a probe from `src` uses: `dst`'s first address of a family `src` has.
pub fn probe_addr(src: &RecordPod, dst: &RecordPod) -> Option<IpAddr> {
    dst.ips
        .iter()
        .find(|d| src.ips.iter().any(|s| s.is_ipv4() == d.is_ipv4()))
        .copied()
}

/// Removes everything a lab named `tag` may have left: its process (asked to stop, then killed),
/// network namespaces (and with the node namespace its bridge and veths), pinned maps, programs
/// and links, and the record. Safe to run any number of times; returns what it removed.
pub fn down(tag: &str) -> Result<Vec<String>, LabError> {
    let mut removed = Vec::new();
    let record = LabRecord::load(tag).unwrap_or(None);
    if let Some(record) = &record
        && record.alive()
        && record.pid != std::process::id()
    {
        // SAFETY: plain signals to the lab's own process.
        unsafe { libc::kill(record.pid as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while record.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if record.alive() {
            // SAFETY: as above.
            unsafe { libc::kill(record.pid as i32, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while record.alive() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        removed.push(format!("process {}", record.pid));
    }
    // Pod namespaces first, the node (with the bridge) last.
    let mut namespaces = netns::list_with_prefix(&format!("{tag}-"));
    namespaces.sort_by_key(|n| n.ends_with("-node"));
    for ns in namespaces {
        netns::ip(&["netns", "del", &ns])?;
        removed.push(format!("netns {ns}"));
    }
    let pin_root = record
        .as_ref()
        .map(|r| r.pin_root.clone())
        .unwrap_or_else(|| LabOptions::pin_root_of(tag));
    if pin_root.exists() {
        std::fs::remove_dir_all(&pin_root)
            .map_err(|e| LabError::Setup(format!("removing {}: {e}", pin_root.display())))?;
        removed.push(format!("pins {}", pin_root.display()));
    }
    let path = LabRecord::path(tag);
    if path.exists() {
        let _ = std::fs::remove_file(&path);
        removed.push(format!("record {}", path.display()));
    }
    Ok(removed)
}

/// One reachability matrix per port/protocol, as upstream's e2e tests print them:
/// rows = from, columns = to, `.` allowed, `X` blocked, blank = not probed.
pub fn matrix(probes: &[Probe]) -> String {
    let mut out = String::new();
    let mut keys: Vec<(u16, String)> = probes.iter().map(|p| (p.port, p.protocol.clone())).collect();
    keys.sort();
    keys.dedup();
    let mut pods: Vec<String> = probes.iter().flat_map(|p| [p.from.clone(), p.to.clone()]).collect();
    pods.sort();
    pods.dedup();
    let width = pods.iter().map(String::len).max().unwrap_or(0);
    for (port, protocol) in keys {
        out.push_str(&format!("{port}/{protocol}\n"));
        out.push_str(&format!("{:width$}", ""));
        for (i, _) in pods.iter().enumerate() {
            out.push_str(&format!(" {i:>2}"));
        }
        out.push('\n');
        for (i, from) in pods.iter().enumerate() {
            out.push_str(&format!("{from:width$}"));
            for to in &pods {
                let cell = probes
                    .iter()
                    .find(|p| &p.from == from && &p.to == to && p.port == port && p.protocol == protocol)
                    .map(|p| if p.result == "allowed" { "." } else { "X" })
                    .unwrap_or(" ");
                out.push_str(&format!("  {cell}"));
            }
            out.push_str(&format!("   ({i})\n"));
        }
        out.push('\n');
    }
    out
}

/// Lab addresses: the node takes the first host address of the pod CIDR, pods the next free ones
/// in the order they are first seen.
#[derive(Clone, Debug)]
pub struct AddressPool {
    cidr: Ipv4Net,
    next_host: u32,
}

impl AddressPool {
    pub fn new(cidr: Ipv4Net) -> Self {
        Self { cidr, next_host: 2 }
    }

    pub fn node_addr(&self) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(u32::from(self.cidr.network()) + 1))
    }

    /// The next address nobody has (`taken`), or None when the CIDR is used up.
    pub fn allocate(&mut self, taken: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
        let size = 1u64 << (32 - u32::from(self.cidr.prefix_len()));
        while u64::from(self.next_host) + 1 < size {
            let candidate = IpAddr::V4(std::net::Ipv4Addr::from(
                u32::from(self.cidr.network()) + self.next_host,
            ));
            self.next_host += 1;
            if !taken(&candidate) {
                return Some(candidate);
            }
        }
        None
    }

    fn used(&self) -> usize {
        self.next_host as usize
    }
}

/// What a lab makes of `loaded` when it starts, without building anything: pods that pin no
/// address get the one the lab would give them, and the node has the lab's node address. Explain
/// uses it so that its answers are about the same addresses `lab run` probes.
pub fn lab_state(loaded: &Loaded, pod_cidr: Ipv4Net, legacy_default_deny: bool) -> State {
    let mut pool = AddressPool::new(pod_cidr);
    let mut state = State {
        node_addrs: vec![pool.node_addr()],
        legacy_default_deny,
        ..loaded.to_state()
    };
    for pod in &loaded.pods {
        if pod.ips.is_empty() {
            let taken = |ip: &IpAddr| state.pods.values().any(|p| p.ips.contains(ip));
            if let Some(ip) = pool.allocate(taken)
                && let Some(p) = state.pods.get_mut(&pod.object_ref())
            {
                p.ips = vec![ip];
            }
        }
    }
    state
}

/// A short stable hash for interface names (15-byte limit).
fn fxhash(s: &str) -> u32 {
    s.bytes()
        .fold(0x811c9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x01000193))
}

/// Waits up to `ms` for `fd` to become readable.
fn readable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn start_listeners(ns: &str, pod: &Pod) -> Result<Listeners, LabError> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let reply = format!("{}/{}\n", pod.namespace, pod.name).into_bytes();
    for port in &pod.ports {
        let (ns, stop, reply, number, protocol) =
            (ns.to_string(), stop.clone(), reply.clone(), port.port, port.protocol);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(std::thread::spawn(move || {
            let bound = netns::enter(&ns)
                .map_err(|e| e.to_string())
                .and_then(|()| match protocol {
                    Protocol::Tcp => TcpListener::bind(("::", number))
                        .or_else(|_| TcpListener::bind(("0.0.0.0", number)))
                        .map(Either::Tcp)
                        .map_err(|e| e.to_string()),
                    Protocol::Udp => UdpSocket::bind(("::", number))
                        .or_else(|_| UdpSocket::bind(("0.0.0.0", number)))
                        .map(Either::Udp)
                        .map_err(|e| e.to_string()),
                    Protocol::Sctp => Err("skipped".into()),
                });
            let socket = match bound {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(if e == "skipped" { Ok(()) } else { Err(e) });
                    return;
                }
            };
            serve(socket, &stop, &reply);
        }));
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(LabError::Setup(format!(
                    "listener {}:{number}/{protocol}: {e}",
                    pod.name
                )));
            }
            Err(_) => {
                return Err(LabError::Setup(format!(
                    "listener {}:{number}/{protocol} did not start",
                    pod.name
                )));
            }
        }
    }
    Ok(Listeners { stop, threads })
}

enum Either {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn serve(socket: Either, stop: &AtomicBool, reply: &[u8]) {
    match socket {
        Either::Tcp(listener) => {
            let fd = listener.as_raw_fd();
            while !stop.load(Ordering::Relaxed) {
                if !readable(fd, 100) {
                    continue;
                }
                if let Ok((mut conn, _)) = listener.accept() {
                    let _ = conn.write_all(reply);
                }
            }
        }
        Either::Udp(sock) => {
            let fd = sock.as_raw_fd();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if !readable(fd, 100) {
                    continue;
                }
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        }
    }
}

/// Connects (TCP: and reads the reply; UDP: and waits for the echo) within `timeout`.
pub fn connect(addr: SocketAddr, protocol: Protocol, timeout: Duration) -> bool {
    match protocol {
        Protocol::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            let _ = stream.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 256];
            matches!(stream.read(&mut buf), Ok(n) if n > 0)
        }
        Protocol::Udp => {
            let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let Ok(sock) = UdpSocket::bind(bind) else { return false };
            let _ = sock.set_read_timeout(Some(timeout));
            if sock.send_to(b"npc-probe", addr).is_err() {
                return false;
            }
            let mut buf = [0u8; 64];
            matches!(sock.recv_from(&mut buf), Ok((n, from)) if from == addr && &buf[..n] == b"npc-probe")
        }
        Protocol::Sctp => false,
    }
}

/// Pod CIDR helper for callers that take a string.
pub fn parse_pod_cidr(s: &str) -> Result<Ipv4Net, String> {
    match s.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => Ok(n.trunc()),
        Ok(IpNet::V6(_)) => Err(format!(
            "--pod-cidr {s}: the lab allocates IPv4 addresses; pin IPv6 ones in status.podIPs"
        )),
        Err(_) => Err(format!("--pod-cidr {s:?} is not a CIDR")),
    }
}
