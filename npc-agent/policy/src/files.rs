//! The files source: Kubernetes YAML (multi-document) read into the model.
//!
//! Every problem becomes a [`ManifestError`] naming the file, the document's index in it and the
//! field; the documents that are fine are still returned, so one broken policy never stops the
//! others from being enforced.
use std::{
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Namespace as K8sNamespace, Pod as K8sPod, Service as K8sService},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;

use crate::{
    model::{self, Namespace, ObjectRef, Pod, State},
    policy::Policy,
    service::{self, Backend, Service},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// `Kind ns/name` when we got that far.
    pub object: Option<String>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<Policy>,
    pub services: Vec<Service>,
    /// EndpointSlices, by the Service they belong to. A Service with a selector and no slice here
    /// gets the endpoints the EndpointSlice controller would make.
    pub slices: Vec<(ObjectRef, Vec<Backend>)>,
    pub errors: Vec<ManifestError>,
}

impl Loaded {
    /// NetworkPolicies that were rejected (each has an entry in `errors`); the rest apply.
    pub fn rejected_policies(&self) -> usize {
        self.rejected("NetworkPolicy")
    }

    /// Objects of `kind` ("Pod", "Service", ...) that were rejected (each has an entry in `errors`).
    pub fn rejected(&self, kind: &str) -> usize {
        rejected(&self.errors, kind)
    }

    /// The compiler's input, with every pod local (a later object with the same name replaces
    /// an earlier one, as `kubectl apply` would).
    pub fn to_state(&self) -> State {
        State {
            namespaces: self.namespaces.iter().map(|n| (n.name.clone(), n.clone())).collect(),
            pods: self.pods.iter().map(|p| (p.object_ref(), p.clone())).collect(),
            policies: self.policies.iter().map(|p| (p.id.clone(), p.clone())).collect(),
            services: self.services.iter().map(|s| (s.object_ref(), s.clone())).collect(),
            service_backends: self.slices.iter().fold(Default::default(), |mut all, (svc, backends)| {
                all.entry(svc.clone())
                    .or_insert_with(Vec::new)
                    .extend(backends.iter().cloned());
                all
            }),
            ..State::default()
        }
    }

    pub fn extend(&mut self, other: Loaded) {
        self.namespaces.extend(other.namespaces);
        self.pods.extend(other.pods);
        self.policies.extend(other.policies);
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.errors.extend(other.errors);
    }
}

/// How many of `errors` are about objects of `kind` ("Pod", "Service", ...).
pub fn rejected(errors: &[ManifestError], kind: &str) -> usize {
    errors
        .iter()
        .filter(|e| {
            e.object
                .as_deref()
                .and_then(|o| o.split_once(' '))
                .is_some_and(|(k, _)| k == kind)
        })
        .count()
}

/// Namespace used for namespaced objects that do not name one (as `kubectl apply` would).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Result<Loaded, std::io::Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut loaded = Loaded::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => loaded.extend(parse_str(&file, &text)),
            Err(e) => loaded.errors.push(ManifestError {
                file: file.clone(),
                document: 0,
                object: None,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    Ok(loaded)
}

/// Parses a (multi-document) YAML text; `file` only names the source in errors.
pub fn parse_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    for (document, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let error = |object: Option<String>, field: String, message: String| ManifestError {
            file: file.to_path_buf(),
            document,
            object,
            field,
            message,
        };
        let value: serde_json::Value = match serde::Deserialize::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                loaded
                    .errors
                    .push(error(None, String::new(), format!("not valid YAML: {e}")));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        match parse_object(value) {
            Ok(Some(Object::Namespace(ns))) => loaded.namespaces.push(ns),
            Ok(Some(Object::Pod(pod))) => {
                for (field, message) in &pod.ignored {
                    let object = Some(format!("Pod {}", pod.object_ref()));
                    loaded.errors.push(error(object, field.clone(), message.clone()));
                }
                loaded.pods.push(pod);
            }
            Ok(Some(Object::Policy(p))) => loaded.policies.push(p),
            Ok(Some(Object::Service(svc))) => loaded.services.push(svc),
            Ok(Some(Object::Slice(svc, backends))) => loaded.slices.push((svc, backends)),
            Ok(None) => {}
            Err((object, field, message)) => loaded.errors.push(error(object, field, message)),
        }
    }
    loaded
}

enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Policy(Policy),
    Service(Service),
    Slice(ObjectRef, Vec<Backend>),
}

type ObjectError = (Option<String>, String, String);

fn typed<T: DeserializeOwned>(value: serde_json::Value, object: &str) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        (Some(object.to_string()), field, e.into_inner().to_string())
    })
}

fn parse_object(mut value: serde_json::Value) -> Result<Option<Object>, ObjectError> {
    let kind = value.get("kind").and_then(|k| k.as_str()).map(str::to_string);
    let api_version = value.get("apiVersion").and_then(|k| k.as_str()).map(str::to_string);
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("?")
        .to_string();
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(|n| n.as_str())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string();
    let (Some(kind), Some(api_version)) = (kind, api_version) else {
        return Err((None, "kind".into(), "every document needs apiVersion and kind".into()));
    };
    let object = match (kind.as_str(), api_version.as_str()) {
        ("Namespace", "v1") => read(value, format!("Namespace {name}"), |ns: &K8sNamespace| {
            model::namespace_from_k8s(ns).map(Object::Namespace)
        }),
        ("Pod", "v1") => read(value, format!("Pod {namespace}/{name}"), |pod: &K8sPod| {
            model::pod_from_k8s(pod, DEFAULT_NAMESPACE).map(Object::Pod)
        }),
        ("NetworkPolicy", "networking.k8s.io/v1" | "extensions/v1beta1" | "networking.k8s.io/v1beta1") => {
            let object = format!("NetworkPolicy {namespace}/{name}");
            // The pre-v1 groups (seed 001's extensions/v1beta1) share v1's schema.
            value["apiVersion"] = "networking.k8s.io/v1".into();
            let np: NetworkPolicy = typed(value, &object)?;
            Policy::from_k8s(&np, DEFAULT_NAMESPACE)
                .map(Object::Policy)
                .map_err(|e| (Some(object), e.field, e.message))
        }
        ("Service", "v1") => read(value, format!("Service {namespace}/{name}"), |svc: &K8sService| {
            service::service_from_k8s(svc, DEFAULT_NAMESPACE).map(Object::Service)
        }),
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            // A slice that names no Service is not ours to judge by.
            let slice = read(
                value,
                format!("EndpointSlice {namespace}/{name}"),
                |slice: &EndpointSlice| service::slice_from_k8s(slice, DEFAULT_NAMESPACE),
            )?;
            let Some((svc, backends)) = slice else { return Ok(None) };
            Ok(Object::Slice(svc, backends))
        }
        ("NetworkPolicy", other) => Err((
            Some(format!("NetworkPolicy {namespace}/{name}")),
            "apiVersion".into(),
            format!("unsupported apiVersion {other:?} (networking.k8s.io/v1 or extensions/v1beta1)"),
        )),
        // Deployments and the like: not ours to enforce; skipped quietly.
        _ => return Ok(None),
    };
    object.map(Some)
}

/// Deserializes `value` as `K` and converts it into the model; errors name `object` and the field.
fn read<K: DeserializeOwned, T>(
    value: serde_json::Value,
    object: String,
    convert: impl FnOnce(&K) -> Result<T, model::ObjectError>,
) -> Result<T, ObjectError> {
    let k: K = typed(value, &object)?;
    convert(&k).map_err(|e| obj_err(&object, e))
}

fn obj_err(object: &str, e: model::ObjectError) -> ObjectError {
    let model::ObjectError::Field { field, message } = e;
    (Some(object.to_string()), field, message)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_broken_policy_is_rejected_alone() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: one, namespace: n}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: two, namespace: n}\nspec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: three, namespace: n}\nspec: {podSelector: {matchLabels: {a: b}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec: {containers: [{name: c, ports: [{containerPort: 80, protocol: QUIC}]}]}\n";
        let loaded = parse_str(Path::new("dir/p.yaml"), text);
        let names: Vec<&str> = loaded.policies.iter().map(|p| p.id.name.as_str()).collect();
        assert_eq!(names, ["one", "three"]);
        assert_eq!(loaded.rejected_policies(), 1);
        assert_eq!(loaded.errors.len(), 2, "{:?}", loaded.errors);
        assert_eq!(
            loaded.errors[0].to_string(),
            "dir/p.yaml document 1 (NetworkPolicy n/two): spec.ingress[0].ports[0].port: 0 is not a port (1-65535)"
        );
        assert_eq!(
            loaded.errors[1].to_string(),
            "dir/p.yaml document 3 (Pod n/p): spec.containers[0].ports[0].protocol: unknown protocol \"QUIC\" (TCP, UDP or SCTP)"
        );
    }

    #[test]
    fn malformed_objects_name_the_field() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q}\nspec: {podSelector: {matchLabels: [1]}}\n";
        let loaded = parse_str(Path::new("x.yaml"), text);
        assert!(
            loaded.errors[0].to_string().contains("status.podIP"),
            "{}",
            loaded.errors[0]
        );
        assert!(
            loaded.errors[1].to_string().contains("spec.podSelector.matchLabels"),
            "{}",
            loaded.errors[1]
        );
    }
}
