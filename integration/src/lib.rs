//! Helpers for the privileged tests: they run the real datapath in the real kernel.

pub mod scenario;

/// Fails (never skips) when the test cannot do what it exists to do.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and creates network namespaces: run it as root (`sudo cargo xtask test`)"
    );
    assert!(
        std::path::Path::new("/sys/fs/bpf").exists(),
        "no /sys/fs/bpf: this kernel or container has no BPF filesystem (`cargo xtask setup` mounts it)"
    );
}

/// A name unique to this test process, for netns and pin directories.
pub fn tag(test: &str) -> String {
    format!("npct{}{}", std::process::id() % 100_000, test)
}
