//! kube-proxy's iptables mode, as the lab's node runs it: the same `nat` table layout kube-proxy
//! writes (pkg/proxy/iptables/proxier.go), applied with `iptables-restore` in the node namespace,
//! so that npc's datapath meets Service traffic exactly as on a kube-proxy node: the from-pod hook
//! sees the VIP, netfilter DNATs after it, the backend's to-pod hook sees the backend address.
//!
//! ```text
//! PREROUTING, OUTPUT -> KUBE-SERVICES -> (-d VIP -p P --dport PORT) KUBE-SVC-<hash>
//! KUBE-SVC-<hash>    -> -m statistic --mode random --probability 1/n ... KUBE-SEP-<hash>
//! KUBE-SEP-<hash>    -> (-s itself: hairpin) KUBE-MARK-MASQ; DNAT --to-destination BACKEND:TARGET
//! POSTROUTING        -> KUBE-POSTROUTING: MASQUERADE what KUBE-MARK-MASQ marked (0x4000)
//! ```
//!
//! Chain names are kube-proxy's: the first 16 characters of base32(sha256(name)), where the name
//! is `ns/svc:port` plus the protocol (and the endpoint, for SEP chains). IPv4 only: the lab's node
//! has no IPv6 address to masquerade with.
use std::{fmt::Write as _, net::IpAddr};

use npc_policy::{
    model::State,
    service::{ServicePort, picked_backends},
};
use sha2::{Digest as _, Sha256};

/// kube-proxy's `portProtoHash` / `servicePortEndpointChainName` suffix.
fn chain_hash(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    data_encoding::BASE32.encode(&digest)[..16].to_string()
}

fn proto(port: &ServicePort) -> String {
    port.protocol.as_str().to_lowercase()
}

/// The whole `nat` table as `iptables-restore` input (the node namespace is the lab's own: nothing
/// else writes its nat table, so it is replaced whole on every change).
pub(super) fn nat_table(state: &State) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
    ];
    let mut rules = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_string(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_string(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".to_string(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".to_string(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_string(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".to_string(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
            .to_string(),
    ];
    for svc in state.services.values() {
        let backends = picked_backends(state, svc);
        for port in &svc.ports {
            let name = if port.name.is_empty() {
                format!("{}/{}", svc.namespace, svc.name)
            } else {
                format!("{}/{}:{}", svc.namespace, svc.name, port.name)
            };
            let p = proto(port);
            let endpoints: Vec<(IpAddr, u16)> = backends
                .iter()
                .filter(|b| b.addr.is_ipv4())
                .filter_map(|b| Some((b.addr, b.port_for(port)?)))
                .collect();
            if endpoints.is_empty() {
                continue; // kube-proxy REJECTs in the filter table; the lab probes no such port
            }
            let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{name}{}", port.protocol.as_str())));
            chains.push(svc_chain.clone());
            for vip in svc.vips.iter().filter(|v| v.is_ipv4()) {
                rules.push(format!(
                    "-A KUBE-SERVICES -d {vip}/32 -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {} -j {svc_chain}",
                    port.port
                ));
            }
            let n = endpoints.len();
            for (i, (addr, target)) in endpoints.iter().enumerate() {
                let endpoint = format!("{addr}:{target}");
                let sep_chain = format!(
                    "KUBE-SEP-{}",
                    chain_hash(&format!("{name}{}{endpoint}", port.protocol.as_str()))
                );
                chains.push(sep_chain.clone());
                let mut jump = format!("-A {svc_chain} -m comment --comment \"{name} -> {endpoint}\"");
                if i + 1 < n {
                    // kube-proxy's 1/(remaining) split, printed with its ten decimals.
                    let _ = write!(
                        jump,
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / (n - i) as f64
                    );
                }
                let _ = write!(jump, " -j {sep_chain}");
                rules.push(jump);
                rules.push(format!(
                    "-A {sep_chain} -s {addr}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
                ));
                rules.push(format!(
                    "-A {sep_chain} -p {p} -m comment --comment \"{name}\" -m {p} -j DNAT --to-destination {endpoint}"
                ));
            }
        }
    }
    let mut out = String::from("*nat\n");
    for builtin in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(out, ":{builtin} ACCEPT [0:0]");
    }
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in &rules {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_layout_is_kube_proxys() {
        let loaded = npc_policy::files::parse_str(
            Path::new("t.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: n, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.244.0.5}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: n, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}\nstatus: {podIP: 10.244.0.6}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: n}\nspec: {clusterIP: 10.96.0.80, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: nobody, namespace: n}\nspec: {clusterIP: 10.96.0.81, selector: {app: none}, ports: [{port: 80}]}\n",
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let text = nat_table(&loaded.to_state());
        let svc = format!("KUBE-SVC-{}", chain_hash("n/web:httpTCP"));
        assert!(
            text.contains(&format!("-A KUBE-SERVICES -d 10.96.0.80/32 -p tcp -m comment --comment \"n/web:http cluster IP\" -m tcp --dport 80 -j {svc}")),
            "{text}"
        );
        // Two backends: the first taken with probability 1/2, the second always; each on its own
        // resolved target port, with the hairpin mark.
        assert!(
            text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"),
            "{text}"
        );
        assert!(text.contains("-j DNAT --to-destination 10.244.0.5:8080"), "{text}");
        assert!(text.contains("-j DNAT --to-destination 10.244.0.6:8081"), "{text}");
        assert!(
            text.contains("-A KUBE-SEP-") && text.contains("-s 10.244.0.5/32"),
            "{text}"
        );
        assert!(!text.contains("10.96.0.81"), "no endpoints: no rule");
        assert_eq!(chain_hash("n/web:httpTCP").len(), 16);
    }
}
