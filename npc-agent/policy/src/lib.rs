//! npc's policy core, pure: no kernel, no network, no async, no clock.
//!
//! ```text
//!  files (YAML) ─┐
//!                ├─▶ model (State) ──▶ compiler ──▶ DesiredMaps (what the BPF maps should hold)
//!  kube objects ─┘                          └──▶ lookup / explain (the datapath's lookups, in user space)
//!
//!  reference: the same semantics the slow obvious way, on the k8s-openapi objects themselves
//!  (shares no code with model, policy or compiler; tests compare the compiler with it)
//!  scenario (feature `scenario`): random clusters as k8s-openapi objects, for those tests
//! ```
//!
//! Builds and tests on stable Rust alone: `cargo test -p npc-policy`.
pub mod compiler;
pub mod explain;
pub mod files;
pub mod model;
pub mod policy;
pub mod reference;
#[cfg(feature = "scenario")]
pub mod scenario;
pub mod service;
