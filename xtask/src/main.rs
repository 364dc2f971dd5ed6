//! Developer commands: `cargo xtask setup | build-ebpf | test | test-vm | demo | bench`.
//!
//! `test` and `demo` run `setup` first, so on a fresh machine they are all a user types. Every step
//! of `setup` is idempotent and says what is wrong and what to do when it fails.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod sys;
mod vm;

use sys::{ensure_tool, output, run, step, which};

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
    /// Setup, then every test: unit, property, datapath (BPF_PROG_TEST_RUN) and network-namespace
    /// tests on this kernel, then the privileged ones again on Debian's Linux 6.1 in qemu.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, then only the 6.1 part of `test`: every privileged test binary of npc-integration,
    /// in one qemu guest (installs qemu, the kernel and virtme-ng when missing).
    TestVm {
        /// Extra arguments for every test binary (a name filter, --nocapture...).
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
    /// nanoseconds per packet in the kernel (BPF_PROG_TEST_RUN). `bench traffic`: real traffic
    /// between two lab pods with no enforcement, npc and weave-npc's iptables layout. `bench
    /// scale`: the agent against generated clusters (start → enforcing, RSS, edit → maps).
    /// `bench traffic --profile-paths`: the programs built with their path probes, and where
    /// their time goes in real traffic (docs/benchmarks.md).
    Bench {
        /// `traffic` (then optionally `--profile-paths`), `scale`, or cluster sizes for the
        /// compiler benchmark (default 1000 10000 50000).
        #[arg(allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Test { args } => {
            setup()?;
            // The image test checks a freshly built archive: its shape (layout, config, one static
            // binary that runs), not its speed, so not in release (8 of CI's 34 minutes).
            let archive = image("image-test")?;
            let started = std::time::Instant::now();
            let host = test(&args, &archive);
            let host_time = started.elapsed();
            let guest = test_vm(&[], false);
            let (h, g) = (
                host.as_ref().cloned().unwrap_or_default(),
                guest.as_ref().cloned().unwrap_or_default(),
            );
            println!(
                "host ({}): {} passed, {} failed in {} s",
                vm::host_kernel(),
                h.passed,
                h.failed,
                host_time.as_secs()
            );
            match &guest {
                Ok(g) => println!("{}: {} passed, {} failed", g.label, g.passed, g.failed),
                Err(e) => println!("vm: {e:#}"),
            }
            println!(
                "{} passed, {} failed (in {} s)",
                h.passed + g.passed,
                h.failed + g.failed,
                started.elapsed().as_secs()
            );
            host?;
            guest?;
            if h.failed + g.failed > 0 {
                bail!("{} tests failed", h.failed + g.failed);
            }
            Ok(())
        }
        Cmd::TestVm { args } => {
            setup()?;
            let g = test_vm(&args, true)?;
            println!("{}: {} passed, {} failed", g.label, g.passed, g.failed);
            println!("{} passed, {} failed", g.passed, g.failed);
            if g.failed > 0 {
                bail!("{} tests failed in the {} guest", g.failed, g.label);
            }
            Ok(())
        }
        Cmd::Demo => {
            setup()?;
            demo()
        }
        Cmd::Image => {
            setup_build()?;
            image("release").map(|_| ())
        }
        Cmd::SetupBuild => setup_build(),
        Cmd::Bench { args } => {
            setup()?;
            if let Some(which @ ("traffic" | "scale")) = args.first().map(String::as_str) {
                // The scale benchmark runs the agent binary: build it first, in the same profile.
                if which == "scale" {
                    run(Command::new("cargo").current_dir(workspace_root()).args([
                        "build",
                        "--release",
                        "-p",
                        "npc-agent",
                    ]))?;
                }
                let mut cargo = Command::new("cargo");
                cargo
                    .current_dir(workspace_root())
                    .args(["bench", "-p", "npc-integration", "--bench", which]);
                match &args[1..] {
                    [] => {}
                    [flag] if which == "traffic" && flag == "--profile-paths" => {
                        cargo.args(["--features", "npc-agent/profile-paths"]);
                    }
                    other => anyhow::bail!(
                        "`bench {which}` takes {other:?}: only `bench traffic --profile-paths` takes more"
                    ),
                }
                return run(&mut cargo);
            }
            let sizes = args
                .iter()
                .map(|a| {
                    a.parse()
                        .with_context(|| format!("{a:?} is neither `traffic`, `scale` nor a cluster size"))
                })
                .collect::<anyhow::Result<Vec<usize>>>()?;
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
    // bpftool_dump.rs checks `bpftool map dump` against the maps' BTF.
    ensure_tool("bpftool", "bpftool")?;
    // The lab renders kube-proxy's NAT rules with iptables-restore.
    ensure_tool("iptables-restore", "iptables")?;
    // The traffic benchmark renders weave-npc's ipsets.
    ensure_tool("ipset", "ipset")?;
    step("ready");
    Ok(())
}

fn setup_build() -> anyhow::Result<()> {
    ensure_nightly()?;
    ensure_bpf_linker()
}

pub const IMAGE_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds target/npc-agent-image.tar (an OCI archive; `-<profile>` before `.tar` for a profile
/// other than release, so that a test image is never the one pushed) and returns its path.
fn image(profile: &str) -> anyhow::Result<PathBuf> {
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
            "--profile",
            profile,
            "-p",
            "npc-agent",
            "--bin",
            "npc-agent",
            "--target",
            IMAGE_TARGET,
        ])
        .env(format!("CC_{}", IMAGE_TARGET.replace('-', "_")), "musl-gcc"))?;
    let binary = root.join(format!("target/{IMAGE_TARGET}/{profile}/npc-agent"));
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
    let archive = root.join(match profile {
        "release" => "target/npc-agent-image.tar".to_string(),
        _ => format!("target/npc-agent-image-{profile}.tar"),
    });
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

/// libtest counts, added up over binaries.
#[derive(Clone, Debug, Default)]
struct Counts {
    label: String,
    passed: u64,
    failed: u64,
}

impl Counts {
    /// Adds a `test result: ok. 3 passed; 1 failed; ...` line (other lines are ignored).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim_start().strip_prefix("test result: ") else {
            return;
        };
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
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// The package selection of the host's `cargo test`. test_vm builds the guest's binaries with it
/// too: another selection (`-p npc-agent`, `-p npc-integration`) unifies other features
/// (npc-common without `default`, npc-policy without `scenario`) and rebuilt npc-common and
/// everything above it (~110 s of CI) into binaries the host never ran.
const TEST_SELECTION: &[&str] = &[
    "--workspace",
    "--exclude",
    "npc-ebpf",
    // Run on stable alone (`policy_core_alone`), where it must pass.
    "--exclude",
    "npc-policy",
    "--lib",
    "--bins",
    "--tests",
];

/// What `cargo xtask test` runs in the 6.1 guest, per binary: what depends on the kernel (load
/// and verifier, BTF, the clsact attach, restart, detach and uninstall, traffic through attached
/// programs), not what the host's run already proves on any kernel. `None`: not run in the
/// guest; an empty list: every test; else the tests these libtest filters match.
/// (`cargo xtask test-vm` runs every test of every binary.)
fn guest_filters(name: &str) -> Option<&'static [&'static str]> {
    match name {
        // Checks an archive, not a kernel.
        "image" => None,
        // The quick benchmarks check their report fields: no timing, nothing kernel-specific.
        "bench_scale" | "bench_traffic" => None,
        // The watch, relist and coalescing logic is the agent's and the fake API server's (and
        // timing-bound under emulation); re-attaching a recreated interface is the kernel's.
        "kube_agent" => Some(&["a_recreated_interface_is_attached_again"]),
        // `lab run`'s output and live edits are the host's; clsact cleanup by `lab down` and on
        // SIGINT is 6.1's.
        "lab_cli" => Some(&[
            "a_killed_lab_up_is_cleaned_up_by_down",
            "ctrl_c_stops_lab_up_and_leaves_nothing",
        ]),
        _ => Some(&[]),
    }
}

/// Boots Debian's 6.1 once and runs the privileged test binaries of npc-integration in it, one
/// test thread: with `full` (or filters in `extra`) every test of every binary but `image`, else
/// the kernel-specific set ([`guest_filters`]) with a quarter of the random cases. A binary that
/// dies without a `test result` line counts as one failure.
fn test_vm(extra: &[String], full: bool) -> anyhow::Result<Counts> {
    let root = workspace_root();
    let kernel = vm::ensure_vm_tools()?;
    // The tests start the agent binary; `cargo test --no-run` does not build it. The host's
    // selection, so that both are fresh after the host's run.
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--workspace", "--exclude", "npc-ebpf", "--bins"]))?;
    let out = output(
        Command::new("cargo")
            .current_dir(&root)
            .arg("test")
            .args(TEST_SELECTION)
            .args(["--no-run", "--message-format=json"]),
    )?;
    let integration_tests = format!(r#""src_path":"{}/integration/tests/"#, root.display());
    let mut binaries: Vec<(String, String)> = out
        .lines()
        .filter(|l| l.contains(r#""kind":["test"]"#) && l.contains(r#""executable":""#))
        .filter(|l| l.contains(&integration_tests))
        .filter_map(|l| {
            let field = |key: &str, from: &str| -> Option<String> {
                let rest = &from[from.find(key)? + key.len()..];
                Some(rest[..rest.find('"')?].to_string())
            };
            let target = &l[l.find(r#""target":{"#)?..];
            Some((field(r#""name":""#, target)?, field(r#""executable":""#, l)?))
        })
        .filter(|(name, _)| name != "image")
        .collect();
    let selective = !full && extra.is_empty();
    binaries.sort();
    binaries.dedup();
    if binaries.is_empty() {
        bail!("cargo found no npc-integration test binaries");
    }
    let extra: String = extra
        .iter()
        .map(|a| format!(" '{}'", a.replace('\'', r"'\''")))
        .collect();
    let mut script = String::from("failed=0\n");
    for (name, exe) in &binaries {
        let filters = match guest_filters(name) {
            None if selective => continue,
            Some(filters) if selective => filters.iter().map(|f| format!(" '{f}'")).collect(),
            _ => extra.clone(),
        };
        script += &format!(
            "echo 'vm: running {name}'; start=$(date +%s); '{exe}' --test-threads=1{filters}; rc=$?; \
             echo \"vm: {name} exited $rc after $(( $(date +%s) - start )) s\"; \
             if [ $rc -ne 0 ]; then failed=1; echo 'vm-binary-failed: {name}'; fi\n"
        );
    }
    script += "exit $failed\n";
    let mut env = vec![("RUST_BACKTRACE".to_string(), "1".to_string())];
    if selective {
        // Emulated, a random case costs ten times the host's: the guest checks that the
        // verifier takes the programs and that they compute the same verdicts, not new clusters.
        env.push(("NPC_CASES_DIVISOR".to_string(), "4".to_string()));
    }
    let (status, stdout) = vm::run_in_vm(&kernel, &root, &["sh".into(), "-c".into(), script], &env)?;
    let mut counts = Counts {
        label: format!("vm ({})", kernel.version),
        ..Counts::default()
    };
    let mut current_ok = std::collections::BTreeMap::new();
    let mut name = String::new();
    for line in stdout.lines() {
        counts.add_line(line);
        if let Some(n) = line.strip_prefix("vm: running ") {
            name = n.to_string();
            current_ok.insert(name.clone(), false);
        }
        if line.trim_start().starts_with("test result: ") {
            current_ok.insert(name.clone(), true);
        }
        if let Some(n) = line.strip_prefix("vm-binary-failed: ")
            && !line.is_empty()
            && current_ok.get(n) == Some(&false)
        {
            counts.failed += 1; // died before its summary
        }
    }
    if !status.success() && counts.failed == 0 {
        counts.failed += 1;
        eprintln!("vm: the guest exited with {status} and no test reported a failure");
    }
    Ok(counts)
}

/// Runs the host's tests and returns their counts (an error when cargo test fails).
fn test(extra: &[String], image_archive: &Path) -> anyhow::Result<Counts> {
    // Network-namespace tests share the host's bpffs and iproute2 state: one test thread keeps
    // their output readable and their timing honest on a 2-core machine.
    // Benchmarks are built (so they cannot rot) but not run: their timing loops are for
    // `cargo xtask bench`, and a test run measures nothing.
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--workspace",
        "--exclude",
        "npc-ebpf",
        "--benches",
    ]))?;
    let mut child = Command::new("cargo");
    child
        .current_dir(workspace_root())
        .arg("test")
        .args(TEST_SELECTION)
        .args(["--", "--test-threads=1"])
        .args(extra)
        .env("NPC_IMAGE_ARCHIVE", image_archive);
    let mut counts = Counts {
        label: "host".into(),
        ..Counts::default()
    };
    let status = run_counted(&mut child, &mut counts).context("running cargo test")?;
    if !status.success() {
        println!("host: {} passed, {} failed", counts.passed, counts.failed);
        bail!("cargo test failed with {status}");
    }
    policy_core_alone(&mut counts)?;
    if extra.is_empty() {
        path_probes(&mut counts)?;
    }
    Ok(counts)
}

/// The quick traffic benchmark again, with the programs built with their path probes (the
/// `profile-paths` feature, for `cargo xtask bench traffic --profile-paths`): that build must
/// still load, and report, for the instrument not to rot between the sessions that use it.
fn path_probes(counts: &mut Counts) -> anyhow::Result<()> {
    step("the quick traffic benchmark with the programs' path probes (--features profile-paths)");
    let mut child = Command::new("cargo");
    child.current_dir(workspace_root()).args([
        "test",
        "-p",
        "npc-integration",
        "--features",
        "profile-paths",
        "--test",
        "bench_traffic",
        "--",
        "--test-threads=1",
    ]);
    let status = run_counted(&mut child, counts).context("running the path-probe build's test")?;
    if !status.success() {
        bail!("the quick traffic benchmark with path probes failed with {status}");
    }
    Ok(())
}

/// Runs a `cargo test`, echoing its output and adding up every binary's "test result" line.
fn run_counted(cmd: &mut Command, counts: &mut Counts) -> anyhow::Result<std::process::ExitStatus> {
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    Ok(child.wait()?)
}

/// The pure policy core's tests with nothing on PATH but the stable toolchain and the system:
/// no rustup proxy, no nightly, no bpf-linker (so nothing below npc-policy can need them).
fn policy_core_alone(counts: &mut Counts) -> anyhow::Result<()> {
    let root = workspace_root();
    let sysroot = output(Command::new("rustc").args(["+stable", "--print", "sysroot"]))?;
    let bin = PathBuf::from(sysroot.trim()).join("bin");
    step("npc-policy on stable alone (PATH: the stable toolchain, /usr/bin, /bin)");
    let mut child = Command::new(bin.join("cargo"));
    child
        .current_dir(&root)
        .args(["test", "-p", "npc-policy"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("CARGO_TARGET_DIR", root.join("target/stable-only"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    let status = run_counted(&mut child, counts).context("running cargo test -p npc-policy on stable")?;
    if !status.success() {
        bail!("cargo test -p npc-policy (stable alone) failed with {status}");
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
