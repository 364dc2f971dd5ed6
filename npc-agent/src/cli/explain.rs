//! `npc-agent explain`: why a connection is allowed or blocked, from manifests or a live cluster.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use npc_policy::{
    explain::{self, Endpoint},
    files::Loaded,
    model::{Protocol, State},
};

use super::{LabArgs, Output, load_manifests};
use crate::{lab, node::metrics::Metrics, source::kube::KubeSource};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A directory of manifests (Namespaces, Pods, NetworkPolicies, Services), as for `lab`. Without
    /// it, the cluster of --kubeconfig (else $KUBECONFIG, else in-cluster).
    #[arg(long)]
    pub(super) manifests: Option<PathBuf>,
    #[arg(long, conflicts_with = "manifests")]
    pub(super) kubeconfig: Option<PathBuf>,
    /// NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub(super) from: String,
    /// NAMESPACE/POD, svc/NAMESPACE/NAME (through its ClusterIP: each backend explained) or an IP
    /// address.
    #[arg(long)]
    pub(super) to: String,
    #[arg(long)]
    pub(super) port: u16,
    #[arg(long, default_value = "TCP", value_parser = ["TCP", "UDP", "SCTP"])]
    pub(super) protocol: String,
    #[command(flatten)]
    pub(super) lab: LabArgs,
    #[arg(long, value_enum, default_value = "table")]
    pub(super) output: Output,
}

pub(super) fn explain(args: Args) -> anyhow::Result<()> {
    let state = match args.manifests {
        Some(dir) => {
            let loaded = load_manifests(&dir)?;
            // Pods without status.podIP get the addresses a lab would give them.
            lab::lab_state(&loaded, &super::lab::options("explain", &args.lab)?)
        }
        None => {
            let loaded = cluster_snapshot(args.kubeconfig.as_deref())?;
            for e in &loaded.errors {
                eprintln!("error: {e} (ignored)");
            }
            State {
                legacy_default_deny: args.lab.legacy_default_deny,
                ..loaded.to_state()
            }
        }
    };
    let from = Endpoint::parse(&args.from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let to = Endpoint::parse(&args.to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let protocol = Protocol::parse(&args.protocol).context("--protocol")?;
    let e = explain::explain(&state, &from, &to, protocol, args.port)?;
    match args.output {
        Output::Table => print!("{e}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
    }
    Ok(())
}

/// One consistent read of the cluster's pods, namespaces and policies (the agent's own watchers,
/// stopped after their first list).
fn cluster_snapshot(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Loaded> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = crate::node::agent::client(kubeconfig).await?;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let stores = KubeSource::start(client, tx, Metrics::new());
        tokio::time::timeout(Duration::from_secs(30), stores.wait_until_ready())
            .await
            .context("the API server did not answer the lists within 30 s")??;
        Ok(stores.snapshot())
    })
}
