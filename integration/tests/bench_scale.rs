//! The scale benchmark in a quick mode, as `cargo xtask test` runs it: a small generated cluster,
//! the real agent binary against the fake API server, every field of the report produced and
//! every edit seen in the kernel maps. No timing is asserted.
use npc_integration::scale::{self, Size};

#[test]
fn the_quick_scale_benchmark_reports_every_field_and_sees_every_edit() {
    npc_integration::require_root();
    let size = Size {
        pods: 500,
        namespaces: 5,
        policies: 50,
        services: 20,
        local: 6,
    };
    // `run` panics if an edit or relabel never reaches the maps.
    let row = scale::run(size, 2);
    assert!(row.start_to_enforcing_s > 0.0);
    assert!(row.rss_mib > 0.0 && row.peak_rss_mib >= row.rss_mib, "{row:?}");
    assert_eq!((row.policy_edit_ms.len(), row.relabel_ms.len()), (2, 2));
    assert!(
        row.first_sync_s > 0.0,
        "the agent's first turn is read from its metrics: {row:?}"
    );
    // Both local pods are isolated for egress and allowed to every backend: judged against each.
    assert_eq!(row.service_entries, 2 * 20, "{row:?}");
    // The extra local pods are enforced too (each in a group its policy isolates).
    assert_eq!(row.endpoints, 2 + 6, "{row:?}");
    assert!(
        row.restart_to_enforcing_s > 0.0 && row.restart_first_sync_s > 0.0,
        "a restarted agent over the pins reaches /readyz and reports its turn: {row:?}"
    );
    assert_eq!(row.turn_ms.len(), 4, "a turn time per edit and relabel: {row:?}");
    assert!(row.turn_ms.iter().all(|t| *t > 0.0), "{row:?}");
    let table = scale::table(&[row]);
    assert_eq!(table.lines().count(), 2, "{table}");
}
