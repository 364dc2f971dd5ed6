//! The reachability matrix, as upstream's e2e tests print it: one table per port/protocol, rows =
//! from, columns = to (by index), `.` allowed, `X` blocked, blank = not probed. Laid out by
//! comfy-table, so the columns stay aligned at any number of pods. Probes through a Service
//! (`to` = `svc/ns/name`) get a second matrix: pods × Services.
use comfy_table::{CellAlignment, Table, presets};

use super::Probe;

pub fn matrix(probes: &[Probe]) -> String {
    let (to_services, to_pods): (Vec<&Probe>, Vec<&Probe>) = probes.iter().partition(|p| p.to.starts_with("svc/"));
    let mut pods: Vec<&str> = to_pods.iter().flat_map(|p| [p.from.as_str(), p.to.as_str()]).collect();
    pods.sort();
    pods.dedup();
    let mut out = tables(&to_pods, &pods, &pods, "");
    // The second matrix: pods × Services, through the ClusterIP (columns numbered s0, s1, ...).
    let mut froms: Vec<&str> = to_services.iter().map(|p| p.from.as_str()).collect();
    froms.sort();
    froms.dedup();
    let mut services: Vec<&str> = to_services.iter().map(|p| p.to.as_str()).collect();
    services.sort();
    services.dedup();
    if !services.is_empty() {
        out.push_str("through Services:\n");
        for (i, svc) in services.iter().enumerate() {
            out.push_str(&format!("  s{i} = {svc}\n"));
        }
        out.push('\n');
        out.push_str(&tables(&to_services, &froms, &services, "s"));
    }
    out
}

/// One table per port/protocol: `rows` × `columns` (columns by `prefix` and index).
fn tables(probes: &[&Probe], rows: &[&str], columns: &[&str], prefix: &str) -> String {
    let mut keys: Vec<(u16, &str)> = probes.iter().map(|p| (p.port, p.protocol.as_str())).collect();
    keys.sort();
    keys.dedup();
    let mut out = String::new();
    for (port, protocol) in keys {
        let mut table = Table::new();
        table.load_style(presets::NOTHING).force_no_tty();
        let mut header = vec![String::new()];
        header.extend((0..columns.len()).map(|i| format!("{prefix}{i}")));
        header.push(String::new());
        table.set_header(header);
        for (i, from) in rows.iter().enumerate() {
            let mut row = vec![(*from).to_string()];
            row.extend(columns.iter().map(|to| {
                probes
                    .iter()
                    .find(|p| p.from == *from && p.to == *to && p.port == port && p.protocol == protocol)
                    .map_or(" ", |p| if p.result == "allowed" { "." } else { "X" })
                    .to_string()
            }));
            row.push(format!("({i})"));
            table.add_row(row);
        }
        if let Some(names) = table.column_mut(0) {
            names.set_padding((0, 1));
        }
        for column in table.column_iter_mut().skip(1) {
            column.set_cell_alignment(CellAlignment::Center);
        }
        out.push_str(&format!("{port}/{protocol}\n"));
        // No trailing blanks: the examples' READMEs hold this output, and editors strip them.
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    out
}
