//! `npc-agent run`: the node agent.
//!
//! ```text
//!  kube watchers ──changed──▶ agent loop (one thread): snapshot stores → compile → attach/detach
//!  (tokio)                    local pods (netlink) → MapSync → metrics          ▲
//!  /metrics /healthz /readyz (axum, tokio) ◀── Metrics ───────────────────────────┘
//! ```
//!
//! The loop is a plain thread: aya and the attacher's netlink calls are blocking, and the
//! attacher runs its own small runtime, which must not be nested inside tokio's.
//!
//! Until the initial lists complete nothing is synced: whatever a previous agent left pinned keeps
//! being enforced. The first sync adopts the previous agent's numbering (see
//! [`Compiler::adopt`]) and then rewrites only what changed. On exit everything stays pinned and
//! enforcing; `--uninstall` removes it.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use kube::{Client, Config, config::KubeConfigOptions};

use crate::{
    attacher::{Attacher, PodLink},
    compiler::Compiler,
    datapath::{Datapath, ifindex_of},
    kube_source::KubeStores,
    metrics::Metrics,
    model::{ObjectRef, State},
    observer::{Observer, SharedNames},
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub metrics_addr: SocketAddr,
    pub pin_root: PathBuf,
    pub legacy_default_deny: bool,
    /// Events closer together than this are compiled together.
    pub coalesce: Duration,
    /// Even without events, look again this often (interfaces recreated, counters for metrics).
    pub resync: Duration,
}

/// `--kubeconfig`, else `$KUBECONFIG`, else in-cluster (and kube's usual fallbacks).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig, no $KUBECONFIG, and not in a cluster")?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs the agent until `stop` is set.
pub fn run(opts: AgentOptions, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    run_with(opts, stop, Metrics::new())
}

/// [`run`], reporting into `metrics` (tests read them directly).
pub fn run_with(opts: AgentOptions, stop: Arc<AtomicBool>, metrics: Metrics) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(opts.metrics_addr))
        .with_context(|| format!("listening on --metrics-addr {}", opts.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    runtime.spawn(serve(listener, metrics.clone()));

    let client = runtime.block_on(client(opts.kubeconfig.as_deref()))?;
    let (changed_tx, changed) = std::sync::mpsc::channel();
    let stores = {
        let _guard = runtime.enter();
        KubeStores::start(client, changed_tx, metrics.clone())
    };

    let mut datapath = Datapath::load(&opts.pin_root)
        .with_context(|| format!("loading the datapath under {}", opts.pin_root.display()))?;
    let attacher = Attacher::new().context("opening netlink")?;
    let names = SharedNames::default();
    let _observer = datapath
        .take_events()
        .map(|events| Observer::start(events, names.clone(), metrics.clone(), 10));
    for (map, capacity) in [
        ("endpoints", npc_common::capacity::ENDPOINTS),
        ("identities", npc_common::capacity::IDENTITIES),
        ("cidrs", npc_common::capacity::CIDRS),
        ("policy", npc_common::capacity::POLICY),
        ("port_ranges", npc_common::capacity::PORT_RANGES),
        ("conntrack", npc_common::capacity::CONNTRACK),
    ] {
        metrics.set_map_capacity(map, capacity);
    }

    // First sync only after every initial list: a partial view would drop allowed traffic.
    tracing::info!("waiting for the initial lists of pods, namespaces and network policies");
    let ready = runtime.block_on(async {
        tokio::select! {
            r = stores.wait_until_ready() => r.map(|()| true),
            () = wait_for_flag(&stop) => Ok(false),
        }
    })?;
    if !ready {
        return Ok(());
    }

    let mut agent = Agent {
        opts,
        stores,
        datapath: &mut datapath,
        attacher,
        compiler: Compiler::default(),
        adopted: false,
        links: BTreeMap::new(),
        unattached: 0,
        names,
        conntrack_counted: None,
        metrics: metrics.clone(),
    };
    agent.turn();
    while !stop.load(Ordering::Relaxed) {
        match wait_for_change(&changed, agent.opts.coalesce, agent.opts.resync, &stop) {
            Wake::Changed => agent.turn(),
            // No event: compile again only when an interface needs attaching (a pod that could
            // not be attached yet, or whose interface was recreated); otherwise just counters.
            Wake::Tick if agent.needs_attach() => agent.turn(),
            Wake::Tick => agent.refresh_counters(),
            Wake::Stop => break,
        }
    }
    tracing::info!("stopping; the datapath stays pinned and keeps enforcing");
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn wait_for_flag(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often the agent counts the conntrack table for `npc_map_entries{map="conntrack"}`.
const CONNTRACK_COUNT_EVERY: Duration = Duration::from_secs(30);

enum Wake {
    Changed,
    Tick,
    Stop,
}

/// Waits for a change (coalescing a burst into one), the resync period, or the stop flag.
fn wait_for_change(changed: &Receiver<()>, coalesce: Duration, resync: Duration, stop: &AtomicBool) -> Wake {
    let deadline = Instant::now() + resync;
    while Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return Wake::Stop;
        }
        match changed.recv_timeout(Duration::from_millis(100).min(resync)) {
            Ok(()) => {
                // A burst (a relist, a rollout) becomes one compile.
                let quiet_until = Instant::now() + coalesce;
                while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
                    if changed.recv_timeout(left).is_err() {
                        break;
                    }
                }
                return Wake::Changed;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Wake::Stop,
        }
    }
    if stop.load(Ordering::Relaxed) {
        Wake::Stop
    } else {
        Wake::Tick
    }
}

struct Agent<'a> {
    opts: AgentOptions,
    stores: KubeStores,
    datapath: &'a mut Datapath,
    attacher: Attacher,
    compiler: Compiler,
    adopted: bool,
    /// Local pods we attached to, and where.
    links: BTreeMap<ObjectRef, (IpAddr, PodLink)>,
    /// Local pods with an address that could not be attached on the last turn.
    unattached: usize,
    /// For the observer's log lines.
    names: SharedNames,
    /// When the conntrack table was last counted.
    conntrack_counted: Option<Instant>,
    metrics: Metrics,
}

impl Agent<'_> {
    fn turn(&mut self) {
        let start = Instant::now();
        self.metrics
            .beat(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        let loaded = self.stores.snapshot();
        for e in &loaded.errors {
            tracing::warn!("{e} (ignored; everything else is enforced)");
        }
        self.metrics.set_rejected("NetworkPolicy", loaded.rejected_policies());
        self.metrics.set_rejected(
            "Pod",
            loaded
                .errors
                .iter()
                .filter(|e| e.object.as_deref().is_some_and(|o| o.starts_with("Pod ")))
                .count(),
        );
        let node_addrs = self.attacher.local_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing this node's addresses");
            Vec::new()
        });
        let state = State {
            node_name: Some(self.opts.node_name.clone()),
            node_addrs,
            legacy_default_deny: self.opts.legacy_default_deny,
            ..loaded.to_state()
        };
        if !self.adopted {
            match self.datapath.kernel_numbering() {
                Ok((identities, cidrs)) => self.compiler.adopt(&state, &identities, &cidrs),
                Err(e) => tracing::warn!(error = %e, "reading the previous agent's maps; starting afresh"),
            }
            self.adopted = true;
        }
        let compiled = self.compiler.compile(&state);

        // Attach to every local pod with an address; forget pods that are gone.
        let mut ifindexes: BTreeMap<ObjectRef, u32> = BTreeMap::new();
        self.unattached = 0;
        for pod in compiled.maps.endpoints.keys() {
            let Some(ip) = state.pods.get(pod).and_then(|p| p.ips.first().copied()) else {
                continue; // no address yet: attached when it gets one
            };
            match self.ensure_attached(pod, ip) {
                Ok(ifindex) => {
                    ifindexes.insert(pod.clone(), ifindex);
                }
                Err(e) => {
                    self.unattached += 1;
                    self.metrics.attach_failed();
                    tracing::warn!(pod = %pod, %ip, error = %e, "cannot attach yet; retrying");
                }
            }
        }
        self.links.retain(|pod, _| ifindexes.contains_key(pod));
        let wanted: std::collections::BTreeSet<u32> = ifindexes.values().copied().collect();
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
            names.by_addr = compiled.address_owners.clone();
            names.by_ifindex = ifindexes.iter().map(|(pod, i)| (*i, pod.clone())).collect();
        }
        match self.datapath.sync(&compiled.maps, |pod| ifindexes.get(pod).copied()) {
            Ok(stats) => {
                self.metrics
                    .synced(start.elapsed().as_secs_f64(), stats.upserts + stats.deletes);
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
                tracing::error!(error = %e, "sync failed; retrying on the next turn");
            }
        }
        self.metrics
            .set_counts(state.policies.len(), ifindexes.len(), compiled.identities.len());
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
    }

    /// Whether a turn would attach something: a pod left unattached, or an interface we are
    /// attached to that is gone or was replaced (same name, new index, or no longer there).
    fn needs_attach(&self) -> bool {
        self.unattached > 0
            || self
                .links
                .values()
                .any(|(_, link)| ifindex_of(&link.name) != Some(link.ifindex))
    }

    fn refresh_counters(&mut self) {
        self.metrics
            .beat(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        if let Ok(drops) = self.datapath.drops() {
            self.metrics.observe_drops(&drops);
        }
        if let Ok(allowed) = self.datapath.allowed_connections() {
            self.metrics.observe_allowed(allowed);
        }
        // Counting the conntrack table walks all of it (up to 262k entries): not on every turn.
        let due = self
            .conntrack_counted
            .is_none_or(|at| at.elapsed() >= CONNTRACK_COUNT_EVERY);
        if due && let Ok(n) = self.datapath.conntrack_count() {
            self.metrics.set_map_entries("conntrack", n);
            self.conntrack_counted = Some(Instant::now());
        }
    }

    /// The pod's interface, attached; re-resolved when the pod's address changed or its
    /// interface was recreated.
    fn ensure_attached(&mut self, pod: &ObjectRef, ip: IpAddr) -> anyhow::Result<u32> {
        if let Some((known_ip, link)) = self.links.get(pod)
            && *known_ip == ip
            && ifindex_of(&link.name) == Some(link.ifindex)
        {
            return Ok(link.ifindex);
        }
        let link = self.attacher.resolve(ip, Duration::from_millis(500))?;
        let ifindex = self.datapath.attach(&link.name)?;
        tracing::info!(pod = %pod, %ip, interface = %link.name, ifindex, "attached");
        self.links.insert(pod.clone(), (ip, link));
        Ok(ifindex)
    }
}

/// `/metrics` (Prometheus text), `/healthz` (the agent loop is turning), `/readyz` (first sync
/// done).
async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    use axum::{Router, http::StatusCode, routing::get};
    let m = metrics.clone();
    let h = metrics.clone();
    let r = metrics;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = h.clone();
                async move {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    let last = h.last_beat();
                    // Before the first turn the loop is waiting for the lists: alive.
                    if last == 0 || now.saturating_sub(last) < 120 {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "agent loop stalled\n")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.is_ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first sync\n")
                    }
                }
            }),
        )
        .into_make_service();
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}
