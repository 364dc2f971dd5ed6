//! The kernel side as the agent sees it: the loaded object and its pinned maps.
//!
//! - this file: loading (programs, maps pinned by name) and reading the maps back;
//! - [`sync`]: MapSync, writing [`npc_policy::compiler::DesiredMaps`] into the maps in an order that never opens a hole;
//! - [`links`]: attaching the programs to an interface and detaching them (TCX links or clsact
//!   filters, [`nl`] for the netlink requests aya lacks);
//! - [`inspect`]: every pinned map decoded for people (`npc-agent inspect`);
//! - [`test_run`]: running a program on a crafted packet (BPF_PROG_TEST_RUN);
//! - [`bpffs`], [`log`]: the bpf filesystem, and the datapath's own log lines.
mod bpffs;
pub mod inspect;
mod links;
mod log;
mod nl;
mod sync;
mod test_run;

use self::log::LogPump;
pub use self::{
    bpffs::ensure_bpffs,
    links::{AttachPath, NL_PRIORITY, ifindex_of, kernel_release, uninstall},
    sync::Touched,
};
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::LpmTrie},
    programs::{ProgramError, SchedClassifier, TcAttachType, links::LinkError},
};
use npc_common::{
    Config, ConntrackKey, ConntrackKey4, ConntrackValue, DropKey, EndpointInfo, PolicyKey, PolicyValue, PortLabelKey,
    PortRangeKey, SourceKey, ct_origin, ct_timeout, map_names, program_names,
};

use npc_policy::compiler::CidrKey;

/// The eBPF object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npc"));

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/npc";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] MapError),
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("{0}")]
    Environment(String),
    #[error(
        "the map {map} pinned under {pin_root} has another layout than this npc's ({pinned}; this npc needs {expected}): \
         an npc of another version pinned it. Nothing was loaded, and what it pinned still enforces. Remove the old \
         datapath with `npc-agent run --uninstall --pin-root {pin_root}` (the node is unenforced until this agent \
         starts) and start again"
    )]
    PinnedLayout {
        map: String,
        pin_root: String,
        pinned: String,
        expected: String,
    },
    #[error(
        "{map} would need {wanted} entries and holds at most {capacity}: nothing was written, the previous state \
         stays enforced"
    )]
    MapFull {
        map: &'static str,
        wanted: usize,
        capacity: u32,
    },
}

impl DatapathError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Load(_) => "load",
            Self::Program(_) => "program",
            Self::Map(_) => "map",
            Self::Link(_) | Self::Pin(_) => "link",
            Self::Io { .. } => "io",
            Self::MissingMap(_) | Self::MissingProgram(_) => "object",
            Self::NoInterface(_) => "interface",
            Self::Environment(_) => "environment",
            Self::PinnedLayout { .. } => "pinned_layout",
            Self::MapFull { .. } => "map_full",
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    move |source| DatapathError::Io {
        what: what.into(),
        source,
    }
}

/// Which hook of the host-side veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// tc ingress: packets from the pod (its egress policy).
    FromPod,
    /// tc egress: packets to the pod (its ingress policy).
    ToPod,
}

impl Hook {
    const BOTH: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    fn program(self) -> &'static str {
        match self {
            Self::FromPod => program_names::FROM_POD,
            Self::ToPod => program_names::TO_POD,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::FromPod => TcAttachType::Ingress,
            Self::ToPod => TcAttachType::Egress,
        }
    }

    fn pin_suffix(self) -> &'static str {
        match self {
            Self::FromPod => "from_pod",
            Self::ToPod => "to_pod",
        }
    }
}
/// The ids of every BPF program loaded in the kernel (for tests that check what is left).
pub fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok().map(|p| p.id()))
        .collect()
}

/// (address → identity, ipBlock prefix → class) as found in the kernel maps.
pub type KernelNumbering = (BTreeMap<[u8; 16], u32>, BTreeMap<CidrKey, u32>);

/// (exact allow entries, port-range entries as (prefix length, key, value)).
pub type PolicyEntries = (Vec<(PolicyKey, PolicyValue)>, Vec<(u32, PortRangeKey, PolicyValue)>);

/// One program's run-time statistics (see [`Datapath::program_runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramRuns {
    pub program: &'static str,
    pub runs: u64,
    pub run_time: std::time::Duration,
}

/// Counts of what a sync wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
    /// The policy epoch was bumped (policy changed): tracked connections get re-checked.
    pub epoch_bumped: bool,
    /// Entries a full reconcile found different from what the last sync wrote (drift).
    pub repaired: usize,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    identities: HashMap<MapData, [u8; 16], u32>,
    cidrs: LpmTrie<MapData, [u8; 16], u32>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    port_ranges: LpmTrie<MapData, PortRangeKey, PolicyValue>,
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    conntrack4: HashMap<MapData, ConntrackKey4, ConntrackValue>,
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    sources: LpmTrie<MapData, SourceKey, u32>,
    port_labels: HashMap<MapData, PortLabelKey, u8>,
    /// The verdict events ring buffer, until the observer takes it.
    events: Option<RingBuf<MapData>>,
    _log: Option<LogPump>,
    /// What the last successful sync wrote (MapSync diffs against it; None: read the maps back).
    written: Option<sync::Written>,
    /// When a sync last read every map back.
    reconciled_at: Option<std::time::Instant>,
    /// Maps over 90% of their capacity (logged once on the way up).
    pressured: std::collections::BTreeSet<&'static str>,
    /// The conntrack sweep `load` ran, for the first metrics count (the table can hold 262k
    /// entries: walking it twice at start is a second of CPU for nothing).
    load_sweep: Option<ConntrackSweep>,
}

macro_rules! take_map {
    ($ebpf:expr, $name:expr) => {
        $ebpf
            .take_map($name)
            .ok_or(DatapathError::MissingMap($name))?
            .try_into()?
    };
}

impl Datapath {
    /// Loads the programs and opens (or creates) the maps pinned under `pin_root`. Maps pinned by
    /// an earlier agent are reused, so enforcement carries on across restarts.
    ///
    /// A load that fails removes the pins it created (and `pin_root`, if it created that), so a
    /// failed start leaves nothing behind; pins it found (an earlier agent's) stay, for a later
    /// start to adopt. The programs it loaded go with the dropped object.
    pub fn load(pin_root: &Path) -> Result<Self, DatapathError> {
        let path = AttachPath::current();
        tracing::info!(
            attach = path.label(),
            kernel = %kernel_release(),
            "attach path: {}",
            match path {
                AttachPath::Tcx => "TCX links (Linux 6.6+)",
                AttachPath::Clsact => "clsact qdisc and netlink cls_bpf filters (no TCX before Linux 6.6)",
            }
        );
        let existed = pin_root.exists();
        ensure_bpffs(pin_root)?;
        let names = || -> std::collections::BTreeSet<std::ffi::OsString> {
            std::fs::read_dir(pin_root)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
                .unwrap_or_default()
        };
        let before = names();
        let loaded = Self::load_pinned(pin_root);
        if let Err(e) = &loaded {
            let created: Vec<_> = names().into_iter().filter(|n| !before.contains(n)).collect();
            tracing::warn!(error = %e, pins = created.len(), "loading failed: removing the pins this load created");
            for name in created {
                let path = pin_root.join(name);
                let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
            }
            if !existed {
                let _ = std::fs::remove_dir(pin_root);
            }
        }
        loaded
    }

    fn load_pinned(pin_root: &Path) -> Result<Self, DatapathError> {
        let carried = take_previous_endpoints(pin_root)?;
        check_pinned_layouts(pin_root)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_root)
            .load(EBPF_OBJECT)?;
        let log = LogPump::start(&mut ebpf);
        for hook in Hook::BOTH {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.program())
                .ok_or(DatapathError::MissingProgram(hook.program()))?
                .try_into()?;
            load_retrying(prog)?;
        }
        let dp = Self {
            endpoints: take_map!(ebpf, map_names::ENDPOINTS),
            identities: take_map!(ebpf, map_names::IDENTITIES),
            cidrs: take_map!(ebpf, map_names::CIDRS),
            policy: take_map!(ebpf, map_names::POLICY),
            port_ranges: take_map!(ebpf, map_names::PORT_RANGES),
            conntrack: take_map!(ebpf, map_names::CONNTRACK),
            conntrack4: take_map!(ebpf, map_names::CONNTRACK4),
            drops: take_map!(ebpf, map_names::DROPS),
            config: take_map!(ebpf, map_names::CONFIG),
            events: Some(take_map!(ebpf, map_names::EVENTS)),
            stats: take_map!(ebpf, map_names::STATS),
            sources: take_map!(ebpf, map_names::SOURCES),
            port_labels: take_map!(ebpf, map_names::PORT_LABELS),
            ebpf,
            pin_root: pin_root.to_path_buf(),
            _log: log,
            written: None,
            reconciled_at: None,
            pressured: Default::default(),
            load_sweep: None,
        };
        std::fs::create_dir_all(dp.links_dir()).map_err(io_err("creating the links directory"))?;
        let mut dp = dp;
        let swept = dp.conntrack_sweep()?;
        if swept.rewritten > 0 {
            tracing::info!(
                entries = swept.rewritten,
                "conntrack: rewrote the previous releases' entries into the current tables"
            );
        }
        dp.load_sweep = Some(swept);
        for (ifindex, info) in &carried {
            dp.endpoints.insert(ifindex, info, 0)?;
        }
        if !carried.is_empty() {
            tracing::info!(
                endpoints = carried.len(),
                "carried the previous release's endpoints into the new layout"
            );
        }
        Ok(dp)
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_root.join("links")
    }

    fn link_pin(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.links_dir().join(format!("if{ifindex}_{}", hook.pin_suffix()))
    }

    fn program(&mut self, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(hook.program())
            .ok_or(DatapathError::MissingProgram(hook.program()))?
            .try_into()?)
    }

    /// Attaches both programs to a host-side interface (in the calling thread's network
    /// namespace). On kernels with TCX the links are pinned, so they outlive this process; an
    pub fn config(&self) -> Result<Config, DatapathError> {
        Ok(self.config.get(&0, 0)?)
    }

    pub fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        Ok(self.config.set(0, config, 0)?)
    }

    /// New connections allowed so far, summed over CPUs: (at ingress, at egress).
    pub fn allowed_connections(&self) -> Result<(u64, u64), DatapathError> {
        Ok((
            self.stat(npc_common::stats::ALLOWED_INGRESS)?,
            self.stat(npc_common::stats::ALLOWED_EGRESS)?,
        ))
    }

    /// How many instructions the verifier walked to accept each program (Linux 5.16+ reports it):
    /// the cost of a datapath change to load time, and the margin to the verifier's 1M limit.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        Hook::BOTH
            .map(|hook| {
                let count = self
                    .program_info(hook)
                    .ok()
                    .and_then(|info| info.verified_instruction_count());
                (hook.program(), count)
            })
            .into()
    }

    /// Each program's runs so far and their total time, summed over every interface it is on, as
    /// the kernel counts them while its run-time statistics are on (`aya::sys::enable_stats`, or
    /// `sysctl kernel.bpf_stats_enabled=1`; `bpftool prog show` prints the same `run_cnt` and
    /// `run_time_ns`). With the statistics off, the counters stand still.
    pub fn program_runs(&self) -> Result<Vec<ProgramRuns>, DatapathError> {
        Hook::BOTH
            .into_iter()
            .map(|hook| {
                let info = self.program_info(hook)?;
                Ok(ProgramRuns {
                    program: hook.program(),
                    runs: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }

    /// What the kernel reports about a hook's loaded program.
    fn program_info(&self, hook: Hook) -> Result<aya::programs::ProgramInfo, DatapathError> {
        let program = self
            .ebpf
            .program(hook.program())
            .ok_or(DatapathError::MissingProgram(hook.program()))?;
        Ok(program.info()?)
    }

    /// The path probes' figures, summed over CPUs: (times fired, nanoseconds) per
    /// `npc_common::path_profile` slot. `None` unless the programs were built with their probes
    /// (the `profile-paths` feature).
    pub fn path_profile(&self) -> Result<Option<Vec<(u64, u64)>>, DatapathError> {
        let Some(map) = self.ebpf.map(npc_common::path_profile::MAP) else {
            return Ok(None);
        };
        let map = PerCpuArray::<_, u64>::try_from(map)?;
        let sum = |index: u32| -> Result<u64, DatapathError> { Ok(map.get(&index, 0)?.iter().sum()) };
        (0..npc_common::path_profile::COUNT)
            .map(|slot| Ok((sum(slot * 2)?, sum(slot * 2 + 1)?)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Packets pods sent from addresses not their own, summed over CPUs.
    pub fn spoofed_packets(&self) -> Result<u64, DatapathError> {
        self.stat(npc_common::stats::SPOOFED)
    }

    /// Packets dropped by policy, every one (the drop counters count connections).
    pub fn denied_packets(&self) -> Result<u64, DatapathError> {
        self.stat(npc_common::stats::DENIED_PACKETS)
    }

    fn stat(&self, slot: u32) -> Result<u64, DatapathError> {
        Ok(self.stats.get(&slot, 0)?.iter().sum())
    }

    /// Every allow entry: exact ones, and port ranges as (prefix length, key, value).
    pub fn policy_entries(&self) -> Result<PolicyEntries, DatapathError> {
        let exact = self.policy.iter().collect::<Result<_, _>>()?;
        let ranges = self
            .port_ranges
            .iter()
            .map(|r| r.map(|(k, v)| (k.prefix_len(), k.data(), v)))
            .collect::<Result<_, _>>()?;
        Ok((exact, ranges))
    }

    /// Whether a datapath is pinned under `pin_root` (without creating one).
    pub fn is_pinned(pin_root: &Path) -> bool {
        pin_root.join(map_names::ENDPOINTS).exists()
    }

    /// The verdict events ring buffer (for the observer; once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// What the identities and ipBlock-class maps hold now (to adopt a previous agent's numbering).
    pub fn kernel_numbering(&self) -> Result<KernelNumbering, DatapathError> {
        let identities = self.identities.iter().collect::<Result<_, _>>()?;
        let cidrs = self
            .cidrs
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    (
                        CidrKey {
                            prefix_len: k.prefix_len(),
                            addr: k.data(),
                        },
                        v,
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok((identities, cidrs))
    }

    /// Drop counters summed over CPUs.
    pub fn drops(&self) -> Result<BTreeMap<DropKey, u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for entry in self.drops.iter() {
            let (key, values) = entry?;
            out.insert(key, values.iter().sum());
        }
        Ok(out)
    }

    pub fn drop_count(&self, key: DropKey) -> u64 {
        self.drops.get(&key, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Both tables' entries, IPv4 keys in their IPv4-mapped form.
    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, DatapathError> {
        let mut entries: Vec<_> = self.conntrack.iter().collect::<Result<_, _>>()?;
        for entry in self.conntrack4.iter() {
            let (key, value) = entry?;
            entries.push((key.mapped(), value));
        }
        Ok(entries)
    }

    /// Walks the conntrack table: counts the live connections (entries idle past their state's
    /// timeout are dead to the programs; only the LRU reclaims them), and rewrites entries keyed
    /// the way the release before shared entries keyed them.
    ///
    /// That release keyed an entry by its opening tuple; the programs now look one key up for
    /// both directions (lower end first, see [`ConntrackKey::reversed`]) and would miss entries
    /// whose opener was the higher end, judging their packets as new. The load sweeps once
    /// (while the previous programs still enforce, writing entries the old way), and the
    /// enforcer's first sweep after attaching catches what they wrote meanwhile.
    /// The sweep that loading ran (once: the caller counts it as its first).
    pub fn take_load_sweep(&mut self) -> Option<ConntrackSweep> {
        self.load_sweep.take()
    }

    pub fn conntrack_sweep(&mut self) -> Result<ConntrackSweep, DatapathError> {
        let now = monotonic_coarse_ns();
        // Modular, as the programs compute an entry's age (`now.wrapping_sub(last_seen)`), so
        // that both agree on every entry.
        let live = |value: &ConntrackValue| now.wrapping_sub(value.last_seen_ns) <= ct_timeout::of(value.state);
        let mut sweep = ConntrackSweep::default();
        let mut older = Vec::new();
        for entry in self.conntrack.iter() {
            let (key, value) = entry?;
            let ipv4 = ConntrackKey4::from_mapped(&key).is_some();
            if !key.is_normal() || ipv4 {
                older.push((key, value));
            } else if live(&value) {
                sweep.live_ipv6 += 1;
            }
        }
        sweep.rewritten = self.share(older)?;
        for entry in self.conntrack4.iter() {
            if live(&entry?.1) {
                sweep.live_ipv4 += 1;
            }
        }
        Ok(sweep)
    }

    /// Moves entries the programs of an older release wrote where the current ones do not look:
    /// keyed by their opening tuple (before shared entries), or IPv4 ones in `NPC_CONNTRACK`
    /// (before `NPC_CONNTRACK4`). Returns how many moved.
    fn share(&mut self, older: Vec<(ConntrackKey, ConntrackValue)>) -> Result<usize, DatapathError> {
        let mut rewritten = 0;
        for (key, mut value) in older {
            let shared = if key.is_normal() {
                key
            } else {
                // The older layout's pad byte reads as "opened by the key's src end"; swapped,
                // that end is the new key's dst.
                value.origin = ct_origin::DST;
                key.swapped()
            };
            // An entry the new programs already made for the connection is the fresher one.
            let inserted = match ConntrackKey4::from_mapped(&shared) {
                Some(key4) => self.conntrack4.insert(key4, value, BPF_NOEXIST),
                None => self.conntrack.insert(shared, value, BPF_NOEXIST),
            };
            match inserted {
                Ok(()) => rewritten += 1,
                Err(e) if map_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            match self.conntrack.remove(&key) {
                Err(e) if map_errno(&e) != Some(libc::ENOENT) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(rewritten)
    }

    pub fn endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, DatapathError> {
        Ok(self.endpoints.iter().collect::<Result<_, _>>()?)
    }
}

/// How many times a program load that the kernel interrupted is tried (libbpf's
/// `PROG_LOAD_ATTEMPTS`).
const PROG_LOAD_ATTEMPTS: usize = 5;

/// Loads a program, again when the kernel gives up with EAGAIN: the verifier stops when the
/// loading thread has a signal pending (`do_check` returns -EAGAIN), which happened here on a
/// test thread while another test thread was spawning `bpftool`. libbpf retries the same way.
fn load_retrying(prog: &mut SchedClassifier) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match prog.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < PROG_LOAD_ATTEMPTS =>
            {
                tracing::debug!(attempt, "program load interrupted (EAGAIN): trying again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// What a walk of the conntrack table found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackSweep {
    /// Entries not idle past their state's timeout, in `NPC_CONNTRACK4`.
    pub live_ipv4: usize,
    /// The same in `NPC_CONNTRACK`.
    pub live_ipv6: usize,
    /// Older releases' entries moved where the programs look (see `Datapath::share`).
    pub rewritten: usize,
}

impl ConntrackSweep {
    /// Live entries in both tables.
    pub fn live(&self) -> usize {
        self.live_ipv4 + self.live_ipv6
    }
}

/// Only create, never replace (`BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;

fn map_errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        _ => None,
    }
}

/// The clock the programs stamp conntrack entries with (`bpf_ktime_get_coarse_ns`:
/// CLOCK_MONOTONIC_COARSE).
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `NPC_ENDPOINTS` as the release before source validation pinned it: 24-byte values (identity,
/// flags, one address).
const PREVIOUS_ENDPOINT_VALUE_SIZE: u32 = 24;

/// An upgrade from the release whose `NPC_ENDPOINTS` held one address per pod: its entries are
/// read and converted (the address fills both slots), and its pin removed so the load creates
/// the map in the new layout; the caller writes the entries back before anything is attached.
/// The old programs, still attached, keep the old map alive and keep enforcing with it until the
/// new ones replace them. Every entry is derived state (the next sync rewrites it), so a load
/// that fails after this loses nothing a sync cannot restore.
fn take_previous_endpoints(pin_root: &Path) -> Result<Vec<(u32, EndpointInfo)>, DatapathError> {
    let pin = pin_root.join(map_names::ENDPOINTS);
    if !pin.exists() || aya::maps::MapInfo::from_pin(&pin)?.value_size() != PREVIOUS_ENDPOINT_VALUE_SIZE {
        return Ok(Vec::new());
    }
    let old: HashMap<MapData, u32, [u8; 24]> = aya::maps::Map::HashMap(MapData::from_pin(&pin)?).try_into()?;
    let mut carried = Vec::new();
    for entry in old.iter() {
        let (ifindex, v) = entry?;
        let word = |i: usize| u32::from_ne_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let addr: [u8; 16] = v[8..24].try_into().expect("16 bytes");
        carried.push((ifindex, EndpointInfo::new(word(0), word(4), &[addr])));
    }
    std::fs::remove_file(&pin).map_err(io_err(format!("removing the previous release's {}", pin.display())))?;
    Ok(carried)
}

/// Refuses maps pinned under `pin_root` whose type, key size, value size or capacity differ from
/// the object's: aya 0.14 reuses a pinned map by name without comparing, and the programs would
/// then read another npc version's values as ours (an `EndpointInfo` grew from 24 to 40 bytes
/// in one release), or the verifier would refuse them with an opaque message. Flags are not
/// compared: what they change for the programs (read-only maps, say) the verifier checks.
fn check_pinned_layouts(pin_root: &Path) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| DatapathError::Environment(format!("parsing the eBPF object: {e}")))?;
    for (name, def) in &object.maps {
        let pin = pin_root.join(name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin)?;
        let layout = |kind: u32, key: u32, value: u32, max: u32| {
            format!("type {kind}, key {key} B, value {value} B, {max} entries")
        };
        let pinned = layout(
            info.map_type()? as u32,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let expected = layout(def.map_type(), def.key_size(), def.value_size(), def.max_entries());
        if pinned != expected {
            return Err(DatapathError::PinnedLayout {
                map: name.clone(),
                pin_root: pin_root.display().to_string(),
                pinned,
                expected,
            });
        }
    }
    Ok(())
}

/// The drop counters pinned under `pin_root`, summed over CPUs, read without loading anything
/// (another process's datapath: `lab probe`, tests that prove a block).
pub fn pinned_drops(pin_root: &Path) -> Result<BTreeMap<DropKey, u64>, DatapathError> {
    let data = MapData::from_pin(pin_root.join(map_names::DROPS))?;
    let drops: PerCpuHashMap<MapData, DropKey, u64> = aya::maps::Map::PerCpuHashMap(data).try_into()?;
    let mut out = BTreeMap::new();
    for entry in drops.iter() {
        let (key, values) = entry?;
        out.insert(key, values.iter().sum());
    }
    Ok(out)
}
