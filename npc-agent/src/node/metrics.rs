//! Prometheus metrics (prometheus-client), served as text on `--metrics-addr` with `/healthz` and
//! `/readyz`.
//!
//! The headline is `npc_blocked_connections_total{protocol,dport,direction}`, the successor of
//! weave-npc's `weavenpc_blocked_connections_total{protocol,dport}` that users alert on (seed 003).
//! It is fed from the per-CPU drop counters in the kernel: the agent adds what they grew by since
//! the last look.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use npc_common::DropKey;
use npc_policy::{model::protocol_name, policy::direction_name};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// `npc_build_info`: how this node attaches (`tcx` on 6.6+, `clsact` before) and its kernel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub attach: String,
    pub kernel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlockedLabels {
    pub protocol: String,
    pub dport: u16,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Every metric the agent exports; cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    blocked: Family<BlockedLabels, Counter>,
    last_drops: Mutex<BTreeMap<DropKey, u64>>,
    allowed: Family<DirectionLabels, Counter>,
    last_allowed: Mutex<(u64, u64)>,
    spoofed: Counter,
    last_spoofed: Mutex<u64>,
    denied_packets: Counter,
    last_denied_packets: Mutex<u64>,
    policies: Gauge,
    rejected: Family<KindLabels, Gauge>,
    endpoints: Gauge,
    identities: Gauge,
    services: Gauge,
    partly_allowed: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    verdict_events: Family<EventLabels, Counter>,
    syncs: Counter,
    sync_errors: Counter,
    sync_duration: Histogram,
    map_writes: Counter,
    attach_errors: Counter,
    map_repairs: Counter,
    kube_errors: Family<ResourceLabels, Counter>,
    kube_gone: Family<ResourceLabels, Counter>,
    kube_relists: Family<ResourceLabels, Counter>,
    kube_unchanged: Family<ResourceLabels, Counter>,
    ready: AtomicBool,
    heartbeat: AtomicU64,
}

/// How much a kernel counter grew from `before` to `now`. A counter that went down was reset
/// (maps recreated): count it from zero.
fn grown(now: u64, before: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

/// Registers `metric` under `name` and hands back the shared handle.
fn register<M: prometheus_client::registry::Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let blocked: Family<BlockedLabels, Counter> = register(
            &mut r,
            "npc_blocked_connections",
            "Connections dropped by network policy (a flow counts once while its packets keep being dropped less than 60 s apart; a port that no policy, Service or local pod names counts as dport 0)",
            Default::default(),
        );
        let allowed: Family<DirectionLabels, Counter> = register(
            &mut r,
            "npc_allowed_connections",
            "New connections allowed and tracked, by the enforcement point that judged them",
            Default::default(),
        );
        let spoofed: Counter = register(
            &mut r,
            "npc_spoofed_packets",
            "Packets local pods sent from an address that is not theirs (dropped whatever the policy)",
            Default::default(),
        );
        let denied_packets: Counter = register(
            &mut r,
            "npc_denied_packets",
            "Packets dropped by network policy, every one (retransmissions included)",
            Default::default(),
        );
        let policies: Gauge = register(&mut r, "npc_policies", "NetworkPolicies enforced", Default::default());
        let rejected: Family<KindLabels, Gauge> = register(
            &mut r,
            "npc_rejected_objects",
            "Objects the agent cannot use (a policy that fails validation, a pod with a malformed address), by kind",
            Default::default(),
        );
        let endpoints: Gauge = register(
            &mut r,
            "npc_endpoints",
            "Local pods with the datapath attached",
            Default::default(),
        );
        let identities: Gauge = register(&mut r, "npc_identities", "Distinct pod identities", Default::default());
        let services: Gauge = register(
            &mut r,
            "npc_services",
            "Services with a VIP, whose connections are judged by their backends",
            Default::default(),
        );
        let partly_allowed: Gauge = register(
            &mut r,
            "npc_service_ports_partly_allowed",
            "(local pod identity, Service port) pairs whose egress rules allow only some of the backends: refused (fail-closed)",
            Default::default(),
        );
        let map_entries: Family<MapLabels, Gauge> = register(
            &mut r,
            "npc_map_entries",
            "Entries in each policy map",
            Default::default(),
        );
        let map_capacity: Family<MapLabels, Gauge> = register(
            &mut r,
            "npc_map_capacity",
            "Maximum entries of each map (pressure = npc_map_entries / npc_map_capacity)",
            Default::default(),
        );
        let verdict_events: Family<EventLabels, Counter> = register(
            &mut r,
            "npc_verdict_events",
            "Verdict events read from the datapath's ring buffer (drops, audit-mode would-drops), by reason",
            Default::default(),
        );
        let syncs: Counter = register(
            &mut r,
            "npc_syncs",
            "Compiles synced into the kernel maps",
            Default::default(),
        );
        let sync_errors: Counter = register(
            &mut r,
            "npc_sync_errors",
            "Syncs that failed (retried)",
            Default::default(),
        );
        let sync_duration = register(
            &mut r,
            "npc_sync_duration_seconds",
            "Compile and map sync time",
            Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        );
        let map_writes: Counter = register(
            &mut r,
            "npc_map_writes",
            "Kernel map entries written or deleted",
            Default::default(),
        );
        let attach_errors: Counter = register(
            &mut r,
            "npc_attach_errors",
            "Local pods whose interface could not be found or attached (retried)",
            Default::default(),
        );
        let map_repairs: Counter = register(
            &mut r,
            "npc_map_repairs",
            "Map entries a periodic full reconcile found changed behind the agent's back, and rewrote",
            Default::default(),
        );
        let kube_errors: Family<ResourceLabels, Counter> = register(
            &mut r,
            "npc_kube_watch_errors",
            "Failed lists and watches (the last state stays enforced; retried with backoff)",
            Default::default(),
        );
        let kube_gone: Family<ResourceLabels, Counter> = register(
            &mut r,
            "npc_kube_watch_gone",
            "Watches answered 410 Gone (too old a resourceVersion: relisted)",
            Default::default(),
        );
        let build_info: Family<BuildLabels, Gauge> = register(
            &mut r,
            "npc_build_info",
            "Always 1: the attach path (tcx or clsact) and kernel release of this node",
            Default::default(),
        );
        build_info
            .get_or_create(&BuildLabels {
                attach: crate::datapath::AttachPath::current().label().into(),
                kernel: crate::datapath::kernel_release(),
            })
            .set(1);
        let kube_relists: Family<ResourceLabels, Counter> = register(
            &mut r,
            "npc_kube_relists",
            "Full lists of a resource",
            Default::default(),
        );
        let kube_unchanged: Family<ResourceLabels, Counter> = register(
            &mut r,
            "npc_kube_unchanged_events",
            "Watch events that changed nothing the compiler reads (status churn): no compile",
            Default::default(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: r,
                blocked,
                last_drops: Mutex::new(BTreeMap::new()),
                allowed,
                last_allowed: Mutex::new((0, 0)),
                spoofed,
                last_spoofed: Mutex::new(0),
                denied_packets,
                last_denied_packets: Mutex::new(0),
                policies,
                rejected,
                endpoints,
                identities,
                services,
                partly_allowed,
                map_entries,
                map_capacity,
                verdict_events,
                syncs,
                sync_errors,
                sync_duration,
                map_writes,
                attach_errors,
                map_repairs,
                kube_errors,
                kube_gone,
                kube_relists,
                kube_unchanged,
                ready: AtomicBool::new(false),
                heartbeat: AtomicU64::new(0),
            }),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }

    /// Adds what each kernel drop counter grew by since the last call.
    pub fn observe_drops(&self, drops: &BTreeMap<DropKey, u64>) {
        let mut last = self.inner.last_drops.lock().expect("not poisoned");
        for (key, now) in drops {
            let delta = grown(*now, last.get(key).copied().unwrap_or(0));
            if delta > 0 {
                self.inner.blocked.get_or_create(&blocked_labels(key)).inc_by(delta);
            }
            last.insert(*key, *now);
        }
    }

    /// Adds what the kernel's allowed-connection counters grew by since the last call.
    pub fn observe_allowed(&self, (ingress, egress): (u64, u64)) {
        let mut last = self.inner.last_allowed.lock().expect("not poisoned");
        for (direction, now, before) in [("ingress", ingress, last.0), ("egress", egress, last.1)] {
            let delta = grown(now, before);
            if delta > 0 {
                self.inner
                    .allowed
                    .get_or_create(&DirectionLabels {
                        direction: direction.into(),
                    })
                    .inc_by(delta);
            }
        }
        *last = (ingress, egress);
    }

    /// Adds what the kernel's spoofed-packet counter grew by since the last call.
    pub fn observe_spoofed(&self, now: u64) {
        let mut last = self.inner.last_spoofed.lock().expect("not poisoned");
        self.inner.spoofed.inc_by(grown(now, *last));
        *last = now;
    }

    /// Adds what the kernel's denied-packet counter grew by since the last call.
    pub fn observe_denied_packets(&self, now: u64) {
        let mut last = self.inner.last_denied_packets.lock().expect("not poisoned");
        self.inner.denied_packets.inc_by(grown(now, *last));
        *last = now;
    }

    pub fn blocked(&self, protocol: &str, dport: u16, direction: &str) -> u64 {
        self.inner
            .blocked
            .get_or_create(&BlockedLabels {
                protocol: protocol.into(),
                dport,
                direction: direction.into(),
            })
            .get()
    }

    pub fn set_counts(&self, policies: usize, endpoints: usize, identities: usize) {
        self.inner.policies.set(policies as i64);
        self.inner.endpoints.set(endpoints as i64);
        self.inner.identities.set(identities as i64);
    }

    pub fn set_services(&self, services: usize, partly_allowed: usize) {
        self.inner.services.set(services as i64);
        self.inner.partly_allowed.set(partly_allowed as i64);
    }

    pub fn set_rejected(&self, kind: &str, n: usize) {
        self.inner
            .rejected
            .get_or_create(&KindLabels { kind: kind.into() })
            .set(n as i64);
    }

    pub fn set_map_entries(&self, map: &str, n: usize) {
        self.inner
            .map_entries
            .get_or_create(&MapLabels { map: map.into() })
            .set(n as i64);
    }

    pub fn set_map_capacity(&self, map: &str, n: u32) {
        self.inner
            .map_capacity
            .get_or_create(&MapLabels { map: map.into() })
            .set(i64::from(n));
    }

    pub fn verdict_event(&self, kind: u8, reason: u8) {
        let kind = match kind {
            npc_common::event_kind::DROP => "drop",
            npc_common::event_kind::AUDIT => "audit",
            _ => "other",
        };
        let reason = match reason {
            npc_common::drop_reason::POLICY => "policy",
            npc_common::drop_reason::UNPARSEABLE => "unparseable",
            npc_common::drop_reason::POLICY_CHANGED => "policy_changed",
            npc_common::drop_reason::NOT_IP => "not_ip",
            npc_common::drop_reason::SPOOFED => "spoofed",
            npc_common::drop_reason::FRAGMENT => "fragment",
            _ => "other",
        };
        self.inner
            .verdict_events
            .get_or_create(&EventLabels {
                kind: kind.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn synced(&self, seconds: f64, writes: usize) {
        self.inner.syncs.inc();
        self.inner.sync_duration.observe(seconds);
        self.inner.map_writes.inc_by(writes as u64);
        self.inner.ready.store(true, Ordering::Relaxed);
    }

    pub fn sync_failed(&self) {
        self.inner.sync_errors.inc();
    }

    pub fn maps_repaired(&self, entries: usize) {
        self.inner.map_repairs.inc_by(entries as u64);
    }

    pub fn attach_failed(&self) {
        self.inner.attach_errors.inc();
    }

    pub fn kube_error(&self, resource: &str, gone: bool) {
        let labels = ResourceLabels {
            resource: resource.into(),
        };
        self.inner.kube_errors.get_or_create(&labels).inc();
        if gone {
            self.inner.kube_gone.get_or_create(&labels).inc();
        }
    }

    pub fn kube_relist(&self, resource: &str) {
        self.inner
            .kube_relists
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .inc();
    }

    pub fn kube_unchanged(&self, resource: &str) {
        self.inner
            .kube_unchanged
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .inc();
    }

    /// Ready once the first sync after the initial lists is done.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// The agent loop calls this every turn; `/healthz` fails when it stops (a wedged loop).
    pub fn beat(&self, unix_seconds: u64) {
        self.inner.heartbeat.store(unix_seconds, Ordering::Relaxed);
    }

    pub fn last_beat(&self) -> u64 {
        self.inner.heartbeat.load(Ordering::Relaxed)
    }
}

fn blocked_labels(key: &DropKey) -> BlockedLabels {
    BlockedLabels {
        protocol: protocol_name(key.protocol).map_or_else(|| key.protocol.to_string(), str::to_string),
        dport: key.dport,
        direction: direction_name(key.direction).into(),
    }
}

#[cfg(test)]
mod tests {
    use npc_common::{DIR_INGRESS, PROTO_TCP};

    use super::*;

    #[test]
    fn blocked_connections_follow_the_kernel_counters() {
        let m = Metrics::new();
        let key = DropKey {
            direction: DIR_INGRESS,
            protocol: PROTO_TCP,
            dport: 80,
        };
        m.observe_drops(&[(key, 3)].into());
        m.observe_drops(&[(key, 5)].into());
        assert_eq!(m.blocked("TCP", 80, "ingress"), 5);
        m.observe_drops(&[(key, 2)].into()); // reset underneath: counted from zero
        assert_eq!(m.blocked("TCP", 80, "ingress"), 7);
        let text = m.render();
        assert!(
            text.contains(r#"npc_blocked_connections_total{protocol="TCP",dport="80",direction="ingress"} 7"#),
            "{text}"
        );
    }
}
