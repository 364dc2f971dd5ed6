//! `bpftool map dump` prints every npc map's fields by name (the maps carry BTF key and value
//! types), and a datapath pinned by an older agent without BTF is adopted and keeps enforcing.
//!
//! Runs Debian's `bpftool` (which `cargo xtask setup` installs) on the pinned maps of a loaded
//! datapath; fails, never skips, when it is missing.
use std::{
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
};

use npc_agent::datapath::{Datapath, Hook};
use npc_common::map_names;
use npc_integration::{TestDatapath, compile_for, packet, packet::TCP_SYN};
use npc_policy::model::ObjectRef;
use serde_json::Value;

const PASS: i32 = -1;
const SHOT: i32 = 2;

const CLUSTER: &str = include_str!("fixtures/shop.yaml");

const POLICY: &str = include_str!("fixtures/shop-bpftool-policy.yaml");

/// The maps bpftool can dump, and the field names of their keys and values (`None`: a plain
/// integer, or a byte array; `Some`: a struct's fields, in order).
type Fields = Option<&'static [&'static str]>;

const EXPECTED: &[(&str, Fields, Fields)] = &[
    (map_names::ENDPOINTS, None, Some(&["identity", "flags", "addrs"])),
    (map_names::IDENTITIES, None, None),
    (map_names::CIDRS, Some(&["prefix_len", "data"]), None),
    (
        map_names::POLICY,
        Some(&["identity", "peer", "port", "protocol", "direction"]),
        Some(&["rule"]),
    ),
    (map_names::PORT_RANGES, Some(&["prefix_len", "data"]), Some(&["rule"])),
    (
        map_names::CONNTRACK,
        Some(&["ifindex", "protocol", "_pad", "src", "dst", "sport", "dport"]),
        Some(&["last_seen_ns", "epoch", "state", "direction", "origin", "local"]),
    ),
    (
        map_names::CONNTRACK4,
        Some(&["ifindex", "src", "dst", "sport", "dport", "protocol", "_pad"]),
        Some(&["last_seen_ns", "epoch", "state", "direction", "origin", "local"]),
    ),
    (map_names::DROPS, Some(&["direction", "protocol", "dport"]), None),
    (map_names::STATS, None, None),
    (map_names::CONFIG, None, Some(&["log_level", "mode", "epoch", "_pad"])),
];

/// `bpftool` (`cargo xtask setup` installs Debian's package); a test without it fails, never skips.
fn bpftool() -> &'static str {
    let found = Command::new("bpftool").arg("version").stdout(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "this test needs bpftool on PATH: run `cargo xtask setup` (or `apt-get install -y bpftool`)"
    );
    "bpftool"
}

fn run_bpftool(args: &[&str]) -> String {
    let out = Command::new(bpftool()).args(args).output().expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("bpftool prints UTF-8")
}

fn dump_json(pin_root: &Path, map: &str) -> Vec<Value> {
    let path = pin_root.join(map);
    let text = run_bpftool(&["-j", "map", "dump", "pinned", path.to_str().unwrap()]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool -j output for {map}: {e}\n{text}"))
}

/// The field names of a formatted key or value (per-CPU maps: of the first CPU's value).
fn fields(v: &Value) -> Option<Vec<String>> {
    let v = match v {
        Value::Array(cpus) if cpus.first().is_some_and(|c| c.get("cpu").is_some()) => &cpus[0]["value"],
        v => v,
    };
    v.as_object().map(|o| o.keys().cloned().collect())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sync(dp: &mut Datapath) {
    let compiled = compile_for("node-a", &[("cluster.yaml", CLUSTER), ("policy.yaml", POLICY)]);
    let server = ObjectRef::new("shop", "server");
    dp.sync(&compiled.maps, |pod| (*pod == server).then_some(1))
        .expect("sync");
}

/// Fills conntrack, the stats and the drop counters too.
fn traffic(dp: &Datapath) {
    let allowed = packet::tcp(ip("10.0.0.20"), ip("10.0.0.10"), 40000, 80, TCP_SYN);
    assert_eq!(dp.test_run(Hook::ToPod, &allowed).unwrap(), PASS);
    let denied = packet::tcp(ip("10.0.0.99"), ip("10.0.0.10"), 40001, 80, TCP_SYN);
    assert_eq!(dp.test_run(Hook::ToPod, &denied).unwrap(), SHOT);
    let ranged = packet::tcp(ip("192.168.1.1"), ip("10.0.0.10"), 40002, 8002, TCP_SYN);
    assert_eq!(dp.test_run(Hook::ToPod, &ranged).unwrap(), PASS);
    // IPv6 connections have their own table.
    let v6 = packet::tcp(ip("fd00::20"), ip("fd00::10"), 40003, 80, TCP_SYN);
    assert_eq!(dp.test_run(Hook::ToPod, &v6).unwrap(), PASS);
}

#[test]
fn bpftool_prints_every_map_by_field_name() {
    let mut t = TestDatapath::load("btfdump");
    sync(&mut t.dp);
    traffic(&t.dp);
    let readme = readme_examples();
    let mut problems = Vec::new();
    for (map, key_fields, value_fields) in EXPECTED {
        let entries = dump_json(t.pin_root(), map);
        if std::env::var_os("NPC_SHOW_DUMPS").is_some() {
            let path = t.pin_root().join(map);
            eprintln!(
                "$ bpftool map dump pinned .../{map}\n{}",
                run_bpftool(&["map", "dump", "pinned", path.to_str().unwrap()])
            );
        }
        let Some(entry) = entries.first() else {
            problems.push(format!("{map}: no entries to check"));
            continue;
        };
        // Without BTF, bpftool prints only "key"/"value" as hex bytes; with it, "formatted".
        let Some(formatted) = entry.get("formatted") else {
            problems.push(format!("{map}: no BTF (bpftool printed bytes only): {entry}"));
            continue;
        };
        check(
            &mut problems,
            &format!("{map} (bpftool -j)"),
            formatted,
            *key_fields,
            *value_fields,
        );
        // The README's example of this map must have the same fields.
        match readme.iter().find(|(name, _)| name == map) {
            Some((_, example)) => check(
                &mut problems,
                &format!("{map} (README)"),
                example,
                *key_fields,
                *value_fields,
            ),
            None => problems.push(format!(
                "{map}: no `bpftool map dump` example in README.md's Debugging section"
            )),
        }
    }
    assert!(problems.is_empty(), "bpftool output:\n{}", problems.join("\n"));
}

/// Compares a formatted entry's key and value fields with the expected ones.
fn check(
    problems: &mut Vec<String>,
    what: &str,
    entry: &Value,
    key_fields: Option<&[&str]>,
    value_fields: Option<&[&str]>,
) {
    let want = |f: Option<&[&str]>| f.map(|f| f.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let key = fields(&entry["key"]);
    let value = match entry.get("values") {
        Some(per_cpu) => fields(per_cpu),
        None => fields(&entry["value"]),
    };
    if key != want(key_fields) {
        problems.push(format!("{what}: key fields {key:?}, expected {:?}", want(key_fields)));
    }
    if value != want(value_fields) {
        problems.push(format!(
            "{what}: value fields {value:?}, expected {:?}",
            want(value_fields)
        ));
    }
}

/// README.md's "Debugging" examples: `$ bpftool map dump pinned /sys/fs/bpf/npc/<MAP>` followed
/// by bpftool's (BTF-formatted, JSON) output; the first entry of each.
fn readme_examples() -> Vec<(String, Value)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let section = readme
        .split("\n## Debugging")
        .nth(1)
        .expect("a Debugging section in README.md");
    let section = section.split("\n## ").next().unwrap();
    let mut out = Vec::new();
    let mut lines = section.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        let Some(map) = line.strip_prefix("$ bpftool map dump pinned /sys/fs/bpf/npc/") else {
            continue;
        };
        // The map's name, without the `# ...` comment some examples carry.
        let map = map.split_whitespace().next().unwrap_or_default();
        let mut json = String::new();
        while let Some(next) = lines.peek() {
            if next.starts_with('$') || next.starts_with("```") {
                break;
            }
            json.push_str(lines.next().unwrap());
        }
        let entries: Vec<Value> = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("README example of {map} is not bpftool's JSON: {e}"));
        out.push((map.to_string(), entries.into_iter().next().expect("an entry")));
    }
    out
}

/// The maps as agents before BTF pinned them (legacy definitions: same types, sizes and
/// capacities, no BTF): `bpftool map create` makes exactly such maps.
const LEGACY: &[(&str, &str, u32, u32, u32, u32)] = &[
    (map_names::ENDPOINTS, "hash", 4, 24, 4096, 0),
    (map_names::IDENTITIES, "hash", 16, 4, 262_144, 0),
    (map_names::CIDRS, "lpm_trie", 20, 4, 65_536, 1),
    (map_names::POLICY, "hash", 12, 4, 524_288, 0),
    (map_names::PORT_RANGES, "lpm_trie", 16, 4, 65_536, 1),
    (map_names::CONNTRACK, "lru_hash", 44, 16, 262_144, 0),
    (map_names::DROPS, "percpu_hash", 4, 8, 16_384, 0),
    (map_names::EVENTS, "ringbuf", 0, 0, 256 * 1024, 0),
    (map_names::CONFIG, "array", 4, 16, 1, 0),
    (map_names::STATS, "percpu_array", 4, 8, 4, 0),
];

fn map_show(path: &Path) -> Value {
    serde_json::from_str(&run_bpftool(&["-j", "map", "show", "pinned", path.to_str().unwrap()])).unwrap()
}

/// An upgrade: the new object is loaded over maps an older agent pinned without BTF. aya 0.14
/// opens a pinned map by path and uses it as it is (it compares nothing; npc compares the
/// layouts first), which is right here: the layouts are byte for byte the ones the programs were
/// built for, BTF only describes them. Enforcement carries on, on the very same maps, except
/// `NPC_ENDPOINTS`, whose values grew (one address per pod then, two now): its entries are carried
/// into a new map.
#[test]
fn maps_pinned_without_btf_are_adopted_and_keep_enforcing() {
    npc_integration::require_root();
    let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/{}", npc_integration::tag("legacy")));
    let _ = std::fs::remove_dir_all(&pin_root);
    npc_agent::datapath::ensure_bpffs(&pin_root).unwrap();
    let mut ids = Vec::new();
    for (name, kind, key, value, entries, flags) in LEGACY {
        let path = pin_root.join(name);
        let (key, value, entries, flags) = (
            key.to_string(),
            value.to_string(),
            entries.to_string(),
            flags.to_string(),
        );
        run_bpftool(&[
            "map",
            "create",
            path.to_str().unwrap(),
            "type",
            kind,
            "key",
            &key,
            "value",
            &value,
            "entries",
            &entries,
            "name",
            name,
            "flags",
            &flags,
        ]);
        let shown = map_show(&path);
        assert!(shown.get("btf_id").is_none(), "{name} was created with BTF: {shown}");
        ids.push(shown["id"].clone());
    }
    // A "before" policy written by the old agent stays in force until the new one syncs.
    let result = std::panic::catch_unwind(|| {
        // The old agent's endpoint: the server behind ifindex 1, identity 300, ingress-isolated.
        let old_endpoint: Vec<String> = [
            1u32.to_ne_bytes().as_slice(),
            &300u32.to_ne_bytes(),
            &1u32.to_ne_bytes(),
        ]
        .concat()
        .into_iter()
        .chain(npc_common::v4_mapped([10, 0, 0, 10]))
        .map(|b| b.to_string())
        .collect();
        let endpoints_pin = pin_root.join(map_names::ENDPOINTS);
        let mut args = vec!["map", "update", "pinned", endpoints_pin.to_str().unwrap(), "key"];
        args.extend(old_endpoint[..4].iter().map(String::as_str));
        args.push("value");
        args.extend(old_endpoint[4..].iter().map(String::as_str));
        run_bpftool(&args);

        // And a connection the server opened to a lower address, keyed the way releases before
        // shared conntrack entries keyed it: by its opening tuple, higher end first.
        let (server_addr, peer_addr) = (
            npc_common::v4_mapped([10, 0, 0, 10]),
            npc_common::v4_mapped([10, 0, 0, 5]),
        );
        let old_key: Vec<u8> = [
            1u32.to_ne_bytes().as_slice(),
            &[6, 0, 0, 0],
            &server_addr,
            &peer_addr,
            &45000u16.to_ne_bytes(),
            &443u16.to_ne_bytes(),
        ]
        .concat();
        let old_value: Vec<u8> = [
            npc_agent::datapath::monotonic_coarse_ns().to_ne_bytes().as_slice(),
            &1u32.to_ne_bytes(),
            &[npc_common::ct_state::TCP_ESTABLISHED, npc_common::DIR_EGRESS, 0, 0],
        ]
        .concat();
        let conntrack_pin = pin_root.join(map_names::CONNTRACK);
        let (old_key_args, old_value_args): (Vec<String>, Vec<String>) = (
            old_key.iter().map(u8::to_string).collect(),
            old_value.iter().map(u8::to_string).collect(),
        );
        let mut args = vec!["map", "update", "pinned", conntrack_pin.to_str().unwrap(), "key"];
        args.extend(old_key_args.iter().map(String::as_str));
        args.push("value");
        args.extend(old_value_args.iter().map(String::as_str));
        run_bpftool(&args);

        let mut dp = Datapath::load(&pin_root).expect("load the new object over maps pinned without BTF");
        for ((name, ..), id) in LEGACY.iter().zip(&ids) {
            let same = &map_show(&pin_root.join(name))["id"] == id;
            if *name == map_names::ENDPOINTS {
                assert!(!same, "{name} has a new layout: it must be a new map");
            } else {
                assert!(same, "{name} was replaced, not adopted");
            }
        }
        let carried = dp.endpoints().unwrap();
        let server = npc_common::v4_mapped([10, 0, 0, 10]);
        assert_eq!(
            carried.get(&1),
            Some(&npc_common::EndpointInfo::new(300, 1, &[server])),
            "the old endpoint was carried into the new layout"
        );
        // The load rewrote the old entry into the shared orientation, opener kept, and moved it
        // into the IPv4 table (`conntrack_entries` reads both).
        let tracked = dp.conntrack_entries().unwrap();
        assert_eq!(tracked.len(), 1, "{tracked:?}");
        let (key, value) = tracked[0];
        assert!(key.is_normal(), "{key:?}");
        assert_eq!(value.opener(&key), (server_addr, peer_addr, 45000, 443));
        sync(&mut dp);
        // Its reply into the ingress-isolated server (from an address no policy allows) is
        // still a reply: the one lookup finds the rewritten entry.
        let reply = packet::tcp(ip("10.0.0.5"), ip("10.0.0.10"), 443, 45000, packet::TCP_ACK);
        assert_eq!(
            dp.test_run(Hook::ToPod, &reply).unwrap(),
            PASS,
            "the reply of the old connection"
        );
        traffic(&dp);
        assert_eq!(
            dp.drops().unwrap().values().sum::<u64>(),
            1,
            "the denied SYN was counted"
        );
        // These maps stay without BTF until they are removed: bpftool shows their bytes.
        let entries = dump_json(&pin_root, map_names::IDENTITIES);
        assert!(entries[0].get("formatted").is_none(), "{entries:?}");
    });
    let _ = std::fs::remove_dir_all(&pin_root);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
