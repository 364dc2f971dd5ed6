use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use npc_agent::{
    datapath::{DEFAULT_PIN_ROOT, Datapath},
    explain::{self, Endpoint},
    lab::{self, Lab, LabOptions, Probe},
    manifests::{self, Loaded},
    model::{Protocol, addr_from_bytes},
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
    /// Run the real datapath on this host in network namespaces, no cluster needed.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Why is a connection allowed or blocked? Prints the verdict of each side and the policy
    /// rule behind it, computed from the same maps the datapath reads.
    Explain {
        /// A directory of manifests (Namespaces, Pods, NetworkPolicies), as for `lab`.
        #[arg(long)]
        manifests: PathBuf,
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
    /// Decoded dump of the pinned maps.
    Inspect {
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
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
            command: LabCommand::Walkthrough { dir },
        } => {
            require_root()?;
            walkthrough::run(&dir, &mut std::io::stdout())
        }
        Command::Inspect { pin_root } => inspect(&pin_root),
        Command::Explain {
            manifests,
            from,
            to,
            port,
            protocol,
            lab,
            output,
        } => {
            let loaded = load_manifests(&manifests)?;
            // Pods without status.podIP get the addresses a lab would give them.
            let pod_cidr = lab::parse_pod_cidr(&lab.pod_cidr).map_err(anyhow::Error::msg)?;
            let state = lab::lab_state(&loaded, pod_cidr, lab.legacy_default_deny);
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

fn lab_run(dir: &Path, output: Output, args: &LabArgs) -> anyhow::Result<()> {
    require_root()?;
    let loaded = load_manifests(dir)?;
    let mut opts = LabOptions::new("npclab");
    opts.pod_cidr = lab::parse_pod_cidr(&args.pod_cidr).map_err(anyhow::Error::msg)?;
    opts.legacy_default_deny = args.legacy_default_deny;
    let lab = Lab::up(opts, &loaded)?;
    let probes = lab.probe_all()?;
    drop(lab);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "probes": probes }))?
        ),
        Output::Table => print!("{}", matrix(&probes)),
    }
    Ok(())
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

fn inspect(pin_root: &Path) -> anyhow::Result<()> {
    let dp =
        Datapath::load(pin_root).with_context(|| format!("opening the maps pinned under {}", pin_root.display()))?;
    let config = dp.config()?;
    println!(
        "config: log_level={} mode={} epoch={}",
        config.log_level, config.mode, config.epoch
    );
    println!("endpoints:");
    for (ifindex, ep) in dp.endpoints()? {
        println!(
            "  ifindex {ifindex}: identity {} flags {:#x} addr {}",
            ep.identity,
            ep.flags,
            addr_from_bytes(ep.addr)
        );
    }
    println!("drops:");
    for (k, count) in dp.drops()? {
        println!(
            "  direction {} protocol {} dport {}: {count}",
            k.direction, k.protocol, k.dport
        );
    }
    println!("conntrack: {} entries", dp.conntrack_entries()?.len());
    Ok(())
}
