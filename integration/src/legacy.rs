//! What the release before one conntrack entry per connection left pinned: its per-interface
//! IPv4 conntrack table (`NPC_CONNTRACK4`), for the upgrade tests.
use std::{path::Path, process::Command};

use aya::maps::{HashMap, MapData};
use npc_common::{ConntrackKey, DIR_EGRESS, PROTO_TCP, ct_state, map_names, v4_mapped};

/// Pins an empty `NPC_CONNTRACK4` of that release's layout (LRU hash, 20-byte key, 16-byte
/// value, 262,144 entries, no BTF) under `pin_root`, with Debian's `bpftool` as the test's
/// stand-in for the old agent, and opens it.
pub fn conntrack4(pin_root: &Path) -> HashMap<MapData, [u8; 20], [u8; 16]> {
    let pin = pin_root.join(map_names::LEGACY_CONNTRACK4);
    let out = Command::new("bpftool")
        .args(["map", "create", pin.to_str().expect("a UTF-8 path")])
        .args(["type", "lru_hash", "key", "20", "value", "16", "entries", "262144"])
        .args(["name", map_names::LEGACY_CONNTRACK4])
        .output()
        .expect("this test needs bpftool on PATH: run `cargo xtask setup` (or `apt-get install -y bpftool`)");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    aya::maps::Map::LruHashMap(MapData::from_pin(&pin).expect("the pinned table"))
        .try_into()
        .expect("an LRU hash")
}

/// One interface's entry of a TCP connection in that table, as that release wrote it: key
/// (interface, lower end, higher end, ports, protocol) and value (last seen now, epoch 3,
/// established, `direction`, which end opened it, which end is the pod's). `opener` and `peer`
/// are (IPv4 address, port).
pub fn entry4(ifindex: u32, opener: ([u8; 4], u16), peer: ([u8; 4], u16), direction: u8) -> ([u8; 20], [u8; 16]) {
    let reversed = ConntrackKey::reversed_bytes(&v4_mapped(opener.0), opener.1, &v4_mapped(peer.0), peer.1);
    let (lower, higher, origin) = if reversed { (peer, opener, 1) } else { (opener, peer, 0) };
    // The pod's end: the opener's at egress, the peer's at ingress; `local` was 1 + its index.
    let pod_end = if direction == DIR_EGRESS { origin } else { 1 - origin };
    let key: Vec<u8> = [
        ifindex.to_ne_bytes().as_slice(),
        &lower.0,
        &higher.0,
        &lower.1.to_ne_bytes(),
        &higher.1.to_ne_bytes(),
        &[PROTO_TCP, 0, 0, 0],
    ]
    .concat();
    let value: Vec<u8> = [
        npc_agent::datapath::monotonic_coarse_ns().to_ne_bytes().as_slice(),
        &3u32.to_ne_bytes(),
        &[ct_state::TCP_ESTABLISHED, direction, origin, 1 + pod_end],
    ]
    .concat();
    (key.try_into().expect("20 bytes"), value.try_into().expect("16 bytes"))
}
