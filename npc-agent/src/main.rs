use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use notify::Watcher as _;
use npc_agent::{
    datapath::{DEFAULT_PIN_ROOT, Datapath},
    explain::{self, Endpoint},
    lab::{self, Lab, LabOptions, LabRecord, Probe},
    manifests::{self, Loaded},
    model::Protocol,
    walkthrough,
};

#[derive(Parser)]
#[command(name = "npc-agent", version, about = "eBPF Kubernetes NetworkPolicy enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node agent: watch the cluster, enforce NetworkPolicy on this node's pods.
    Run {
        /// Kubeconfig file (else $KUBECONFIG, else the in-cluster service account).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name (spec.nodeName of the pods to enforce on); from the downward API.
        #[arg(long, env = "NODE_NAME", required_unless_present = "uninstall")]
        node_name: Option<String>,
        #[arg(long, default_value = "0.0.0.0:9655")]
        metrics_addr: std::net::SocketAddr,
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Honour the legacy `net.beta.kubernetes.io/network-policy` DefaultDeny annotation.
        #[arg(long)]
        legacy_default_deny: bool,
        /// Remove everything npc put on this node (programs, links, maps) and exit.
        #[arg(long)]
        uninstall: bool,
    },
    /// Run the real datapath on this host in network namespaces, no cluster needed.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Why is a connection allowed or blocked? Prints the verdict of each side and the policy
    /// rule behind it, computed from the same maps the datapath reads.
    Explain {
        /// A directory of manifests (Namespaces, Pods, NetworkPolicies), as for `lab`. Without
        /// it, the cluster of --kubeconfig (else $KUBECONFIG, else in-cluster).
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(long, conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// NAMESPACE/POD or an IP address.
        #[arg(long)]
        from: String,
        /// NAMESPACE/POD or an IP address.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP", value_parser = ["TCP", "UDP", "SCTP"])]
        protocol: String,
        #[command(flatten)]
        lab: LabArgs,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The pinned maps, decoded: endpoints, identities, ipBlock classes, allow entries,
    /// tracked connections, counters.
    Inspect {
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        /// List at most this many tracked connections (all are counted).
        #[arg(long, default_value_t = 50)]
        conntrack_limit: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
struct LabArgs {
    /// Pod addresses come from here unless a Pod pins status.podIP(s).
    #[arg(long, default_value = "10.244.0.0/16")]
    pod_cidr: String,
    /// Honour the legacy `net.beta.kubernetes.io/network-policy` DefaultDeny namespace annotation.
    #[arg(long)]
    legacy_default_deny: bool,
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
    /// Read the manifests, probe every pair of pods on every declared port, print, tear down.
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab {
            command: LabCommand::Run { manifests, output, lab },
        } => lab_run(&manifests, output, &lab),
        Command::Lab {
            command: LabCommand::Up { manifests, lab, name },
        } => lab_up(&manifests, &lab, &name.name),
        Command::Lab {
            command: LabCommand::Probe { output, name },
        } => lab_probe(output, &name.name),
        Command::Lab {
            command: LabCommand::Down { name },
        } => {
            require_root()?;
            let removed = lab::down(&name.name)?;
            if removed.is_empty() {
                println!("lab {}: nothing to remove", name.name);
            }
            for r in removed {
                println!("removed {r}");
            }
            Ok(())
        }
        Command::Lab {
            command: LabCommand::Walkthrough { dir },
        } => {
            require_root()?;
            walkthrough::run(&dir, &mut std::io::stdout())
        }
        Command::Inspect {
            pin_root,
            output,
            conntrack_limit,
        } => inspect(&pin_root, output, conntrack_limit),
        Command::Run {
            kubeconfig,
            node_name,
            metrics_addr,
            pin_root,
            legacy_default_deny,
            uninstall,
        } => {
            if uninstall {
                npc_agent::datapath::uninstall(&pin_root)?;
                println!("removed {} (programs detached, maps gone)", pin_root.display());
                return Ok(());
            }
            let stop = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
            }
            npc_agent::agent::run(
                npc_agent::agent::AgentOptions {
                    kubeconfig,
                    node_name: node_name.context("--node-name (or NODE_NAME) is required")?,
                    metrics_addr,
                    pin_root,
                    legacy_default_deny,
                    coalesce: Duration::from_millis(100),
                    resync: Duration::from_secs(2),
                },
                stop,
            )
        }
        Command::Explain {
            manifests,
            kubeconfig,
            from,
            to,
            port,
            protocol,
            lab,
            output,
        } => {
            let state = match manifests {
                Some(dir) => {
                    let loaded = load_manifests(&dir)?;
                    // Pods without status.podIP get the addresses a lab would give them.
                    let pod_cidr = lab::parse_pod_cidr(&lab.pod_cidr).map_err(anyhow::Error::msg)?;
                    lab::lab_state(&loaded, pod_cidr, lab.legacy_default_deny)
                }
                None => {
                    let loaded = cluster_snapshot(kubeconfig.as_deref())?;
                    for e in &loaded.errors {
                        eprintln!("error: {e} (ignored)");
                    }
                    npc_agent::model::State {
                        legacy_default_deny: lab.legacy_default_deny,
                        ..loaded.to_state()
                    }
                }
            };
            let from = Endpoint::parse(&from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
            let to = Endpoint::parse(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            let protocol = Protocol::parse(&protocol).context("--protocol")?;
            let e = explain::explain(&state, &from, &to, protocol, port)?;
            match output {
                Output::Table => print!("{e}"),
                Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
            }
            Ok(())
        }
    }
}

/// One consistent read of the cluster's pods, namespaces and policies (the agent's own watchers,
/// stopped after their first list).
fn cluster_snapshot(kubeconfig: Option<&Path>) -> anyhow::Result<Loaded> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = npc_agent::agent::client(kubeconfig).await?;
        let (tx, _rx) = std::sync::mpsc::channel();
        let stores = npc_agent::kube_source::KubeStores::start(client, tx, npc_agent::metrics::Metrics::new());
        tokio::time::timeout(Duration::from_secs(30), stores.wait_until_ready())
            .await
            .context("the API server did not answer the lists within 30 s")??;
        Ok(stores.snapshot())
    })
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab creates network namespaces and loads eBPF programs: run it as root");
    }
    Ok(())
}

fn load_manifests(dir: &Path) -> anyhow::Result<Loaded> {
    let loaded = manifests::load_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in &loaded.errors {
        eprintln!("error: {e} (skipped; everything else applies)");
    }
    Ok(loaded)
}

fn lab_options(tag: &str, args: &LabArgs) -> anyhow::Result<LabOptions> {
    let mut opts = LabOptions::new(tag);
    opts.pod_cidr = lab::parse_pod_cidr(&args.pod_cidr).map_err(anyhow::Error::msg)?;
    opts.legacy_default_deny = args.legacy_default_deny;
    Ok(opts)
}

fn lab_run(dir: &Path, output: Output, args: &LabArgs) -> anyhow::Result<()> {
    require_root()?;
    let loaded = load_manifests(dir)?;
    // Its own name, so that a `lab run` never collides with a lab that is up.
    let opts = lab_options(&format!("npcrun{}", std::process::id()), args)?;
    let lab = Lab::up(opts, &loaded)?;
    let probes = lab.probe_all()?;
    drop(lab);
    print_probes(&probes, output)
}

fn lab_up(dir: &Path, args: &LabArgs, tag: &str) -> anyhow::Result<()> {
    require_root()?;
    if let Some(record) = LabRecord::load(tag)?
        && record.alive()
    {
        bail!(
            "lab {tag} is already up (pid {}): stop it with `npc-agent lab down{}` first",
            record.pid,
            name_flag(tag)
        );
    }
    let leftovers = lab::down(tag)?;
    if !leftovers.is_empty() {
        eprintln!(
            "cleaned up after an earlier lab {tag} that did not stop: {}",
            leftovers.join(", ")
        );
    }
    // Ctrl-C, SIGTERM (`lab down`) and SIGHUP all end the loop below, and the lab is torn down.
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::event::{EventKind, ModifyKind};
        // Our own reads of DIR show up as access (and atime) events: only changes count.
        let changed = event.is_ok_and(|e| {
            matches!(
                e.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            )
        });
        if changed {
            let _ = tx.send(());
        }
    })
    .context("watching the manifests directory")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    let loaded = load_manifests(dir)?;
    let mut lab = Lab::up(lab_options(tag, args)?, &loaded)?;
    lab.record().save()?;
    eprintln!(
        "lab {tag} is up: {} pods; watching {} (Ctrl-C or `npc-agent lab down{}` stops it)",
        lab.state().pods.len(),
        dir.display(),
        name_flag(tag)
    );
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => {
                // Editors write a file in several steps: let them finish.
                while rx.recv_timeout(Duration::from_millis(100)).is_ok() {}
                let loaded = load_manifests(dir)?;
                match lab.apply(&loaded) {
                    Ok(stats) => {
                        lab.record().save()?;
                        eprintln!(
                            "applied {}: {} pods, {} map writes, {} deletes",
                            dir.display(),
                            lab.state().pods.len(),
                            stats.upserts,
                            stats.deletes
                        );
                    }
                    Err(e) => eprintln!("error: applying {}: {e}", dir.display()),
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    eprintln!("lab {tag}: stopping");
    drop(lab);
    let _ = std::fs::remove_file(LabRecord::path(tag));
    Ok(())
}

fn name_flag(tag: &str) -> String {
    if tag == "npclab" {
        String::new()
    } else {
        format!(" --name {tag}")
    }
}

fn lab_probe(output: Output, tag: &str) -> anyhow::Result<()> {
    require_root()?;
    let Some(record) = LabRecord::load(tag)? else {
        bail!(
            "no lab {tag} is up ({} does not exist): start one with `npc-agent lab up --manifests DIR{}`",
            LabRecord::path(tag).display(),
            name_flag(tag)
        );
    };
    if !record.alive() {
        bail!(
            "lab {tag}'s process (pid {}) is gone: `npc-agent lab down{}` cleans up after it",
            record.pid,
            name_flag(tag)
        );
    }
    print_probes(&record.probe_all()?, output)
}

fn print_probes(probes: &[Probe], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "probes": probes }))?
        ),
        Output::Table => print!("{}", lab::matrix(probes)),
    }
    Ok(())
}

fn inspect(pin_root: &Path, output: Output, conntrack_limit: usize) -> anyhow::Result<()> {
    if !Datapath::is_pinned(pin_root) {
        bail!(
            "nothing is pinned under {}: is the agent running there (see its --pin-root)?",
            pin_root.display()
        );
    }
    let dp =
        Datapath::load(pin_root).with_context(|| format!("opening the maps pinned under {}", pin_root.display()))?;
    let snapshot = npc_agent::inspect::Snapshot::read(&dp, conntrack_limit)?;
    match output {
        Output::Table => print!("{snapshot}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
    }
    Ok(())
}
