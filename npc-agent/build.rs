//! Builds the eBPF object (`npc-ebpf`) with the nightly toolchain and bpf-linker, and leaves it in
//! OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs what this needs; without it
//! the error below says so instead of a wall of linker output.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // aya-build tracks npc-ebpf's own sources; the shared types live in npc-common.
    println!("cargo:rerun-if-changed=../npc-common/src");
    if std::env::var_os("AYA_BUILD_SKIP").is_none() && which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it builds bpf-linker against the nightly's LLVM)"
        ));
    }
    // `--features npc-agent/profile-paths` builds the programs with their path probes (see
    // npc_common::path_profile): for `cargo xtask bench traffic --profile-paths` only.
    let profile = std::env::var_os("CARGO_FEATURE_PROFILE_PATHS").is_some();
    let ebpf = Package {
        name: "npc-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../npc-ebpf"),
        features: if profile { &["profile"] } else { &[] },
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the eBPF programs (npc-ebpf) failed; `cargo xtask setup` installs the toolchain")
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
