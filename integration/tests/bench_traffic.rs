//! The traffic benchmark in its quick mode, as `cargo xtask test` runs it: every field of the
//! report is produced, and each mode enforces what it says (the port no policy allows is refused
//! and its drop counted under npc and iptables, and open under none and hooks), and the kernel
//! counted npc's programs running on both pods' packets where they are attached. No timing is
//! asserted.
use npc_common::path_profile;
use npc_integration::traffic::{Enforcer, Options, run};

#[test]
fn the_quick_traffic_benchmark_reports_every_mode_and_each_enforces_what_it_says() {
    npc_integration::require_root();
    let report = run(&Options::quick(&npc_integration::tag("trafficq")));
    let modes: Vec<(Enforcer, usize, usize)> = report
        .results
        .iter()
        .map(|r| (r.enforcer, r.policies, r.peers))
        .collect();
    assert_eq!(
        modes,
        [
            (Enforcer::None, 0, 0),
            (Enforcer::Hooks, 0, 0),
            (Enforcer::Npc, 1, 0),
            (Enforcer::Iptables, 1, 0),
            (Enforcer::Npc, 100, 0),
            (Enforcer::Iptables, 100, 0),
            (Enforcer::Npc, 100, 200),
            (Enforcer::Iptables, 100, 200)
        ]
    );
    for r in &report.results {
        let what = format!("{:?} with {} policies and {} peers", r.enforcer, r.policies, r.peers);
        assert_eq!(r.connections_per_second.len(), 1, "{what}");
        assert_eq!(r.bulk_bits_per_second.len(), 1, "{what}");
        assert!(r.connections_per_second[0] > 0.0, "{what}: no connection completed");
        assert!(r.bulk_bits_per_second[0] > 0.0, "{what}: no bulk byte arrived");
        if matches!(r.enforcer, Enforcer::Npc | Enforcer::Hooks) {
            let names: Vec<&str> = r.programs.iter().map(|p| p.program.as_str()).collect();
            assert_eq!(names, ["npc_from_pod", "npc_to_pod"], "{what}");
            for p in &r.programs {
                assert!(
                    p.ns_per_run[0] > 0.0,
                    "{what}: {} ran no measurable time: {p:?}",
                    p.program
                );
                // Each pod sends and receives at least one packet of every connection (the SYN
                // one way, the SYN-ACK the other), and both pods' interfaces have the program.
                assert!(
                    p.runs_per_connection[0] >= 2.0,
                    "{what}: {} ran on fewer than two packets a connection: {p:?}",
                    p.program
                );
            }
            assert!(r.program_cpu_share[0] > 0.0, "{what}: {:?}", r.program_cpu_share);
        } else {
            assert!(r.programs.is_empty() && r.program_cpu_share.is_empty(), "{what}: {r:?}");
        }
        // Built with the programs' path probes (`--features profile-paths`: `cargo xtask test`
        // runs this test a second time so), the modes with programs report where their time
        // went; without the probes, no mode reports any.
        let probed = cfg!(feature = "profile-paths") && matches!(r.enforcer, Enforcer::Npc | Enforcer::Hooks);
        if probed {
            let fired = |slot: u32| r.paths[slot as usize].fired_per_connection[0];
            assert_eq!(r.paths.len(), path_profile::COUNT as usize, "{what}: {:?}", r.paths);
            // Every run passes the parse probe: as many per connection as the programs ran.
            let runs: f64 = r.programs.iter().map(|p| p.runs_per_connection[0]).sum();
            assert!(
                (fired(path_profile::PARSE) - runs).abs() < 0.5,
                "{what}: parse fired {} times a connection, the programs ran {runs}",
                fired(path_profile::PARSE)
            );
            if r.enforcer == Enforcer::Npc {
                // Each connection: the client's interface inserts it, the server's judges it
                // by policy and inserts it too, and the rest of its packets take the fast path.
                for slot in [
                    path_profile::INSERT_OUT,
                    path_profile::INSERT_IN,
                    path_profile::POLICY_IN,
                    path_profile::RUN_FAST,
                ] {
                    assert!(
                        fired(slot) >= 0.9,
                        "{what}: {} fired {}",
                        path_profile::NAMES[slot as usize],
                        fired(slot)
                    );
                }
            } else {
                assert!(fired(path_profile::RUN_NO_ENDPOINT) >= 2.0, "{what}: {:?}", r.paths);
            }
        } else {
            assert!(r.paths.is_empty(), "{what}: {:?}", r.paths);
        }
        match r.enforcer {
            Enforcer::None | Enforcer::Hooks => {
                assert!(
                    !r.blocked_port_refused,
                    "{what}: the port was refused with nothing enforced"
                )
            }
            _ => {
                assert!(r.blocked_port_refused, "{what}: the port no policy allows was open");
                assert!(r.blocked_port_drops > 0, "{what}: the refusal was not a counted drop");
                if r.enforcer == Enforcer::Npc {
                    // Every peer's address is in NPC_IDENTITIES, beside what the same policies
                    // without peers have there (the lab's pods and the node's addresses).
                    let alone = report
                        .results
                        .iter()
                        .find(|o| o.enforcer == Enforcer::Npc && o.policies == r.policies && o.peers == 0)
                        .expect("the same policies without peers");
                    assert!(alone.identity_addresses >= 2, "{alone:?}");
                    assert_eq!(
                        r.identity_addresses,
                        alone.identity_addresses + r.peers,
                        "{what}: every peer is in NPC_IDENTITIES"
                    );
                }
            }
        }
    }
    assert_eq!(report.rows.len(), report.results.len());
    let none = &report.rows[0];
    assert_eq!((none.connections_vs_none, none.bulk_vs_none), (1.0, 1.0));
    let table = report.table();
    let with_programs = report.rows.iter().filter(|r| !r.programs.is_empty()).count();
    assert_eq!(with_programs, 4, "hooks and the three npc rows: {:?}", report.rows);
    for r in report.rows.iter().filter(|r| !r.programs.is_empty()) {
        assert!(r.program_ns_per_connection.is_some_and(|ns| ns > 0.0), "{r:?}");
        assert!(r.program_cpu_share.is_some_and(|share| share > 0.0), "{r:?}");
    }
    // The rates' title, header and rows, then the programs' title, header and rows.
    // (With the path probes, their own lines follow.)
    let path_lines: usize = report
        .rows
        .iter()
        .filter(|r| !r.paths.is_empty())
        .map(|r| 1 + r.paths.iter().filter(|p| p.fired_per_connection > 0.0).count())
        .sum();
    assert_eq!(
        table.lines().count(),
        2 + report.rows.len() + 2 + with_programs + path_lines,
        "{table}"
    );
    let json = serde_json::to_value(&report).expect("JSON");
    for field in ["kernel", "cpus", "duration_seconds", "repeats", "results", "rows"] {
        assert!(json.get(field).is_some(), "the JSON report lacks {field}");
    }
}
