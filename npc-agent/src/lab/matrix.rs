//! The reachability matrix, as upstream's e2e tests print it: one table per port/protocol, rows =
//! from, columns = to (by index), `.` allowed, `X` blocked, blank = not probed. Laid out by
//! comfy-table, so the columns stay aligned at any number of pods.
use comfy_table::{CellAlignment, Table, presets};

use super::Probe;

pub fn matrix(probes: &[Probe]) -> String {
    let mut keys: Vec<(u16, &str)> = probes.iter().map(|p| (p.port, p.protocol.as_str())).collect();
    keys.sort();
    keys.dedup();
    let mut pods: Vec<&str> = probes.iter().flat_map(|p| [p.from.as_str(), p.to.as_str()]).collect();
    pods.sort();
    pods.dedup();
    let mut out = String::new();
    for (port, protocol) in keys {
        let mut table = Table::new();
        table.load_style(presets::NOTHING).force_no_tty();
        let mut header = vec![String::new()];
        header.extend((0..pods.len()).map(|i| i.to_string()));
        header.push(String::new());
        table.set_header(header);
        for (i, from) in pods.iter().enumerate() {
            let mut row = vec![(*from).to_string()];
            row.extend(pods.iter().map(|to| {
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
