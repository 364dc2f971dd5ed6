//! One turn of the node's loop: the cluster as a source sees it → State → compile → attach or
//! detach local pods (Attacher) → MapSync → metrics. The agent (kube source) and the lab (files
//! source and a fabric) both turn exactly this.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use npc_policy::{
    compiler::Incremental,
    files::{Loaded, ManifestError},
    model::{ObjectRef, State},
};

use crate::{
    datapath::{Datapath, DatapathError, SyncStats, Touched, ifindex_of},
    node::{
        attacher::{AttachError, Attacher, PodLink},
        metrics::Metrics,
        observer::{Observer, SharedNames},
        wake::retry_delay,
    },
    source::kube::Changes,
};

/// How often the conntrack tables are swept (live entries counted for
/// `npc_map_entries{map="conntrack_ipv4"}` and `{map="conntrack"}`, older entries moved; see
/// [`Datapath::conntrack_sweep`]): it walks both tables (up to 262k entries each), so not on
/// every turn. The first turn always sweeps.
const CONNTRACK_COUNT_EVERY: Duration = Duration::from_secs(30);

/// The live entries a sweep counted, as the two conntrack tables' map sizes.
fn count_conntrack(metrics: &Metrics, sweep: &crate::datapath::ConntrackSweep) {
    metrics.set_map_entries("conntrack", sweep.live_ipv6);
    metrics.set_map_entries("conntrack_ipv4", sweep.live_ipv4);
}

/// What the node is, for the compiler and the attacher.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `spec.nodeName` of the pods enforced here; None: every pod is local (the lab).
    pub node_name: Option<String>,
    pub legacy_default_deny: bool,
    /// How long a turn waits for a bridge to learn a new pod's interface before leaving it for
    /// the next turn.
    pub resolve_wait: Duration,
}

pub struct Enforcer {
    node: NodeOptions,
    datapath: Datapath,
    attacher: Attacher,
    /// The model and the compiled maps, brought up to date by each turn's changes.
    compiler: Incremental,
    adopted: bool,
    /// Local pods we attached to, and where.
    links: BTreeMap<ObjectRef, (IpAddr, PodLink)>,
    /// Local pods with an address that could not be attached on the last turn.
    unattached: usize,
    /// For the observer's log lines.
    names: SharedNames,
    conntrack_counted: Option<Instant>,
    /// Turns whose sync failed, in a row (for the retry backoff).
    failed_turns: u32,
    metrics: Metrics,
    /// Drains the verdict events while the enforcer lives.
    _observer: Option<Observer>,
}

impl Enforcer {
    /// `attacher` must be bound to the node's network namespace (it resolves pod interfaces
    /// there); turns must run on a thread in that namespace too (attaching looks names up).
    pub fn new(node: NodeOptions, mut datapath: Datapath, attacher: Attacher, metrics: Metrics) -> Self {
        let names = SharedNames::default();
        let observer = datapath
            .take_events()
            .map(|events| Observer::start(events, names.clone(), metrics.clone(), 10));
        for (map, capacity) in [
            ("endpoints", npc_common::capacity::ENDPOINTS),
            ("identities", npc_common::capacity::IDENTITIES),
            ("cidrs", npc_common::capacity::CIDRS),
            ("policy", npc_common::capacity::POLICY),
            ("port_ranges", npc_common::capacity::PORT_RANGES),
            ("conntrack", npc_common::capacity::CONNTRACK),
            ("conntrack_ipv4", npc_common::capacity::CONNTRACK4),
        ] {
            metrics.set_map_capacity(map, capacity);
        }
        // Loading swept conntrack already: that is the first count.
        let swept_at_load = datapath.take_load_sweep();
        if let Some(sweep) = &swept_at_load {
            count_conntrack(&metrics, sweep);
        }
        Self {
            node,
            datapath,
            attacher,
            compiler: Incremental::default(),
            adopted: false,
            links: BTreeMap::new(),
            unattached: 0,
            names,
            conntrack_counted: swept_at_load.map(|_| Instant::now()),
            failed_turns: 0,
            metrics,
            _observer: observer,
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// The interface a local pod was attached to on the last turn.
    pub fn link(&self, pod: &ObjectRef) -> Option<&PodLink> {
        self.links.get(pod).map(|(_, link)| link)
    }

    /// Compiles `loaded` for this node, attaches to every local pod that has an address, detaches
    /// from pods that are gone, and syncs the maps. A pod that cannot be attached yet is counted
    /// and retried on the next turn ([`Self::needs_turn`]).
    pub fn turn(&mut self, loaded: &Loaded) -> Result<SyncStats, DatapathError> {
        let state = loaded.to_state();
        self.compiler.replace(State {
            node_name: self.compiler.state().node_name.clone(),
            node_addrs: self.compiler.state().node_addrs.clone(),
            legacy_default_deny: self.compiler.state().legacy_default_deny,
            ..state
        });
        self.turn_on(&loaded.errors)
    }

    /// [`Self::turn`] for a source that knows what changed (the agent's watchers): only those
    /// objects are compiled again. `errors`: every object the source currently rejects.
    pub fn turn_changes(&mut self, changes: Changes, errors: &[ManifestError]) -> Result<SyncStats, DatapathError> {
        changes.apply(&mut self.compiler);
        self.turn_on(errors)
    }

    fn turn_on(&mut self, errors: &[ManifestError]) -> Result<SyncStats, DatapathError> {
        let start = Instant::now();
        self.beat();
        for e in errors {
            tracing::warn!("{e} (ignored; everything else is enforced)");
        }
        for kind in ["NetworkPolicy", "Pod", "Service", "EndpointSlice"] {
            self.metrics
                .set_rejected(kind, npc_policy::files::rejected(errors, kind));
        }
        let node_addrs = self.attacher.local_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing this node's addresses");
            Vec::new()
        });
        self.compiler
            .set_node(self.node.node_name.clone(), node_addrs, self.node.legacy_default_deny);
        if !self.adopted {
            match self.datapath.kernel_numbering() {
                Ok((identities, cidrs)) => self.compiler.adopt(&identities, &cidrs),
                Err(e) => tracing::warn!(error = %e, "reading the previous agent's maps; starting afresh"),
            }
            self.adopted = true;
        }
        // Borrowed out for the turn: the compiled maps are read while the rest of `self` works.
        let mut compiler = std::mem::take(&mut self.compiler);
        compiler.compile();
        let stats = compiler.stats();
        tracing::debug!(
            full = stats.full,
            pods = stats.pods,
            elapsed_ms = stats.elapsed.as_secs_f64() * 1e3,
            "compiled"
        );
        let synced = self.apply(&compiler, start);
        self.compiler = compiler;
        synced
    }

    /// Attaches, detaches and syncs what `compiler` last compiled.
    fn apply(&mut self, compiler: &Incremental, start: Instant) -> Result<SyncStats, DatapathError> {
        let (state, compiled) = (compiler.state(), compiler.compiled());
        let mut ifindexes: BTreeMap<ObjectRef, u32> = BTreeMap::new();
        self.unattached = 0;
        // By an address the pod owns: one another (newer) pod reuses leads to that pod's
        // interface. Pods without an address yet are attached when they get one.
        let local: Vec<(ObjectRef, IpAddr)> = compiled
            .maps
            .endpoints
            .keys()
            .filter_map(|pod| {
                let owned = |ip: &&IpAddr| compiled.address_owners.get(*ip) == Some(pod);
                let ip = state.pods.get(pod)?.ips.iter().find(owned).copied()?;
                Some((pod.clone(), ip))
            })
            .collect();
        // Every interface that must be looked up, at once (see `Attacher::resolve_all`).
        let stale: Vec<IpAddr> = local
            .iter()
            .filter(|(pod, ip)| self.current_link(pod, *ip).is_none())
            .map(|(_, ip)| *ip)
            .collect();
        let mut resolved: BTreeMap<IpAddr, Result<PodLink, AttachError>> = stale
            .iter()
            .copied()
            .zip(self.attacher.resolve_all(&stale, self.node.resolve_wait))
            .collect();
        let mut previous_endpoints = None;
        for (pod, ip) in &local {
            let attached = match self.current_link(pod, *ip) {
                Some(ifindex) => Ok(ifindex),
                None => match resolved.remove(ip) {
                    Some(link) => self.attach(pod, *ip, link),
                    None => Err(anyhow::anyhow!("{ip}: resolved for another pod this turn")),
                },
            };
            match attached {
                Ok(ifindex) => {
                    ifindexes.insert(pod.clone(), ifindex);
                }
                Err(e) => {
                    self.unattached += 1;
                    self.metrics.attach_failed();
                    // Never silently unenforced: the interface that enforces this address now
                    // (ours from an earlier turn, or a previous agent's, found by the endpoint
                    // it left) keeps its programs and its endpoint until a lookup succeeds.
                    let kept = self.still_enforcing(pod, *ip, &mut previous_endpoints);
                    tracing::warn!(pod = %pod, %ip, error = %e, kept_ifindex = kept, "cannot attach yet; retrying");
                    if let Some(ifindex) = kept {
                        ifindexes.insert(pod.clone(), ifindex);
                    }
                }
            }
        }
        self.links.retain(|pod, _| ifindexes.contains_key(pod));
        let wanted: BTreeSet<u32> = ifindexes.values().copied().collect();
        for ifindex in self.datapath.attached_ifindexes() {
            if !wanted.contains(&ifindex) {
                // Only our own pinned links: another tool's filters are never touched.
                if let Err(e) = self.datapath.detach(ifindex) {
                    tracing::warn!(ifindex, error = %e, "detaching from a gone pod");
                }
            }
        }

        {
            let mut names = self.names.write().expect("not poisoned");
            // Patched, not copied: the owners are every pod address of the cluster.
            match compiler.changed_owners() {
                None => names.by_addr = compiled.address_owners.clone(),
                Some(addrs) => {
                    for ip in addrs {
                        match compiled.address_owners.get(ip) {
                            Some(pod) => names.by_addr.insert(*ip, pod.clone()),
                            None => names.by_addr.remove(ip),
                        };
                    }
                }
            }
            names.services = compiled.vip_owners.clone();
            names.by_ifindex = ifindexes.iter().map(|(pod, i)| (*i, pod.clone())).collect();
        }
        let synced = self.datapath.sync_changed(
            &compiled.maps,
            Touched {
                identities: compiler.changed_identities(),
                policy: compiler.changed_policy(),
            },
            |pod| ifindexes.get(pod).copied(),
        );
        match &synced {
            Ok(stats) => {
                self.metrics
                    .synced(start.elapsed().as_secs_f64(), stats.upserts + stats.deletes);
                if stats.repaired > 0 {
                    self.metrics.maps_repaired(stats.repaired);
                    tracing::warn!(
                        entries = stats.repaired,
                        "map entries changed behind our back: rewritten"
                    );
                }
                tracing::info!(
                    pods = state.pods.len(),
                    policies = state.policies.len(),
                    endpoints = ifindexes.len(),
                    writes = stats.upserts,
                    deletes = stats.deletes,
                    "synced"
                );
            }
            Err(e) => {
                self.metrics.sync_failed();
                tracing::error!(
                    error = %e,
                    retry_in_ms = retry_delay(self.failed_turns + 1).map_or(0, |d| d.as_millis()),
                    "sync failed; retrying"
                );
            }
        }
        self.failed_turns = if synced.is_ok() {
            0
        } else {
            self.failed_turns.saturating_add(1)
        };
        self.metrics
            .set_counts(state.policies.len(), ifindexes.len(), compiled.identities.len());
        self.metrics
            .set_services(compiled.services.len(), compiled.partly_allowed.len());
        for (map, n) in [
            ("endpoints", ifindexes.len()),
            ("identities", compiled.maps.identities.len()),
            ("cidrs", compiled.maps.cidrs.len()),
            ("policy", compiled.maps.policy.len()),
            ("port_ranges", compiled.maps.port_ranges.len()),
        ] {
            self.metrics.set_map_entries(map, n);
        }
        self.refresh_counters();
        synced
    }

    /// When to turn again though nothing changed: after a failed sync, with backoff
    /// ([`retry_delay`]); None when the last turn went through.
    pub fn retry_delay(&self) -> Option<Duration> {
        retry_delay(self.failed_turns)
    }

    /// Whether a quiet tick should turn: to attach something (a pod left unattached, or an
    /// interface we are attached to that is gone or was replaced: same name, new index, or no
    /// longer there), or for the periodic full reconcile of the maps.
    pub fn needs_turn(&self) -> bool {
        self.datapath.reconcile_due()
            || self.unattached > 0
            || self
                .links
                .values()
                .any(|(_, link)| ifindex_of(&link.name) != Some(link.ifindex))
    }

    /// Reads the datapath's counters into the metrics.
    pub fn refresh_counters(&mut self) {
        self.beat();
        if let Ok(drops) = self.datapath.drops() {
            self.metrics.observe_drops(&drops);
        }
        if let Ok(allowed) = self.datapath.allowed_connections() {
            self.metrics.observe_allowed(allowed);
        }
        if let Ok(spoofed) = self.datapath.spoofed_packets() {
            self.metrics.observe_spoofed(spoofed);
        }
        if let Ok(denied) = self.datapath.denied_packets() {
            self.metrics.observe_denied_packets(denied);
        }
        let due = self
            .conntrack_counted
            .is_none_or(|at| at.elapsed() >= CONNTRACK_COUNT_EVERY);
        if due {
            match self.datapath.conntrack_sweep() {
                Ok(sweep) => {
                    count_conntrack(&self.metrics, &sweep);
                    if sweep.rewritten > 0 {
                        tracing::info!(
                            entries = sweep.rewritten,
                            "conntrack: rewrote the previous releases' entries into the current tables"
                        );
                    }
                    self.conntrack_counted = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "walking the conntrack table"),
            }
        }
    }

    fn beat(&self) {
        self.metrics
            .beat(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
    }

    /// The interface of the pod's link from an earlier turn, if it still stands for `ip`: same
    /// address, and the interface not recreated since.
    fn current_link(&self, pod: &ObjectRef, ip: IpAddr) -> Option<u32> {
        let (known_ip, link) = self.links.get(pod)?;
        (*known_ip == ip && ifindex_of(&link.name) == Some(link.ifindex)).then_some(link.ifindex)
    }

    /// Attaches to a freshly resolved interface.
    fn attach(&mut self, pod: &ObjectRef, ip: IpAddr, link: Result<PodLink, AttachError>) -> anyhow::Result<u32> {
        let link = link?;
        let ifindex = self.datapath.attach(&link.name)?;
        tracing::info!(pod = %pod, %ip, interface = %link.name, ifindex, "attached");
        self.links.insert(pod.clone(), (ip, link));
        Ok(ifindex)
    }

    /// Where `ip` is enforced now, for a pod whose interface could not be looked up this turn:
    /// its link from an earlier turn if that interface still exists, else (right after a
    /// restart) an interface with our programs whose endpoint holds the address. The endpoints
    /// and our attachments are read once per turn, on the first need (a restart may find
    /// hundreds of pods unresolved).
    fn still_enforcing(
        &self,
        pod: &ObjectRef,
        ip: IpAddr,
        previous: &mut Option<(BTreeMap<u32, npc_common::EndpointInfo>, BTreeSet<u32>)>,
    ) -> Option<u32> {
        if let Some((_, link)) = self.links.get(pod)
            && ifindex_of(&link.name) == Some(link.ifindex)
        {
            return Some(link.ifindex);
        }
        let (endpoints, attached) = previous.get_or_insert_with(|| {
            (
                self.datapath.endpoints().unwrap_or_default(),
                self.datapath.attached_ifindexes(),
            )
        });
        let addr = npc_policy::model::addr_bytes(ip);
        endpoints
            .iter()
            .find(|(ifindex, info)| attached.contains(ifindex) && info.addrs.contains(&addr))
            .map(|(ifindex, _)| *ifindex)
    }
}
