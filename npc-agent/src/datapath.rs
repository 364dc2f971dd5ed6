//! The kernel side as the agent sees it: the loaded object, its pinned maps, the TC links, and
//! MapSync (writing [`DesiredMaps`] into the maps in an order that never opens a hole).
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, TcAttachOptions},
    },
    sys::SyscallError,
    util::KernelVersion,
};
use npc_common::{
    Config, ConntrackKey, ConntrackValue, DropKey, EndpointInfo, PolicyKey, PolicyValue, PortRangeKey, map_names,
    program_names,
};

use crate::{
    compiler::{CidrKey, DesiredMaps, RangeKey},
    model::ObjectRef,
};

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

/// Checks that bpffs is mounted at (or above) `dir`, mounting it at /sys/fs/bpf when it is not.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let on_bpffs = |p: &Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs into a zeroed struct with a valid C string.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && i128::from(st.f_type) == i128::from(libc::BPF_FS_MAGIC)
    };
    let root = Path::new("/sys/fs/bpf");
    if !on_bpffs(root) {
        tracing::warn!("bpffs is not mounted at /sys/fs/bpf; mounting it");
        std::fs::create_dir_all(root).map_err(io_err("creating /sys/fs/bpf"))?;
        let ok = nix_mount_bpf(root);
        if !ok || !on_bpffs(root) {
            return Err(DatapathError::Environment(
                "cannot mount bpffs at /sys/fs/bpf (are we root with CAP_SYS_ADMIN?)".into(),
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    if !on_bpffs(dir) {
        return Err(DatapathError::Environment(format!(
            "{} is not on a bpf filesystem",
            dir.display()
        )));
    }
    Ok(())
}

fn nix_mount_bpf(target: &Path) -> bool {
    let (Ok(src), Ok(tgt), Ok(fs)) = (
        std::ffi::CString::new("bpf"),
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()),
        std::ffi::CString::new("bpf"),
    ) else {
        return false;
    };
    // SAFETY: valid C strings; no data argument.
    unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) == 0 }
}

/// Keeps aya-log's reader alive and drained on a thread of its own (dropping the logger closes
/// the log map, and the programs then fail to load: "fd N is not pointing to valid bpf_map").
struct LogPump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let mut logger = match aya_log::EbpfLogger::init(ebpf) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("datapath logging unavailable: {e}");
                return None;
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("npc-ebpf-log".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd: logger.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
                    if ready > 0 {
                        logger.flush();
                    }
                }
            })
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (address → identity, ipBlock prefix → class) as found in the kernel maps.
pub type KernelNumbering = (BTreeMap<[u8; 16], u32>, BTreeMap<CidrKey, u32>);

/// (exact allow entries, port-range entries as (prefix length, key, value)).
pub type PolicyEntries = (Vec<(PolicyKey, PolicyValue)>, Vec<(u32, PortRangeKey, PolicyValue)>);

/// Counts of what a sync wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub upserts: usize,
    pub deletes: usize,
    /// The policy epoch was bumped (policy changed): tracked connections get re-checked.
    pub epoch_bumped: bool,
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
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    /// The verdict events ring buffer, until the observer takes it.
    events: Option<RingBuf<MapData>>,
    _log: Option<LogPump>,
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
    pub fn load(pin_root: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_root)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_root)
            .load(EBPF_OBJECT)?;
        let log = LogPump::start(&mut ebpf);
        for hook in [Hook::FromPod, Hook::ToPod] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(hook.program())
                .ok_or(DatapathError::MissingProgram(hook.program()))?
                .try_into()?;
            prog.load()?;
        }
        let dp = Self {
            endpoints: take_map!(ebpf, map_names::ENDPOINTS),
            identities: take_map!(ebpf, map_names::IDENTITIES),
            cidrs: take_map!(ebpf, map_names::CIDRS),
            policy: take_map!(ebpf, map_names::POLICY),
            port_ranges: take_map!(ebpf, map_names::PORT_RANGES),
            conntrack: take_map!(ebpf, map_names::CONNTRACK),
            drops: take_map!(ebpf, map_names::DROPS),
            config: take_map!(ebpf, map_names::CONFIG),
            events: Some(take_map!(ebpf, map_names::EVENTS)),
            stats: take_map!(ebpf, map_names::STATS),
            ebpf,
            pin_root: pin_root.to_path_buf(),
            _log: log,
        };
        std::fs::create_dir_all(dp.links_dir()).map_err(io_err("creating the links directory"))?;
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
    /// existing pinned link is updated in place (atomic program replacement across restarts).
    pub fn attach(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        let ifindex = ifindex_of(ifname).ok_or_else(|| DatapathError::NoInterface(ifname.into()))?;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            // Legacy cls_bpf needs the clsact qdisc; it may exist already.
            let _ = tc::qdisc_add_clsact(ifname);
        }
        for hook in [Hook::FromPod, Hook::ToPod] {
            let pin = self.link_pin(ifindex, hook);
            let prog = self.program(hook)?;
            if !tcx {
                let id = prog.attach(ifname, hook.attach_type())?;
                // Netlink filters stay after we exit; forgetting the link keeps Drop from removing it.
                std::mem::forget(prog.take_link(id)?);
                continue;
            }
            let replaced = match PinnedLink::from_pin(&pin) {
                // The interface may be gone and its index reused: a defunct link cannot be
                // updated, so fall back to a fresh attachment.
                Ok(old) => FdLink::from(old)
                    .try_into()
                    .ok()
                    .and_then(|link| prog.attach_to_link(link).ok()),
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => return Err(e.into()),
            };
            let id = match replaced {
                Some(id) => id,
                None => {
                    let _ = std::fs::remove_file(&pin);
                    prog.attach_with_options(
                        ifname,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )?
                }
            };
            let link = prog.take_link(id)?;
            let fd_link: FdLink = link.try_into()?;
            // Re-pinning over an existing pin: remove the old path first.
            let _ = std::fs::remove_file(&pin);
            fd_link.pin(&pin)?;
        }
        Ok(ifindex)
    }

    /// Removes our links from an interface (TCX: unpinning the last reference detaches).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let pin = self.link_pin(ifindex, hook);
            match PinnedLink::from_pin(&pin) {
                Ok(link) => {
                    let fd_link = link.unpin().map_err(io_err("unpinning a link"))?;
                    let _ = aya::programs::links::Link::detach(fd_link);
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Interfaces that have pinned links.
    pub fn attached_ifindexes(&self) -> BTreeSet<u32> {
        let Ok(dir) = std::fs::read_dir(self.links_dir()) else {
            return BTreeSet::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("if")?.split('_').next()?.parse().ok()
            })
            .collect()
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        Ok(self.config.get(&0, 0)?)
    }

    pub fn set_config(&mut self, config: Config) -> Result<(), DatapathError> {
        Ok(self.config.set(0, config, 0)?)
    }

    /// Writes `desired` into the maps. `ifindex_of` says which interface a local pod is behind
    /// (pods it does not know are not enforced yet).
    ///
    /// Order: upserts from the inside out (policy entries and ranges, then ipBlock classes, then
    /// peer identities, then endpoints), so that an endpoint or peer never points at entries that
    /// are not there yet; then deletes the other way round. In between, the datapath sees the
    /// union of old and new allows, never less. Last, the epoch is bumped when policy changed, so
    /// tracked connections are judged again under the new rules.
    pub fn sync(
        &mut self,
        desired: &DesiredMaps,
        ifindex_of: impl Fn(&ObjectRef) -> Option<u32>,
    ) -> Result<SyncStats, DatapathError> {
        let mut stats = SyncStats::default();
        let endpoints: BTreeMap<u32, EndpointInfo> = desired
            .endpoints
            .iter()
            .filter_map(|(pod, info)| ifindex_of(pod).map(|i| (i, *info)))
            .collect();
        let cidrs: BTreeMap<CidrKey, u32> = desired.cidrs.clone();
        let ranges: BTreeMap<RangeKey, PolicyValue> = desired.port_ranges.clone();

        let policy_diff = diff_hash(&self.policy, &desired.policy)?;
        let ranges_diff = diff_lpm(&self.port_ranges, &ranges, |k| RangeKey {
            prefix_len: k.prefix_len(),
            key: k.data(),
        })?;
        let cidrs_diff = diff_lpm(&self.cidrs, &cidrs, |k| CidrKey {
            prefix_len: k.prefix_len(),
            addr: k.data(),
        })?;
        let identities_diff = diff_hash(&self.identities, &desired.identities)?;
        let endpoints_diff = diff_hash(&self.endpoints, &endpoints)?;
        let policy_changed = !policy_diff.is_empty()
            || !ranges_diff.is_empty()
            || !cidrs_diff.is_empty()
            || !identities_diff.is_empty()
            || !endpoints_diff.is_empty();

        for (k, v) in &policy_diff.upsert {
            self.policy.insert(k, v, 0)?;
        }
        for (k, v) in &ranges_diff.upsert {
            self.port_ranges.insert(&Key::new(k.prefix_len, k.key), v, 0)?;
        }
        for (k, v) in &cidrs_diff.upsert {
            self.cidrs.insert(&Key::new(k.prefix_len, k.addr), v, 0)?;
        }
        for (k, v) in &identities_diff.upsert {
            self.identities.insert(k, v, 0)?;
        }
        for (k, v) in &endpoints_diff.upsert {
            self.endpoints.insert(k, v, 0)?;
        }
        for k in &endpoints_diff.delete {
            ignore_missing(self.endpoints.remove(k))?;
        }
        for k in &identities_diff.delete {
            ignore_missing(self.identities.remove(k))?;
        }
        for k in &cidrs_diff.delete {
            ignore_missing(self.cidrs.remove(&Key::new(k.prefix_len, k.addr)))?;
        }
        for k in &ranges_diff.delete {
            ignore_missing(self.port_ranges.remove(&Key::new(k.prefix_len, k.key)))?;
        }
        for k in &policy_diff.delete {
            ignore_missing(self.policy.remove(k))?;
        }
        stats.upserts = policy_diff.upsert.len()
            + ranges_diff.upsert.len()
            + cidrs_diff.upsert.len()
            + identities_diff.upsert.len()
            + endpoints_diff.upsert.len();
        stats.deletes = policy_diff.delete.len()
            + ranges_diff.delete.len()
            + cidrs_diff.delete.len()
            + identities_diff.delete.len()
            + endpoints_diff.delete.len();
        if policy_changed {
            let mut config = self.config()?;
            config.epoch = config.epoch.wrapping_add(1);
            self.set_config(config)?;
            stats.epoch_bumped = true;
        }
        Ok(stats)
    }

    /// New connections allowed so far, summed over CPUs: (at ingress, at egress).
    pub fn allowed_connections(&self) -> Result<(u64, u64), DatapathError> {
        let sum = |slot: u32| -> Result<u64, DatapathError> { Ok(self.stats.get(&slot, 0)?.iter().sum()) };
        Ok((
            sum(npc_common::stats::ALLOWED_INGRESS)?,
            sum(npc_common::stats::ALLOWED_EGRESS)?,
        ))
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

    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, DatapathError> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// How many connections are tracked: walks the keys only (one syscall per entry, where
    /// [`Self::conntrack_entries`] takes two), still proportional to the table.
    pub fn conntrack_count(&self) -> Result<usize, DatapathError> {
        let mut n = 0;
        for key in self.conntrack.keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    pub fn endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, DatapathError> {
        Ok(self.endpoints.iter().collect::<Result<_, _>>()?)
    }

    /// Runs a program once on a crafted packet (BPF_PROG_TEST_RUN) and returns its verdict.
    /// In a test run the packet "arrives" on the loopback device, ifindex 1.
    pub fn test_run(&self, hook: Hook, packet: &[u8]) -> Result<i32, DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(hook.program())
            .ok_or(DatapathError::MissingProgram(hook.program()))?
            .try_into()?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            repeat: 1,
            ..Default::default()
        };
        Ok(prog.test_run(opts)?.return_value as i32)
    }

    /// Runs a program `repeat` times on one packet and returns the mean time per run (benchmarks).
    pub fn bench_run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<std::time::Duration, DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(hook.program())
            .ok_or(DatapathError::MissingProgram(hook.program()))?
            .try_into()?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        };
        Ok(prog.test_run(opts)?.duration)
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(SyscallError { io_error, .. })) if io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}

struct Diff<K, V> {
    upsert: Vec<(K, V)>,
    delete: Vec<K>,
}

impl<K, V> Diff<K, V> {
    fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }
}

fn diff_hash<K, V>(current: &HashMap<MapData, K, V>, desired: &BTreeMap<K, V>) -> Result<Diff<K, V>, MapError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut have = BTreeMap::new();
    for entry in current.iter() {
        let (k, v) = entry?;
        have.insert(k, v);
    }
    Ok(diff(&have, desired))
}

fn diff_lpm<D, K, V>(
    current: &LpmTrie<MapData, D, V>,
    desired: &BTreeMap<K, V>,
    from_key: impl Fn(Key<D>) -> K,
) -> Result<Diff<K, V>, MapError>
where
    D: aya::Pod,
    K: Ord + Clone,
    V: aya::Pod + PartialEq,
{
    let mut have = BTreeMap::new();
    for entry in current.iter() {
        let (k, v) = entry?;
        have.insert(from_key(k), v);
    }
    Ok(diff(&have, desired))
}

fn diff<K: Ord + Clone, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Diff<K, V> {
    Diff {
        upsert: want
            .iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        delete: have.keys().filter(|k| !want.contains_key(k)).cloned().collect(),
    }
}

/// `if_nametoindex` in the calling thread's network namespace.
pub fn ifindex_of(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Removes everything pinned under `pin_root` (links first: that detaches the programs).
pub fn uninstall(pin_root: &Path) -> Result<(), DatapathError> {
    if !pin_root.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(pin_root).map_err(io_err(format!("removing {}", pin_root.display())))
}
