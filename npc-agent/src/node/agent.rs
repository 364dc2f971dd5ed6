//! `npc-agent run`: the node agent.
//!
//! ```text
//!  kube watchers ──changed──▶ Waker (select!: changes, tick, stop) ──▶ Enforcer::turn
//!  (tokio)                     changes → compile → attach/detach → MapSync → metrics
//!  /metrics /healthz /readyz (axum, tokio) ◀── Metrics ──────────────────────┘
//! ```
//!
//! Turns run on the calling thread, outside any async context: aya and the attacher's netlink
//! calls are blocking, and the attacher runs its own small runtime, which must not be nested
//! inside tokio's.
//!
//! Until the initial lists complete nothing is synced: whatever a previous agent left pinned keeps
//! being enforced. The first sync adopts the previous agent's numbering (see
//! [`npc_policy::compiler::Compiler::adopt`]) and then rewrites only what changed. On exit
//! everything stays pinned and enforcing; `--uninstall` removes it.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use kube::{Client, Config, config::KubeConfigOptions};
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::Datapath,
    node::{
        attacher::Attacher,
        enforcer::{Enforcer, NodeOptions},
        metrics::Metrics,
        wake::{Timing, Wake, Waker},
    },
    source::kube::KubeSource,
};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub metrics_addr: SocketAddr,
    pub pin_root: PathBuf,
    pub legacy_default_deny: bool,
    pub timing: Timing,
}

/// Hands the heap the initial lists freed back to the system. The lists deserialize every object
/// of the cluster (JSON, k8s-openapi structs, fingerprints) before it is stripped to the model:
/// without this, the agent's resident size after start is its peak during the lists, not what it
/// holds. (The agent's allocator is mimalloc, see main.rs; it would purge on its own, later.)
fn release_freed_memory() {
    // SAFETY: no preconditions; it frees unused pages of every thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
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

/// Runs the agent until `stop` is cancelled.
pub fn run(opts: AgentOptions, stop: CancellationToken) -> anyhow::Result<()> {
    run_with(opts, stop, Metrics::new())
}

/// [`run`], reporting into `metrics` (tests read them directly).
pub fn run_with(opts: AgentOptions, stop: CancellationToken, metrics: Metrics) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(opts.metrics_addr))
        .with_context(|| format!("listening on --metrics-addr {}", opts.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    runtime.spawn(crate::node::http::serve(listener, metrics.clone()));

    let client = runtime.block_on(client(opts.kubeconfig.as_deref()))?;
    let (changed_tx, changed) = tokio::sync::mpsc::unbounded_channel();
    let stores = {
        let _guard = runtime.enter();
        KubeSource::start(client, changed_tx, metrics.clone())
    };

    let datapath = Datapath::load(&opts.pin_root)
        .with_context(|| format!("loading the datapath under {}", opts.pin_root.display()))?;
    let attacher = Attacher::new().context("opening netlink")?;
    let node = NodeOptions {
        node_name: Some(opts.node_name.clone()),
        legacy_default_deny: opts.legacy_default_deny,
        resolve_wait: Duration::from_millis(500),
    };
    let mut enforcer = Enforcer::new(node, datapath, attacher, metrics.clone());

    // First sync only after every initial list: a partial view would drop allowed traffic.
    tracing::info!("waiting for the initial lists of pods, namespaces and network policies");
    let ready = runtime.block_on(async {
        tokio::select! {
            r = stores.wait_until_ready() => r.map(|()| true),
            () = stop.cancelled() => Ok(false),
        }
    })?;
    if !ready {
        return Ok(());
    }

    let mut waker = Waker::new(changed, stop, opts.timing)?;
    let turn = |enforcer: &mut Enforcer| {
        let (changes, errors) = stores.take();
        let _ = enforcer.turn_changes(changes, &errors);
    };
    turn(&mut enforcer);
    release_freed_memory();
    loop {
        waker.retry_after(enforcer.retry_delay());
        match waker.wait() {
            Wake::Changed | Wake::Retry => turn(&mut enforcer),
            // No event: compile again only when an interface needs attaching (a pod that could
            // not be attached yet, or whose interface was recreated); otherwise just counters.
            Wake::Tick if enforcer.needs_turn() => turn(&mut enforcer),
            Wake::Tick => enforcer.refresh_counters(),
            Wake::Stop => break,
        }
    }
    tracing::info!("stopping; the datapath stays pinned and keeps enforcing");
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
