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
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use npc_common::{EndpointInfo, PolicyKey, PolicyValue, endpoint_flags, peer};

use super::{
    Compiled, DesiredMaps, Verdict,
    lookup::{class_of, lookup_peer},
    parts::{Touched, note},
};
use crate::{
    model::{ObjectRef, Protocol, State, addr_bytes},
    policy::Direction,
    service::{Backend, Service, picked_backends},
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

/// The VIPs' identities, and which Service each VIP and Service identity is. Run before any
/// Service is judged: a backend at another Service's VIP is judged by the VIP's identity, whatever
/// the order of the two.
pub(super) fn emit_vips(state: &State, out: &mut Compiled, ids: &BTreeMap<ServiceKey, u32>) {
    for svc in state.services.values() {
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
        }
    }
}

/// Emits the Service allow entries (after [`emit_vips`]). `flags` holds the local identities
/// (and their endpoint flags); run after every policy rule is emitted, since the backends are
/// judged by those entries.
pub(super) fn emit_services(
    state: &State,
    out: &mut Compiled,
    ids: &BTreeMap<ServiceKey, u32>,
    flags: &BTreeMap<u32, u32>,
) {
    let judges = egress_isolated(flags);
    // Judged only for egress-isolated local identities: none, no backends to look at.
    if judges.is_empty() {
        return;
    }
    for svc in state.services.values() {
        let backends = picked_backends(state, svc);
        for v4 in [true, false] {
            let Some(&service_id) = ids.get(&(svc.object_ref(), v4)) else {
                continue;
            };
            let targets = targets(svc, &backends, v4);
            for (id, flags) in &judges {
                let verdicts = judge(&out.maps, svc, service_id, &targets, *id, *flags);
                for (k, v) in verdicts.entries {
                    out.maps.policy.entry(k).or_insert(v);
                }
                out.partly_allowed.extend(verdicts.partly);
            }
        }
    }
    out.partly_allowed.sort();
}

/// The local identities isolated for egress, with the flags an egress lookup reads: those
/// judged against Services.
fn egress_isolated(flags: &BTreeMap<u32, u32>) -> BTreeMap<u32, u32> {
    flags
        .iter()
        .filter(|(_, f)| *f & endpoint_flags::EGRESS_ISOLATED != 0)
        .map(|(id, f)| {
            (
                *id,
                *f & (endpoint_flags::EGRESS_ISOLATED | endpoint_flags::EGRESS_RANGES),
            )
        })
        .collect()
}

/// Per Service port (in order), the backends of one family kube-proxy may pick, each with its
/// target port for that Service port.
type Targets = Vec<Vec<(IpAddr, u16)>>;

fn targets(svc: &Service, backends: &[Backend], v4: bool) -> Targets {
    svc.ports
        .iter()
        .map(|port| {
            backends
                .iter()
                .filter(|b| b.addr.is_ipv4() == v4)
                .filter_map(|b| Some((b.addr, b.port_for(port)?)))
                .collect()
        })
        .collect()
}

/// What a verdict depends on of a backend: its identity entry, its class, its target port.
type BackendPeer = (Option<u32>, Option<u32>, u16);

/// What one local identity is allowed of one Service (and family).
#[derive(Clone, Debug, Default)]
struct Verdicts {
    /// In key order.
    entries: Vec<(PolicyKey, PolicyValue)>,
    partly: Vec<PartlyAllowed>,
}

/// Judges every port of `svc` for local identity `id`: an entry per port whose backends are all
/// allowed, a [`PartlyAllowed`] per port only some of whose backends are.
fn judge(maps: &DesiredMaps, svc: &Service, service_id: u32, targets: &Targets, id: u32, flags: u32) -> Verdicts {
    let endpoint = EndpointInfo::new(id, flags, &[]);
    let mut entries = BTreeMap::new();
    let mut partly = Vec::new();
    // A Service's backends are mostly replicas (one identity, one class, one target port): the
    // verdict is asked once per distinct (identity, class, target port).
    let mut seen: Vec<(BackendPeer, Verdict)> = Vec::new();
    for (port, targets) in svc.ports.iter().zip(targets) {
        seen.clear();
        let verdicts: Vec<Verdict> = targets
            .iter()
            .map(|(addr, target)| {
                let addr = addr_bytes(*addr);
                let peer = (maps.identities.get(&addr).copied(), class_of(maps, &addr), *target);
                if let Some((_, v)) = seen.iter().find(|(p, _)| *p == peer) {
                    return *v;
                }
                let protocol = port.protocol.number();
                let v = lookup_peer(maps, &endpoint, Direction::Egress, peer.0, || peer.1, protocol, *target);
                seen.push((peer, v));
                v
            })
            .collect();
        let allowed = verdicts.iter().filter(|v| v.allowed()).count();
        if allowed == 0 {
            continue;
        }
        if allowed < verdicts.len() {
            partly.push(PartlyAllowed {
                identity: id,
                service: svc.object_ref(),
                protocol: port.protocol,
                port: port.port,
            });
            continue;
        }
        // The first backend's rule names the entry (explain lists every backend's own).
        let rule = match verdicts[0] {
            Verdict::Allowed { rule } => rule,
            _ => super::BUILTIN_RULE,
        };
        // Two ports of one number and protocol: the first one's entry.
        entries
            .entry(PolicyKey {
                identity: id,
                peer: service_id,
                port: port.port,
                protocol: port.protocol.number(),
                direction: Direction::Egress.as_u8(),
            })
            .or_insert(PolicyValue { rule });
    }
    Verdicts {
        entries: entries.into_iter().collect(),
        partly,
    }
}

/// The Service entries kept per Service (and family) and local identity, for
/// [`super::Incremental`]: with 10k Services and an egress-isolated pod on the node, judging
/// every Service port on every compile costs ~180 ms, and almost every compile changes none.
///
/// A Service's judgement for one local identity reads: the Service and its picked backends, the
/// backends' identity entries and classes, the identity's flags, and the identity's egress entries
/// whose peer is a backend's identity, a backend's class or the wildcard (and its port ranges).
/// So a Service is judged again, for every identity, when it or its backends changed, when one of
/// its backend addresses' identity entry changed, or when its id did; a local identity is judged
/// again against every Service when its flags, its wildcard entries or its port ranges changed;
/// and a (Service, identity) pair when an entry of that identity whose peer the Service's backends
/// have changed. Everything is judged again when the classes or the numbering changed.
#[derive(Clone, Debug, Default)]
pub(super) struct Judgements {
    judged: BTreeMap<ServiceKey, Judged>,
    /// The judged Services by id (the indexes below hold ids: 4 bytes, where a key is two
    /// strings, and the backends' addresses are ~10 per Service).
    keys: BTreeMap<u32, ServiceKey>,
    /// The Services whose judgement reads each peer (a backend's identity or class).
    by_peer: BTreeMap<u32, BTreeSet<u32>>,
    /// The Services that have a backend at each address.
    by_addr: BTreeMap<[u8; 16], Vec<u32>>,
    /// The identities judged, with the flags they were judged with.
    judges: BTreeMap<u32, u32>,
    /// Every judgement's [`PartlyAllowed`], counted (one can come from both VIP families).
    partly: BTreeMap<PartlyAllowed, usize>,
}

#[derive(Clone, Debug)]
struct Judged {
    id: u32,
    /// None until an identity is judged (the backends are looked at only then).
    targets: Option<Targets>,
    /// The backends' identities and classes (indexed in `by_peer`; their addresses, in
    /// `targets`, in `by_addr`).
    peers: BTreeSet<u32>,
    verdicts: BTreeMap<u32, Verdicts>,
}

impl Judged {
    fn new(id: u32) -> Self {
        Self {
            id,
            targets: None,
            peers: BTreeSet::new(),
            verdicts: BTreeMap::new(),
        }
    }
}

/// What changed since the last [`Judgements::update`], besides the flags and the allow entries.
#[derive(Debug)]
pub(super) struct ServiceChanges<'a> {
    /// Judge everything again: the numbering or the ipBlock classes changed.
    pub(super) all: bool,
    /// Services set or removed, or whose EndpointSlices changed.
    pub(super) services: &'a BTreeSet<ObjectRef>,
    /// Namespaces with a pod that changed (a Service without EndpointSlices picks its backends
    /// from its namespace's pods).
    pub(super) pod_namespaces: &'a BTreeSet<String>,
    /// The identity entries that may have changed (None: any).
    pub(super) identities: Option<&'a BTreeSet<[u8; 16]>>,
    /// The local identities whose port-range entries changed.
    pub(super) ranges: &'a BTreeSet<u32>,
}

/// Which identities to judge a Service for again.
#[derive(Debug)]
enum Redo {
    All,
    Some(BTreeSet<u32>),
}

impl Judgements {
    /// Brings the Service entries in `out` (and `out.partly_allowed`) up to date, after the
    /// rules' entries and [`emit_vips`]. `touched` holds the policy keys this compile changed so
    /// far (None: any), and gets the Service entries' changes. Returns how many (Service and
    /// family, identity) judgements were made again.
    pub(super) fn update(
        &mut self,
        state: &State,
        out: &mut Compiled,
        ids: &BTreeMap<ServiceKey, u32>,
        flags: &BTreeMap<u32, u32>,
        changes: &ServiceChanges,
        touched: &mut Touched,
    ) -> usize {
        let judges = egress_isolated(flags);
        let all = changes.all || touched.is_none() || changes.identities.is_none();

        // Identities to judge against every Service: new ones, and those whose wildcard or
        // range entries changed (an identity's egress flags, isolated and has-ranges, change
        // only with its range entries).
        let mut whole: BTreeSet<u32> = judges
            .keys()
            .filter(|id| !self.judges.contains_key(*id) || changes.ranges.contains(*id))
            .copied()
            .collect();
        let mut redo: BTreeMap<ServiceKey, Redo> = BTreeMap::new();
        let mut pairs: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for key in touched.iter().flatten() {
            if key.direction != Direction::Egress.as_u8() || !judges.contains_key(&key.identity) {
                continue;
            }
            if key.peer == peer::ANY {
                whole.insert(key.identity);
            } else if self.by_peer.contains_key(&key.peer) {
                pairs.entry(key.peer).or_default().insert(key.identity);
            }
        }
        for (peer, identities) in pairs {
            for svc in &self.by_peer[&peer] {
                if let Redo::Some(set) = redo
                    .entry(self.keys[svc].clone())
                    .or_insert_with(|| Redo::Some(BTreeSet::new()))
                {
                    set.extend(&identities);
                }
            }
        }

        // Services to judge again for every identity: new, gone or renumbered ones (the two
        // maps walked side by side: both are in key order), changed ones and their backends.
        let mut stale: BTreeSet<ServiceKey> = BTreeSet::new();
        {
            let mut old = self.judged.iter().peekable();
            let mut new = ids.iter().peekable();
            loop {
                match (old.peek(), new.peek()) {
                    (None, None) => break,
                    (Some((k, j)), Some((n, id))) if k == n => {
                        // A Service's id changes without a change to the Service only when the
                        // id space runs out and everything is renumbered.
                        if all || j.id != **id {
                            stale.insert((*k).clone());
                        }
                        old.next();
                        new.next();
                    }
                    (Some((k, _)), Some((n, _))) if k < n => {
                        stale.insert((*k).clone());
                        old.next();
                    }
                    (Some((k, _)), None) => {
                        stale.insert((*k).clone());
                        old.next();
                    }
                    (_, Some((n, _))) => {
                        stale.insert((*n).clone());
                        new.next();
                    }
                }
            }
        }
        for svc in changes.services {
            for v4 in [true, false] {
                let key = (svc.clone(), v4);
                if self.judged.contains_key(&key) || ids.contains_key(&key) {
                    stale.insert(key);
                }
            }
        }
        for ns in changes.pod_namespaces {
            let first = (ObjectRef::new(ns, ""), false);
            stale.extend(
                self.judged
                    .range(first..)
                    .take_while(|((svc, _), _)| svc.namespace == *ns)
                    .filter(|((svc, _), _)| !state.service_backends.contains_key(svc))
                    .map(|(k, _)| k.clone()),
            );
        }
        for addr in changes.identities.into_iter().flatten() {
            if let Some(services) = self.by_addr.get(addr) {
                stale.extend(services.iter().map(|id| self.keys[id].clone()));
            }
        }

        // Identities no longer judged lose their entries.
        let gone: Vec<u32> = self
            .judges
            .keys()
            .filter(|id| !judges.contains_key(*id))
            .copied()
            .collect();
        if !gone.is_empty() {
            for judged in self.judged.values_mut() {
                for id in &gone {
                    if let Some(v) = judged.verdicts.remove(id) {
                        forget(out, &mut self.partly, &v, touched);
                    }
                }
            }
        }
        // Every stale judgement goes before any comes back: when the id space ran out, a new id
        // may be one a stale Service had.
        for key in &stale {
            if let Some(old) = self.judged.remove(key) {
                for v in old.verdicts.values() {
                    forget(out, &mut self.partly, v, touched);
                }
                self.unindex(&old);
            }
        }
        for key in &stale {
            match ids.get(key) {
                Some(&id) => {
                    self.judged.insert(key.clone(), Judged::new(id));
                    self.keys.insert(id, key.clone());
                    redo.insert(key.clone(), Redo::All);
                }
                None => _ = redo.remove(key),
            }
        }
        self.judges = judges;
        let mut count = 0;
        if !self.judges.is_empty() {
            let Self {
                judged,
                by_peer,
                by_addr,
                keys: _,
                judges,
                partly,
            } = self;
            let mut judge_again = |key: &ServiceKey, judged: &mut Judged, which: &Redo| {
                let svc = &state.services[&key.0];
                if judged.targets.is_none() {
                    look_at_backends(state, &out.maps, svc, key, judged, by_peer, by_addr);
                }
                let targets = judged.targets.as_ref().expect("looked at above");
                for (id, flags) in judges.iter() {
                    let listed = match which {
                        Redo::All => true,
                        Redo::Some(set) => set.contains(id),
                    };
                    if !listed && !whole.contains(id) {
                        continue;
                    }
                    if let Some(old) = judged.verdicts.remove(id) {
                        forget(out, partly, &old, touched);
                    }
                    let verdicts = judge(&out.maps, svc, judged.id, targets, *id, *flags);
                    for (k, v) in &verdicts.entries {
                        out.maps.policy.insert(*k, *v);
                    }
                    note(touched, verdicts.entries.iter().map(|(k, _)| *k));
                    for p in &verdicts.partly {
                        *partly.entry(p.clone()).or_default() += 1;
                    }
                    judged.verdicts.insert(*id, verdicts);
                    count += 1;
                }
            };
            if whole.is_empty() {
                for (key, which) in &redo {
                    let judged = judged.get_mut(key).expect("redone Services are judged");
                    judge_again(key, judged, which);
                }
            } else {
                let none = Redo::Some(BTreeSet::new());
                for (key, judged) in judged.iter_mut() {
                    judge_again(key, judged, redo.get(key).unwrap_or(&none));
                }
            }
        }
        out.partly_allowed = self
            .partly
            .iter()
            .flat_map(|(p, n)| std::iter::repeat_n(p, *n))
            .cloned()
            .collect();
        count
    }

    fn unindex(&mut self, judged: &Judged) {
        self.keys.remove(&judged.id);
        for peer in &judged.peers {
            if let Some(set) = self.by_peer.get_mut(peer) {
                set.remove(&judged.id);
                if set.is_empty() {
                    self.by_peer.remove(peer);
                }
            }
        }
        for (addr, _) in judged.targets.iter().flatten().flatten() {
            let addr = addr_bytes(*addr);
            if let Some(list) = self.by_addr.get_mut(&addr) {
                list.retain(|id| *id != judged.id);
                if list.is_empty() {
                    self.by_addr.remove(&addr);
                }
            }
        }
    }
}

/// Picks `key`'s backends, and indexes what judging them reads.
fn look_at_backends(
    state: &State,
    maps: &DesiredMaps,
    svc: &Service,
    key: &ServiceKey,
    judged: &mut Judged,
    by_peer: &mut BTreeMap<u32, BTreeSet<u32>>,
    by_addr: &mut BTreeMap<[u8; 16], Vec<u32>>,
) {
    let targets = targets(svc, &picked_backends(state, svc), key.1);
    for (addr, _) in targets.iter().flatten() {
        let addr = addr_bytes(*addr);
        let list = by_addr.entry(addr).or_default();
        // One entry per Service, however many of its ports the address serves.
        if !list.contains(&judged.id) {
            list.push(judged.id);
        }
        judged.peers.extend(maps.identities.get(&addr).copied());
        judged.peers.extend(class_of(maps, &addr));
    }
    judged.targets = Some(targets);
    for peer in &judged.peers {
        by_peer.entry(*peer).or_default().insert(judged.id);
    }
}

/// Removes one judgement's entries from `out`, and its partly-allowed ports from the count.
fn forget(out: &mut Compiled, partly: &mut BTreeMap<PartlyAllowed, usize>, verdicts: &Verdicts, touched: &mut Touched) {
    for (k, _) in &verdicts.entries {
        out.maps.policy.remove(k);
    }
    note(touched, verdicts.entries.iter().map(|(k, _)| *k));
    for p in &verdicts.partly {
        if let Some(n) = partly.get_mut(p) {
            *n -= 1;
            if *n == 0 {
                partly.remove(p);
            }
        }
    }
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
