//! The incremental compiler against the full compile, its reference: random clusters are turned
//! into random event sequences (every object that differs between one cluster and the next is
//! one event: a pod added, relabelled, readdressed or deleted, a policy edited, a namespace
//! relabelled, a Service or its endpoints changed, the node's addresses), applied in random order
//! and random batches; after every batch the incremental result must *equal* a full compile of the
//! same state by a compiler with the same numbering history: the same identity, class and rule
//! numbers, the same entries, the same owners. Pure: no kernel needed.
use std::collections::BTreeMap;

use npc_policy::{
    compiler::{Compiler, Incremental},
    model::{ObjectRef, State},
    scenario,
    service::Backend,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Event {
    Pod(ObjectRef, Option<npc_policy::model::Pod>),
    Policy(ObjectRef, Option<npc_policy::policy::Policy>),
    Namespace(String, Option<npc_policy::model::Namespace>),
    Service(ObjectRef, Option<npc_policy::service::Service>),
    Backends(ObjectRef, Option<Vec<Backend>>),
    Node(State),
}

/// One event per object that differs from `from` to `to`, per kind.
fn events(from: &State, to: &State) -> Vec<Event> {
    fn diff<K: Ord + Clone, V: PartialEq + Clone>(
        a: &BTreeMap<K, V>,
        b: &BTreeMap<K, V>,
        event: impl Fn(K, Option<V>) -> Event,
    ) -> Vec<Event> {
        let mut out: Vec<Event> = a
            .keys()
            .filter(|k| !b.contains_key(*k))
            .map(|k| event(k.clone(), None))
            .collect();
        out.extend(
            b.iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| event(k.clone(), Some(v.clone()))),
        );
        out
    }
    let mut out = diff(&from.pods, &to.pods, Event::Pod);
    out.extend(diff(&from.policies, &to.policies, Event::Policy));
    out.extend(diff(&from.namespaces, &to.namespaces, Event::Namespace));
    out.extend(diff(&from.services, &to.services, Event::Service));
    out.extend(diff(&from.service_backends, &to.service_backends, Event::Backends));
    if (&from.node_name, &from.node_addrs, from.legacy_default_deny)
        != (&to.node_name, &to.node_addrs, to.legacy_default_deny)
    {
        out.push(Event::Node(to.clone()));
    }
    out
}

/// Applies `e` to the incremental compiler and to the reference's state.
fn apply(inc: &mut Incremental, state: &mut State, e: Event) {
    match e {
        Event::Pod(name, Some(pod)) => {
            state.pods.insert(name, pod.clone());
            inc.set_pod(pod);
        }
        Event::Pod(name, None) => {
            state.pods.remove(&name);
            inc.remove_pod(&name);
        }
        Event::Policy(name, Some(p)) => {
            state.policies.insert(name, p.clone());
            inc.set_policy(p);
        }
        Event::Policy(name, None) => {
            state.policies.remove(&name);
            inc.remove_policy(&name);
        }
        Event::Namespace(name, Some(ns)) => {
            state.namespaces.insert(name, ns.clone());
            inc.set_namespace(ns);
        }
        Event::Namespace(name, None) => {
            state.namespaces.remove(&name);
            inc.remove_namespace(&name);
        }
        Event::Service(name, Some(svc)) => {
            state.services.insert(name, svc.clone());
            inc.set_service(svc);
        }
        Event::Service(name, None) => {
            state.services.remove(&name);
            inc.remove_service(&name);
        }
        Event::Backends(name, backends) => {
            match &backends {
                Some(b) => state.service_backends.insert(name.clone(), b.clone()),
                None => state.service_backends.remove(&name),
            };
            inc.set_backends(name, backends);
        }
        Event::Node(to) => {
            state.node_name = to.node_name.clone();
            state.node_addrs = to.node_addrs.clone();
            state.legacy_default_deny = to.legacy_default_deny;
            inc.set_node(to.node_name, to.node_addrs, to.legacy_default_deny);
        }
    }
}

/// A small deterministic shuffle (the seed comes from proptest, so failures replay).
fn shuffle<T>(items: &mut [T], mut seed: u64) {
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// Brings `copy` up to date with `got` at the `changed` keys alone (None: any key may have
/// changed, so all of it), as a reader of the incremental compiler's change lists does.
fn patch<'a, K: Ord + Clone + 'a, V: Clone>(
    copy: &mut BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
    changed: Option<impl IntoIterator<Item = &'a K>>,
) {
    let Some(keys) = changed else {
        *copy = got.clone();
        return;
    };
    for k in keys {
        match got.get(k) {
            Some(v) => copy.insert(k.clone(), v.clone()),
            None => copy.remove(k),
        };
    }
}

/// Replays `clusters` as events, comparing after every batch. `adopt`: start from the numbering a
/// previous agent left for the last cluster (as the agent does after a restart).
fn replay(clusters: &[State], seed: u64, batch: usize, adopt: bool) -> Result<(), TestCaseError> {
    let mut reference = Compiler::default();
    let mut inc = Incremental::new(Compiler::default());
    let mut state = State::default();
    if adopt {
        let left = npc_policy::compiler::compile(clusters.last().expect("non-empty"));
        let first = &clusters[0];
        for e in events(&state, first) {
            apply(&mut inc, &mut state, e);
        }
        reference.adopt(&state, &left.maps.identities, &left.maps.cidrs);
        inc.adopt(&left.maps.identities, &left.maps.cidrs);
    }
    let mut steps = 0;
    let mut owners = BTreeMap::new();
    let mut identities = BTreeMap::new();
    let mut policy = BTreeMap::new();
    for (n, target) in clusters.iter().enumerate() {
        let mut todo = events(&state, target);
        shuffle(&mut todo, seed.wrapping_add(n as u64) | 1);
        for chunk in todo.chunks(batch) {
            for e in chunk.iter().cloned() {
                apply(&mut inc, &mut state, e);
            }
            let full = reference.compile(&state);
            let got = inc.compile().clone();
            prop_assert_eq!(&got, &full, "after step {} towards cluster {}", steps, n);
            // A copy of the owners kept up to date from `changed_owners` alone stays right.
            patch(&mut owners, &got.address_owners, inc.changed_owners());
            prop_assert_eq!(&owners, &full.address_owners);
            // So does a copy of the identities map patched at `changed_identities` alone (what
            // MapSync writes).
            patch(&mut identities, &got.maps.identities, inc.changed_identities());
            prop_assert_eq!(&identities, &full.maps.identities);
            // And a copy of the allow entries patched at `changed_policy` alone.
            patch(&mut policy, &got.maps.policy, inc.changed_policy());
            prop_assert_eq!(&policy, &full.maps.policy);
            steps += 1;
        }
        prop_assert_eq!(&inc.state().pods, &target.pods);
        prop_assert_eq!(&inc.state().policies, &target.policies);
    }
    // Nothing changed: a compile changes nothing.
    let before = inc.compiled().clone();
    prop_assert_eq!(inc.compile(), &before);
    prop_assert!(!inc.stats().full && inc.stats().pods == 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_the_full_compile(
        clusters in prop::collection::vec(scenario::cluster(), 2..=4),
        seed in any::<u64>(),
        batch in 1usize..=3,
        adopt in any::<bool>(),
    ) {
        let states: Vec<State> = clusters.iter().map(scenario::state).collect();
        replay(&states, seed, batch, adopt)?;
    }
}

/// The state `yaml` describes (which must parse without an error).
fn parse(yaml: &str) -> State {
    let loaded = npc_policy::files::parse_str(std::path::Path::new("t.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    loaded.to_state()
}

/// One relabelled pod in a large cluster recomputes that pod only.
#[test]
fn a_relabel_recomputes_one_pod() {
    let yaml: String = (0..200)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: a, labels: {{app: g{}}}}}\nspec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.1.{}.{}}}\n",
                i % 10,
                i / 200,
                i % 200 + 1
            )
        })
        .collect();
    let loaded = npc_policy::files::parse_str(std::path::Path::new("t.yaml"), &yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut inc = Incremental::default();
    let mut reference = Compiler::default();
    inc.replace(State {
        node_name: Some("n1".into()),
        ..loaded.to_state()
    });
    let full = reference.compile(inc.state());
    assert_eq!(inc.compile(), &full);
    assert!(inc.stats().full);
    assert_eq!(inc.stats().pods, 200);
    let mut pod = inc.state().pods[&ObjectRef::new("a", "p7")].clone();
    pod.labels.insert("app".into(), "new".into());
    inc.set_pod(pod);
    let compiled = inc.compile().clone();
    assert!(!inc.stats().full);
    assert_eq!(inc.stats().pods, 1);
    assert_eq!(compiled, reference.compile(inc.state()));
    assert!(compiled.identities.values().any(|k| k.labels["app"] == "new"));
}

/// Each kind of change re-emits the policies it can change, and only those (the others' entries
/// are kept), and the result is still the full compile's.
#[test]
fn a_change_re_emits_only_the_policies_it_can_change() {
    let pod = |ns: &str, name: &str, labels: &str, node: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    let policy = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: a}}\nspec:\n{spec}"
        )
    };
    let yaml = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b, labels: {team: x}}\n".to_string()
        + &pod("a", "web", "app: web", "n1", "10.0.0.1")
        + &pod("a", "db", "app: db", "n1", "10.0.0.2")
        + &pod("b", "cli", "app: cli", "n2", "10.0.1.1")
        + &policy("p1", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n")
        + &policy(
            "p2",
            "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {app: cli}}}]}]\n",
        )
        + &policy(
            "p3",
            "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
        );
    let mut inc = Incremental::default();
    let mut reference = Compiler::default();
    inc.replace(State {
        node_name: Some("n1".into()),
        ..parse(&yaml)
    });
    let full = reference.compile(inc.state());
    assert_eq!(inc.compile(), &full);
    assert_eq!(inc.stats().rules, 3, "every policy selecting a local pod, at first");
    let mut check = |inc: &mut Incremental, what: &str, emitted: usize| {
        let got = inc.compile().clone();
        assert_eq!(got, reference.compile(inc.state()), "{what}");
        assert_eq!(inc.stats().rules, emitted, "{what}");
    };

    // A new ipBlock inside p1's moves p1's block into a new class too.
    let p4 = parse(&policy(
        "p4",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24}}]}]\n",
    ));
    inc.set_policy(p4.policies.into_values().next().expect("one policy"));
    check(&mut inc, "an overlapping ipBlock", 2);

    // Relabelling a namespace: the policy selecting peers by namespace labels (p2).
    let mut b = inc.state().namespaces["b"].clone();
    b.labels.insert("team".into(), "y".into());
    inc.set_namespace(b);
    check(&mut inc, "a relabelled namespace", 1);

    // A new peer identity on another node: its entries are added (p3 allows it), nothing is
    // emitted again; and when it goes, they are removed.
    let web2 = parse(&pod("a", "web2", "app: web, v: '2'", "n2", "10.0.1.2"));
    inc.set_pod(web2.pods.into_values().next().expect("one pod"));
    let before = inc.compiled().maps.policy.len();
    check(&mut inc, "a new peer identity", 0);
    assert!(inc.compiled().maps.policy.len() > before, "the new peer's entries");
    inc.remove_pod(&ObjectRef::new("a", "web2"));
    check(&mut inc, "a peer identity gone", 0);
    assert_eq!(inc.compiled().maps.policy.len(), before);
    let web2 = parse(&pod("a", "web2", "app: web, v: '2'", "n2", "10.0.1.2"));
    inc.set_pod(web2.pods.into_values().next().expect("one pod"));
    check(&mut inc, "a new peer identity again", 0);

    // A new pod of an existing identity changes no policy's entries.
    let db2 = parse(&pod("a", "db2", "app: db", "n2", "10.0.1.3"));
    inc.set_pod(db2.pods.into_values().next().expect("one pod"));
    check(&mut inc, "a replica", 0);

    // A local pod of a new identity: the policies of its namespace.
    let new_local = parse(&pod("a", "db3", "app: db, v: '3'", "n1", "10.0.0.3"));
    inc.set_pod(new_local.pods.into_values().next().expect("one pod"));
    check(&mut inc, "a new local identity", 4);

    // It goes again: the policies that selected it drop its entries (p1 and p3 select app=db).
    inc.remove_pod(&ObjectRef::new("a", "db3"));
    check(&mut inc, "a local identity gone", 2);
}

/// A Service is judged again only when what its judgement reads changed: the Service or its
/// backends, a backend's identity, or the judged identity's egress entries for the backends' peers
/// (port ranges included); and the result is still the full compile's.
#[test]
fn a_service_is_judged_again_only_when_what_it_reads_changed() {
    let doc = |kind: &str, ns: &str, name: &str, rest: &str| {
        let api = if kind == "NetworkPolicy" {
            "networking.k8s.io/v1"
        } else {
            "v1"
        };
        format!("---\napiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}{rest}\n")
    };
    let pod = |ns: &str, name: &str, labels: &str, node: &str, ip: &str| {
        doc(
            "Pod",
            ns,
            name,
            &format!(
                ", labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}"
            ),
        )
    };
    let service = |name: &str, vip: &str, app: &str, port: u16, target: u16| {
        doc(
            "Service",
            "b",
            name,
            &format!(
                "}}\nspec: {{clusterIP: {vip}, selector: {{app: {app}}}, ports: [{{port: {port}, targetPort: {target}}}]}}"
            ),
        )
    };
    // cli may reach app=web pods anywhere on TCP 8000-`end`.
    let egress = |end: u16| {
        doc(
            "NetworkPolicy",
            "a",
            "cli-out",
            &format!(
                "}}\nspec:\n  podSelector: {{matchLabels: {{app: cli}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{{port: 8000, endPort: {end}}}]}}]"
            ),
        )
    };
    let yaml = ["a", "b", "c"]
        .iter()
        .map(|ns| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"))
        .collect::<String>()
        + &pod("a", "cli", "app: cli", "n1", "10.0.0.1")
        + &pod("b", "web", "app: web", "n2", "10.0.1.1")
        + &pod("b", "db", "app: db", "n2", "10.0.1.2")
        + &pod("c", "x", "app: x", "n2", "10.0.2.1")
        + &service("web", "10.96.0.1", "web", 80, 8080)
        + &service("db", "10.96.0.2", "db", 5432, 5432)
        + &egress(8100);
    let mut inc = Incremental::default();
    let mut reference = Compiler::default();
    inc.replace(State {
        node_name: Some("n1".into()),
        ..parse(&yaml)
    });
    let mut check = |inc: &mut Incremental, what: &str, judged: usize| {
        let got = inc.compile().clone();
        assert_eq!(got, reference.compile(inc.state()), "{what}");
        assert_eq!(inc.stats().services, judged, "{what}");
        got
    };
    let allows_web = |c: &npc_policy::compiler::Compiled| {
        let web = c.services.iter().find(|(_, s)| s.name == "web").map(|(id, _)| *id);
        c.maps.policy.keys().any(|k| Some(k.peer) == web)
    };
    let first = check(&mut inc, "the first compile", 2);
    assert!(allows_web(&first), "8080 is in 8000-8100");

    // A pod no Service picks, in another namespace: nothing is judged.
    let x = parse(&pod("c", "x", "app: x, v: '2'", "n2", "10.0.2.1"));
    inc.set_pod(x.pods.into_values().next().expect("one pod"));
    check(&mut inc, "an unrelated relabel", 0);

    // The range shrinks below the web backend's target port: only the range entries move, and
    // cli is judged again against every Service.
    let narrower = parse(&egress(8050));
    inc.set_policy(narrower.policies.into_values().next().expect("one policy"));
    let got = check(&mut inc, "a narrower port range", 2);
    assert!(!allows_web(&got), "8080 is not in 8000-8050");
    let wider = parse(&egress(8100));
    inc.set_policy(wider.policies.into_values().next().expect("one policy"));
    assert!(allows_web(&check(&mut inc, "the range back", 2)));

    // EndpointSlices (from here on, the pods' labels no longer pick the backends): each Service
    // alone.
    let slice = |addr: &str, port: u16| {
        Some(vec![Backend {
            addr: addr.parse().expect("address"),
            node: Some("n2".into()),
            ready: true,
            serving: true,
            terminating: false,
            ports: vec![(String::new(), npc_policy::model::Protocol::Tcp, port)],
        }])
    };
    inc.set_backends(ObjectRef::new("b", "db"), slice("10.0.1.2", 5432));
    check(&mut inc, "db's EndpointSlices", 1);
    inc.set_backends(ObjectRef::new("b", "web"), slice("10.0.1.1", 8080));
    check(&mut inc, "web's EndpointSlices", 1);
    inc.set_backends(ObjectRef::new("b", "web"), slice("10.0.1.1", 8080));
    check(&mut inc, "the same EndpointSlices again", 0);

    // A pod reporting db's VIP as its address owns it (its identity entry is the pod's) while it
    // lives, and the VIP's entry comes back when it goes. Nothing is judged again.
    let squat = parse(&pod("c", "squat", "app: squat", "n2", "10.96.0.2"));
    inc.set_pod(squat.pods.into_values().next().expect("one pod"));
    let got = check(&mut inc, "a pod at a VIP", 0);
    assert!(got.address_owners.contains_key(&"10.96.0.2".parse().expect("address")));
    inc.remove_pod(&ObjectRef::new("c", "squat"));
    check(&mut inc, "the pod at a VIP gone", 0);

    // The db backend relabelled (a new identity at its address, which cli has no entry for): db
    // alone.
    let db = parse(&pod("b", "db", "app: db, v: '2'", "n2", "10.0.1.2"));
    inc.set_pod(db.pods.into_values().next().expect("one pod"));
    check(&mut inc, "the db backend relabelled", 1);

    // The web backend relabelled: cli's range entries for its old identity go, so cli is judged
    // again against every Service, and may not reach web any more.
    let web = parse(&pod("b", "web", "app: web2", "n2", "10.0.1.1"));
    inc.set_pod(web.pods.into_values().next().expect("one pod"));
    let got = check(&mut inc, "the web backend relabelled", 2);
    assert!(!allows_web(&got), "no backend is app=web");
}
