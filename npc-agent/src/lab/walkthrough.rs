//! Seed 002's "Enforcing network isolation" walk-through, replayed in the lab.
//!
//! ns-1 holds http-echo (app=http-echo, port 80) and busybox. Four steps, each applied live to the
//! running lab: no policy; `deny-all-by-default`; that replaced by `allow` (from app=busybox);
//! busybox labelled app=busybox.
use std::{io::Write, path::Path};

use anyhow::Context as _;

use crate::lab::{Lab, LabOptions};
use npc_policy::files::{self, Loaded};
use npc_policy::model::{ObjectRef, Protocol};

pub struct Step {
    pub title: &'static str,
    /// Files of the walk-through directory that make up the cluster in this step.
    pub files: &'static [&'static str],
    /// What the seed says happens to busybox's request.
    pub expected_allowed: bool,
}

pub const STEPS: [Step; 4] = [
    Step {
        title: "no network policy: busybox -> http-echo:80 succeeds",
        files: &["namespace.yaml", "http-echo.yaml", "busybox.yaml"],
        expected_allowed: true,
    },
    Step {
        title: "deny-all-by-default created: the request times out",
        files: &[
            "namespace.yaml",
            "http-echo.yaml",
            "busybox.yaml",
            "steps/deny-all-by-default.yaml",
        ],
        expected_allowed: false,
    },
    Step {
        title: "deny-all deleted, `allow` (from app=busybox) created: still times out",
        files: &[
            "namespace.yaml",
            "http-echo.yaml",
            "busybox.yaml",
            "steps/allow-network-policy.yaml",
        ],
        expected_allowed: false,
    },
    Step {
        title: "busybox labelled app=busybox: the request succeeds",
        files: &[
            "namespace.yaml",
            "http-echo.yaml",
            "steps/busybox-labeled.yaml",
            "steps/allow-network-policy.yaml",
        ],
        expected_allowed: true,
    },
];

/// Reads the files of a step.
pub fn load_step(dir: &Path, step: &Step) -> anyhow::Result<Loaded> {
    let mut loaded = Loaded::default();
    for file in step.files {
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
        let allowed = lab.probe(&busybox(), &http_echo(), 80, Protocol::Tcp)?;
        let outcome = if allowed {
            "request succeeded"
        } else {
            "request timed out (blocked)"
        };
        writeln!(out, "step {}: {}\n        -> {outcome}", i + 1, step.title)?;
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
