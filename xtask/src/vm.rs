//! Running the privileged test binaries under another kernel: Debian's Linux 6.1, booted in qemu
//! through virtme-ng (`vng`), which shares this machine's root filesystem with the guest.
//!
//! qemu emulates (TCG, `--disable-kvm`): on a machine that is itself a VM there is no nested
//! virtualisation and a KVM guest hangs after "Probing EDD". See docs/kernels.md for the recipe
//! and every trap it avoids.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::sys::{apt_install, run, step, which};

/// A kernel the guest boots: its image and its release (`uname -r`, the /lib/modules directory).
#[derive(Clone, Debug)]
pub(crate) struct VmKernel {
    pub(crate) image: PathBuf,
    pub(crate) version: String,
}

/// This machine's kernel release (`uname -r`), for the summary lines.
pub(crate) fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

/// virtme-ng lives in its own venv: Debian's python3 is "externally managed" (PEP 668) and the
/// pyenv python on PATH may change; /usr/bin/python3 and /opt stay put.
const VENV: &str = "/opt/npc-virtme";
/// The version tested with (1.42 boots Debian's 6.1 with `--force-9p`).
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Debian's kernel packages: linux-image-6.1.0-<N>-amd64-unsigned installs
/// /boot/vmlinuz-6.1.0-<N>-amd64 and /lib/modules/6.1.0-<N>-amd64.
const SERIES: &str = "6.1.0-";
const FLAVOUR: &str = "-amd64";
/// Modules the tests need that Debian builds as modules (veth pairs, the bridge, the clsact
/// qdisc and the BPF classifier/action) and that the lab's kube-proxy rules need (br_netfilter,
/// iptables-nft's nat and the matches and targets kube-proxy uses).
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "br_netfilter",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_statistic",
    "xt_comment",
    "xt_mark",
    // The traffic benchmark's weave-npc layout (ipsets, the ESTABLISHED rule).
    "ip_set",
    "ip_set_hash_ip",
    "xt_set",
    "xt_state",
    "xt_conntrack",
];
/// A guest that prints nothing for this long is hung (TCG runs a test binary in 1-2 minutes);
/// NPC_VM_TIMEOUT_SECS overrides it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Installs, when missing, qemu, busybox-static (virtme's initramfs, which loads the 9p modules),
/// the newest Debian 6.1 kernel and virtme-ng. Idempotent: a second call installs nothing.
pub(crate) fn ensure_vm_tools() -> anyhow::Result<VmKernel> {
    let mut missing = Vec::new();
    if which("qemu-system-x86_64").is_none() && !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        missing.push("qemu-system-x86");
    }
    if !Path::new("/bin/busybox").exists() && !Path::new("/usr/bin/busybox").exists() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let kernel = match installed_kernel()? {
        Some(k) => k,
        None => {
            let package = newest_kernel_package()?;
            apt_install(&[&package])?;
            installed_kernel()?
                .with_context(|| format!("{package} is installed but no /boot/vmlinuz-{SERIES}*{FLAVOUR}"))?
        }
    };
    ensure_virtme_ng()?;
    Ok(kernel)
}

/// The newest /boot/vmlinuz-6.1.0-N-amd64 whose modules are installed too.
fn installed_kernel() -> anyhow::Result<Option<VmKernel>> {
    let mut best: Option<(u32, VmKernel)> = None;
    for entry in std::fs::read_dir("/boot").context("reading /boot")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(version) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let Some(abi) = version
            .strip_prefix(SERIES)
            .and_then(|r| r.strip_suffix(FLAVOUR))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue; // also skips -cloud-amd64 and -rt-amd64
        };
        if !Path::new("/lib/modules").join(version).join("modules.dep").exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| abi > *b) {
            let kernel = VmKernel {
                image: Path::new("/boot").join(&name),
                version: version.to_string(),
            };
            best = Some((abi, kernel));
        }
    }
    Ok(best.map(|(_, k)| k))
}

/// linux-image-6.1.0-<newest N>-amd64-unsigned, as apt knows it (the ABI number moves with every
/// Debian point release, so it cannot be hard-coded).
fn newest_kernel_package() -> anyhow::Result<String> {
    let search = || -> anyhow::Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args([
                "search",
                "--names-only",
                &format!("^linux-image-{SERIES}[0-9]+{FLAVOUR}-unsigned$"),
            ])
            .output()
            .context("running apt-cache search")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|p| {
                let n = p
                    .strip_prefix(&format!("linux-image-{SERIES}"))?
                    .strip_suffix(&format!("{FLAVOUR}-unsigned"))?
                    .parse::<u32>()
                    .ok()?;
                Some((n, p.to_string()))
            })
            .max()
            .map(|(_, p)| p))
    };
    if let Some(p) = search()? {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    search()?.with_context(|| {
        format!(
            "apt knows no linux-image-{SERIES}N{FLAVOUR}-unsigned: is this Debian 12 (bookworm) with its main archive?"
        )
    })
}

fn vng() -> PathBuf {
    Path::new(VENV).join("bin/vng")
}

fn ensure_virtme_ng() -> anyhow::Result<()> {
    let works = || {
        Command::new(vng())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works() {
        return Ok(());
    }
    step(&format!("installing {VIRTME_NG} into the venv {VENV}"));
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    if !matches!(Command::new(python).args(["-m", "venv", VENV]).status(), Ok(s) if s.success()) {
        // Debian ships venv's ensurepip separately.
        apt_install(&["python3-venv"])?;
        let _ = std::fs::remove_dir_all(VENV);
        run(Command::new(python).args(["-m", "venv", VENV]))?;
    }
    run(Command::new(Path::new(VENV).join("bin/pip")).args(["install", "-q", VIRTME_NG]))
        .context("pip could not install virtme-ng (PyPI reachable?)")?;
    if !works() {
        bail!("{} --version fails after installing {VIRTME_NG}", vng().display());
    }
    Ok(())
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots `kernel`, prepares the guest the way `cargo xtask setup` prepares the host, runs `cmd` in
/// `workdir` with `env` (on top of the guest's minimal environment) and returns the guest
/// command's exit status and its stdout, which is also echoed line by line as it comes.
/// The command's stderr goes to our stderr.
///
/// The guest sees this machine's whole root filesystem read-only, except overlays (writable,
/// thrown away at power-off) on /tmp, /etc, /var, /usr, /opt, /home, /srv and a tmpfs /run. So
/// `workdir` (the cargo target dir) is readable but not writable; tests must write under /tmp
/// (std::env::temp_dir()), /run or /sys/fs/bpf.
pub(crate) fn run_in_vm(
    kernel: &VmKernel,
    workdir: &Path,
    cmd: &[String],
    env: &[(String, String)],
) -> anyhow::Result<(ExitStatus, String)> {
    let Some((program, args)) = cmd.split_first() else {
        bail!("run_in_vm: empty command");
    };
    // The command goes to the guest as a script file, not on vng's command line: vng passes that
    // on the kernel command line (base64), which holds 2 KiB at most. The host's /tmp is the
    // lower layer of the guest's /tmp, so the file is there at boot.
    let mut script = String::from("set -e\n");
    script += "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n";
    script += &format!("modprobe -a {}\n", MODULES.join(" "));
    // /run is a tmpfs already (vng mounts one); these are where netns and lab state go.
    script += "mkdir -p /run/netns /run/npc\n";
    // The guest's PATH is minimal (/sbin:/bin:/usr/sbin:/usr/bin); keep the host's after it.
    if let Some(path) = std::env::var_os("PATH") {
        script += &format!("export PATH=\"$PATH:\"{}\n", quote(&path.to_string_lossy()));
    }
    for (k, v) in env {
        if k.is_empty() || !k.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
            bail!("run_in_vm: bad environment variable name {k:?}");
        }
        script += &format!("export {k}={}\n", quote(v));
    }
    script += &format!("cd {}\n", quote(&workdir.to_string_lossy()));
    script += "set +e\n";
    script += &format!(
        "{}{}\n",
        quote(program),
        args.iter().map(|a| format!(" {}", quote(a))).collect::<String>()
    );
    script += "exit $?\n";
    let script_path = std::env::temp_dir().join(format!("npc-vm-{}.sh", std::process::id()));
    std::fs::write(&script_path, &script).with_context(|| format!("writing {}", script_path.display()))?;

    let timeout = std::env::var("NPC_VM_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    // vng runs `virtme-run` through the shell: the venv's bin must be on PATH.
    let path = std::env::join_paths(
        std::iter::once(Path::new(VENV).join("bin"))
            .chain(std::env::var_os("PATH").iter().flat_map(std::env::split_paths)),
    )?;
    step(&format!("booting {} under qemu (TCG, no KVM)", kernel.version));
    let started = Instant::now();
    let mut child = Command::new(vng())
        .current_dir(workdir)
        .env("PATH", path)
        .arg("--disable-kvm") // a KVM guest hangs after "Probing EDD" here (no nested virtualisation)
        .arg("--force-9p") // Debian's virtiofsd rejects vng's arguments
        .arg("--run")
        .arg(&kernel.image)
        .args(["--user", "root", "--memory", "4G", "--cpus", "2", "--"])
        .arg(format!("sh {}", quote(&script_path.to_string_lossy())))
        .stdin(Stdio::null()) // vng otherwise wires the terminal to the guest console
        .stdout(Stdio::piped())
        // Piped, not inherited: qemu opens /proc/self/fd/1 and /proc/self/fd/2 as "file"
        // chardevs, with O_TRUNC, so a log file given as our stderr would be emptied.
        .stderr(Stdio::piped())
        // Its own process group: vng -> sh -> virtme-run -> exec qemu, all killed together on timeout.
        .process_group(0)
        .spawn()
        .context("starting vng")?;
    let pgid = child.id();
    let mut stderr = child.stderr.take().context("vng stderr")?;
    let err_copier = std::thread::spawn(move || {
        let _ = std::io::copy(&mut stderr, &mut std::io::stderr());
    });
    let stdout = child.stdout.take().context("vng stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut captured = String::new();
    let mut last_output = Instant::now();
    let status = loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                println!("{line}");
                let _ = std::io::stdout().flush();
                captured.push_str(&line);
                captured.push('\n');
                last_output = Instant::now();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break child.wait()?,
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if last_output.elapsed() > timeout {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
            let _ = child.wait();
            let _ = std::fs::remove_file(&script_path);
            bail!(
                "the {} guest printed nothing for {} s: killed (NPC_VM_TIMEOUT_SECS raises the limit)",
                kernel.version,
                timeout.as_secs()
            );
        }
    };
    // Lines still in the pipe when vng ended (not joining the reader: a stray qemu could hold
    // the pipe open).
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        println!("{line}");
        captured.push_str(&line);
        captured.push('\n');
    }
    drop((reader, err_copier));
    let _ = std::fs::remove_file(&script_path);
    step(&format!(
        "{} guest finished with {status} after {} s",
        kernel.version,
        started.elapsed().as_secs()
    ));
    Ok((status, captured))
}
