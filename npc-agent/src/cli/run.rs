//! `npc-agent run`: the node agent; `--uninstall` removes everything npc put on the node.
use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::node::{
    agent::{self, AgentOptions},
    wake::{Timing, stop_on_signals},
};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Kubeconfig file (else $KUBECONFIG, else the in-cluster service account).
    #[arg(long)]
    pub(super) kubeconfig: Option<PathBuf>,
    /// This node's name (spec.nodeName of the pods to enforce on); from the downward API.
    #[arg(long, env = "NODE_NAME", required_unless_present = "uninstall")]
    pub(super) node_name: Option<String>,
    #[arg(long, default_value = "0.0.0.0:9655")]
    pub(super) metrics_addr: std::net::SocketAddr,
    #[arg(long, default_value = crate::datapath::DEFAULT_PIN_ROOT)]
    pub(super) pin_root: PathBuf,
    /// Honour the legacy `net.beta.kubernetes.io/network-policy` DefaultDeny annotation.
    #[arg(long)]
    pub(super) legacy_default_deny: bool,
    /// Remove everything npc put on this node (programs, links, maps) and exit.
    #[arg(long)]
    pub(super) uninstall: bool,
}

pub(super) fn run(args: Args) -> anyhow::Result<()> {
    if args.uninstall {
        return uninstall(&args.pin_root);
    }
    let node_name = args.node_name.context("--node-name (or NODE_NAME) is required")?;
    let stop = stop_on_signals().context("installing signal handlers")?;
    agent::run(
        AgentOptions {
            kubeconfig: args.kubeconfig,
            node_name,
            metrics_addr: args.metrics_addr,
            pin_root: args.pin_root,
            legacy_default_deny: args.legacy_default_deny,
            timing: Timing {
                coalesce: Duration::from_millis(100),
                // A lone edit on a quiet cluster is applied after 5 ms, not the whole window.
                lone: Duration::from_millis(5),
                resync: Duration::from_secs(2),
            },
        },
        stop,
    )
}

fn uninstall(pin_root: &std::path::Path) -> anyhow::Result<()> {
    crate::datapath::uninstall(pin_root)?;
    println!("removed {} (programs detached, maps gone)", pin_root.display());
    Ok(())
}
