//! Sources: where the cluster comes from. Both give a [`npc_policy::files::Loaded`] snapshot
//! (namespaces, pods, validated policies, and what was rejected) and a change signal.
//!
//! - [`kube`]: kube-rs watchers and stripped reflector stores (the agent);
//! - [`files`]: a directory of Kubernetes YAML, watched for edits (the lab). Its parsing is pure
//!   and lives in `npc_policy::files`.
pub mod files;
pub mod kube;
