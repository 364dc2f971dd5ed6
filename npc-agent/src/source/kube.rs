//! The Kubernetes source: kube-rs watchers and reflector stores for Pods (all namespaces: remote
//! pods are peers), Namespaces, NetworkPolicies, Services and EndpointSlices (a pod's connection
//! to a Service VIP is judged by the backends behind it).
//!
//! Each object is stripped to what the compiler reads before it enters a store (no managedFields,
//! no annotations but the legacy one, no container images, env or status conditions), so memory
//! grows with what policy needs, not with what the API server sends. Every change pings
//! `changed`; the agent coalesces bursts into one compile.
//!
//! Errors never stop a watcher: kube-rs relists (after `410 Gone` too) and we back off
//! ([`AgentBackoff`]); each error and each relist is logged and counted, and the stores keep
//! the last state meanwhile, so enforcement carries on unchanged.
use std::fmt::Debug;

use tokio::sync::mpsc::UnboundedSender as Sender;

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus, Service, ServiceSpec},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};

use crate::node::metrics::Metrics;
use npc_policy::compiler::LEGACY_ANNOTATION;
use npc_policy::files::{DEFAULT_NAMESPACE, Loaded, ManifestError};
use npc_policy::model;
use npc_policy::policy::Policy;
use npc_policy::service;

/// The stores, filled by watchers running on the tokio runtime.
#[derive(Clone)]
pub struct KubeStores {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub policies: Store<NetworkPolicy>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
}

impl KubeStores {
    /// Starts the watchers (on the current tokio runtime). `changed` gets a message after every
    /// event that changed a store.
    pub fn start(client: Client, changed: Sender<()>, metrics: Metrics) -> Self {
        let w = Watchers {
            client,
            changed,
            metrics,
        };
        Self {
            pods: w.watch("pods", strip_pod),
            namespaces: w.watch("namespaces", strip_namespace),
            policies: w.watch("networkpolicies", strip_policy),
            services: w.watch("services", strip_service),
            slices: w.watch("endpointslices", strip_slice),
        }
    }

    /// Waits until every store has completed its first list.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        self.pods.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.policies.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        Ok(())
    }

    /// The stores' contents as the compiler's input. Objects the model cannot take (a policy that
    /// fails validation, a pod with a malformed IP) become errors naming the object and field;
    /// everything else is returned.
    pub fn snapshot(&self) -> Loaded {
        let mut errors = Vec::new();
        let slices = convert(&self.slices, "EndpointSlice", &mut errors, |s| {
            service::slice_from_k8s(s, DEFAULT_NAMESPACE)
        });
        let mut loaded = Loaded {
            namespaces: convert(&self.namespaces, "Namespace", &mut errors, model::namespace_from_k8s),
            pods: convert(&self.pods, "Pod", &mut errors, |p| {
                model::pod_from_k8s(p, DEFAULT_NAMESPACE)
            }),
            policies: convert(&self.policies, "NetworkPolicy", &mut errors, |p| {
                Policy::from_k8s(p, DEFAULT_NAMESPACE)
            }),
            services: convert(&self.services, "Service", &mut errors, |s| {
                service::service_from_k8s(s, DEFAULT_NAMESPACE)
            }),
            // A slice that names no Service is not ours to judge by.
            slices: slices.into_iter().flatten().collect(),
            errors: Vec::new(),
        };
        // Parts of a pod it was kept without (a malformed annotation) are reported too.
        for pod in &loaded.pods {
            for (field, message) in &pod.ignored {
                errors.push(ManifestError {
                    file: "kubernetes".into(),
                    document: 0,
                    object: Some(format!("Pod {}", pod.object_ref())),
                    field: field.clone(),
                    message: message.clone(),
                });
            }
        }
        loaded.errors = errors;
        loaded
    }
}

/// Converts every object of a store; the ones that fail become errors naming kind, object and
/// field (the error's own text), and the rest are returned.
fn convert<K, T, E: std::fmt::Display>(
    store: &Store<K>,
    kind: &str,
    errors: &mut Vec<ManifestError>,
    f: impl Fn(&K) -> Result<T, E>,
) -> Vec<T>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let mut out = Vec::new();
    for object in store.state() {
        match f(&object) {
            Ok(t) => out.push(t),
            Err(e) => errors.push(ManifestError {
                file: "kubernetes".into(),
                document: 0,
                object: Some(format!("{kind} {}", name_of(&*object))),
                field: String::new(),
                message: e.to_string(),
            }),
        }
    }
    out
}

fn name_of<K: Resource>(k: &K) -> String {
    let meta = k.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("-"),
        meta.name.as_deref().unwrap_or("?")
    )
}

/// What every watcher shares: the client, where to ping on a change, the metrics.
struct Watchers {
    client: Client,
    changed: Sender<()>,
    metrics: Metrics,
}

impl Watchers {
    /// A cluster-wide watcher of `K` whose objects are stripped before they enter the store.
    fn watch<K>(&self, resource: &'static str, strip: fn(&mut K)) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug + Send + Sync + 'static,
    {
        watch(
            resource,
            Api::all(self.client.clone()),
            strip,
            self.changed.clone(),
            self.metrics.clone(),
        )
    }
}

fn watch<K>(resource: &'static str, api: Api<K>, strip: fn(&mut K), changed: Sender<()>, metrics: Metrics) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .backoff(AgentBackoff::default())
        .modify(strip)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // What each object looked like (stripped) when last seen: an update that leaves it as it
        // was (status conditions, container statuses, a resourceVersion bump) changes nothing the
        // compiler reads, and must not cost a compile on every node.
        let mut seen: std::collections::HashMap<(Option<String>, String), u64> = Default::default();
        while let Some(item) = stream.next().await {
            match item {
                Ok(watcher::Event::Init) => {
                    metrics.kube_relist(resource);
                    tracing::info!(resource, "listing");
                    seen.clear();
                }
                Ok(watcher::Event::InitDone) => {
                    tracing::info!(resource, "list complete");
                    let _ = changed.send(());
                }
                Ok(watcher::Event::InitApply(object)) => {
                    seen.insert(object_key(&object), fingerprint(&object));
                }
                Ok(watcher::Event::Apply(object)) => {
                    let print = fingerprint(&object);
                    if seen.insert(object_key(&object), print) == Some(print) {
                        metrics.kube_unchanged(resource);
                    } else {
                        let _ = changed.send(());
                    }
                }
                Ok(watcher::Event::Delete(object)) => {
                    seen.remove(&object_key(&object));
                    let _ = changed.send(());
                }
                Err(e) => {
                    let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                    metrics.kube_error(resource, gone);
                    tracing::warn!(resource, error = %e, "watch failed; enforcing the last state, retrying with backoff");
                }
            }
        }
    });
    reader
}

fn object_key<K: Resource>(object: &K) -> (Option<String>, String) {
    let meta = object.meta();
    (meta.namespace.clone(), meta.name.clone().unwrap_or_default())
}

/// A hash of the stripped object without its resourceVersion (which every update bumps).
fn fingerprint<K: Resource + serde::Serialize + Clone>(object: &K) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(&object).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// Retry delays after a failed list or watch: 0.5 s doubling to 2 s, ±20% jitter, back to 0.5 s
/// after a success. kube's default goes to 30 s, so an agent could stay out of date for half a
/// minute after the API server came back (~20 s with the earlier 10 s cap): a node agent
/// enforcing stale policy is worse than a few requests a second per node against a server that
/// is down (which refuses them cheaply), and the jitter keeps a fleet from retrying in step.
#[derive(Clone, Debug)]
struct AgentBackoff {
    next: std::time::Duration,
}

impl AgentBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(500);
    const MAX: std::time::Duration = std::time::Duration::from_secs(2);
}

impl Default for AgentBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for AgentBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter from the clock's low bits: no need for a random number generator here.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let factor = 0.8 + f64::from(nanos % 1000) / 2500.0;
        Some(base.mul_f64(factor))
    }
}

impl kube::runtime::utils::Backoff for AgentBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// What the compiler reads of a pod: name, namespace, labels, node, hostNetwork, named
/// container ports, addresses, phase, creation time.
pub fn strip_pod(pod: &mut Pod) {
    strip_meta(pod.meta_mut(), &[model::SOURCE_PREFIXES_ANNOTATION]);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            host_network: spec.host_network,
            containers: spec
                .containers
                .into_iter()
                .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
                .map(|c| Container {
                    name: String::new(),
                    ports: c.ports.map(|ports| {
                        ports
                            .into_iter()
                            .map(|p| ContainerPort {
                                container_port: p.container_port,
                                name: p.name,
                                protocol: p.protocol,
                                ..ContainerPort::default()
                            })
                            .collect()
                    }),
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}

/// What the compiler reads of a Service: its VIPs, ports, selector and internalTrafficPolicy.
fn strip_service(svc: &mut Service) {
    strip_meta(svc.meta_mut(), &[]);
    svc.meta_mut().labels = None;
    if let Some(spec) = svc.spec.take() {
        svc.spec = Some(ServiceSpec {
            cluster_ip: spec.cluster_ip,
            cluster_ips: spec.cluster_ips,
            external_ips: spec.external_ips,
            ports: spec.ports,
            selector: spec.selector,
            internal_traffic_policy: spec.internal_traffic_policy,
            ..ServiceSpec::default()
        });
    }
    if let Some(status) = svc.status.as_mut() {
        status.conditions = None;
    }
}

/// An EndpointSlice keeps its Service's name label, its ports and its endpoints' addresses,
/// conditions and nodes.
fn strip_slice(slice: &mut EndpointSlice) {
    strip_meta(slice.meta_mut(), &[]);
    if let Some(labels) = slice.meta_mut().labels.as_mut() {
        labels.retain(|k, _| k == service::SERVICE_NAME_LABEL);
    }
    for ep in &mut slice.endpoints {
        ep.hints = None;
        ep.target_ref = None;
        ep.hostname = None;
        ep.zone = None;
        ep.deprecated_topology = None;
    }
}

fn strip_namespace(ns: &mut Namespace) {
    strip_meta(ns.meta_mut(), &[LEGACY_ANNOTATION]);
    ns.spec = None;
    ns.status = None;
}

fn strip_policy(np: &mut NetworkPolicy) {
    strip_meta(np.meta_mut(), &[]);
}

/// Drops the metadata the compiler never reads; `keep` names the annotations it does.
fn strip_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, keep: &[&str]) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.generate_name = None;
    meta.annotations = match meta.annotations.take() {
        Some(mut a) if !keep.is_empty() => {
            a.retain(|k, _| keep.contains(&k.as_str()));
            (!a.is_empty()).then_some(a)
        }
        _ => None,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_backoff_stays_within_a_couple_of_seconds() {
        let delays: Vec<f64> = AgentBackoff::default().take(12).map(|d| d.as_secs_f64()).collect();
        // 0.5, 1, 2, 2, ... each within ±20%.
        for (i, d) in delays.iter().enumerate() {
            let base = [0.5, 1.0].get(i).copied().unwrap_or(2.0);
            assert!(
                (base * 0.8..=base * 1.2).contains(d),
                "retry {i}: {d} s, expected {base} s ±20%"
            );
        }
        let mut backoff = AgentBackoff::default();
        backoff.by_ref().take(5).for_each(drop);
        kube::runtime::utils::Backoff::reset(&mut backoff);
        assert!(backoff.next().unwrap().as_secs_f64() <= 0.6, "a success starts over");
    }
}
