//! `npc-agent inspect`: the pinned maps, decoded.
use std::path::Path;

use anyhow::{Context as _, bail};

use super::Output;
use crate::datapath::{Datapath, inspect::Snapshot};

pub(super) fn inspect(pin_root: &Path, output: Output, conntrack_limit: usize) -> anyhow::Result<()> {
    if !Datapath::is_pinned(pin_root) {
        bail!(
            "nothing is pinned under {}: is the agent running there (see its --pin-root)?",
            pin_root.display()
        );
    }
    let dp =
        Datapath::load(pin_root).with_context(|| format!("opening the maps pinned under {}", pin_root.display()))?;
    let snapshot = Snapshot::read(&dp, conntrack_limit)?;
    match output {
        Output::Table => print!("{snapshot}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
    }
    Ok(())
}
