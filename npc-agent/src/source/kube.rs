//! The Kubernetes source: kube-rs watchers for Pods (all namespaces: remote pods are peers),
//! Namespaces, NetworkPolicies, Services and EndpointSlices (a pod's connection to a Service VIP
//! is judged by the backends behind it).
//!
//! Each object is stripped to what the compiler reads and turned into the model as it arrives;
//! the model object is all that is kept (by the enforcer's [`Incremental`] compiler), so memory
//! grows with what policy needs, not with what the API server sends, and a turn handles only the
//! objects that changed since the last one ([`Changes`]), never a snapshot of the whole cluster.
//! Every change pings `changed`; the agent coalesces bursts into one compile.
//!
//! Errors never stop a watcher: kube-rs relists (after `410 Gone` too) and we back off
//! ([`AgentBackoff`]); each error and each relist is logged and counted, and the model keeps the
//! last state meanwhile, so enforcement carries on unchanged. A relist's objects are compared
//! with what was known before it: changed ones are changes, and the ones it no longer holds are
//! deletions (what a reflector store would do on its own).
use std::{
    collections::{BTreeMap, HashMap},
    fmt::{Debug, Display},
    sync::{Arc, Mutex},
};

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
    runtime::{WatchStreamExt as _, watcher},
};

use crate::node::metrics::Metrics;
use npc_policy::compiler::{Incremental, LEGACY_ANNOTATION};
use npc_policy::files::{DEFAULT_NAMESPACE, Loaded, ManifestError};
use npc_policy::model::{self, ObjectRef};
use npc_policy::policy::Policy;
use npc_policy::service::{self, Backend};

/// What the watchers turned into the model since the enforcer last took it: per object, its
/// latest model (`None`: deleted, or no longer usable: see the errors).
#[derive(Debug, Default)]
pub struct Changes {
    pub pods: BTreeMap<ObjectRef, Option<model::Pod>>,
    pub namespaces: BTreeMap<String, Option<model::Namespace>>,
    pub policies: BTreeMap<ObjectRef, Option<Policy>>,
    pub services: BTreeMap<ObjectRef, Option<service::Service>>,
    /// Per Service, the endpoints of all its EndpointSlices together (`None`: it has no slice).
    pub backends: BTreeMap<ObjectRef, Option<Vec<Backend>>>,
}

impl Changes {
    pub fn len(&self) -> usize {
        self.pods.len() + self.namespaces.len() + self.policies.len() + self.services.len() + self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands every change to the compiler.
    pub fn apply(self, inc: &mut Incremental) {
        for (name, pod) in self.pods {
            match pod {
                Some(pod) => inc.set_pod(pod),
                None => inc.remove_pod(&name),
            }
        }
        for (name, ns) in self.namespaces {
            match ns {
                Some(ns) => inc.set_namespace(ns),
                None => inc.remove_namespace(&name),
            }
        }
        for (name, policy) in self.policies {
            match policy {
                Some(policy) => inc.set_policy(policy),
                None => inc.remove_policy(&name),
            }
        }
        for (name, svc) in self.services {
            match svc {
                Some(svc) => inc.set_service(svc),
                None => inc.remove_service(&name),
            }
        }
        for (name, backends) in self.backends {
            inc.set_backends(name, backends);
        }
    }
}

/// What the watchers share with whoever takes the changes.
#[derive(Default)]
struct Shared {
    changes: Changes,
    /// Objects the model could not take (or took without some part), by kind and name: reported
    /// on every turn until the object is fixed or deleted.
    errors: BTreeMap<(&'static str, String), Vec<ManifestError>>,
    /// Each EndpointSlice's Service and endpoints: a Service's backends are its slices' together.
    slices: BTreeMap<ObjectRef, (ObjectRef, Vec<Backend>)>,
}

impl Shared {
    fn set_errors(&mut self, kind: &'static str, name: String, errors: Vec<ManifestError>) {
        if errors.is_empty() {
            self.errors.remove(&(kind, name));
        } else {
            self.errors.insert((kind, name), errors);
        }
    }

    /// The backends of `svc` from every slice that names it.
    fn backends_of(&self, svc: &ObjectRef) -> Option<Vec<Backend>> {
        let mut out: Option<Vec<Backend>> = None;
        for (owner, backends) in self.slices.values() {
            if owner == svc {
                out.get_or_insert_with(Vec::new).extend(backends.iter().cloned());
            }
        }
        out
    }
}

/// The watchers, filling [`Changes`] on the tokio runtime.
#[derive(Clone)]
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    ready: Vec<tokio::sync::watch::Receiver<bool>>,
}

impl KubeSource {
    /// Starts the watchers (on the current tokio runtime). `changed` gets a message after every
    /// event that changed the model.
    pub fn start(client: Client, changed: Sender<()>, metrics: Metrics) -> Self {
        let mut w = Watchers {
            client,
            changed,
            metrics,
            shared: Arc::default(),
            ready: Vec::new(),
        };
        w.watch("pods", strip_pod, pod_changed);
        w.watch("namespaces", strip_namespace, namespace_changed);
        w.watch("networkpolicies", strip_policy, policy_changed);
        w.watch("services", strip_service, service_changed);
        w.watch("endpointslices", strip_slice, slice_changed);
        Self {
            shared: w.shared,
            ready: w.ready,
        }
    }

    /// Waits until every watcher has completed its first list.
    pub async fn wait_until_ready(&self) -> anyhow::Result<()> {
        for ready in &self.ready {
            ready
                .clone()
                .wait_for(|r| *r)
                .await
                .map_err(|_| anyhow::anyhow!("a watcher stopped before its first list completed"))?;
        }
        Ok(())
    }

    /// The changes since the last call, and every object currently rejected (an error naming
    /// the object and field; everything else is in the changes).
    pub fn take(&self) -> (Changes, Vec<ManifestError>) {
        let mut shared = self.shared.lock().expect("not poisoned");
        let changes = std::mem::take(&mut shared.changes);
        (changes, shared.errors.values().flatten().cloned().collect())
    }

    /// Everything as one snapshot (right after the first lists: one-shot tools like `explain`).
    pub fn snapshot(&self) -> Loaded {
        let (changes, errors) = self.take();
        Loaded {
            namespaces: changes.namespaces.into_values().flatten().collect(),
            pods: changes.pods.into_values().flatten().collect(),
            policies: changes.policies.into_values().flatten().collect(),
            services: changes.services.into_values().flatten().collect(),
            slices: changes
                .backends
                .into_iter()
                .filter_map(|(svc, b)| Some((svc, b?)))
                .collect(),
            errors,
        }
    }
}

/// The model of one object (`None` when deleted), and the errors to report for it.
fn convert<K, T, E: Display>(
    kind: &str,
    name: &str,
    object: Option<&K>,
    f: impl Fn(&K) -> Result<T, E>,
) -> (Option<T>, Vec<ManifestError>) {
    match object.map(f) {
        None => (None, Vec::new()),
        Some(Ok(t)) => (Some(t), Vec::new()),
        Some(Err(e)) => (None, vec![object_error(kind, name, String::new(), e.to_string())]),
    }
}

fn object_error(kind: &str, name: &str, field: String, message: String) -> ManifestError {
    ManifestError {
        file: "kubernetes".into(),
        document: 0,
        object: Some(format!("{kind} {name}")),
        field,
        message,
    }
}

/// An object's name as the model names it: a missing namespace is the default one.
fn object_ref(key: &ObjectKey) -> ObjectRef {
    ObjectRef::new(key.0.as_deref().unwrap_or(DEFAULT_NAMESPACE), &key.1)
}

fn pod_changed(shared: &mut Shared, key: &ObjectKey, pod: Option<&Pod>) {
    let name = object_ref(key);
    let (pod, mut errors) = convert("Pod", &name.to_string(), pod, |p| {
        model::pod_from_k8s(p, DEFAULT_NAMESPACE)
    });
    // Parts of a pod it was kept without (a malformed annotation) are reported too.
    for (field, message) in pod.iter().flat_map(|p| &p.ignored) {
        errors.push(object_error("Pod", &name.to_string(), field.clone(), message.clone()));
    }
    shared.set_errors("Pod", name.to_string(), errors);
    shared.changes.pods.insert(name, pod);
}

fn namespace_changed(shared: &mut Shared, key: &ObjectKey, ns: Option<&Namespace>) {
    let (ns, errors) = convert("Namespace", &key.1, ns, model::namespace_from_k8s);
    shared.set_errors("Namespace", key.1.clone(), errors);
    shared.changes.namespaces.insert(key.1.clone(), ns);
}

fn policy_changed(shared: &mut Shared, key: &ObjectKey, np: Option<&NetworkPolicy>) {
    let name = object_ref(key);
    let (policy, errors) = convert("NetworkPolicy", &name.to_string(), np, |p| {
        Policy::from_k8s(p, DEFAULT_NAMESPACE)
    });
    shared.set_errors("NetworkPolicy", name.to_string(), errors);
    shared.changes.policies.insert(name, policy);
}

fn service_changed(shared: &mut Shared, key: &ObjectKey, svc: Option<&Service>) {
    let name = object_ref(key);
    let (svc, errors) = convert("Service", &name.to_string(), svc, |s| {
        service::service_from_k8s(s, DEFAULT_NAMESPACE)
    });
    shared.set_errors("Service", name.to_string(), errors);
    shared.changes.services.insert(name, svc);
}

fn slice_changed(shared: &mut Shared, key: &ObjectKey, slice: Option<&EndpointSlice>) {
    let name = object_ref(key);
    let (slice, errors) = convert("EndpointSlice", &name.to_string(), slice, |s| {
        service::slice_from_k8s(s, DEFAULT_NAMESPACE)
    });
    shared.set_errors("EndpointSlice", name.to_string(), errors);
    let mut touched: Vec<ObjectRef> = shared.slices.remove(&name).map(|(svc, _)| svc).into_iter().collect();
    // A slice that names no Service is not ours to judge by.
    if let Some((svc, backends)) = slice.flatten() {
        touched.push(svc.clone());
        shared.slices.insert(name, (svc, backends));
    }
    for svc in touched {
        let backends = shared.backends_of(&svc);
        shared.changes.backends.insert(svc, backends);
    }
}

/// (namespace, name) as the API server sends them.
type ObjectKey = (Option<String>, String);

/// What every watcher shares: the client, where to ping on a change, the metrics, the model.
struct Watchers {
    client: Client,
    changed: Sender<()>,
    metrics: Metrics,
    shared: Arc<Mutex<Shared>>,
    ready: Vec<tokio::sync::watch::Receiver<bool>>,
}

impl Watchers {
    /// A cluster-wide watcher of `K` whose objects are stripped, then handed to `changed`.
    fn watch<K>(&mut self, resource: &'static str, strip: fn(&mut K), changed: fn(&mut Shared, &ObjectKey, Option<&K>))
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + serde::Serialize + Debug + Send + Sync + 'static,
    {
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        self.ready.push(ready);
        let stream = watcher(Api::<K>::all(self.client.clone()), watcher::Config::default())
            .backoff(AgentBackoff::default())
            .modify(strip);
        let (ping, metrics, shared) = (self.changed.clone(), self.metrics.clone(), self.shared.clone());
        let apply = move |key: &ObjectKey, object: Option<&K>| {
            changed(&mut shared.lock().expect("not poisoned"), key, object);
        };
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // What each object looked like (stripped) when last seen: an update that leaves it as
            // it was (status conditions, container statuses, a resourceVersion bump) changes
            // nothing the compiler reads, and must not cost a compile on every node.
            let mut seen: HashMap<ObjectKey, u64> = HashMap::new();
            // During a (re)list: what it has returned so far.
            let mut listed: HashMap<ObjectKey, u64> = HashMap::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(watcher::Event::Init) => {
                        metrics.kube_relist(resource);
                        tracing::info!(resource, "listing");
                        listed.clear();
                    }
                    Ok(watcher::Event::InitApply(object)) => {
                        let (key, print) = (object_key(&object), fingerprint(&object));
                        if seen.get(&key) != Some(&print) {
                            apply(&key, Some(&object));
                        }
                        listed.insert(key, print);
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Objects deleted while we were not watching.
                        for key in seen.keys().filter(|k| !listed.contains_key(*k)) {
                            apply(key, None);
                        }
                        seen = std::mem::take(&mut listed);
                        tracing::info!(resource, objects = seen.len(), "list complete");
                        ready_tx.send_replace(true);
                        let _ = ping.send(());
                    }
                    Ok(watcher::Event::Apply(object)) => {
                        let (key, print) = (object_key(&object), fingerprint(&object));
                        if seen.get(&key) == Some(&print) {
                            metrics.kube_unchanged(resource);
                        } else {
                            apply(&key, Some(&object));
                            seen.insert(key, print);
                            let _ = ping.send(());
                        }
                    }
                    Ok(watcher::Event::Delete(object)) => {
                        let key = object_key(&object);
                        seen.remove(&key);
                        apply(&key, None);
                        let _ = ping.send(());
                    }
                    Err(e) => {
                        let gone = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                        metrics.kube_error(resource, gone);
                        tracing::warn!(resource, error = %e, "watch failed; enforcing the last state, retrying with backoff");
                    }
                }
            }
        });
    }
}

fn object_key<K: Resource>(object: &K) -> ObjectKey {
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
