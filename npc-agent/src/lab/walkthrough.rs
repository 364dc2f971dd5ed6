//! Seed 002's "Enforcing network isolation" walk-through, replayed in the lab.
//!
//! ns-1 holds http-echo (app=http-echo, port 80, behind the http-echo Service) and busybox;
//! kube-system holds the cluster DNS. Four steps, each applied live to the running lab: no policy;
//! `deny-all-by-default`; that replaced by `allow` (from app=busybox); busybox labelled
//! app=busybox. Each step does what the seed's `wget http://http-echo.ns-1.svc.cluster.local`
//! does: resolve the name through the kube-dns ClusterIP, then connect to the Service's ClusterIP
//! (kube-proxy's DNAT in the lab's node picks the pod).
use std::{io::Write, path::Path};

use anyhow::Context as _;

use crate::lab::{Lab, LabOptions};
use npc_policy::files::{self, Loaded};
use npc_policy::model::{ObjectRef, Protocol};

pub struct Step {
    pub title: &'static str,
    /// Files of the walk-through directory that this step adds to [`CLUSTER`].
    pub files: &'static [&'static str],
    /// What the seed says happens to busybox's request.
    pub expected_allowed: bool,
}

/// The files every step has: ns-1, http-echo and its Service, the cluster DNS.
pub const CLUSTER: [&str; 4] = [
    "namespace.yaml",
    "http-echo.yaml",
    "http-echo-service.yaml",
    "kube-dns.yaml",
];

pub const STEPS: [Step; 4] = [
    Step {
        title: "no network policy: busybox -> http-echo:80 succeeds",
        files: &["busybox.yaml"],
        expected_allowed: true,
    },
    Step {
        title: "deny-all-by-default created: the request times out",
        files: &["busybox.yaml", "steps/deny-all-by-default.yaml"],
        expected_allowed: false,
    },
    Step {
        title: "deny-all deleted, `allow` (from app=busybox) created: still times out",
        files: &["busybox.yaml", "steps/allow-network-policy.yaml"],
        expected_allowed: false,
    },
    Step {
        title: "busybox labelled app=busybox: the request succeeds",
        files: &["steps/busybox-labeled.yaml", "steps/allow-network-policy.yaml"],
        expected_allowed: true,
    },
];

/// Reads the files of a step.
pub fn load_step(dir: &Path, step: &Step) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    for file in CLUSTER.iter().chain(step.files) {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        loaded.extend(files::parse_str(&path, &text));
    }
    if let Some(e) = loaded.errors.first() {
        anyhow::bail!("{e}");
    }
    Ok(loaded)
}

pub fn busybox() -> ObjectRef {
    ObjectRef::new("ns-1", "busybox")
}

pub fn http_echo() -> ObjectRef {
    ObjectRef::new("ns-1", "http-echo")
}

/// The name busybox's wget asks for.
pub const HTTP_ECHO_NAME: &str = "http-echo.ns-1.svc.cluster.local";

/// What `wget http://http-echo.ns-1.svc.cluster.local/` does from busybox: resolve the name through
/// the cluster DNS, then connect to the address it got on port 80. Returns that address and
/// whether the request succeeded (a block is proven by a drop counter, as every lab probe is).
pub fn wget(lab: &Lab) -> anyhow::Result<(std::net::IpAddr, bool)> {
    let record = lab.record();
    let from = busybox().to_string();
    let addr = match record.resolve(&from, HTTP_ECHO_NAME, crate::lab::dns::Transport::Udp)? {
        crate::lab::dns::Lookup::Address(addr) => addr,
        other => anyhow::bail!("busybox could not resolve {HTTP_ECHO_NAME}: {other:?}"),
    };
    let vip = record
        .services
        .iter()
        .find(|s| s.id == "svc/ns-1/http-echo")
        .map(|s| s.vip)
        .context("the lab serves no svc/ns-1/http-echo")?;
    anyhow::ensure!(
        addr == vip,
        "{HTTP_ECHO_NAME} resolved to {addr}, not the ClusterIP {vip}"
    );
    Ok((
        addr,
        record.probe_service(&from, "svc/ns-1/http-echo", 80, Protocol::Tcp)?,
    ))
}

/// Runs the four steps in one lab and prints each outcome; fails if one differs from the seed.
pub fn run(dir: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let mut lab: Option<Lab> = None;
    let mut mismatches = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        let loaded = load_step(dir, step)?;
        match lab.as_mut() {
            None => lab = Some(Lab::up(LabOptions::new("npcdemo"), &loaded)?),
            Some(lab) => {
                lab.apply(&loaded)?;
            }
        }
        let lab = lab.as_ref().expect("set above");
        let (addr, allowed) = wget(lab)?;
        let outcome = if allowed {
            "request succeeded"
        } else {
            "request timed out (blocked)"
        };
        writeln!(
            out,
            "step {}: {}\n        busybox$ wget http://{HTTP_ECHO_NAME}/\n        Connecting to {HTTP_ECHO_NAME} ({addr}:80)\n        -> {outcome}",
            i + 1,
            step.title
        )?;
        write!(out, "{}", crate::lab::matrix(&lab.probe_all()?))?;
        if allowed != step.expected_allowed {
            mismatches.push(i + 1);
        }
    }
    let drops = lab
        .as_ref()
        .map(|l| l.datapath().drops())
        .transpose()?
        .unwrap_or_default();
    let total: u64 = drops.values().sum();
    writeln!(out, "packets dropped by policy during the walk-through: {total}")?;
    if !mismatches.is_empty() {
        anyhow::bail!("steps {mismatches:?} did not behave as the walk-through says");
    }
    Ok(())
}
