//! The few shell helpers every xtask command uses: run a command, read its output, find a binary,
//! install a Debian package.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

pub(crate) fn step(what: &str) {
    eprintln!("xtask: {what}");
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Installs Debian packages (refreshing the package lists first: a fresh container has none).
pub(crate) fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    step(&format!("installing {}", packages.join(" ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get could not install {}", packages.join(" ")))
}

/// `bin` on PATH, from Debian's `package` if it is missing.
pub(crate) fn ensure_tool(bin: &str, package: &str) -> anyhow::Result<()> {
    if which(bin).is_some() {
        return Ok(());
    }
    apt_install(&[package]).with_context(|| format!("`{bin}` is missing"))
}
