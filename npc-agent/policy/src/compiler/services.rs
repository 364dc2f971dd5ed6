//! Services: a pod's new connection to a Service VIP is judged by where kube-proxy will send it.
//!
//! kube-proxy DNATs after the from-pod hook, so that hook sees the VIP. Each Service gets one
//! identity per address family (the peer id its VIPs carry in `identities`); for every local pod
//! identity isolated for egress and every Service port, the compiler asks the pod's egress rules
//! about each backend kube-proxy may pick (on that backend's target port) and emits an allow
//! entry (local identity, Service identity, Service port) when **every** backend is allowed.
//!
//! Backends only partly allowed get no entry: the connection is refused whichever backend
//! kube-proxy would have picked (fail-closed), and the case is reported in
//! [`Compiled::partly_allowed`] (the agent exports it as a metric). A rule that allows the VIP
//! address itself (an ipBlock holding the Service CIDR, or a rule with no `to`) still allows it
//! on the Service port, through the VIP's ipBlock class and the wildcard peer, as for any address.
//!
//! The datapath needs nothing new: the VIP is one more address in `identities`.
use std::{collections::BTreeMap, net::IpAddr};

use npc_common::{EndpointInfo, PolicyKey, PolicyValue, endpoint_flags};

use super::{Compiled, Verdict, lookup::lookup_endpoint};
use crate::{
    model::{ObjectRef, Protocol, State, addr_bytes},
    policy::Direction,
    service::{Service, picked_backends},
};

/// What a Service identity stands for: the Service, and the address family of its VIPs.
pub type ServiceKey = (ObjectRef, bool);

/// A local identity whose egress rules allow some but not all backends of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartlyAllowed {
    pub identity: u32,
    pub service: ObjectRef,
    pub protocol: Protocol,
    pub port: u16,
}

/// Every (Service, family) that has a VIP of that family: the keys Service identities number.
pub(super) fn service_keys(state: &State) -> Vec<ServiceKey> {
    let mut keys = Vec::new();
    for svc in state.services.values() {
        for v4 in [true, false] {
            if svc.vips.iter().any(|a| a.is_ipv4() == v4) {
                keys.push((svc.object_ref(), v4));
            }
        }
    }
    keys
}

/// Emits the Service allow entries and the VIPs' identities. `flags` holds the local identities
/// (and their endpoint flags); run after every policy rule is emitted, since the backends are
/// judged by those entries.
pub(super) fn emit_services(
    state: &State,
    out: &mut Compiled,
    ids: &BTreeMap<ServiceKey, u32>,
    flags: &BTreeMap<u32, u32>,
) {
    let egress_isolated: Vec<EndpointInfo> = flags
        .iter()
        .filter(|(_, f)| *f & endpoint_flags::EGRESS_ISOLATED != 0)
        .map(|(id, f)| EndpointInfo::new(*id, *f, &[]))
        .collect();
    for svc in state.services.values() {
        // Judged only for egress-isolated local identities: none, no backends to look at.
        let backends = if egress_isolated.is_empty() {
            Vec::new()
        } else {
            picked_backends(state, svc)
        };
        for v4 in [true, false] {
            let Some(&service_id) = ids.get(&(svc.object_ref(), v4)) else {
                continue;
            };
            for vip in svc.vips.iter().filter(|a| a.is_ipv4() == v4) {
                // A VIP that is also a pod's or the node's address keeps that owner.
                out.maps.identities.entry(addr_bytes(*vip)).or_insert(service_id);
                out.vip_owners.entry(*vip).or_insert_with(|| svc.object_ref());
            }
            out.services.insert(service_id, svc.object_ref());
            for port in &svc.ports {
                let targets: Vec<(IpAddr, u16)> = backends
                    .iter()
                    .filter(|b| b.addr.is_ipv4() == v4)
                    .filter_map(|b| Some((b.addr, b.port_for(port)?)))
                    .collect();
                for endpoint in &egress_isolated {
                    judge(out, svc, service_id, port, &targets, endpoint);
                }
            }
        }
    }
}

fn judge(
    out: &mut Compiled,
    svc: &Service,
    service_id: u32,
    port: &crate::service::ServicePort,
    targets: &[(IpAddr, u16)],
    endpoint: &EndpointInfo,
) {
    let verdicts: Vec<Verdict> = targets
        .iter()
        .map(|(addr, target)| {
            lookup_endpoint(
                &out.maps,
                endpoint,
                Direction::Egress,
                *addr,
                port.protocol.number(),
                *target,
            )
        })
        .collect();
    let allowed = verdicts.iter().filter(|v| v.allowed()).count();
    if allowed == 0 {
        return;
    }
    if allowed < verdicts.len() {
        out.partly_allowed.push(PartlyAllowed {
            identity: endpoint.identity,
            service: svc.object_ref(),
            protocol: port.protocol,
            port: port.port,
        });
        return;
    }
    // The first backend's rule names the entry (explain lists every backend's own).
    let rule = match verdicts[0] {
        Verdict::Allowed { rule } => rule,
        _ => super::BUILTIN_RULE,
    };
    out.maps
        .policy
        .entry(PolicyKey {
            identity: endpoint.identity,
            peer: service_id,
            port: port.port,
            protocol: port.protocol.number(),
            direction: Direction::Egress.as_u8(),
        })
        .or_insert(PolicyValue { rule });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use npc_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::{compiler::compile, files, model::State};

    const CLUSTER: &str = include_str!("../../tests/fixtures/services-cluster.yaml");

    const DNS_ONLY: &str = include_str!("../../tests/fixtures/services-dns-only.yaml");

    fn compiled_with(extra: &[&str], node: Option<&str>) -> Compiled {
        let mut loaded = files::parse_str(Path::new("cluster.yaml"), CLUSTER);
        for (i, text) in extra.iter().enumerate() {
            loaded.extend(files::parse_str(Path::new(&format!("extra-{i}.yaml")), text));
        }
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        compile(&State {
            node_name: node.map(str::to_string),
            ..loaded.to_state()
        })
    }

    fn client_may(c: &Compiled, to: &str, protocol: u8, port: u16) -> bool {
        crate::compiler::lookup(
            c,
            &ObjectRef::new("shop", "client"),
            Direction::Egress,
            to.parse().unwrap(),
            protocol,
            port,
        )
        .allowed()
    }

    fn egress(to: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: out, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress: [{to}]\n"
        )
    }

    #[test]
    fn dns_only_egress_allows_the_kube_dns_service_and_nothing_else() {
        let c = compiled_with(&[DNS_ONLY], None);
        assert!(client_may(&c, "10.96.0.10", PROTO_UDP, 53), "UDP 53 to the ClusterIP");
        assert!(client_may(&c, "10.96.0.10", PROTO_TCP, 53), "TCP 53 to the ClusterIP");
        assert!(client_may(&c, "10.0.1.53", PROTO_UDP, 53), "UDP 53 to the pod itself");
        assert!(!client_may(&c, "10.96.0.10", PROTO_TCP, 80));
        assert!(!client_may(&c, "10.96.0.80", PROTO_TCP, 80), "another Service");
        assert!(!client_may(&c, "10.0.1.11", PROTO_TCP, 8080), "another pod");
        assert!(c.partly_allowed.is_empty());
    }

    #[test]
    fn the_service_port_is_judged_on_the_backends_target_port() {
        // Allowing the backends' 8080 allows the Service's 80, on every VIP.
        let c = compiled_with(
            &[&egress(
                "{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}",
            )],
            None,
        );
        assert!(client_may(&c, "10.96.0.80", PROTO_TCP, 80));
        assert!(client_may(&c, "192.0.2.80", PROTO_TCP, 80), "the external IP too");
        assert!(!client_may(&c, "10.96.0.80", PROTO_UDP, 80));
        // By the named port, too.
        let c = compiled_with(
            &[&egress(
                "{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: http}]}",
            )],
            None,
        );
        assert!(client_may(&c, "10.96.0.80", PROTO_TCP, 80));
        // Allowing the Service port on the backends allows nothing: they are reached on 8080.
        let c = compiled_with(
            &[&egress(
                "{to: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}",
            )],
            None,
        );
        assert!(!client_may(&c, "10.96.0.80", PROTO_TCP, 80));
    }

    #[test]
    fn backends_only_partly_allowed_are_refused_and_reported() {
        let c = compiled_with(&[&egress("{to: [{podSelector: {matchLabels: {tier: gold}}}]}")], None);
        assert!(!client_may(&c, "10.96.0.80", PROTO_TCP, 80));
        assert!(
            client_may(&c, "10.0.1.11", PROTO_TCP, 8080),
            "the allowed backend, directly"
        );
        let partly: Vec<_> = c
            .partly_allowed
            .iter()
            .map(|p| (p.service.to_string(), p.port))
            .collect();
        assert_eq!(partly, [("shop/web".to_string(), 80)]);
    }

    #[test]
    fn ipblocks_of_the_backends_or_of_the_vip_allow_the_service() {
        let both = "{to: [{ipBlock: {cidr: 10.0.1.11/32}}, {ipBlock: {cidr: 10.0.2.12/32}}]}";
        assert!(client_may(
            &compiled_with(&[&egress(both)], None),
            "10.96.0.80",
            PROTO_TCP,
            80
        ));
        let one = "{to: [{ipBlock: {cidr: 10.0.1.11/32}}]}";
        assert!(!client_may(
            &compiled_with(&[&egress(one)], None),
            "10.96.0.80",
            PROTO_TCP,
            80
        ));
        // The Service CIDR itself, on the Service port (as the packet leaving the pod has it).
        let cidr = "{to: [{ipBlock: {cidr: 10.96.0.0/12}}], ports: [{port: 80}]}";
        let c = compiled_with(&[&egress(cidr)], None);
        assert!(client_may(&c, "10.96.0.80", PROTO_TCP, 80));
        assert!(!client_may(&c, "10.96.0.80", PROTO_TCP, 81));
    }

    #[test]
    fn internal_traffic_policy_local_counts_only_this_nodes_backends() {
        let local = CLUSTER.replace(
            "  ports: [{port: 80, targetPort: http}]",
            "  ports: [{port: 80, targetPort: http}]\n  internalTrafficPolicy: Local",
        );
        let gold = egress("{to: [{podSelector: {matchLabels: {tier: gold}}}]}");
        let mut loaded = files::parse_str(Path::new("c.yaml"), &local);
        loaded.extend(files::parse_str(Path::new("p.yaml"), &gold));
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let on_n1 = compile(&State {
            node_name: Some("n1".into()),
            ..loaded.to_state()
        });
        // web-1 (gold) is the only backend on n1.
        assert!(client_may(&on_n1, "10.96.0.80", PROTO_TCP, 80));
        assert!(on_n1.partly_allowed.is_empty());
    }

    #[test]
    fn endpoint_slices_decide_the_backends_and_terminating_ones_serve_only_when_none_is_ready() {
        let slice = include_str!("../../tests/fixtures/services-external-slice.yaml");
        let to_doc = "{to: [{ipBlock: {cidr: 192.0.2.0/24}}], ports: [{port: 8443}]}";
        let c = compiled_with(&[slice, &egress(to_doc)], None);
        assert!(
            client_may(&c, "10.96.0.99", PROTO_TCP, 443),
            "the ready endpoint is allowed"
        );
        assert!(!client_may(&c, "10.96.0.99", PROTO_TCP, 8443));
        // With the ready one gone, the terminating one serves: not in the block.
        let c = compiled_with(
            &[&slice.replace("  - addresses: [192.0.2.10]\n", ""), &egress(to_doc)],
            None,
        );
        assert!(!client_may(&c, "10.96.0.99", PROTO_TCP, 443));
    }

    #[test]
    fn headless_and_empty_services_change_nothing() {
        let extra = include_str!("../../tests/fixtures/services-headless-and-empty.yaml");
        let c = compiled_with(&[extra, &egress("{to: [{podSelector: {}}]}")], None);
        assert!(
            !client_may(&c, "10.96.0.7", PROTO_TCP, 80),
            "no backend: nothing to allow"
        );
        assert!(c.vip_owners.keys().all(|vip| vip.to_string() != "None"));
        assert_eq!(c.vip_owners.len(), 4, "{:?}", c.vip_owners);
        // A pod not isolated for egress is not touched.
        let open = compiled_with(&[extra], None);
        assert!(client_may(&open, "10.96.0.7", PROTO_TCP, 80));
    }

    #[test]
    fn service_identities_are_their_own_and_stay_across_compiles() {
        let mut compiler = crate::compiler::Compiler::default();
        let loaded = files::parse_str(Path::new("c.yaml"), CLUSTER);
        let state = loaded.to_state();
        let first = compiler.compile(&state);
        let vip = addr_bytes("10.96.0.80".parse().unwrap());
        let id = first.maps.identities[&vip];
        assert!((npc_common::FIRST_SERVICE_IDENTITY..npc_common::CIDR_CLASS_BASE).contains(&id));
        assert_eq!(first.services[&id], ObjectRef::new("shop", "web"));
        let mut fewer = state.clone();
        fewer.services.remove(&ObjectRef::new("kube-system", "kube-dns"));
        assert_eq!(compiler.compile(&fewer).maps.identities[&vip], id);
        // A restarted agent adopts it.
        let mut restarted = crate::compiler::Compiler::default();
        restarted.adopt(&state, &first.maps.identities, &first.maps.cidrs);
        assert_eq!(restarted.compile(&state).maps.identities[&vip], id);
    }
}
