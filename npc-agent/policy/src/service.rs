//! Services, as far as policy cares: the addresses kube-proxy DNATs for pods (VIPs), the ports, and
//! the backends kube-proxy may pick for a new connection.
//!
//! kube-proxy rewrites a pod's packet to a Service VIP *after* npc's from-pod hook has seen it, so
//! the egress check there sees the VIP, not a pod. The compiler therefore judges a connection to a
//! VIP by the backends behind it (see `compiler::services` and docs/semantics.md); this module
//! only says who those backends are.
//!
//! Backends come from EndpointSlices (the kube source) or, for a Service with a selector and no
//! EndpointSlice known (the files source, the lab), are computed from the pods the way the
//! EndpointSlice controller would.
use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1::Service as K8sService, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{
    Labels, ObjectError, ObjectRef, Pod, Protocol, State, field_err, in_namespace, name_and_namespace, port_number,
    protocol_of,
};

/// Where a Service port sends traffic on a backend pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `""` for the single unnamed port (EndpointSlices name it the same way).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.clusterIPs`, `spec.externalIPs` and `status.loadBalancer.ingress[].ip`: every address
    /// kube-proxy DNATs for pods. Empty for a headless Service.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: no selector (whoever manages the EndpointSlices says where traffic goes).
    pub selector: Option<Labels>,
    /// `internalTrafficPolicy: Local`: pods reach only backends on their own node.
    pub node_local: bool,
    /// `clusterIP: None`: no VIP, ever (a Service with no clusterIP yet gets one from the API
    /// server, or in the lab from `--service-cidr`).
    pub headless: bool,
}

impl Service {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// One endpoint of a Service, as an EndpointSlice lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: IpAddr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// (Service port name, protocol) → the port on this backend.
    pub ports: Vec<(String, Protocol, u16)>,
}

impl Backend {
    /// The port a connection to Service port `port` reaches on this backend, if it serves it.
    pub fn port_for(&self, port: &ServicePort) -> Option<u16> {
        self.ports
            .iter()
            .find(|(name, protocol, _)| *name == port.name && *protocol == port.protocol)
            .map(|(_, _, n)| *n)
    }
}

/// The backends kube-proxy may pick, on this node, for a new connection to `svc` from a pod:
/// the ready endpoints, or the serving-and-terminating ones when none is ready; under
/// `internalTrafficPolicy: Local`, only those on this node (all of them in the lab, which is one
/// node).
pub fn picked_backends(state: &State, svc: &Service) -> Vec<Backend> {
    let all = backends(state, svc);
    let ready: Vec<&Backend> = all.iter().filter(|b| b.ready).collect();
    let usable = if ready.is_empty() {
        all.iter().filter(|b| b.serving && b.terminating).collect()
    } else {
        ready
    };
    usable
        .into_iter()
        .filter(|b| {
            !svc.node_local
                || match &state.node_name {
                    None => true,
                    Some(node) => b.node.as_deref() == Some(node.as_str()),
                }
        })
        .cloned()
        .collect()
}

/// The Service's endpoints: its EndpointSlices' when the source has them, else computed from its
/// selector over the pods (running pods with an address, one endpoint per address, the Service
/// ports that the pod can serve: a named `targetPort` needs a container port of that name).
pub fn backends(state: &State, svc: &Service) -> Vec<Backend> {
    if let Some(listed) = state.service_backends.get(&svc.object_ref()) {
        return listed.clone();
    }
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    let selected = |pod: &&Pod| !pod.terminated && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v));
    let mut out = Vec::new();
    for pod in in_namespace(&state.pods, &svc.namespace)
        .map(|(_, pod)| pod)
        .filter(selected)
    {
        let ports: Vec<(String, Protocol, u16)> = svc
            .ports
            .iter()
            .filter_map(|sp| {
                let n = match &sp.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .ports
                        .iter()
                        .find(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == sp.protocol)
                        .map(|c| c.port),
                }?;
                Some((sp.name.clone(), sp.protocol, n))
            })
            .collect();
        for addr in &pod.ips {
            out.push(Backend {
                addr: *addr,
                node: pod.node.clone(),
                ready: true,
                serving: true,
                terminating: false,
                ports: ports.clone(),
            });
        }
    }
    out
}

fn address(s: &str, field: &str) -> Result<IpAddr, ObjectError> {
    s.parse()
        .map_err(|_| field_err(field, format!("{s:?} is not an IP address")))
}

/// Converts a v1 Service. `default_namespace` applies when the object has none (files).
pub fn service_from_k8s(svc: &K8sService, default_namespace: &str) -> Result<Service, ObjectError> {
    let (name, namespace) =
        name_and_namespace(&svc.metadata, default_namespace).ok_or_else(|| field_err("metadata.name", "missing"))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let mut vips = Vec::new();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let cluster_ips: Vec<(String, String)> = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
            .collect(),
        _ => spec
            .cluster_ip
            .iter()
            .map(|ip| ("spec.clusterIP".to_string(), ip.clone()))
            .collect(),
    };
    let external = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip.clone()));
    let balancer = svc
        .status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .enumerate()
        .filter_map(|(i, ing)| Some((format!("status.loadBalancer.ingress[{i}].ip"), ing.ip.clone()?)));
    for (field, ip) in cluster_ips.into_iter().chain(external).chain(balancer) {
        // "None" marks a headless Service; "" one the API server has not given an address yet.
        if ip == "None" || ip.is_empty() {
            continue;
        }
        let addr = address(&ip, &field)?;
        if !vips.contains(&addr) {
            vips.push(addr);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_number(p.port, &format!("{field}.port"))?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n, &format!("{field}.targetPort"))?),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number(n, &format!("{field}.targetPort"))?),
                Err(_) => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol_of(p.protocol.as_deref(), &format!("{field}.protocol"))?,
            port,
            target,
        });
    }
    Ok(Service {
        namespace,
        name,
        vips,
        ports,
        selector: spec.selector.filter(|s| !s.is_empty()),
        node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        headless,
    })
}

/// The label every EndpointSlice carries with the name of its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Converts a discovery.k8s.io/v1 EndpointSlice: the Service it belongs to and its endpoints.
/// `None` for a slice that names no Service (not ours to judge by).
pub fn slice_from_k8s(
    slice: &EndpointSlice,
    default_namespace: &str,
) -> Result<Option<(ObjectRef, Vec<Backend>)>, ObjectError> {
    let (_, namespace) =
        name_and_namespace(&slice.metadata, default_namespace).ok_or_else(|| field_err("metadata.name", "missing"))?;
    let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(None);
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Ok(Some((ObjectRef::new(namespace, service), Vec::new()))); // FQDN: no address to judge
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let Some(n) = p.port else { continue };
        ports.push((
            p.name.clone().unwrap_or_default(),
            protocol_of(p.protocol.as_deref(), &format!("{field}.protocol"))?,
            port_number(n, &format!("{field}.port"))?,
        ));
    }
    let mut out = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let c = ep.conditions.as_ref();
        // The API's defaults: unset ready/serving mean ready, unset terminating means not.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        for (j, a) in ep.addresses.iter().enumerate() {
            out.push(Backend {
                addr: address(a, &format!("endpoints[{i}].addresses[{j}]"))?,
                node: ep.node_name.clone(),
                ready,
                serving,
                terminating,
                ports: ports.clone(),
            });
        }
    }
    Ok(Some((ObjectRef::new(namespace, service), out)))
}
