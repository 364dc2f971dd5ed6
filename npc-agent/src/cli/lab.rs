//! `npc-agent lab run | up | probe | down | walkthrough`.
use std::path::Path;

use anyhow::{Context as _, bail};

use super::{LabArgs, Output, load_manifests, report_errors, require_root};
use crate::{
    lab::{self, Lab, LabError, LabOptions, LabRecord, Probe, netns::NetnsError, walkthrough as seed},
    node::wake::{Timing, Wake, Waker, stop_on_signals},
    source::files::DirSource,
};

pub(super) fn options(tag: &str, args: &LabArgs) -> anyhow::Result<LabOptions> {
    let mut opts = LabOptions::new(tag);
    opts.pod_cidr = lab::parse_pod_cidr(&args.pod_cidr).map_err(anyhow::Error::msg)?;
    opts.service_cidr = lab::parse_service_cidr(&args.service_cidr).map_err(anyhow::Error::msg)?;
    opts.legacy_default_deny = args.legacy_default_deny;
    Ok(opts)
}

pub(super) fn run(dir: &Path, output: Output, args: &LabArgs) -> anyhow::Result<()> {
    require_root()?;
    let loaded = load_manifests(dir)?;
    // Its own name, so that a `lab run` never collides with a lab that is up.
    let opts = options(&format!("npcrun{}", std::process::id()), args)?;
    let lab = Lab::up(opts, &loaded)?;
    let probes = lab.probe_all()?;
    drop(lab);
    print_probes(&probes, output)
}

/// The node loop with the files source: the same waker (changes coalesced, a resync tick, stop
/// on SIGINT/SIGTERM/SIGHUP or `lab down`) and the same turn as `npc-agent run`, with the lab's
/// fabric following the manifests first.
pub(super) fn up(dir: &Path, args: &LabArgs, tag: &str) -> anyhow::Result<()> {
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
    let stop = stop_on_signals().context("installing signal handlers")?;
    let (source, changed) = DirSource::watch(dir).with_context(|| format!("watching {}", dir.display()))?;
    let timing = Timing {
        // Editors write a file in several steps: let them finish.
        coalesce: std::time::Duration::from_millis(100),
        lone: std::time::Duration::from_millis(100),
        resync: std::time::Duration::from_secs(2),
    };
    let mut waker = Waker::new(changed, stop, timing)?;

    let loaded = load_manifests(dir)?;
    let mut lab = Lab::up(options(tag, args)?, &loaded)?;
    lab.record().save()?;
    eprintln!(
        "lab {tag} is up: {} pods; watching {} (Ctrl-C or `npc-agent lab down{}` stops it)",
        lab.state().pods.len(),
        dir.display(),
        name_flag(tag)
    );
    loop {
        match waker.wait() {
            Wake::Stop => break,
            // The lab's resync tick is short (2 s): its retries ride on it.
            Wake::Tick | Wake::Retry => {
                if let Err(e) = lab.tick() {
                    eprintln!("error: {e}");
                }
            }
            Wake::Changed => {
                let loaded = source
                    .snapshot()
                    .with_context(|| format!("reading {}", source.dir().display()))?;
                report_errors(&loaded);
                // Pods about to go leave the record first, so that a `lab probe` started now
                // does not try to enter a namespace that is being deleted.
                let mut staying = lab.record();
                staying
                    .pods
                    .retain(|p| loaded.pods.iter().any(|q| q.object_ref().to_string() == p.id));
                staying.save()?;
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

pub(super) fn probe(output: Output, tag: &str) -> anyhow::Result<()> {
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
    // `lab up` may apply an edit while we probe: a pod it removes takes its namespace with it,
    // and a probe to it times out without a drop. It writes the record before and after each
    // edit, so a probe that failed while the record changed is made again on the new record.
    let path = LabRecord::path(tag);
    let written = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let mut record = record;
    for _ in 0..5 {
        let seen = written();
        match record.probe_all() {
            Ok(probes) => return print_probes(&probes, output),
            Err(e) => {
                let changed = |e: &LabError| {
                    matches!(e, LabError::Netns(NetnsError::Enter { source, .. }) if source.kind() == std::io::ErrorKind::NotFound)
                        || written() != seen
                };
                if !changed(&e) {
                    return Err(e.into());
                }
                // The namespace is gone but the new record may not be written yet: wait for it.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while written() == seen && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                record = LabRecord::load(tag)?.with_context(|| format!("lab {tag} went down while probing"))?;
            }
        }
    }
    bail!("lab {tag} kept changing while it was probed; try again")
}

pub(super) fn down(tag: &str) -> anyhow::Result<()> {
    require_root()?;
    let removed = lab::down(tag)?;
    if removed.is_empty() {
        println!("lab {tag}: nothing to remove");
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}

pub(super) fn walkthrough(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    seed::run(dir, &mut std::io::stdout())
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
