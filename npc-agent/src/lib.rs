//! npc: an eBPF NetworkPolicy enforcer. See the README and docs/ for the design.
pub mod agent;
pub mod attacher;
pub mod compiler;
pub mod datapath;
pub mod explain;
pub mod inspect;
pub mod kube_source;
pub mod lab;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod observer;
pub mod packet;
pub mod policy;
pub mod reference;
pub mod walkthrough;
