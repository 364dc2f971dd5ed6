//! Developer commands: `cargo xtask setup | build-ebpf | test | demo | bench`.
//!
//! `test` and `demo` run `setup` first, so on a fresh machine they are all a user types. Every step
//! of `setup` is idempotent and says what is wrong and what to do when it fails.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install what building and testing need (root, BPF, bpffs, nightly, rust-src,
    /// bpf-linker, iproute2).
    Setup,
    /// Build the eBPF object alone (cargo build of npc-agent also does this, through build.rs).
    BuildEbpf,
    /// Setup, then every test: unit, property, datapath (BPF_PROG_TEST_RUN) and network-namespace tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, then replay the seed walk-through in the lab.
    Demo,
    /// Build the agent's container image without a Docker daemon: a static (musl) binary in an
    /// otherwise empty image, written as an OCI archive (umoci) at target/npc-agent-image.tar.
    Image,
    /// Install only what building needs (nightly, rust-src, bpf-linker): for container builds,
    /// where there is no root, BPF or bpffs to check.
    SetupBuild,
    /// Setup, then the benchmarks: compile time, entries and memory at 1k/10k/50k pods, and
    /// nanoseconds per packet in the kernel (BPF_PROG_TEST_RUN).
    Bench {
        /// Cluster sizes for the compiler benchmark (default 1000 10000 50000).
        sizes: Vec<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test { args } => {
            setup()?;
            // The image test checks a freshly built archive.
            let archive = image()?;
            test(&args, &archive)
        }
        Cmd::Demo => {
            setup()?;
            demo()
        }
        Cmd::Image => {
            setup_build()?;
            image().map(|_| ())
        }
        Cmd::SetupBuild => setup_build(),
        Cmd::Bench { sizes } => {
            setup()?;
            bench(&sizes)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("setup: {what}");
}

fn setup() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "setup needs root (it mounts bpffs, loads eBPF programs and creates network namespaces): run it with sudo"
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() && !Path::new("/proc/sys/net/core/bpf_jit_enable").exists() {
        bail!(
            "this kernel shows no BPF support (/proc/sys/net/core/bpf_jit_enable missing): use a kernel built with CONFIG_BPF_SYSCALL"
        );
    }
    ensure_bpffs()?;
    setup_build()?;
    ensure_tool("ip", "iproute2")?;
    ensure_tool("nsenter", "util-linux")?;
    step("ready");
    Ok(())
}

fn setup_build() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

pub const IMAGE_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds target/npc-agent-image.tar (an OCI archive) and returns its path.
fn image() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    ensure_tool("musl-gcc", "musl-tools")?;
    ensure_tool("umoci", "umoci")?;
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|l| l.trim() == IMAGE_TARGET) {
        step(&format!(
            "adding the {IMAGE_TARGET} target (static binaries for the image)"
        ));
        run(Command::new("rustup").args(["target", "add", IMAGE_TARGET]))?;
    }
    step("building the static agent binary");
    run(Command::new("cargo")
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "npc-agent",
            "--bin",
            "npc-agent",
            "--target",
            IMAGE_TARGET,
        ])
        .env(format!("CC_{}", IMAGE_TARGET.replace('-', "_")), "musl-gcc"))?;
    let binary = root.join(format!("target/{IMAGE_TARGET}/release/npc-agent"));
    let version = env!("CARGO_PKG_VERSION");

    let work = root.join("target/image");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let layout = work.join("oci");
    let image_ref = format!("{}:{version}", layout.display());
    let bundle = work.join("bundle");
    step("assembling the image with umoci");
    run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image_ref]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image_ref])
        .arg(&bundle))?;
    let bin_dir = bundle.join("rootfs/usr/local/bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::copy(&binary, bin_dir.join("npc-agent")).context("copying the agent into the image")?;
    run(Command::new("umoci")
        .args(["repack", "--image", &image_ref])
        .arg(&bundle))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image_ref,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        "/usr/local/bin/npc-agent",
        "--config.cmd",
        "run",
        // Root inside the container: pins under the host's /sys/fs/bpf are root's. The
        // DaemonSet grants only BPF, NET_ADMIN and PERFMON on top.
        "--config.user",
        "0:0",
        "--config.label",
        "org.opencontainers.image.title=npc-agent",
        "--config.label",
        &format!("org.opencontainers.image.version={version}"),
        "--config.label",
        "org.opencontainers.image.description=eBPF Kubernetes NetworkPolicy enforcer (node agent)",
        "--config.label",
        "org.opencontainers.image.licenses=Apache-2.0",
    ]))?;
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout))?;
    let archive = root.join("target/npc-agent-image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    eprintln!(
        "image: {}
push it with: skopeo copy oci-archive:{} docker://REGISTRY/npc-agent:{version}",
        archive.display(),
        archive.display()
    );
    Ok(archive)
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    step("mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs failed: is this a container without CAP_SYS_ADMIN?")
}

fn ensure_nightly() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the nightly toolchain for the eBPF build")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (for the eBPF build)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly (needed by -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// The nightly's LLVM major version and the path of its shared libLLVM.
fn nightly_llvm() -> anyhow::Result<(u32, PathBuf, PathBuf)> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not say its LLVM version")?;
    let major: u32 = llvm
        .split('.')
        .next()
        .unwrap_or("")
        .parse()
        .context("parsing the LLVM version")?;
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let lib = sysroot.join("lib");
    let so = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib.display()))?;
    Ok((major, lib, so))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let (major, lib, so) = nightly_llvm()?;
    if output(Command::new("bpf-linker").arg("--version")).is_ok() {
        // A linker built against another LLVM would fail later with bitcode errors; rebuild it.
        let linked = output(Command::new("ldd").arg(which("bpf-linker").unwrap_or_default())).unwrap_or_default();
        if linked.is_empty() || linked.contains(so.file_name().and_then(|n| n.to_str()).unwrap_or("-")) {
            return Ok(());
        }
        step("bpf-linker is linked against another LLVM; rebuilding it");
    }
    if !(21..=23).contains(&major) {
        bail!("the nightly uses LLVM {major}; bpf-linker 0.13 supports LLVM 21-23: install a matching nightly");
    }
    step(&format!(
        "building bpf-linker 0.13 against the nightly's own LLVM {major} (about a minute)"
    ));
    let prefix = std::env::temp_dir().join(format!("npc-llvm-prefix-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&so, &link).context("linking libLLVM.so into the prefix")?;
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker@0.13.0",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib.display())))
    .context("building bpf-linker failed")
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn ensure_tool(bin: &str, package: &str) -> anyhow::Result<()> {
    if which(bin).is_some() {
        return Ok(());
    }
    step(&format!("installing {package} (for `{bin}`)"));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get").args(["install", "-y", "-qq", package]))
        .with_context(|| format!("`{bin}` is missing and apt-get could not install {package}"))
}

fn build_ebpf() -> anyhow::Result<()> {
    // The same flags aya-build uses from npc-agent's build.rs.
    run(Command::new("cargo")
        .current_dir(workspace_root().join("npc-ebpf"))
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        ))?;
    eprintln!(
        "built {}",
        workspace_root().join("target/bpfel-unknown-none/release/npc").display()
    );
    Ok(())
}

fn test(extra: &[String], image_archive: &Path) -> anyhow::Result<()> {
    // Network-namespace tests share the host's bpffs and iproute2 state: one test thread keeps
    // their output readable and their timing honest on a 2-core machine.
    let mut child = Command::new("cargo")
        .current_dir(workspace_root())
        .args([
            "test",
            "--workspace",
            "--exclude",
            "npc-ebpf",
            "--all-targets",
            "--",
            "--test-threads=1",
        ])
        .args(extra)
        .env("NPC_IMAGE_ARCHIVE", image_archive)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output and add up every binary's "test result" line into one closing line.
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_end_matches('.')
                    .rsplit(' ')
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                match kind {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

fn bench(sizes: &[usize]) -> anyhow::Result<()> {
    let root = workspace_root();
    let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["bench", "-p", "npc-agent", "--bench", "compile", "--"])
        .args(&sizes))?;
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["bench", "-p", "npc-integration", "--bench", "datapath"]))
}

fn demo() -> anyhow::Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--release", "-p", "npc-agent"]))?;
    run(Command::new(root.join("target/release/npc-agent"))
        .current_dir(&root)
        .args(["lab", "walkthrough", "--dir", "manifests/examples/walkthrough"]))
}
