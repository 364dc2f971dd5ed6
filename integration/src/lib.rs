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

/// A datapath loaded under its own pin directory for one test, removed again on drop.
pub struct TestDatapath {
    pub dp: npc_agent::datapath::Datapath,
    pin_root: std::path::PathBuf,
}

impl TestDatapath {
    /// Requires root (fails loudly without it), then loads under `/sys/fs/bpf/<tag(name)>`.
    pub fn load(name: &str) -> Self {
        require_root();
        let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", tag(name)));
        let _ = std::fs::remove_dir_all(&pin_root);
        let dp = npc_agent::datapath::Datapath::load(&pin_root).expect("load the datapath");
        Self { dp, pin_root }
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}
