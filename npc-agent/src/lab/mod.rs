//! The lab: the real datapath on one host, no cluster.
//!
//! A node network namespace holds a bridge (no route anywhere else: nothing leaks off the
//! machine); each Pod gets a namespace and a veth to the bridge, and listeners on its declared
//! container ports (TCP: accept, reply, close; UDP: echo). The agent's datapath attaches to the
//! host-side veths inside the node namespace and enforces exactly as on a node.
pub mod dns;
mod kube_proxy;
mod listeners;
mod matrix;
pub mod netns;
mod record;
pub mod walkthrough;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net};
use npc_policy::{
    files::Loaded,
    model::{ObjectRef, Pod, Protocol, State},
    service::Service,
};
use serde::Serialize;

pub use self::{
    listeners::connect,
    matrix::matrix,
    record::{LabRecord, RecordPod, RecordService, RecordServicePort, down, probe_addr},
};
use self::{
    listeners::{Listeners, start_listeners},
    netns::{Netns, NetnsError},
};
use crate::{
    datapath::{Datapath, DatapathError, SyncStats, ifindex_of},
    node::{
        attacher::{AttachError, Attacher},
        enforcer::{Enforcer, NodeOptions},
        metrics::Metrics,
    },
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
    /// Services without a pinned `clusterIP` get theirs from here.
    pub service_cidr: Ipv4Net,
    pub pin_root: PathBuf,
    pub legacy_default_deny: bool,
    /// Run the in-process agent (the default). Without it the lab is only the fabric (node,
    /// bridge, pods, listeners): for tests that run `npc-agent run` against it instead.
    pub enforce: bool,
    /// How long a probe waits before calling a connection blocked.
    pub probe_timeout: Duration,
    /// The node this lab is, in a larger cluster. `None` (the default): every pod in the
    /// manifests is wired here. `Some(node)`: a pod whose `spec.nodeName` names another node is
    /// only in the cluster (a policy peer, a Service backend: what the agent compiles), not
    /// wired or probed, and needs a pinned `status.podIP`; the rest are wired here as `node`'s.
    /// For benchmarks and tests of clusters larger than one host can wire.
    pub node_name: Option<String>,
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
            service_cidr: DEFAULT_SERVICE_CIDR.parse().expect("valid literal"),
            pin_root: Self::pin_root_of(tag),
            legacy_default_deny: false,
            enforce: true,
            probe_timeout: Duration::from_millis(1500),
            node_name: None,
        }
    }
}

/// kube-apiserver's `--service-cluster-ip-range` in most clusters (and kubeadm's default).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";

struct LabPod {
    ns: Netns,
    veth: String,
    ifindex: u32,
}

pub struct Lab {
    opts: LabOptions,
    // Field order is drop order: listeners before the namespaces they live in.
    listeners: BTreeMap<ObjectRef, Listeners>,
    pods: BTreeMap<ObjectRef, LabPod>,
    /// The node agent's loop, turned in the node namespace; None when the lab does not enforce
    /// (`LabOptions::enforce`).
    enforcer: Option<Enforcer>,
    node: Netns,
    state: State,
    addresses: AddressPool,
    node_addr: IpAddr,
    /// The ClusterIPs the lab gave Services that pin none (kept while the Service lives).
    cluster_ips: BTreeMap<ObjectRef, IpAddr>,
    /// Whether kube-proxy's rules were ever written (from then on they follow every change).
    nat_applied: bool,
    /// What the lab's kube-dns pods answer.
    names: dns::Names,
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
        let addresses = AddressPool::new(opts.pod_cidr);
        let node_addr = addresses.node_addr();
        node.run(|| {
            netns::add_bridge(
                "br0",
                IpNet::new(node_addr, opts.pod_cidr.prefix_len()).expect("prefix of the pod CIDR"),
            )?;
            // As on a kube-proxy node: the node routes pod → VIP → backend, and bridged frames
            // (a backend's reply to a client on the same bridge) meet netfilter, which undoes the
            // DNAT (br_netfilter).
            netns::set_sysctl("net/ipv4/ip_forward", "1")?;
            netns::set_sysctl("net/bridge/bridge-nf-call-iptables", "1")
        })??;
        let enforcer = if opts.enforce {
            let _ = std::fs::remove_dir_all(&opts.pin_root);
            let datapath = Datapath::load(&opts.pin_root)?;
            // The node agent's view: netlink in the node namespace, as on a Kubernetes node.
            let attacher = node.run(Attacher::new)??;
            let node_opts = NodeOptions {
                node_name: opts.node_name.clone(),
                legacy_default_deny: opts.legacy_default_deny,
                // A pod the lab just wired has said nothing yet: give the bridge time to learn it.
                resolve_wait: Duration::from_secs(3),
            };
            Some(Enforcer::new(node_opts, datapath, attacher, Metrics::new()))
        } else {
            None
        };
        let state = State {
            node_addrs: vec![node_addr],
            legacy_default_deny: opts.legacy_default_deny,
            ..State::default()
        };
        let mut lab = Self {
            opts,
            listeners: BTreeMap::new(),
            pods: BTreeMap::new(),
            enforcer,
            node,
            state,
            addresses,
            node_addr,
            cluster_ips: BTreeMap::new(),
            nat_applied: false,
            names: dns::Names::default(),
        };
        lab.apply(loaded)?;
        Ok(lab)
    }

    pub fn node_addr(&self) -> IpAddr {
        self.node_addr
    }

    /// The in-process agent's datapath (panics for a lab made with `enforce: false`).
    pub fn datapath(&self) -> &Datapath {
        self.enforcer.as_ref().expect("this lab does not enforce").datapath()
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        self.enforcer
            .as_mut()
            .expect("this lab does not enforce")
            .datapath_mut()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn pod(&self, id: &ObjectRef) -> Option<&Pod> {
        self.state.pods.get(id)
    }

    /// Makes the lab match `loaded`: the fabric first (new pods wired up with listeners, gone
    /// pods torn down), then one turn of the node agent's loop in the node namespace (compile,
    /// attach through the attacher, MapSync): label and policy changes reach the running
    /// datapath, nothing restarts.
    pub fn apply(&mut self, loaded: &Loaded) -> Result<SyncStats, LabError> {
        let wanted: BTreeSet<ObjectRef> = loaded.pods.iter().map(Pod::object_ref).collect();
        let gone: Vec<ObjectRef> = self.pods.keys().filter(|p| !wanted.contains(*p)).cloned().collect();
        for id in gone {
            self.listeners.remove(&id);
            self.pods.remove(&id);
        }
        let mut pods = Vec::new();
        for pod in &loaded.pods {
            let id = pod.object_ref();
            let mut pod = pod.clone();
            if let Some(node) = &self.opts.node_name {
                if pod.node.as_ref().is_some_and(|n| n != node) {
                    // On another node: in the cluster, not on this host.
                    if pod.ips.is_empty() {
                        return Err(LabError::Setup(format!(
                            "{id}: a pod on another node ({}) needs a pinned status.podIP",
                            pod.node.as_deref().unwrap_or_default()
                        )));
                    }
                    pods.push(pod);
                    continue;
                }
                pod.node = Some(node.clone());
            }
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
                            .chain(pods.iter())
                            .any(|p| p.ips.contains(ip))
                    };
                    vec![self.addresses.allocate(taken).ok_or_else(|| {
                        LabError::Setup(format!("--pod-cidr {} has no free address left", self.opts.pod_cidr))
                    })?]
                }
            };
            if self.pods.contains_key(&id) {
                if self.state.pods.get(&id).is_some_and(|old| old.ports != pod.ports) {
                    // Declared ports changed: new listeners (the old ones stop first).
                    self.listeners.remove(&id);
                    let listeners = start_listeners(self.pods[&id].ns.name(), &pod, self.dns_for(&pod))?;
                    self.listeners.insert(id.clone(), listeners);
                }
            } else {
                self.wire(&pod)?;
            }
            pods.push(pod);
        }
        let services = assign_cluster_ips(&loaded.services, self.opts.service_cidr, &mut self.cluster_ips);
        let placed = Loaded {
            pods,
            services,
            ..loaded.clone()
        };
        self.state = State {
            node_addrs: vec![self.node_addr],
            legacy_default_deny: self.opts.legacy_default_deny,
            ..placed.to_state()
        };
        if let Ok(mut names) = self.names.write() {
            *names = self
                .state
                .services
                .values()
                .filter_map(|svc| {
                    let vip = svc.vips.iter().find_map(|a| match a {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })?;
                    Some((dns::service_name(&svc.namespace, &svc.name), vip))
                })
                .collect();
        }
        if !self.state.services.is_empty() || self.nat_applied {
            let table = kube_proxy::nat_table(&self.state);
            self.node.run(|| netns::iptables_restore(&table))??;
            self.nat_applied = true;
        }
        let Some(enforcer) = self.enforcer.as_mut() else {
            return Ok(SyncStats::default());
        };
        let stats = self.node.run(|| enforcer.turn(&placed))??;
        // The attacher found each pod the way a node finds it (route, neighbour, bridge FDB),
        // never by the name the lab gave it: it must have found what the lab wired.
        for (id, wired) in &self.pods {
            match enforcer.link(id) {
                Some(link) if link.name == wired.veth => {}
                Some(link) => {
                    return Err(LabError::Setup(format!(
                        "the attacher found {} for {id}, but the lab wired {}",
                        link.name, wired.veth
                    )));
                }
                None => return Err(LabError::Setup(format!("{id}: not attached (see the log)"))),
            }
        }
        Ok(stats)
    }

    /// The cluster DNS table for a pod that is a kube-dns pod (label `k8s-app=kube-dns`).
    fn dns_for(&self, pod: &Pod) -> Option<dns::Names> {
        (pod.labels.get("k8s-app").map(String::as_str) == Some("kube-dns")).then(|| self.names.clone())
    }

    /// A namespace, a veth into the bridge, addresses and listeners.
    fn wire(&mut self, pod: &Pod) -> Result<(), LabError> {
        let index = self.pods.len() + self.listeners.len() + self.addresses.used();
        let ns = Netns::create(&format!("{}-{}-{}", self.opts.tag, pod.namespace, pod.name))?;
        let veth = format!("lxc{:08x}", fxhash(&format!("{}/{}/{index}", pod.namespace, pod.name)));
        let addrs: Vec<IpNet> = pod
            .ips
            .iter()
            .map(|addr| match addr {
                IpAddr::V4(_) => IpNet::new(*addr, self.opts.pod_cidr.prefix_len()),
                IpAddr::V6(_) => IpNet::new(*addr, 64),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| LabError::Setup(format!("{}/{}: {e}", pod.namespace, pod.name)))?;
        let ifindex = self.node.run(|| {
            netns::add_veth_to_pod(&veth, "br0", &ns, "eth0", &addrs)?;
            for addr in pod.ips.iter().filter(|a| a.is_ipv6()) {
                // The node has no IPv6 address of its own on the bridge: a host route (and the
                // bridge's link-local address for neighbour discovery) reaches pinned IPv6 pods.
                netns::add_host_route(*addr, "br0")?;
            }
            ifindex_of(&veth).ok_or_else(|| NetnsError::Missing(veth.clone()))
        })??;
        if pod.ips.iter().any(IpAddr::is_ipv4) {
            // Services' ClusterIPs are reached through the node, as through a pod's default route
            // on a real node (the lab's node itself routes nowhere else).
            let (cidr, via) = (IpNet::V4(self.opts.service_cidr), self.node_addr);
            ns.run(|| netns::add_route_via(cidr, via))??;
        }
        let listeners = start_listeners(ns.name(), pod, self.dns_for(pod))?;
        self.listeners.insert(pod.object_ref(), listeners);
        self.pods.insert(pod.object_ref(), LabPod { ns, veth, ifindex });
        Ok(())
    }

    /// The host-side interface of a pod.
    /// The interface the in-process agent attached a pod by (None: not attached this turn, or
    /// a lab that does not enforce).
    pub fn enforcer_link(&self, id: &ObjectRef) -> Option<&crate::node::attacher::PodLink> {
        self.enforcer.as_ref()?.link(id)
    }

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
            services: self.record_services(),
            dns: self
                .state
                .services
                .get(&ObjectRef::new("kube-system", "kube-dns"))
                .and_then(|svc| svc.vips.iter().copied().find(IpAddr::is_ipv4)),
        }
    }

    /// The Service ports worth probing: an IPv4 ClusterIP, endpoints, and a listener behind every
    /// endpoint (the lab listens on the ports a pod declares; a numeric `targetPort` it does not
    /// declare has nobody answering, which would look like a broken fabric).
    fn record_services(&self) -> Vec<RecordService> {
        let listening = |addr: IpAddr, port: u16, protocol: Protocol| {
            self.state.pods.values().any(|p| {
                self.pods.contains_key(&p.object_ref())
                    && p.ips.contains(&addr)
                    && p.ports.iter().any(|c| c.port == port && c.protocol == protocol)
            })
        };
        let mut out = Vec::new();
        for svc in self.state.services.values() {
            let Some(vip) = svc.vips.iter().copied().find(IpAddr::is_ipv4) else {
                continue;
            };
            let backends = npc_policy::service::picked_backends(&self.state, svc);
            let ports: Vec<RecordServicePort> = svc
                .ports
                .iter()
                .filter_map(|sp| {
                    let endpoints: Vec<(IpAddr, u16)> = backends
                        .iter()
                        .filter(|b| b.addr.is_ipv4())
                        .filter_map(|b| Some((b.addr, b.port_for(sp)?)))
                        .collect();
                    let served = !endpoints.is_empty()
                        && endpoints
                            .iter()
                            .all(|(addr, port)| listening(*addr, *port, sp.protocol));
                    let mut targets: Vec<u16> = endpoints.iter().map(|(_, port)| *port).collect();
                    targets.sort();
                    targets.dedup();
                    served.then(|| RecordServicePort {
                        port: sp.port,
                        protocol: sp.protocol.to_string(),
                        targets,
                    })
                })
                .collect();
            if !ports.is_empty() {
                out.push(RecordService {
                    id: format!("svc/{}", svc.object_ref()),
                    vip,
                    ports,
                });
            }
        }
        out
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

    /// Runs one more turn when the loop would on a quiet tick: an interface needs attaching, or
    /// just the counters (for `lab up`).
    pub fn tick(&mut self) -> Result<(), LabError> {
        let placed = self.placed();
        if let Some(enforcer) = self.enforcer.as_mut() {
            self.node.run(|| {
                if enforcer.needs_turn() || enforcer.retry_delay().is_some() {
                    enforcer.turn(&placed).map(drop)
                } else {
                    enforcer.refresh_counters();
                    Ok(())
                }
            })??;
        }
        Ok(())
    }

    /// Restarts the in-process agent as a node's agent restarts: the old one goes (its pinned
    /// maps and links stay, enforcing), a new one loads over the pins and turns once, resolving
    /// pods with `resolve_wait`. The turn's attach failures are left to the log and the next
    /// turns, as on a node.
    pub fn restart_agent(&mut self, resolve_wait: Duration) -> Result<SyncStats, LabError> {
        let Some(old) = self.enforcer.take() else {
            return Ok(SyncStats::default());
        };
        drop(old);
        let datapath = Datapath::load(&self.opts.pin_root)?;
        let attacher = self.node.run(Attacher::new)??;
        let node_opts = NodeOptions {
            node_name: self.opts.node_name.clone(),
            legacy_default_deny: self.opts.legacy_default_deny,
            resolve_wait,
        };
        let placed = self.placed();
        let enforcer = self
            .enforcer
            .insert(Enforcer::new(node_opts, datapath, attacher, Metrics::new()));
        Ok(self.node.run(|| enforcer.turn(&placed))??)
    }

    /// The lab's cluster as a source would hand it to the enforcer.
    fn placed(&self) -> Loaded {
        Loaded {
            namespaces: self.state.namespaces.values().cloned().collect(),
            pods: self.state.pods.values().cloned().collect(),
            policies: self.state.policies.values().cloned().collect(),
            services: self.state.services.values().cloned().collect(),
            slices: self
                .state
                .service_backends
                .iter()
                .map(|(svc, backends)| (svc.clone(), backends.clone()))
                .collect(),
            errors: Vec::new(),
        }
    }

    pub fn pin_root(&self) -> &Path {
        &self.opts.pin_root
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.listeners.clear();
        let ifindexes: Vec<u32> = self.pods.values().map(|p| p.ifindex).collect();
        if let Some(enforcer) = self.enforcer.as_mut() {
            for i in ifindexes {
                let _ = enforcer.datapath_mut().detach(i);
            }
        }
        self.pods.clear();
        if self.enforcer.take().is_some() {
            let _ = std::fs::remove_dir_all(&self.opts.pin_root);
        }
    }
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
pub fn lab_state(loaded: &Loaded, opts: &LabOptions) -> State {
    let mut pool = AddressPool::new(opts.pod_cidr);
    let services = assign_cluster_ips(&loaded.services, opts.service_cidr, &mut BTreeMap::new());
    let mut state = State {
        node_addrs: vec![pool.node_addr()],
        legacy_default_deny: opts.legacy_default_deny,
        services: services.iter().map(|s| (s.object_ref(), s.clone())).collect(),
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

/// Gives every Service that is not headless and pins no IPv4 ClusterIP one from `cidr`, as the API
/// server does from `--service-cluster-ip-range`: the first free address from .1, kept in
/// `given` for as long as the Service exists.
fn assign_cluster_ips(services: &[Service], cidr: Ipv4Net, given: &mut BTreeMap<ObjectRef, IpAddr>) -> Vec<Service> {
    given.retain(|id, _| services.iter().any(|s| s.object_ref() == *id));
    let pinned: BTreeSet<IpAddr> = services.iter().flat_map(|s| s.vips.iter().copied()).collect();
    services
        .iter()
        .map(|svc| {
            let mut svc = svc.clone();
            if svc.headless || svc.vips.iter().any(IpAddr::is_ipv4) {
                given.remove(&svc.object_ref());
                return svc;
            }
            let vip = match given.get(&svc.object_ref()) {
                Some(vip) => Some(*vip),
                None => cidr
                    .hosts()
                    .map(IpAddr::V4)
                    .find(|a| !pinned.contains(a) && !given.values().any(|g| g == a)),
            };
            if let Some(vip) = vip {
                given.insert(svc.object_ref(), vip);
                svc.vips.insert(0, vip);
            }
            svc
        })
        .collect()
}

/// A short stable hash for interface names (15-byte limit).
fn fxhash(s: &str) -> u32 {
    s.bytes()
        .fold(0x811c9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x01000193))
}

/// Pod CIDR helper for callers that take a string.
pub fn parse_pod_cidr(s: &str) -> Result<Ipv4Net, String> {
    parse_lab_cidr("--pod-cidr", s, "pin IPv6 ones in status.podIPs")
}

/// `--service-cidr` for callers that take a string.
pub fn parse_service_cidr(s: &str) -> Result<Ipv4Net, String> {
    parse_lab_cidr("--service-cidr", s, "pin IPv6 ones in spec.clusterIPs")
}

fn parse_lab_cidr(flag: &str, s: &str, hint: &str) -> Result<Ipv4Net, String> {
    match s.parse::<IpNet>() {
        Ok(IpNet::V4(n)) => Ok(n.trunc()),
        Ok(IpNet::V6(_)) => Err(format!("{flag} {s}: the lab allocates IPv4 addresses; {hint}")),
        Err(_) => Err(format!("{flag} {s:?} is not a CIDR")),
    }
}
