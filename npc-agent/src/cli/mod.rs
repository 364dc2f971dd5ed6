//! The command line: one file per subcommand.
//!
//! - `run` ([`run`]): the node agent, or `--uninstall`;
//! - `lab run | up | probe | down | walkthrough` ([`lab`]);
//! - `explain` ([`explain`]), `inspect` ([`inspect`]).
mod explain;
mod inspect;
mod lab;
mod run;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use npc_policy::files::{self, Loaded};

#[derive(Parser)]
#[command(name = "npc-agent", version, about = "eBPF Kubernetes NetworkPolicy enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node agent: watch the cluster, enforce NetworkPolicy on this node's pods.
    Run(run::Args),
    /// Run the real datapath on this host in network namespaces, no cluster needed.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Why is a connection allowed or blocked? Prints the verdict of each side and the policy
    /// rule behind it, computed from the same maps the datapath reads.
    Explain(explain::Args),
    /// The pinned maps, decoded: endpoints, identities, ipBlock classes, allow entries,
    /// tracked connections, counters.
    Inspect {
        #[arg(long, default_value = crate::datapath::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        /// List at most this many tracked connections (all are counted).
        #[arg(long, default_value_t = 50)]
        conntrack_limit: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
pub(crate) struct LabArgs {
    /// Pod addresses come from here unless a Pod pins status.podIP(s).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub(crate) pod_cidr: String,
    /// Services that pin no `spec.clusterIP` get one from here.
    #[arg(long, default_value = crate::lab::DEFAULT_SERVICE_CIDR)]
    pub(crate) service_cidr: String,
    /// Honour the legacy `net.beta.kubernetes.io/network-policy` DefaultDeny namespace annotation.
    #[arg(long)]
    pub(crate) legacy_default_deny: bool,
}

#[derive(clap::Args, Clone)]
struct LabName {
    /// Name of the lab (its namespaces, pins and record carry it): labs with different names
    /// can be up side by side.
    #[arg(long, default_value = "npclab")]
    name: String,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Read the manifests, probe every pair of pods on every declared port and every pod to every
    /// Service port (through its ClusterIP), print, tear down.
    Run {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Start a lab and keep it up: edits to DIR (policies, labels, pods, namespaces) apply live.
    /// Stops on Ctrl-C, SIGTERM or `lab down`.
    Up {
        #[arg(long)]
        manifests: PathBuf,
        #[command(flatten)]
        lab: LabArgs,
        #[command(flatten)]
        name: LabName,
    },
    /// Probe every pair of pods of the running lab (as `lab run` does) and print the matrix.
    Probe {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        name: LabName,
    },
    /// Stop the running lab and remove everything it made (also after a crash).
    Down {
        #[command(flatten)]
        name: LabName,
    },
    /// Replay the seeds' "Enforcing network isolation" walk-through, step by step.
    Walkthrough {
        #[arg(long, default_value = "manifests/examples/walkthrough")]
        dir: PathBuf,
    },
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab { command } => match command {
            LabCommand::Run { manifests, output, lab } => lab::run(&manifests, output, &lab),
            LabCommand::Up { manifests, lab, name } => lab::up(&manifests, &lab, &name.name),
            LabCommand::Probe { output, name } => lab::probe(output, &name.name),
            LabCommand::Down { name } => lab::down(&name.name),
            LabCommand::Walkthrough { dir } => lab::walkthrough(&dir),
        },
        Command::Inspect {
            pin_root,
            output,
            conntrack_limit,
        } => inspect::inspect(&pin_root, output, conntrack_limit),
        Command::Run(args) => run::run(args),
        Command::Explain(args) => explain::explain(args),
    }
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and loads eBPF programs: run it as root");
    }
    Ok(())
}

/// The manifests of `dir`; broken documents are reported and skipped.
fn load_manifests(dir: &Path) -> anyhow::Result<Loaded> {
    let loaded = files::load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    report_errors(&loaded);
    Ok(loaded)
}

fn report_errors(loaded: &Loaded) {
    for e in &loaded.errors {
        eprintln!("error: {e} (skipped; everything else applies)");
    }
}
