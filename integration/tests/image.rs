//! The container image `cargo xtask image` builds (`cargo xtask test` builds it first and passes
//! its path in NPC_IMAGE_ARCHIVE): a valid OCI archive whose config runs the agent as intended,
//! holding one static binary that runs.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn archive() -> PathBuf {
    let path = std::env::var_os("NPC_IMAGE_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/npc-agent-image.tar"));
    assert!(
        path.exists(),
        "no image archive at {}: build it with `cargo xtask image` (`cargo xtask test` does)",
        path.display()
    );
    path
}

fn blob(dir: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').expect("algo:hex digest");
    dir.join("blobs").join(algo).join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read blob")).expect("JSON blob")
}

fn untar(args: &[&str], file: &Path, into: &Path) {
    std::fs::create_dir_all(into).expect("mkdir");
    let status = Command::new("tar")
        .args(args)
        .arg(file)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar");
    assert!(status.success(), "tar {args:?} {}", file.display());
}

/// An ELF executable with no PT_INTERP program header needs no dynamic loader: static.
fn is_static_elf(bytes: &[u8]) -> bool {
    assert_eq!(&bytes[..4], b"\x7fELF", "an ELF file");
    assert_eq!(bytes[4], 2, "64-bit");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| u32::from_le_bytes(bytes[phoff + i * phentsize..][..4].try_into().expect("4 bytes")) != 3)
}

#[test]
fn the_image_runs_the_static_agent_as_configured() {
    let archive = archive();
    let dir = std::env::temp_dir().join(format!("npc-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let layout = dir.join("layout");
    untar(&["-xf"], &archive, &layout);

    let layout_file = json(&layout.join("oci-layout"));
    assert_eq!(layout_file["imageLayoutVersion"], "1.0.0");
    let index = json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image");
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        env!("CARGO_PKG_VERSION"),
        "tagged with the version"
    );
    let manifest = json(&blob(&layout, manifests[0]["digest"].as_str().expect("digest")));
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().expect("config digest"),
    ));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/npc-agent"]));
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert_eq!(c["User"], "0:0");
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "npc-agent");
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    let rootfs = dir.join("rootfs");
    for layer in manifest["layers"].as_array().expect("layers") {
        untar(
            &["-xzf"],
            &blob(&layout, layer["digest"].as_str().expect("layer digest")),
            &rootfs,
        );
    }
    let files: Vec<String> = walk(&rootfs);
    assert_eq!(files, ["usr/local/bin/npc-agent"], "nothing but the agent in the image");
    let binary = rootfs.join("usr/local/bin/npc-agent");
    assert!(
        is_static_elf(&std::fs::read(&binary).expect("read binary")),
        "a static binary"
    );
    let out = Command::new(&binary).arg("--version").output().expect("run the agent");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("npc-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Regular files under `root`, relative, sorted.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).expect("under root").display().to_string());
            }
        }
    }
    out.sort();
    out
}
