//! npc: an eBPF NetworkPolicy enforcer. The folders are the data flow (see the README):
//!
//! ```text
//!  source (kube | files) ──▶ npc_policy (model, compiler) ──▶ datapath::sync (MapSync) ──▶ BPF maps
//!                                                                  ▲          ◀── npc-ebpf programs
//!  node: the loop (enforcer, wake), attacher, observer, metrics ───┘
//!  lab: the node loop with the files source and a fabric of network namespaces
//!  cli: one file per subcommand
//! ```
pub mod cli;
pub mod datapath;
pub mod lab;
pub mod node;
pub mod source;
