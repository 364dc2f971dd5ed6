//! MapSync: the compiled [`DesiredMaps`] written into the kernel maps, in an order that never
//! opens a hole.
use std::collections::{BTreeMap, BTreeSet};

use aya::{
    maps::{
        HashMap, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
    sys::SyscallError,
};
use npc_common::{
    EndpointInfo, PolicyKey, PolicyValue, PortLabelKey, SOURCE_FIXED_BITS, SourceKey, capacity, map_names,
};
use npc_policy::{
    compiler::{CidrKey, DesiredMaps, RangeKey},
    model::ObjectRef,
};

use super::{Datapath, DatapathError, SyncStats};

impl Datapath {
    /// Writes `desired` into the maps. `ifindex_of` says which interface a local pod is behind
    /// (pods it does not know are not enforced yet).
    ///
    /// Order: upserts from the inside out (policy entries and ranges, then ipBlock classes, then
    /// peer identities, then endpoints), so that an endpoint or peer never points at entries that
    /// are not there yet; then deletes the other way round. In between, the datapath sees the
    /// union of old and new allows, never less. Last, the epoch is bumped when policy changed, so
    /// tracked connections are judged again under the new rules.
    ///
    /// A map without room for its old and new entries together has its removed entries deleted
    /// first (what goes is not wanted any more; at worst a connection the old policy allowed is
    /// refused a moment early), so a near-full map still converges; one whose new contents alone
    /// exceed its capacity fails the sync before anything is written ([`DatapathError::MapFull`]).
    /// Crossing 90% of a map's capacity is logged once.
    pub fn sync(
        &mut self,
        desired: &DesiredMaps,
        ifindex_of: impl Fn(&ObjectRef) -> Option<u32>,
    ) -> Result<SyncStats, DatapathError> {
        self.sync_changed(desired, Touched::default(), ifindex_of)
    }

    /// [`Self::sync`] told which keys of `desired.identities` and `desired.policy` may differ
    /// from the last sync's ([`Touched`]): only those are compared, unless a full reconcile is
    /// due. The identities map holds every pod of the cluster, and its diff was most of a turn
    /// at 100k pods; the policy map holds every allow entry of the node's pods (534k for 100
    /// local pods in the compiler bench).
    pub fn sync_changed(
        &mut self,
        desired: &DesiredMaps,
        touched: Touched,
        ifindex_of: impl Fn(&ObjectRef) -> Option<u32>,
    ) -> Result<SyncStats, DatapathError> {
        let mut stats = SyncStats::default();
        let endpoints: BTreeMap<u32, EndpointInfo> = desired
            .endpoints
            .iter()
            .filter_map(|(pod, info)| ifindex_of(pod).map(|i| (i, *info)))
            .collect();
        let cidrs: BTreeMap<CidrKey, u32> = desired.cidrs.clone();
        // Extra source prefixes, keyed by the pod's interface (in the trie's own prefix terms).
        let sources: BTreeMap<SourceEntry, u32> = desired
            .sources
            .iter()
            .filter_map(|(pod, prefixes)| ifindex_of(pod).map(|i| (i, prefixes)))
            .flat_map(|(ifindex, prefixes)| {
                prefixes.iter().map(move |p| {
                    let key = SourceKey {
                        ifindex_be: ifindex.to_be_bytes(),
                        addr: p.addr,
                    };
                    ((SOURCE_FIXED_BITS + p.prefix_len, key), 1)
                })
            })
            .collect();
        let ranges: BTreeMap<RangeKey, PolicyValue> = desired.port_ranges.clone();

        // The peers' identities (one entry per pod in the cluster) and the allow entries (every
        // local identity's peers) are diffed in place at the keys the compile touched, and what
        // was written is patched with the difference, so a sync costs the change, not a copy of
        // the cluster. The other maps are small.
        let mut want = Written {
            policy: BTreeMap::new(),
            ranges,
            cidrs,
            sources,
            identities: BTreeMap::new(),
            endpoints,
            port_labels: desired.port_labels.iter().map(|k| (*k, 1)).collect(),
        };
        // What the maps hold: what we wrote last (no read-back), unless a full reconcile is due
        // (the first sync, after a failed one, and every RECONCILE_EVERY), which reads every map
        // back and repairs what changed behind our back (bpftool, another process).
        let due = self.written.is_none() || self.reconciled_at.is_none_or(|at| at.elapsed() >= RECONCILE_EVERY);
        // A sync that fails part-way leaves the maps unknown: the next one reads them back.
        let last = self.written.take();
        let have = if due {
            let kernel = self.read_back()?;
            if let Some(last) = &last {
                stats.repaired = kernel.differences(last);
            }
            self.reconciled_at = Some(std::time::Instant::now());
            kernel
        } else {
            last.expect("not due only after a sync that wrote")
        };
        let sizes = [
            (map_names::POLICY, desired.policy.len(), capacity::POLICY),
            (map_names::PORT_RANGES, want.ranges.len(), capacity::PORT_RANGES),
            (map_names::CIDRS, want.cidrs.len(), capacity::CIDRS),
            (map_names::SOURCES, want.sources.len(), capacity::SOURCES),
            (map_names::IDENTITIES, desired.identities.len(), capacity::IDENTITIES),
            (map_names::ENDPOINTS, want.endpoints.len(), capacity::ENDPOINTS),
            (map_names::PORT_LABELS, want.port_labels.len(), capacity::PORT_LABELS),
        ];
        for (map, wanted, capacity) in sizes {
            if wanted > capacity as usize {
                // The maps are as they were: the next sync may diff against memory again.
                self.written = Some(have);
                return Err(DatapathError::MapFull { map, wanted, capacity });
            }
            self.note_pressure(map, wanted, capacity);
        }
        let policy_diff = match touched.policy {
            Some(keys) if !due => diff_at(&have.policy, &desired.policy, keys),
            _ => diff(&have.policy, &desired.policy),
        };
        let ranges_diff = diff(&have.ranges, &want.ranges);
        let cidrs_diff = diff(&have.cidrs, &want.cidrs);
        let sources_diff = diff(&have.sources, &want.sources);
        let identities_diff = match touched.identities {
            Some(keys) if !due => diff_at(&have.identities, &desired.identities, keys),
            _ => diff(&have.identities, &desired.identities),
        };
        let endpoints_diff = diff(&have.endpoints, &want.endpoints);
        let labels_diff = diff(&have.port_labels, &want.port_labels);
        // Which maps delete first, for room (see above).
        let early = Early {
            policy: tight(&have.policy, &policy_diff, capacity::POLICY),
            ranges: tight(&have.ranges, &ranges_diff, capacity::PORT_RANGES),
            cidrs: tight(&have.cidrs, &cidrs_diff, capacity::CIDRS),
            sources: tight(&have.sources, &sources_diff, capacity::SOURCES),
            identities: tight(&have.identities, &identities_diff, capacity::IDENTITIES),
            endpoints: tight(&have.endpoints, &endpoints_diff, capacity::ENDPOINTS),
        };
        // Sources too: a tracked packet out of a pod skips source validation only under the
        // epoch its entry was judged in (see the datapath's `handle`).
        let policy_changed = !policy_diff.is_empty()
            || !ranges_diff.is_empty()
            || !cidrs_diff.is_empty()
            || !identities_diff.is_empty()
            || !endpoints_diff.is_empty()
            || !sources_diff.is_empty();

        // Deletes, inside out, of the maps `phase` picks: the tight ones before the upserts, the
        // others after.
        macro_rules! deletes {
            ($phase:expr) => {
                if $phase(early.endpoints) {
                    for k in &endpoints_diff.delete {
                        ignore_missing(self.endpoints.remove(k))?;
                    }
                }
                if $phase(early.sources) {
                    for (prefix_len, key) in &sources_diff.delete {
                        ignore_missing(self.sources.remove(&Key::new(*prefix_len, *key)))?;
                    }
                }
                if $phase(early.identities) {
                    for k in &identities_diff.delete {
                        ignore_missing(self.identities.remove(k))?;
                    }
                }
                if $phase(early.cidrs) {
                    for k in &cidrs_diff.delete {
                        ignore_missing(self.cidrs.remove(&Key::new(k.prefix_len, k.addr)))?;
                    }
                }
                if $phase(early.ranges) {
                    for k in &ranges_diff.delete {
                        ignore_missing(self.port_ranges.remove(&Key::new(k.prefix_len, k.key)))?;
                    }
                }
                if $phase(early.policy) {
                    for k in &policy_diff.delete {
                        ignore_missing(self.policy.remove(k))?;
                    }
                }
            };
        }
        deletes!(|tight: bool| tight);
        // Labels only name drop counters: no order to keep with the other maps, and never
        // near full (the compiler caps them at the capacity).
        for k in &labels_diff.delete {
            ignore_missing(self.port_labels.remove(k))?;
        }
        for (k, v) in &labels_diff.upsert {
            self.port_labels.insert(k, v, 0)?;
        }
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
        for ((prefix_len, key), v) in &sources_diff.upsert {
            self.sources.insert(&Key::new(*prefix_len, *key), v, 0)?;
        }
        for (k, v) in &endpoints_diff.upsert {
            self.endpoints.insert(k, v, 0)?;
        }
        deletes!(|tight: bool| !tight);
        stats.upserts = policy_diff.upsert.len()
            + ranges_diff.upsert.len()
            + cidrs_diff.upsert.len()
            + identities_diff.upsert.len()
            + sources_diff.upsert.len()
            + endpoints_diff.upsert.len()
            + labels_diff.upsert.len();
        stats.deletes = policy_diff.delete.len()
            + ranges_diff.delete.len()
            + cidrs_diff.delete.len()
            + identities_diff.delete.len()
            + sources_diff.delete.len()
            + endpoints_diff.delete.len()
            + labels_diff.delete.len();
        if policy_changed {
            let mut config = self.config()?;
            config.epoch = config.epoch.wrapping_add(1);
            self.set_config(config)?;
            stats.epoch_bumped = true;
        }
        want.identities = patched(have.identities, identities_diff);
        want.policy = patched(have.policy, policy_diff);
        self.written = Some(want);
        Ok(stats)
    }

    /// Logs a map crossing 90% of its capacity (once, until it falls back below).
    fn note_pressure(&mut self, map: &'static str, wanted: usize, capacity: u32) {
        let pressed = wanted * 10 > capacity as usize * 9;
        if pressed && self.pressured.insert(map) {
            tracing::warn!(
                map,
                entries = wanted,
                capacity,
                "map over 90% full: syncs fail once it is full (npc_map_entries / npc_map_capacity)"
            );
        } else if !pressed {
            self.pressured.remove(map);
        }
    }

    /// Makes the next sync a full reconcile (read every map back, repair drift).
    pub fn reconcile_next_sync(&mut self) {
        self.reconciled_at = None;
    }

    /// Whether the next sync reads the maps back (see [`RECONCILE_EVERY`]).
    pub fn reconcile_due(&self) -> bool {
        self.written.is_none() || self.reconciled_at.is_none_or(|at| at.elapsed() >= RECONCILE_EVERY)
    }

    fn read_back(&self) -> Result<Written, MapError> {
        Ok(Written {
            policy: read_hash(&self.policy)?,
            ranges: read_lpm(&self.port_ranges, |k| RangeKey {
                prefix_len: k.prefix_len(),
                key: k.data(),
            })?,
            cidrs: read_lpm(&self.cidrs, |k| CidrKey {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            })?,
            sources: read_lpm(&self.sources, |k| (k.prefix_len(), k.data()))?,
            identities: read_hash(&self.identities)?,
            endpoints: read_hash(&self.endpoints)?,
            port_labels: read_hash(&self.port_labels)?,
        })
    }
}

/// Which keys of the big maps may differ from what the last sync wrote (None: any), from the
/// incremental compile (`Incremental::changed_identities`, `Incremental::changed_policy`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Touched<'a> {
    pub identities: Option<&'a BTreeSet<[u8; 16]>>,
    pub policy: Option<&'a BTreeSet<PolicyKey>>,
}

/// What was written, with a diff applied.
fn patched<K: Ord, V>(mut map: BTreeMap<K, V>, diff: Diff<K, V>) -> BTreeMap<K, V> {
    for k in &diff.delete {
        map.remove(k);
    }
    map.extend(diff.upsert);
    map
}

/// How often a sync reads every map back instead of trusting what it wrote last: drift (an
/// entry removed by hand) is repaired within this long, and counted.
pub(super) const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Per map: delete before the upserts, for room.
struct Early {
    policy: bool,
    ranges: bool,
    cidrs: bool,
    sources: bool,
    identities: bool,
    endpoints: bool,
}

/// Would the map overflow holding its current entries and the diff's new keys at once?
fn tight<K: Ord, V>(have: &BTreeMap<K, V>, diff: &Diff<K, V>, capacity: u32) -> bool {
    let new_keys = diff.upsert.iter().filter(|(k, _)| !have.contains_key(k)).count();
    have.len() + new_keys > capacity as usize
}

/// The maps' contents as MapSync writes them.
#[derive(Clone, Debug, Default)]
pub(super) struct Written {
    policy: BTreeMap<npc_common::PolicyKey, PolicyValue>,
    ranges: BTreeMap<RangeKey, PolicyValue>,
    cidrs: BTreeMap<CidrKey, u32>,
    sources: BTreeMap<SourceEntry, u32>,
    identities: BTreeMap<[u8; 16], u32>,
    endpoints: BTreeMap<u32, EndpointInfo>,
    port_labels: BTreeMap<PortLabelKey, u8>,
}

impl Written {
    /// How many entries differ (missing, extra or changed) between `self` and `other`.
    fn differences(&self, other: &Self) -> usize {
        fn count<K: Ord + Clone, V: PartialEq + Copy>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
            let d = diff(a, b);
            d.upsert.len() + d.delete.len()
        }
        count(&self.policy, &other.policy)
            + count(&self.ranges, &other.ranges)
            + count(&self.cidrs, &other.cidrs)
            + count(&self.sources, &other.sources)
            + count(&self.identities, &other.identities)
            + count(&self.endpoints, &other.endpoints)
            + count(&self.port_labels, &other.port_labels)
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

/// An `NPC_SOURCES` entry: the trie's prefix length (interface bits included) and key.
type SourceEntry = (u32, SourceKey);

struct Diff<K, V> {
    upsert: Vec<(K, V)>,
    delete: Vec<K>,
}

impl<K, V> Diff<K, V> {
    fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty()
    }
}

fn read_hash<K, V>(current: &HashMap<MapData, K, V>) -> Result<BTreeMap<K, V>, MapError>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    current.iter().collect()
}

fn read_lpm<D, K, V>(
    current: &LpmTrie<MapData, D, V>,
    from_key: impl Fn(Key<D>) -> K,
) -> Result<BTreeMap<K, V>, MapError>
where
    D: aya::Pod,
    K: Ord,
    V: aya::Pod,
{
    current
        .iter()
        .map(|entry| entry.map(|(k, v)| (from_key(k), v)))
        .collect()
}

/// [`diff`] where `have` and `want` can differ only at `keys`.
fn diff_at<K: Ord + Clone, V: PartialEq + Copy>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
) -> Diff<K, V> {
    let mut out = Diff {
        upsert: Vec::new(),
        delete: Vec::new(),
    };
    for k in keys {
        match (have.get(k), want.get(k)) {
            (Some(_), None) => out.delete.push(k.clone()),
            (h, Some(w)) if h != Some(w) => out.upsert.push((k.clone(), *w)),
            _ => {}
        }
    }
    out
}

/// What turns `have` into `want`: one merge of the two sorted maps (linear, no lookups: the
/// identities map holds every pod of the cluster).
fn diff<K: Ord + Clone, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Diff<K, V> {
    use std::cmp::Ordering;
    let mut out = Diff {
        upsert: Vec::new(),
        delete: Vec::new(),
    };
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.delete.push((*k).clone());
                h.next();
            }
            (None, Some((k, v))) => {
                out.upsert.push(((*k).clone(), **v));
                w.next();
            }
            (Some((hk, hv)), Some((wk, wv))) => match hk.cmp(wk) {
                Ordering::Less => {
                    out.delete.push((*hk).clone());
                    h.next();
                }
                Ordering::Greater => {
                    out.upsert.push(((*wk).clone(), **wv));
                    w.next();
                }
                Ordering::Equal => {
                    if hv != wv {
                        out.upsert.push(((*wk).clone(), **wv));
                    }
                    h.next();
                    w.next();
                }
            },
        }
    }
    out
}
