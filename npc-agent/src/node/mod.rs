//! The node: the loop that turns the cluster into enforcement on this node's pods.
//!
//! - [`enforcer`]: one turn (compile → attach → MapSync → metrics), shared by the agent and the lab;
//! - [`wake`]: when to turn (changes coalesced, a resync tick, stop);
//! - [`agent`]: `npc-agent run`, the enforcer driven by the kube source;
//! - [`attacher`]: a pod address → its host-side interface, with netlink;
//! - [`observer`]: verdict events → rate-limited logs and counters;
//! - [`metrics`], [`http`]: what Prometheus and the kubelet see.
pub mod agent;
pub mod attacher;
pub mod enforcer;
pub mod http;
pub mod metrics;
pub mod observer;
pub mod wake;
