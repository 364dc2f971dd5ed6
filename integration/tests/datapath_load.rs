//! A failed load removes the pins it created and keeps those it found (an earlier agent's,
//! which a later start adopts), and a pinned map of another layout (another npc version's) is
//! refused before anything is created. The loads are made to fail for real: a map pinned under
//! the name of another, with a smaller value; and a map of the right layout that programs may
//! only read (`BPF_F_RDONLY_PROG`), so the verifier rejects the programs after every other map
//! was created and pinned.
use std::{collections::BTreeSet, path::PathBuf};

use npc_agent::datapath::{Datapath, DatapathError, loaded_program_ids, uninstall};
use npc_common::map_names;
use npc_integration::{require_root, tag};

fn names(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

#[test]
fn a_failed_load_removes_the_pins_it_created_and_keeps_the_ones_it_found() {
    require_root();
    let donor = PathBuf::from(format!("/sys/fs/bpf/{}", tag("loaddonor")));
    let root = PathBuf::from(format!("/sys/fs/bpf/{}", tag("loadfail")));
    for r in [&donor, &root] {
        let _ = uninstall(r);
    }
    // An earlier agent's pin, of the wrong shape: the identities map (4-byte values) where the
    // endpoints map (EndpointInfo values) belongs.
    drop(Datapath::load(&donor).expect("the donor loads"));
    std::fs::create_dir_all(&root).expect("pin root");
    std::fs::rename(donor.join(map_names::IDENTITIES), root.join(map_names::ENDPOINTS)).expect("plant a pin");
    uninstall(&donor).expect("remove the donor");
    let programs_before: BTreeSet<u32> = loaded_program_ids().into_iter().collect();

    let err = Datapath::load(&root).err().expect("the load fails");
    let text = err.to_string();
    assert!(
        matches!(&err, DatapathError::PinnedLayout { map, .. } if map == map_names::ENDPOINTS)
            && text.contains("value 4 B")
            && text.contains("value 40 B")
            && text.contains("--uninstall"),
        "the error names the map, both layouts and the way out: {text}"
    );
    assert_eq!(
        names(&root),
        BTreeSet::from([map_names::ENDPOINTS.to_string()]),
        "a refused load created pins (or removed the one it found)"
    );
    std::fs::remove_file(root.join(map_names::ENDPOINTS)).expect("remove the planted pin");

    // The stats counters, of the right layout but read-only to programs (bpftool creates it): the
    // layout check passes it, every other map is created and pinned, and the verifier refuses
    // the programs' counter writes.
    let stats = root.join(map_names::STATS);
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stats)
        .args(["type", "percpu_array", "key", "4", "value", "8", "entries"])
        .arg(npc_common::stats::COUNT.to_string())
        .args(["name", map_names::STATS, "flags", "0x80"])
        .status()
        .expect("run bpftool (cargo xtask setup installs it)");
    assert!(created.success(), "bpftool map create failed");
    let err = Datapath::load(&root).err().expect("the load fails");
    eprintln!("the load failed as planned: {err}");
    assert_eq!(
        names(&root),
        BTreeSet::from([map_names::STATS.to_string()]),
        "a failed load left pins behind (or removed the one it found)"
    );
    let programs_after: BTreeSet<u32> = loaded_program_ids().into_iter().collect();
    assert!(
        programs_after.is_subset(&programs_before),
        "a failed load left programs loaded: {:?}",
        programs_after.difference(&programs_before).collect::<Vec<_>>()
    );
    std::fs::remove_file(&stats).expect("remove the planted pin");

    // Without them the next start succeeds.
    let dp = Datapath::load(&root).expect("a clean start loads");
    drop(dp);
    assert!(
        names(&root).contains(map_names::ENDPOINTS),
        "the clean start pinned its maps"
    );
    // And a restart adopts the first start's pins.
    let dp = Datapath::load(&root).expect("a restart adopts the pins");
    drop(dp);
    uninstall(&root).expect("uninstall");
    assert!(!root.exists());
}
