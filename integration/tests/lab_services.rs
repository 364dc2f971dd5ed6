//! Services in the lab, end to end: kube-proxy's own iptables NAT layout in the node namespace
//! (DNAT after npc's from-pod hook, br_netfilter undoing it on the bridged reply), real sockets
//! through the ClusterIP, and every block proven by a drop counter (`LabRecord::probe_service`).
//! One lab, changed live from step to step, as a user edits manifests under `lab up`.
use npc_agent::lab::{
    Lab, LabOptions,
    dns::{Lookup, Transport},
};
use npc_integration::{require_root, tag};
use npc_policy::{
    files::{self, Loaded},
    model::{ObjectRef, Protocol},
};

const CLUSTER: &str = include_str!("fixtures/lab-services.yaml");

fn loaded(extra: &[&str]) -> Loaded {
    let mut all = files::parse_str("cluster.yaml".as_ref(), CLUSTER);
    for (i, text) in extra.iter().enumerate() {
        all.extend(files::parse_str(format!("extra-{i}.yaml").as_ref(), text));
    }
    assert!(all.errors.is_empty(), "{:?}", all.errors);
    all
}

/// shop/client's egress: DNS to kube-dns, plus `rule` (a YAML egress rule), if any.
fn client_egress(rule: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: client-out, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}, podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}}}]\n      ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]\n{rule}"
    )
}

fn web_pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: web}}}}\nspec: {{containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

struct Probes<'a>(&'a Lab);

impl Probes<'_> {
    /// shop/client -> svc/shop/web TCP 80, the question most steps ask.
    #[track_caller]
    fn client_to_web(&self, what: &str, want: bool) {
        self.service(what, "shop/client", "svc/shop/web", 80, Protocol::Tcp, want);
    }

    #[track_caller]
    fn service(&self, what: &str, from: &str, svc: &str, port: u16, protocol: Protocol, want: bool) {
        let got = self
            .0
            .record()
            .probe_service(from, svc, port, protocol)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, want, "{what}: {from} -> {svc} {port}/{protocol}");
    }

    #[track_caller]
    fn pod(&self, what: &str, from: &str, to: &str, port: u16, want: bool) {
        let got = self
            .0
            .probe(
                &ObjectRef::parse(from).unwrap(),
                &ObjectRef::parse(to).unwrap(),
                port,
                Protocol::Tcp,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, want, "{what}: {from} -> {to} {port}");
    }
}

#[test]
fn services_are_judged_by_their_backends_through_real_dnat() {
    require_root();
    let mut lab = Lab::up(LabOptions::new(&tag("svc")), &loaded(&[])).expect("lab up");
    let web = "svc/shop/web";
    let dns = "svc/kube-system/kube-dns";
    {
        let p = Probes(&lab);
        // No policy: the ClusterIPs work (DNAT there, un-DNAT on the bridged reply).
        p.client_to_web("open", true);
        p.service("open", "shop/client", dns, 53, Protocol::Udp, true);
        p.service("open", "shop/client", dns, 53, Protocol::Tcp, true);
        // Hairpin: a backend reaching its own Service (kube-proxy masquerades it; the bridge
        // port is in hairpin mode, as kubelet sets it).
        p.service("hairpin", "shop/web-1", web, 80, Protocol::Tcp, true);
        p.service("hairpin", "kube-system/coredns", dns, 53, Protocol::Udp, true);
    }
    let record = lab.record();
    let web_vip = record.services.iter().find(|s| s.id == web).expect("web is served").vip;
    assert!(
        "10.96.0.0/16".parse::<ipnet::IpNet>().unwrap().contains(&web_vip),
        "web got a ClusterIP from --service-cidr: {web_vip}"
    );

    // DNS-only egress: DNS through the kube-dns ClusterIP, nothing else, by VIP or pod IP.
    lab.apply(&loaded(&[&client_egress("")])).expect("apply");
    let p = Probes(&lab);
    p.service("dns-only", "shop/client", dns, 53, Protocol::Udp, true);
    p.service("dns-only", "shop/client", dns, 53, Protocol::Tcp, true);
    p.client_to_web("dns-only", false);
    p.pod("dns-only", "shop/client", "shop/web-1", 8080, false);
    p.service("others unaffected", "shop/other", web, 80, Protocol::Tcp, true);
    // Real DNS queries through the ClusterIP: the lab's CoreDNS pod answers with the VIP.
    let record = lab.record();
    let lookup = |name: &str, transport| record.resolve("shop/client", name, transport).expect("resolve");
    for transport in [Transport::Udp, Transport::Tcp] {
        let got = lookup("web.shop.svc.cluster.local", transport);
        assert_eq!(
            got,
            Lookup::Address(web_vip),
            "dns-only: names resolve over {transport:?}"
        );
    }
    assert_eq!(
        lookup("nope.shop.svc.cluster.local", Transport::Udp),
        Lookup::NoSuchName
    );

    // The backends allowed by label on the target port: numeric, then by its name.
    for port in ["8080", "http"] {
        let rule =
            format!("    - to: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n      ports: [{{port: {port}}}]\n");
        lab.apply(&loaded(&[&client_egress(&rule)])).expect("apply");
        Probes(&lab).client_to_web(&format!("backends allowed on {port}"), true);
    }
    // The Service port on the backends is not their target port: blocked.
    let wrong_port = "    - to: [{podSelector: {matchLabels: {app: web}}}]\n      ports: [{port: 80}]\n";
    lab.apply(&loaded(&[&client_egress(wrong_port)])).expect("apply");
    Probes(&lab).client_to_web("service port on the backends", false);

    // The backend's IP/32 as an ipBlock, through the ClusterIP; then scaled to three backends, of
    // which the block holds one: partly allowed, refused (fail-closed).
    let block = "    - to: [{ipBlock: {cidr: 10.244.0.101/32}}]\n";
    lab.apply(&loaded(&[&client_egress(block)])).expect("apply");
    Probes(&lab).client_to_web("ipBlock of the backend", true);
    let (web2, web3) = (web_pod("web-2", "10.244.0.102"), web_pod("web-3", "10.244.0.103"));
    lab.apply(&loaded(&[&client_egress(block), &web2, &web3]))
        .expect("apply");
    Probes(&lab).client_to_web("partly allowed", false);
    // By label, all three are allowed.
    let by_label = "    - to: [{podSelector: {matchLabels: {app: web}}}]\n";
    lab.apply(&loaded(&[&client_egress(by_label), &web2, &web3]))
        .expect("apply");
    let p = Probes(&lab);
    for _ in 0..3 {
        // kube-proxy picks a backend at random: each must answer.
        p.client_to_web("three backends by label", true);
    }

    // A backend leaving the selector: web-1 (the one the ipBlock holds) relabelled away leaves
    // web-2 and web-3, outside the block.
    let moved = CLUSTER.replace(
        "metadata: {name: web-1, namespace: shop, labels: {app: web}}",
        "metadata: {name: web-1, namespace: shop, labels: {app: old}}",
    );
    let mut relabelled = files::parse_str("cluster.yaml".as_ref(), &moved);
    for text in [client_egress(block), web2.clone(), web3.clone()] {
        relabelled.extend(files::parse_str("extra.yaml".as_ref(), &text));
    }
    lab.apply(&relabelled).expect("apply");
    Probes(&lab).client_to_web("backend left the selector", false);

    // Ingress at the backend, after DNAT, with the client's real address: the backends admit only
    // shop/other. Replies from the VIP reach an ingress-isolated client.
    let web_in = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-in, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: other}}}]}]\n";
    let isolated = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-in, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: other}}\n  policyTypes: [Ingress]\n";
    lab.apply(&loaded(&[web_in, isolated])).expect("apply");
    let p = Probes(&lab);
    p.client_to_web("ingress at the backend", false);
    p.service(
        "ingress-isolated client, replies from the VIP",
        "shop/other",
        web,
        80,
        Protocol::Tcp,
        true,
    );

    // Egress deny-all.
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-out, namespace: shop}\nspec: {podSelector: {}, policyTypes: [Egress]}\n";
    lab.apply(&loaded(&[deny])).expect("apply");
    let p = Probes(&lab);
    p.client_to_web("egress deny-all", false);
    p.service("egress deny-all", "shop/client", dns, 53, Protocol::Udp, false);
    assert_eq!(
        lab.record()
            .resolve("shop/client", "web.shop.svc.cluster.local", Transport::Udp)
            .expect("a refused query, proven by a drop"),
        Lookup::NoReply,
        "egress deny-all: no DNS"
    );

    // lab run's matrix has the pods × Services table.
    let probes = lab.probe_all().expect("probe all");
    assert!(
        probes.iter().any(|p| p.to == web && p.result == "blocked"),
        "{probes:?}"
    );
    let text = npc_agent::lab::matrix(&probes);
    assert!(
        text.contains("through Services:") && text.contains("= svc/shop/web"),
        "{text}"
    );
}
