//! Conntrack as the agent sees it: the entries (for `inspect`), the live count (a metric), and
//! the move of connections that older releases tracked where the programs no longer look.
//!
//! The programs keep one entry per connection on the node (`NPC_CT4`, `NPC_CT6`), with a
//! judgement per end. Releases before kept one entry per interface, in `NPC_CONNTRACK4` and
//! `NPC_CONNTRACK` (the legacy tables, keyed by a [`FlowKey`]); an upgrade must not forget the
//! connections they hold, or the replies of connections a pod opened would be judged as new
//! connections into it, and dropped by its ingress policy.

use aya::maps::{HashMap, MapData};
use npc_common::{
    ConntrackEnd, ConntrackKey, ConntrackKey4, ConntrackValue, DIR_EGRESS, FlowKey, ct_origin, ct_timeout, map_names,
};

use super::{Datapath, DatapathError, io_err, map_errno, monotonic_coarse_ns};

/// What a walk of the conntrack tables found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackSweep {
    /// Entries not idle past their state's timeout, in `NPC_CT4`.
    pub live_ipv4: usize,
    /// The same in `NPC_CT6`.
    pub live_ipv6: usize,
    /// Older releases' entries moved where the programs look (see [`Datapath::conntrack_sweep`]).
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

impl Datapath {
    /// Both tables' entries, one per connection, IPv4 keys in their IPv4-mapped form.
    pub fn conntrack_entries(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, DatapathError> {
        let mut entries: Vec<_> = self.conntrack.iter().collect::<Result<_, _>>()?;
        for entry in self.conntrack4.iter() {
            let (key, value) = entry?;
            entries.push((key.mapped(), value));
        }
        Ok(entries)
    }

    /// The sweep that loading ran (once: the caller counts it as its first).
    pub fn take_load_sweep(&mut self) -> Option<ConntrackSweep> {
        self.load_sweep.take()
    }

    /// Walks the conntrack tables: counts the live connections (entries idle past their state's
    /// timeout are dead to the programs; only the LRU reclaims them), and moves what the legacy
    /// tables hold into the current ones.
    ///
    /// The load sweeps once, while the previous release's programs still enforce (writing the
    /// legacy tables); later sweeps catch what they wrote meanwhile. The first sweep after
    /// [`Self::previous_programs_replaced`] moves the rest and removes the legacy tables.
    pub fn conntrack_sweep(&mut self) -> Result<ConntrackSweep, DatapathError> {
        let mut sweep = ConntrackSweep {
            rewritten: self.move_legacy_conntrack()?,
            ..Default::default()
        };
        let now = monotonic_coarse_ns();
        // Modular, as the programs compute an entry's age (`now.wrapping_sub(last_seen)`), so
        // that both agree on every entry.
        let live = |value: &ConntrackValue| now.wrapping_sub(value.last_seen_ns) <= ct_timeout::of(value.state);
        for entry in self.conntrack.iter() {
            if live(&entry?.1) {
                sweep.live_ipv6 += 1;
            }
        }
        for entry in self.conntrack4.iter() {
            if live(&entry?.1) {
                sweep.live_ipv4 += 1;
            }
        }
        Ok(sweep)
    }

    /// Tells the datapath that every interface it enforces runs this object's programs (the
    /// enforcer says so after a turn that attached every local pod): no program of an older
    /// release writes the legacy tables any more, so the next sweep may remove them. (A program
    /// run already under way on another CPU when its replacement was attached could still add
    /// an entry: that connection's next packet is judged as new.)
    pub fn previous_programs_replaced(&mut self) {
        self.previous_programs_replaced = true;
    }

    /// Whether legacy tables are still pinned (see [`Self::conntrack_sweep`]).
    pub fn legacy_conntrack_pinned(&self) -> bool {
        [map_names::LEGACY_CONNTRACK, map_names::LEGACY_CONNTRACK4]
            .iter()
            .any(|name| self.pin_root.join(name).exists())
    }

    /// Moves the legacy tables' entries into the current ones, and removes the tables once no
    /// older program can write them. Returns how many entries moved.
    fn move_legacy_conntrack(&mut self) -> Result<usize, DatapathError> {
        let v6 = self.move_legacy_table(map_names::LEGACY_CONNTRACK, |key: &FlowKey| *key)?;
        let v4 = self.move_legacy_table(map_names::LEGACY_CONNTRACK4, |k: &[u8; 20]| {
            let port = |i: usize| u16::from_ne_bytes([k[i], k[i + 1]]);
            let addr = |i: usize| npc_common::v4_mapped([k[i], k[i + 1], k[i + 2], k[i + 3]]);
            FlowKey {
                ifindex: u32::from_ne_bytes([k[0], k[1], k[2], k[3]]),
                tuple: ConntrackKey {
                    protocol: k[16],
                    _pad: [0; 3],
                    src: addr(4),
                    dst: addr(8),
                    sport: port(12),
                    dport: port(14),
                },
            }
        })?;
        Ok(v6 + v4)
    }

    /// [`Self::move_legacy_conntrack`] for one table, whose keys `flow` reads.
    fn move_legacy_table<K: aya::Pod>(
        &mut self,
        name: &str,
        flow: impl Fn(&K) -> FlowKey,
    ) -> Result<usize, DatapathError> {
        let pin = self.pin_root.join(name);
        if !pin.exists() {
            return Ok(0);
        }
        // Asked before the move: once the old programs are replaced, nothing adds entries.
        let written = !self.previous_programs_replaced;
        let mut table: HashMap<MapData, K, [u8; 16]> =
            aya::maps::Map::LruHashMap(MapData::from_pin(&pin)?).try_into()?;
        let entries: Vec<(K, [u8; 16])> = table.iter().collect::<Result<_, _>>()?;
        let mut moved = 0;
        for (key, value) in &entries {
            if self.join_legacy(&flow(key), &LegacyValue::parse(value))? {
                moved += 1;
            }
        }
        if written {
            // The previous programs still write it: the moved entries go, so the next sweep
            // moves only what they add.
            for (key, _) in &entries {
                match table.remove(key) {
                    Err(e) if map_errno(&e) != Some(libc::ENOENT) => return Err(e.into()),
                    _ => {}
                }
            }
        } else {
            std::fs::remove_file(&pin).map_err(io_err(format!("removing {}", pin.display())))?;
            tracing::info!(
                map = name,
                "conntrack: the previous release's programs are replaced: its table moved and removed"
            );
        }
        Ok(moved)
    }

    /// Writes one legacy entry (one interface's judgement of a connection) into the current
    /// tables as that end's judgement. An end the current programs judged already is theirs to
    /// keep. Returns whether anything was written.
    fn join_legacy(&mut self, flow: &FlowKey, old: &LegacyValue) -> Result<bool, DatapathError> {
        let (key, origin) = {
            let key = flow.tuple;
            if key.is_normal() {
                (key, old.origin)
            } else {
                // Keyed by its opening tuple (releases before shared entries): the pad byte
                // there reads as "opened by the key's src end", which swapped is the new dst.
                (key.swapped(), ct_origin::DST)
            }
        };
        // The interface's pod is the end that opened the connection when it was judged at its
        // egress, the other end when at its ingress.
        let end = if old.direction == DIR_EGRESS {
            origin
        } else {
            1 - origin
        };
        let side = usize::from(end);
        let judgement = ConntrackEnd {
            ifindex: flow.ifindex,
            epoch: old.epoch,
        };
        // `local` named the checked end as 1 + its index (0: unchecked).
        let checked = u8::from(old.local == end + 1);
        let key4 = ConntrackKey4::from_mapped(&key);
        let current = match key4 {
            Some(key4) => self.conntrack4.get(&key4, 0),
            None => self.conntrack.get(&key, 0),
        };
        let (value, flags) = match current {
            Ok(mut value) => {
                if value.ends[side].ifindex != 0 {
                    return Ok(false);
                }
                value.ends[side] = judgement;
                value.direction[side] = old.direction;
                value.checked[side] = checked;
                value.last_seen_ns = value.last_seen_ns.max(old.last_seen_ns);
                (value, 0)
            }
            Err(e) if map_errno(&e) == Some(libc::ENOENT) || matches!(e, aya::maps::MapError::KeyNotFound) => {
                let mut value = ConntrackValue {
                    last_seen_ns: old.last_seen_ns,
                    ends: [ConntrackEnd::default(); 2],
                    state: old.state,
                    origin,
                    direction: [0; 2],
                    checked: [0; 2],
                    _pad: [0; 2],
                };
                value.ends[side] = judgement;
                value.direction[side] = old.direction;
                value.checked[side] = checked;
                (value, BPF_NOEXIST)
            }
            Err(e) => return Err(e.into()),
        };
        let written = match key4 {
            Some(key4) => self.conntrack4.insert(key4, value, flags),
            None => self.conntrack.insert(key, value, flags),
        };
        match written {
            Ok(()) => Ok(true),
            // The programs made the entry meanwhile: theirs is the fresher.
            Err(e) if map_errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// A legacy table's value: one interface's judgement of a connection.
struct LegacyValue {
    last_seen_ns: u64,
    epoch: u32,
    state: u8,
    direction: u8,
    /// Which end of the key opened it (0: src; the pad byte before shared entries).
    origin: u8,
    /// The checked end: 0 none, 1 the key's src, 2 its dst.
    local: u8,
}

impl LegacyValue {
    fn parse(v: &[u8; 16]) -> Self {
        Self {
            last_seen_ns: u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")),
            epoch: u32::from_ne_bytes(v[8..12].try_into().expect("4 bytes")),
            state: v[12],
            direction: v[13],
            origin: v[14] & 1,
            local: v[15],
        }
    }
}
