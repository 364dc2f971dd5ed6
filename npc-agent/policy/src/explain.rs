//! `npc-agent explain`: why a connection is allowed or blocked.
//!
//! The answer comes from the compiled maps, read with [`compiler::lookup`], the user-space twin
//! of the datapath's lookups: explain cannot disagree with what the kernel enforces from the same
//! maps. The rule ids stored in policy entries name the rule that allowed a connection.
use std::{fmt, net::IpAddr};

use serde::Serialize;

use crate::{
    compiler::{self, Compiled, Verdict},
    model::{ObjectRef, Protocol, State},
    policy::Direction,
};

/// One end of the connection: a pod by name, a Service (as a destination: through its ClusterIP),
/// or a bare address (outside the cluster, a node...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Pod(ObjectRef),
    Service(ObjectRef),
    Addr(IpAddr),
}

impl Endpoint {
    /// `NS/POD`, `svc/NS/NAME` or an IP address.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Self::Addr(ip));
        }
        if let Some(svc) = s.strip_prefix("svc/") {
            return ObjectRef::parse(svc)
                .map(Self::Service)
                .ok_or_else(|| format!("{s:?} is not svc/NAMESPACE/NAME"));
        }
        ObjectRef::parse(s)
            .map(Self::Pod)
            .ok_or_else(|| format!("{s:?} is neither NAMESPACE/POD, svc/NAMESPACE/NAME nor an IP address"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(p) => write!(f, "{p}"),
            Self::Service(s) => write!(f, "svc/{s}"),
            Self::Addr(a) => write!(f, "{a}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub from_addr: IpAddr,
    pub to_addr: IpAddr,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    /// The source pod's egress check, then the destination pod's ingress check.
    pub egress: Side,
    pub ingress: Side,
    /// Through a Service: each backend kube-proxy may pick, on its target port (the egress
    /// check at the VIP above is decided by their egress verdicts; ingress is at the backend).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Explanation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    /// The pod whose policy is checked here (none: a bare address, nothing enforced).
    pub pod: Option<String>,
    pub enforced: bool,
    pub isolated: bool,
    /// Policies that select the pod for this direction (what isolates it).
    pub isolated_by: Vec<String>,
    pub allowed: bool,
    /// `ns/policy ingress[2]`, or why it needed no rule.
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("no pod {0} in the manifests")]
    NoSuchPod(ObjectRef),
    #[error("pod {0} has no IP address yet (status.podIP/podIPs)")]
    NoAddress(ObjectRef),
    #[error("{0} and {1} share no address family (one is IPv4 only, the other IPv6 only)")]
    NoCommonFamily(String, String),
    #[error("no Service {0} in the manifests")]
    NoSuchService(ObjectRef),
    #[error("Service {0} has no ClusterIP (headless, or none given yet)")]
    NoVip(ObjectRef),
    #[error("a Service is only a destination (--to svc/NS/NAME)")]
    ServiceAsSource,
    #[error("Service {0} has no port {1}/{2}")]
    NoSuchServicePort(ObjectRef, u16, Protocol),
}

/// Explains a connection from `from` to `to` on `protocol`/`port` under `state`.
pub fn explain(
    state: &State,
    from: &Endpoint,
    to: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> Result<Explanation, ExplainError> {
    let compiled = compiler::compile(state);
    explain_compiled(state, &compiled, from, to, protocol, port)
}

fn explain_compiled(
    state: &State,
    compiled: &Compiled,
    from: &Endpoint,
    to: &Endpoint,
    protocol: Protocol,
    port: u16,
) -> Result<Explanation, ExplainError> {
    let addrs = |e: &Endpoint| -> Result<Vec<IpAddr>, ExplainError> {
        match e {
            Endpoint::Addr(a) => Ok(vec![*a]),
            Endpoint::Service(s) => {
                let svc = state
                    .services
                    .get(s)
                    .ok_or_else(|| ExplainError::NoSuchService(s.clone()))?;
                if svc.vips.is_empty() {
                    return Err(ExplainError::NoVip(s.clone()));
                }
                Ok(svc.vips.clone())
            }
            Endpoint::Pod(p) => {
                let pod = state.pods.get(p).ok_or_else(|| ExplainError::NoSuchPod(p.clone()))?;
                if pod.ips.is_empty() {
                    return Err(ExplainError::NoAddress(p.clone()));
                }
                Ok(pod.ips.clone())
            }
        }
    };
    let (from_addrs, to_addrs) = (addrs(from)?, addrs(to)?);
    let (from_addr, to_addr) = from_addrs
        .iter()
        .find_map(|f| to_addrs.iter().find(|t| t.is_ipv4() == f.is_ipv4()).map(|t| (*f, *t)))
        .ok_or_else(|| ExplainError::NoCommonFamily(from.to_string(), to.to_string()))?;
    if matches!(from, Endpoint::Service(_)) {
        return Err(ExplainError::ServiceAsSource);
    }
    let mut egress = side(state, compiled, Direction::Egress, from, to_addr, protocol, port);
    let mut ingress = side(state, compiled, Direction::Ingress, to, from_addr, protocol, port);
    let mut backends = Vec::new();
    if let Endpoint::Service(id) = to {
        let svc = &state.services[id];
        let sp = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
            .ok_or_else(|| ExplainError::NoSuchServicePort(id.clone(), port, protocol))?;
        for b in crate::service::picked_backends(state, svc) {
            let Some(target) = b.port_for(sp).filter(|_| b.addr.is_ipv4() == to_addr.is_ipv4()) else {
                continue;
            };
            let at = match compiled.address_owners.get(&b.addr) {
                Some(pod) => Endpoint::Pod(pod.clone()),
                None => Endpoint::Addr(b.addr),
            };
            backends.push(explain_compiled(state, compiled, from, &at, protocol, target)?);
        }
        let allowed = backends.iter().filter(|b| b.egress.allowed).count();
        if egress.isolated {
            egress.reason = match (allowed, backends.len()) {
                (_, 0) => format!("{}; the Service has no endpoints", egress.reason),
                (a, n) if a == n => format!("every backend ({n}) allowed on its target port: {}", egress.reason),
                (0, _) if !egress.allowed => "no backend allowed".into(),
                (a, n) if !egress.allowed => {
                    format!("only {a} of {n} backends allowed: refused, whichever kube-proxy picks (fail-closed)")
                }
                _ => format!("the ClusterIP itself is allowed: {}", egress.reason),
            };
        }
        ingress = Side {
            pod: None,
            enforced: false,
            isolated: false,
            isolated_by: Vec::new(),
            allowed: !backends.is_empty() && backends.iter().all(|b| b.ingress.allowed),
            reason: "at the backend kube-proxy picks, after DNAT (below)".into(),
        };
    }
    Ok(Explanation {
        from: from.to_string(),
        to: to.to_string(),
        from_addr,
        to_addr,
        protocol: protocol.to_string(),
        port,
        allowed: egress.allowed && ingress.allowed,
        egress,
        ingress,
        backends,
    })
}

fn side(
    state: &State,
    compiled: &Compiled,
    direction: Direction,
    local: &Endpoint,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Side {
    let Endpoint::Pod(pod) = local else {
        return Side {
            pod: None,
            enforced: false,
            isolated: false,
            isolated_by: Vec::new(),
            allowed: true,
            reason: "not a pod: nothing enforced here".into(),
        };
    };
    let isolated_by: Vec<String> = state
        .pods
        .get(pod)
        .map(|p| {
            state
                .policies
                .values()
                .filter(|pol| {
                    pol.id.namespace == p.namespace
                        && pol.rules(direction).is_some()
                        && pol.pod_selector.matches(&p.labels)
                })
                .map(|pol| pol.id.to_string())
                .collect()
        })
        .unwrap_or_default();
    let verdict = compiler::lookup(compiled, pod, direction, peer, protocol.number(), port);
    let (enforced, isolated, reason) = match verdict {
        Verdict::NotEnforced => (
            false,
            false,
            "not enforced (hostNetwork, finished, or not on this node)".into(),
        ),
        Verdict::NotIsolated => (true, false, format!("no policy selects it for {direction}")),
        Verdict::FromNode => (true, true, "from its own node: always allowed".into()),
        Verdict::Allowed { rule } => (
            true,
            true,
            match compiled.rule(rule) {
                Some(r) => format!("{} {}[{}]", r.policy, r.direction, r.index),
                None => format!("rule id {rule}"),
            },
        ),
        Verdict::Denied => (true, true, "no rule allows it".into()),
    };
    let isolated_by = if isolated && isolated_by.is_empty() {
        // Only the legacy namespace annotation isolates it.
        vec![format!("namespace {} ({})", pod.namespace, compiler::LEGACY_ANNOTATION)]
    } else {
        isolated_by
    };
    Side {
        pod: Some(pod.to_string()),
        enforced,
        isolated,
        isolated_by,
        allowed: verdict.allowed(),
        reason,
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} ({}) -> {} ({}) {}/{}: {}",
            self.from,
            self.from_addr,
            self.to,
            self.to_addr,
            self.protocol,
            self.port,
            if self.allowed { "ALLOWED" } else { "BLOCKED" }
        )?;
        for (name, side) in [("egress", &self.egress), ("ingress", &self.ingress)] {
            let at = side.pod.as_deref().unwrap_or("-");
            let verdict = if side.allowed { "allowed" } else { "blocked" };
            write!(f, "  {name:<7} at {at}: {verdict}")?;
            if side.isolated {
                write!(f, "; isolated by {}", side.isolated_by.join(", "))?;
            }
            writeln!(f, "; {}", side.reason)?;
        }
        for b in &self.backends {
            write!(f, "  via backend {}", b.to_string().replace("\n  ", "\n      "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::files;

    const CLUSTER: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\nspec: {containers: [{name: c, ports: [{containerPort: 5432, name: pg}]}]}\nstatus: {podIP: 10.0.0.2}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-in, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{ipBlock: {cidr: 192.0.2.0/24}}]\n    - from: [{podSelector: {matchLabels: {app: web}}}]\n      ports: [{port: pg}]\n";

    fn state() -> State {
        files::parse_str(Path::new("c.yaml"), CLUSTER).to_state()
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    #[test]
    fn names_the_rule_that_allows() {
        let e = explain(&state(), &ep("shop/web"), &ep("shop/db"), Protocol::Tcp, 5432).unwrap();
        assert!(e.allowed);
        assert!(!e.egress.isolated);
        assert_eq!(e.ingress.reason, "shop/db-in ingress[1]");
        assert_eq!(e.ingress.isolated_by, ["shop/db-in", "shop/deny"]);
        let text = e.to_string();
        assert!(
            text.starts_with("shop/web (10.0.0.1) -> shop/db (10.0.0.2) TCP/5432: ALLOWED"),
            "{text}"
        );
    }

    #[test]
    fn says_when_nothing_allows() {
        let e = explain(&state(), &ep("shop/db"), &ep("shop/web"), Protocol::Tcp, 80).unwrap();
        assert!(!e.allowed);
        assert_eq!(e.ingress.reason, "no rule allows it");
        assert_eq!(e.ingress.isolated_by, ["shop/deny"]);
        let e = explain(&state(), &ep("192.0.2.7"), &ep("shop/db"), Protocol::Udp, 9).unwrap();
        assert!(e.allowed, "ingress[0] has no ports");
        assert_eq!(e.ingress.reason, "shop/db-in ingress[0]");
        assert!(!e.egress.enforced);
    }

    #[test]
    fn through_a_service_each_backend_is_explained() {
        let svc = "---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: 10.96.0.5, selector: {app: db}, ports: [{port: 5000, targetPort: pg}]}\n";
        let state = files::parse_str(Path::new("c.yaml"), &format!("{CLUSTER}{svc}")).to_state();
        let e = explain(&state, &ep("shop/web"), &ep("svc/shop/db"), Protocol::Tcp, 5000).unwrap();
        assert_eq!(e.to_addr.to_string(), "10.96.0.5");
        assert_eq!(e.backends.len(), 1);
        assert_eq!(e.backends[0].to, "shop/db");
        assert_eq!(e.backends[0].port, 5432, "the target port, resolved by name");
        assert!(e.allowed, "{e}");
        assert!(
            e.to_string()
                .contains("via backend shop/web (10.0.0.1) -> shop/db (10.0.0.2) TCP/5432: ALLOWED"),
            "{e}"
        );
        let e = explain(&state, &ep("10.9.9.9"), &ep("svc/shop/db"), Protocol::Tcp, 5000).unwrap();
        assert!(
            !e.allowed,
            "db-in admits neither 10.9.9.9 nor anyone else at the backend: {e}"
        );
        assert!(!e.ingress.allowed && e.egress.allowed, "{e}");
        assert_eq!(
            explain(&state, &ep("shop/web"), &ep("svc/shop/db"), Protocol::Tcp, 80),
            Err(ExplainError::NoSuchServicePort(
                ObjectRef::new("shop", "db"),
                80,
                Protocol::Tcp
            ))
        );
    }

    #[test]
    fn bad_endpoints_are_named() {
        assert_eq!(
            explain(&state(), &ep("shop/nope"), &ep("shop/db"), Protocol::Tcp, 1),
            Err(ExplainError::NoSuchPod(ObjectRef::new("shop", "nope")))
        );
        assert!(Endpoint::parse("nonsense").is_err());
    }
}
