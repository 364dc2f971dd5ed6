//! What a running lab writes down (`/run/npc/lab-<name>.json`) so that `lab probe` and `lab down`
//! in other processes can find it, the probes made from that record, and clean-up after a crash.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use npc_common::DropKey;
use npc_policy::model::Protocol;
use serde::{Deserialize, Serialize};

use super::{
    LabError, LabOptions, Probe, connect,
    dns::{Lookup, Transport},
    netns,
};
use crate::datapath::pinned_drops;

/// A running lab as `lab up` writes it down for `lab probe` and `lab down` (other processes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabRecord {
    pub pid: u32,
    pub tag: String,
    pub pin_root: PathBuf,
    pub node_netns: String,
    pub probe_timeout_ms: u64,
    pub pods: Vec<RecordPod>,
    /// Service ports the lab's kube-proxy rules serve, to probe through their ClusterIP.
    #[serde(default)]
    pub services: Vec<RecordService>,
    /// The kube-system/kube-dns ClusterIP, when the lab has that Service.
    #[serde(default)]
    pub dns: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordService {
    /// `svc/ns/name`, as probes name it.
    pub id: String,
    /// The IPv4 ClusterIP (kube-proxy's rules in the lab are IPv4).
    pub vip: IpAddr,
    pub ports: Vec<RecordServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordServicePort {
    pub port: u16,
    pub protocol: String,
    /// The backends' ports it reaches (a drop there, at the backend's ingress, proves a block too).
    pub targets: Vec<u16>,
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
    ///
    /// "Blocked" is proven, not inferred: a probe that gets no answer counts as blocked only when
    /// the datapath's drop counter for its port moved; otherwise the fabric is broken and this
    /// says so (in a lab that does not enforce, nothing can be proven and none is asked).
    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        let before = self.drops()?;
        let ok = self.probe_unproven(from, to, port, protocol)?;
        if !ok {
            self.prove_blocked(before.as_ref(), &[(vec![port], protocol, 1)])?;
        }
        Ok(ok)
    }

    fn probe_unproven(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        let src = self.pod(from)?;
        let dst = self.pod(to)?;
        let addr =
            probe_addr(src, dst).ok_or_else(|| LabError::Setup(format!("{from} and {to} share no address family")))?;
        let timeout = Duration::from_millis(self.probe_timeout_ms);
        Ok(netns::run_in(&src.netns, || {
            connect(SocketAddr::new(addr, port), protocol, timeout)
        })?)
    }

    /// One probe through a Service's ClusterIP (`to` is `svc/ns/name`), proven like [`Self::probe`]:
    /// a block must have moved the drop counter of the Service port (the client's egress) or of
    /// a target port (the backend's ingress).
    pub fn probe_service(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        let (addr, targets) = self.service_port(to, port, protocol)?;
        let before = self.drops()?;
        let ok = self.connect_from(from, addr, port, protocol)?;
        if !ok {
            let mut ports = targets;
            ports.push(port);
            self.prove_blocked(before.as_ref(), &[(ports, protocol, 1)])?;
        }
        Ok(ok)
    }

    /// Resolves `name` from inside pod `from` through the kube-dns ClusterIP, as a pod's resolver
    /// does (over UDP, or TCP as resolvers retry truncated answers). No reply is proven like a
    /// blocked probe (a drop at port 53 or at kube-dns's target port); a lab without kube-dns is an
    /// error.
    pub fn resolve(&self, from: &str, name: &str, transport: Transport) -> Result<Lookup, LabError> {
        let server = self
            .dns
            .ok_or_else(|| LabError::Setup("the lab has no kube-system/kube-dns Service to resolve with".into()))?;
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let (_, targets) = self.service_port("svc/kube-system/kube-dns", 53, protocol)?;
        let src = self.pod(from)?;
        let timeout = Duration::from_millis(self.probe_timeout_ms);
        let before = self.drops()?;
        let got = netns::run_in(&src.netns, || {
            super::dns::resolve(SocketAddr::new(server, 53), name, transport, timeout)
        })?;
        if got == Lookup::NoReply {
            let mut ports = targets;
            ports.push(53);
            self.prove_blocked(before.as_ref(), &[(ports, protocol, 1)])?;
        }
        Ok(got)
    }

    fn service_port(&self, id: &str, port: u16, protocol: Protocol) -> Result<(IpAddr, Vec<u16>), LabError> {
        let svc = self
            .services
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| LabError::Setup(format!("no Service {id} in the lab (or none with endpoints)")))?;
        let p = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol.as_str())
            .ok_or_else(|| LabError::Setup(format!("{id} serves no {port}/{protocol} with endpoints")))?;
        Ok((svc.vip, p.targets.clone()))
    }

    fn connect_from(&self, from: &str, addr: IpAddr, port: u16, protocol: Protocol) -> Result<bool, LabError> {
        let src = self.pod(from)?;
        let timeout = Duration::from_millis(self.probe_timeout_ms);
        Ok(netns::run_in(&src.netns, || {
            connect(SocketAddr::new(addr, port), protocol, timeout)
        })?)
    }

    /// Every ordered pair of distinct pods, on every port/protocol the destination declares
    /// (SCTP aside: no SCTP sockets on these kernels; the datapath tests cover it), and every pod
    /// with an IPv4 address to every Service port, through the ClusterIP; concurrently.
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
        for svc in &self.services {
            for p in &svc.ports {
                let Some(protocol) = Protocol::parse(&p.protocol).filter(|p| *p != Protocol::Sctp) else {
                    continue;
                };
                for src in self.pods.iter().filter(|s| s.ips.iter().any(IpAddr::is_ipv4)) {
                    plan.push((src.id.as_str(), svc.id.as_str(), p.port, protocol));
                }
            }
        }
        plan.sort();
        plan.dedup();
        let before = self.drops()?;
        let results: Vec<Result<bool, LabError>> = std::thread::scope(|s| {
            let handles: Vec<_> = plan
                .iter()
                .map(|(from, to, port, protocol)| {
                    s.spawn(move || match self.service_port(to, *port, *protocol) {
                        Ok((vip, _)) => self.connect_from(from, vip, *port, *protocol),
                        Err(_) => self.probe_unproven(from, to, *port, *protocol),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("a probe thread panicked".into())))
                })
                .collect()
        });
        let probes: Vec<Probe> = plan
            .into_iter()
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
            .collect::<Result<_, LabError>>()?;
        // Probes run at once, so drops are proven per port and protocol: every blocked probe
        // drops at least its first packet.
        // A Service probe's drop is at its port or at a target port.
        let mut blocked: BTreeMap<(Vec<u16>, Protocol), usize> = BTreeMap::new();
        for p in probes.iter().filter(|p| p.result == "blocked") {
            let protocol = Protocol::parse(&p.protocol).expect("we wrote it");
            let mut ports = match self.service_port(&p.to, p.port, protocol) {
                Ok((_, targets)) => targets,
                Err(_) => Vec::new(),
            };
            ports.push(p.port);
            ports.sort();
            ports.dedup();
            *blocked.entry((ports, protocol)).or_default() += 1;
        }
        let expected: Vec<(Vec<u16>, Protocol, u64)> =
            blocked.into_iter().map(|((p, pr), n)| (p, pr, n as u64)).collect();
        self.prove_blocked(before.as_ref(), &expected)?;
        Ok(probes)
    }

    /// The drop counters of this lab's datapath (None when it enforces nothing).
    fn drops(&self) -> Result<Option<BTreeMap<DropKey, u64>>, LabError> {
        if !self.pin_root.join(npc_common::map_names::DROPS).exists() {
            return Ok(None);
        }
        Ok(Some(pinned_drops(&self.pin_root)?))
    }

    /// Checks that at least `n` drops were counted on each (any of `ports`, protocol) since
    /// `before`.
    fn prove_blocked(
        &self,
        before: Option<&BTreeMap<DropKey, u64>>,
        expected: &[(Vec<u16>, Protocol, u64)],
    ) -> Result<(), LabError> {
        let (Some(before), Some(after)) = (before, self.drops()?) else {
            return Ok(());
        };
        for (ports, protocol, n) in expected {
            let counted = |m: &BTreeMap<DropKey, u64>| -> u64 {
                m.iter()
                    // A port nothing in the cluster names counts under 0 (the label bound).
                    .filter(|(k, _)| (ports.contains(&k.dport) || k.dport == 0) && k.protocol == protocol.number())
                    .map(|(_, v)| *v)
                    .sum()
            };
            let moved = counted(&after).saturating_sub(counted(before));
            if moved < *n {
                return Err(LabError::Setup(format!(
                    "{n} probes on {ports:?}/{protocol} got no answer, but the datapath counted only {moved} drops there: \
                     the fabric is broken, not policy"
                )));
            }
        }
        Ok(())
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
        netns::delete(&ns)?;
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
