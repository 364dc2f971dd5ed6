//! Network namespaces for the lab and the tests: created with iproute2, entered per thread.
//!
//! A thread that `setns`es into a namespace takes its sockets and interface lookups there; other
//! threads are unaffected, so one process can stand in for a node and all its pods at once.
//! (`ip netns exec` would remount /sys and hide bpffs pins; `setns` on the net namespace alone
//! keeps the host's bpffs.)
use std::{fs::File, os::fd::AsRawFd as _, process::Command};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}; install it (apt-get install iproute2)")]
    NoIp(std::io::Error),
    #[error("entering network namespace {name}: {source}")]
    Enter { name: String, source: std::io::Error },
    #[error("a thread in network namespace {0} panicked")]
    Panicked(String),
}

/// Runs `ip ARGS...`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip").args(args).output().map_err(NetnsError::NoIp)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace (replacing a stale one of the same name) with loopback up.
    pub fn create(name: &str) -> Result<Self, NetnsError> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a new thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a new thread inside the named namespace and waits for it.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(name)?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Panicked(name.to_string()))?
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the named network namespace.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).map_err(|source| NetnsError::Enter {
        name: name.into(),
        source,
    })?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Network namespaces whose names start with `prefix` (for cleaning up after a crash).
pub fn list_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
