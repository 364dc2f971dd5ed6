//! Helpers for the privileged tests: they run the real datapath in the real kernel.

pub mod cluster;
pub mod fake_api;
pub mod packet;
pub mod raw;
pub mod scale;
pub mod traffic;

/// A property test's case count: `default`, divided by NPC_CASES_DIVISOR (at least one case),
/// which `cargo xtask test` sets where a case costs ten times the host's (the emulated 6.1 guest).
pub fn cases(default: u32) -> u32 {
    let divisor = std::env::var("NPC_CASES_DIVISOR")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1);
    (default / divisor.max(1)).max(1)
}

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

impl TestDatapath {
    pub fn pin_root(&self) -> &std::path::Path {
        &self.pin_root
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

/// Parses `docs` (file name, YAML text) as the files source does, fails on any error, and
/// compiles them as the agent on `node` would.
pub fn compile_for(node: &str, docs: &[(&str, &str)]) -> npc_policy::compiler::Compiled {
    let mut loaded = npc_policy::files::Loaded::default();
    for (name, text) in docs {
        loaded.extend(npc_policy::files::parse_str(name.as_ref(), text));
    }
    assert!(loaded.errors.is_empty(), "test manifests: {:?}", loaded.errors);
    let state = npc_policy::model::State {
        node_name: Some(node.into()),
        ..loaded.to_state()
    };
    npc_policy::compiler::compile(&state)
}

/// The `npc-agent` binary of this build (cargo builds it next to the test binaries' `deps/`).
pub fn npc_agent_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("npc-agent");
    assert!(
        bin.exists(),
        "{} is not built: run the tests with `cargo xtask test` (or `cargo build -p npc-agent` first)",
        bin.display()
    );
    bin
}

/// The repository's `manifests/examples/<name>`.
pub fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples")
        .join(name)
}

/// Waits for `cond` to hold, polling, up to `deadline`; false if it never did.
pub fn wait_for(deadline: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A thread that runs until told to stop: stopped and joined on [`Self::stop_and_join`] or drop.
pub struct Stoppable<T> {
    stop: tokio_util::sync::CancellationToken,
    handle: Option<std::thread::JoinHandle<T>>,
}

impl<T: Send + 'static> Stoppable<T> {
    /// Runs `f` on a thread of its own with the token that stops it.
    pub fn spawn(f: impl FnOnce(tokio_util::sync::CancellationToken) -> T + Send + 'static) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        Self {
            stop,
            handle: Some(std::thread::spawn(move || f(token))),
        }
    }

    /// Whether the thread has been asked to stop (for loops that poll rather than wait).
    pub fn token(&self) -> tokio_util::sync::CancellationToken {
        self.stop.clone()
    }

    /// Stops the thread and returns what it returned (panics if it panicked).
    pub fn stop_and_join(mut self) -> T {
        self.stop.cancel();
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("the thread panicked")
    }
}

impl<T> Drop for Stoppable<T> {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
