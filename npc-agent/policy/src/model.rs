//! What the compiler needs to know of the cluster, stripped of everything else.
//!
//! Sources (files, kube) turn Kubernetes objects into these; the compiler never sees a raw object.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};

use crate::{
    policy::Policy,
    service::{Backend, Service},
};

pub type Labels = BTreeMap<String, String>;

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// The entries of `map` in `namespace`, in name order: a map keyed by [`ObjectRef`] sorts by
/// namespace first, so this is a range, not a walk of every object.
pub fn in_namespace<'a, V>(
    map: &'a BTreeMap<ObjectRef, V>,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a ObjectRef, &'a V)> + 'a {
    let from = ObjectRef {
        namespace: namespace.to_string(),
        name: String::new(),
    };
    map.range(from..).take_while(move |(k, _)| k.namespace == namespace)
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `ns/name`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty()).then(|| Self::new(ns, name))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    pub annotations: Labels,
}

impl Namespace {
    /// The API server adds `kubernetes.io/metadata.name` to every namespace; files may not.
    pub fn new(name: impl Into<String>, mut labels: Labels, annotations: Labels) -> Self {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Self {
            name,
            labels,
            annotations,
        }
    }
}

pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A protocol a port can be declared or allowed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => npc_common::PROTO_TCP,
            Self::Udp => npc_common::PROTO_UDP,
            Self::Sctp => npc_common::PROTO_SCTP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// The protocol whose IP protocol number is `n`, when it is one a NetworkPolicy can name.
    pub fn from_number(n: u8) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Sctp].into_iter().find(|p| p.number() == n)
    }
}

/// The name of IP protocol number `n` ("TCP", "UDP", "SCTP") as the agent prints it in logs,
/// metrics and `inspect`; `None` for a protocol a NetworkPolicy cannot name.
pub fn protocol_name(n: u8) -> Option<&'static str> {
    Protocol::from_number(n).map(Protocol::as_str)
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container port a pod declares.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub host_network: bool,
    /// Succeeded or Failed pods hold no address that policy should care about.
    pub terminated: bool,
    pub ports: Vec<ContainerPort>,
    /// `metadata.creationTimestamp` in Unix seconds (0 when absent, as in hand-written files):
    /// when two pods claim one address, the newest owns it.
    pub created: i64,
    /// Prefixes the pod may send from besides its own addresses ([`SOURCE_PREFIXES_ANNOTATION`]).
    pub source_prefixes: Vec<ipnet::IpNet>,
    /// Parts of the object that were ignored, as (field, why): the pod is enforced without them.
    pub ignored: Vec<(String, String)>,
}

/// A pod that really routes (a VPN gateway, a router pod) sends from addresses that are not its
/// own; this annotation lists the prefixes it may (comma- or space-separated CIDRs). Everything
/// else a pod sends from an address not its own is dropped as forged.
pub const SOURCE_PREFIXES_ANNOTATION: &str = "npc.dev/source-prefixes";

/// The pod's [`SOURCE_PREFIXES_ANNOTATION`]: the prefixes that parse, and an error naming each one
/// that does not.
fn source_prefixes(annotations: Option<&Labels>) -> (Vec<ipnet::IpNet>, Vec<(String, String)>) {
    let (mut prefixes, mut ignored) = (Vec::new(), Vec::new());
    let Some(value) = annotations.and_then(|a| a.get(SOURCE_PREFIXES_ANNOTATION)) else {
        return (prefixes, ignored);
    };
    for item in value.split([',', ' ', '\n', '\t']).filter(|s| !s.is_empty()) {
        match item.parse::<ipnet::IpNet>() {
            Ok(net) => prefixes.push(net.trunc()),
            Err(_) => ignored.push((
                format!("metadata.annotations[{SOURCE_PREFIXES_ANNOTATION}]"),
                format!("{item:?} is not a CIDR prefix (like 10.8.0.0/16 or fd00:8::/64): ignored, the pod may not send from it"),
            )),
        }
    }
    (prefixes, ignored)
}

impl Pod {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub policies: BTreeMap<ObjectRef, Policy>,
    pub services: BTreeMap<ObjectRef, Service>,
    /// Each Service's endpoints from its EndpointSlices (all slices of one Service merged). A
    /// Service missing here has them computed from its selector ([`crate::service::backends`]).
    pub service_backends: BTreeMap<ObjectRef, Vec<Backend>>,
    /// Addresses of this node: traffic from them to a local pod is always allowed.
    pub node_addrs: Vec<IpAddr>,
    /// Which pods are local: `None` = all (the lab), `Some(node)` = those with `spec.nodeName == node`.
    pub node_name: Option<String>,
    /// Honour the pre-v1 `net.beta.kubernetes.io/network-policy` DefaultDeny namespace annotation.
    pub legacy_default_deny: bool,
}

impl State {
    pub fn is_local(&self, pod: &Pod) -> bool {
        match &self.node_name {
            None => true,
            Some(node) => pod.node.as_deref() == Some(node.as_str()),
        }
    }
}

/// A Kubernetes object turned into the model was not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

pub(crate) fn field_err(field: impl Into<String>, message: impl Into<String>) -> ObjectError {
    ObjectError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// A namespaced object's name (`None`: it has none) and namespace (`default_namespace` when it has
/// none, as in a file applied with `kubectl apply -n`).
pub(crate) fn name_and_namespace(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    default_namespace: &str,
) -> Option<(String, String)> {
    let namespace = meta.namespace.clone().unwrap_or_else(|| default_namespace.to_string());
    Some((meta.name.clone()?, namespace))
}

/// A protocol field: TCP when missing.
pub(crate) fn protocol_of(p: Option<&str>, field: &str) -> Result<Protocol, ObjectError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => {
            Protocol::parse(s).ok_or_else(|| field_err(field, format!("unknown protocol {s:?} (TCP, UDP or SCTP)")))
        }
    }
}

/// A port number field (1-65535).
pub(crate) fn port_number(n: i32, field: &str) -> Result<u16, ObjectError> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| field_err(field, format!("{n} is not a port (1-65535)")))
}

pub fn namespace_from_k8s(ns: &K8sNamespace) -> Result<Namespace, ObjectError> {
    let name = ns
        .metadata
        .name
        .clone()
        .ok_or_else(|| field_err("metadata.name", "missing"))?;
    Ok(Namespace::new(
        name,
        ns.metadata.labels.clone().unwrap_or_default(),
        ns.metadata.annotations.clone().unwrap_or_default(),
    ))
}

/// Converts a Pod. `default_namespace` applies when the object has none (files).
pub fn pod_from_k8s(pod: &K8sPod, default_namespace: &str) -> Result<Pod, ObjectError> {
    let (name, namespace) =
        name_and_namespace(&pod.metadata, default_namespace).ok_or_else(|| field_err("metadata.name", "missing"))?;
    let spec = pod.spec.as_ref();
    let mut ports = Vec::new();
    for (c, container) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (p, port) in container.ports.as_deref().unwrap_or_default().iter().enumerate() {
            let field = format!("spec.containers[{c}].ports[{p}]");
            let number = port_number(port.container_port, &format!("{field}.containerPort"))?;
            let protocol = protocol_of(port.protocol.as_deref(), &format!("{field}.protocol"))?;
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: number,
                protocol,
            });
        }
    }
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    let listed: Vec<(String, String)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("status.podIPs[{i}].ip"), ip.ip.clone()))
            .collect(),
        _ => status
            .and_then(|s| s.pod_ip.clone())
            .map(|ip| vec![("status.podIP".to_string(), ip)])
            .unwrap_or_default(),
    };
    for (field, ip) in listed {
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| field_err(field, format!("{ip:?} is not an IP address")))?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    let (source_prefixes, ignored) = source_prefixes(pod.metadata.annotations.as_ref());
    Ok(Pod {
        namespace,
        name,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminated: matches!(phase, Some("Succeeded" | "Failed")),
        ports,
        created: pod.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
        source_prefixes,
        ignored,
    })
}

/// The 16-byte form every map uses (IPv4 mapped into IPv6).
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => npc_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn addr_from_bytes(bytes: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
