//! `cargo xtask bench scale`: the node agent against the fake API server with generated clusters
//! (see `npc_integration::scale`). Sizes come from `NPC_SCALE_SIZES`
//! (`pods:namespaces:policies[:services[:local]]`, comma-separated, `local` being pods on this
//! node beyond the two the edits time; default 10000:100:1000,30000:100:1000); run by hand without `--bench`, one
//! small size. Prints the table and writes the rows as JSON to `target/bench-scale.json`.
use std::path::Path;

use npc_integration::scale::{self, Size};

fn main() {
    npc_integration::require_root();
    let benching = std::env::args().any(|a| a == "--bench");
    let spec = std::env::var("NPC_SCALE_SIZES")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            if benching {
                "10000:100:1000,30000:100:1000".into()
            } else {
                "1000:10:100".into()
            }
        });
    let sizes: Vec<Size> = spec
        .split(',')
        .map(|s| {
            let n: Vec<usize> = s
                .split(':')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("NPC_SCALE_SIZES {s:?}: {e}"))
                })
                .collect();
            let (pods, namespaces, policies, services, local) = match n[..] {
                [pods, namespaces, policies] => (pods, namespaces, policies, 0, 0),
                [pods, namespaces, policies, services] => (pods, namespaces, policies, services, 0),
                [pods, namespaces, policies, services, local] => (pods, namespaces, policies, services, local),
                _ => panic!("NPC_SCALE_SIZES {s:?}: want pods:namespaces:policies[:services[:local]]"),
            };
            Size {
                pods,
                namespaces,
                policies,
                services,
                local,
            }
        })
        .collect();
    let edits = if benching { 20 } else { 3 };
    let rows: Vec<scale::Row> = sizes.into_iter().map(|size| scale::run(size, edits)).collect();
    print!("{}", scale::table(&rows));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows).expect("JSON")).expect("write the report");
    println!("report: {}", path.display());
}
