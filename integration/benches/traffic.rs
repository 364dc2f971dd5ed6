//! `cargo xtask bench traffic`: real traffic between two lab pods, with no enforcement, with npc
//! and with weave-npc's iptables layout (see `npc_integration::traffic`). Prints the table and
//! writes the report as JSON to `target/bench-traffic.json`.
use std::path::Path;

fn main() {
    npc_integration::require_root();
    // `cargo bench` passes `--bench`; run by hand without it, the binary makes a quick run.
    let benching = std::env::args().any(|a| a == "--bench");
    let tag = npc_integration::tag("traffic");
    let opts = if benching {
        npc_integration::traffic::Options::full(&tag)
    } else {
        npc_integration::traffic::Options::quick(&tag)
    };
    let report = npc_integration::traffic::run(&opts);
    print!("{}", report.table());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-traffic.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("JSON")).expect("write the report");
    println!("report: {}", path.display());
}
