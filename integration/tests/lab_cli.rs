//! `npc-agent lab` as users run it: the JSON contract, `lab run` on the examples against the
//! reference evaluator and the examples' READMEs, `lab up` with live edits probed by `lab probe`,
//! and `lab down` leaving nothing behind (also after Ctrl-C and after a killed `lab up`).
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use npc_agent::lab::netns;
use npc_agent::lab::{self, LabOptions, LabRecord};
use npc_integration::{example, npc_agent_bin, require_root, tag, wait_for};
use npc_policy::files as manifests;
use npc_policy::model::{ObjectRef, Protocol, State};
use npc_policy::{reference, scenario};

fn agent(args: &[&str]) -> Output {
    Command::new(npc_agent_bin())
        .args(args)
        .output()
        .expect("run npc-agent")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "npc-agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Debug, PartialEq)]
struct Probe {
    from: String,
    to: String,
    port: u16,
    protocol: Protocol,
    allowed: bool,
}

/// Parses the JSON contract strictly: exactly these keys and values.
fn parse_probes(json: &str) -> Vec<Probe> {
    let v: serde_json::Value = serde_json::from_str(json).expect("lab JSON");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["probes"], "top-level keys");
    obj["probes"]
        .as_array()
        .expect("probes is a list")
        .iter()
        .map(|p| {
            let p = p.as_object().expect("a probe is an object");
            let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
            keys.sort();
            assert_eq!(keys, ["from", "port", "protocol", "result", "to"]);
            let result = p["result"].as_str().expect("result");
            assert!(result == "allowed" || result == "blocked", "result {result:?}");
            Probe {
                from: p["from"].as_str().expect("from").to_string(),
                to: p["to"].as_str().expect("to").to_string(),
                port: u16::try_from(p["port"].as_u64().expect("port")).expect("port range"),
                protocol: Protocol::parse(p["protocol"].as_str().expect("protocol")).expect("TCP or UDP"),
                allowed: result == "allowed",
            }
        })
        .collect()
}

/// The probes whose result differs from the reference evaluator's verdict, with the lab's own
/// addresses (a probe naming a pod the state does not have counts as a difference).
fn reference_mismatches(state: &State, probes: &[Probe]) -> Vec<String> {
    let addr = |id: &str| -> Option<IpAddr> { state.pods.get(&ObjectRef::parse(id)?)?.ips.first().copied() };
    // The reference judges objects: the lab's state written back as them.
    let cluster = scenario::cluster_of_state(state);
    probes
        .iter()
        .filter(|p| {
            let (Some(from), Some(to)) = (addr(&p.from), addr(&p.to)) else {
                return true;
            };
            reference::allowed(&cluster, from, to, p.protocol.as_str(), p.port) != p.allowed
        })
        .map(|p| {
            format!(
                "{} -> {} {}/{}: lab says allowed={}",
                p.from, p.to, p.protocol, p.port, p.allowed
            )
        })
        .collect()
}

/// What the reference evaluator says of each probe, with the lab's own addresses.
fn check_against_reference(state: &State, probes: &[Probe]) {
    assert!(!probes.is_empty(), "no probes at all");
    let mismatches = reference_mismatches(state, probes);
    assert!(mismatches.is_empty(), "differs from the reference: {mismatches:#?}");
    // Every pair on every declared port was probed.
    let expected: usize = state
        .pods
        .values()
        .map(|dst| dst.ports.iter().filter(|c| c.protocol != Protocol::Sctp).count() * (state.pods.len() - 1))
        .sum();
    assert_eq!(probes.len(), expected, "probe count");
}

/// `lab run --output json` on an example.
fn lab_run_json(dir: &Path) -> Vec<Probe> {
    let d = dir.to_str().expect("utf-8 path");
    parse_probes(&stdout(&agent(&["lab", "run", "--manifests", d, "--output", "json"])))
}

/// `lab run`'s table for an example is the last fenced block of its README.
#[track_caller]
fn assert_readme_is_the_output(dir: &Path) {
    let table = stdout(&agent(&[
        "lab",
        "run",
        "--manifests",
        dir.to_str().expect("utf-8 path"),
    ]));
    assert_eq!(
        table.trim(),
        readme_matrix(dir),
        "{}/README.md is out of date",
        dir.display()
    );
}

/// The matrix in an example's README (the last fenced block).
fn readme_matrix(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("README.md")).expect("README");
    let blocks: Vec<&str> = text.split("```").collect();
    blocks[blocks.len() - 2].trim().to_string()
}

#[test]
fn lab_run_on_the_sock_shop_matches_the_reference_and_its_readme() {
    require_root();
    let dir = example("sock-shop");
    let probes = lab_run_json(&dir);
    let loaded = manifests::load_dir(&dir).expect("read the example");
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let state = lab::lab_state(&loaded, &LabOptions::new("expected"));
    check_against_reference(&state, &probes);
    assert_readme_is_the_output(&dir);
}

#[test]
fn lab_run_on_dns_egress_allows_dns_through_the_cluster_ip_and_matches_its_readme() {
    require_root();
    let dir = example("dns-egress");
    let probes = lab_run_json(&dir);
    let allowed = |from: &str, to: &str, port: u16, protocol: Protocol| {
        probes
            .iter()
            .find(|p| p.from == from && p.to == to && p.port == port && p.protocol == protocol)
            .unwrap_or_else(|| panic!("{from} -> {to} {port}/{protocol} not probed: {probes:#?}"))
            .allowed
    };
    let dns = "svc/kube-system/kube-dns";
    assert!(allowed("shop/client", dns, 53, Protocol::Udp));
    assert!(allowed("shop/client", dns, 53, Protocol::Tcp));
    assert!(allowed("shop/client", "kube-system/coredns", 53, Protocol::Udp));
    assert!(!allowed("shop/client", "svc/shop/web", 80, Protocol::Tcp));
    assert!(!allowed("shop/client", "shop/web", 80, Protocol::Tcp));
    assert!(allowed("kube-system/coredns", "svc/shop/web", 80, Protocol::Tcp));
    assert_readme_is_the_output(&dir);
}

#[test]
fn lab_run_honours_the_legacy_annotation_only_when_asked() {
    require_root();
    let dir = example("legacy");
    let d = dir.to_str().expect("utf-8 path");
    let loaded = manifests::load_dir(&dir).expect("read the example");
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    for legacy in [true, false] {
        let mut args = vec!["lab", "run", "--manifests", d, "--output", "json"];
        if legacy {
            args.push("--legacy-default-deny");
        }
        let probes = parse_probes(&stdout(&agent(&args)));
        let opts = LabOptions {
            legacy_default_deny: legacy,
            ..LabOptions::new("expected")
        };
        check_against_reference(&lab::lab_state(&loaded, &opts), &probes);
        let db = probes
            .iter()
            .find(|p| p.from == "sock-shop/front-end" && p.to == "sock-shop/catalogue-db")
            .expect("front-end -> catalogue-db probed");
        assert_eq!(db.allowed, !legacy, "legacy={legacy}");
    }
    let table = stdout(&agent(&["lab", "run", "--manifests", d, "--legacy-default-deny"]));
    assert_eq!(
        table.trim(),
        readme_matrix(&dir),
        "manifests/examples/legacy/README.md is out of date"
    );
}

/// A `lab up` child process over a scratch copy of a manifests directory.
struct Up {
    name: String,
    dir: PathBuf,
    child: Child,
}

impl Up {
    /// Whether `lab up` exits within `deadline`.
    fn exits_within(&mut self, deadline: Duration) -> bool {
        wait_for(deadline, || self.child.try_wait().ok().flatten().is_some())
    }

    /// `lab up` exits within `deadline` (or the test fails, saying `after`) and leaves nothing.
    fn exits_and_leaves_nothing(mut self, deadline: Duration, after: &str) {
        assert!(self.exits_within(deadline), "lab up did not exit after {after}");
        self.assert_gone();
    }

    fn start(name: &str, files: &[(&str, &str)]) -> Self {
        require_root();
        let name = tag(name);
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write manifest");
        }
        let child = Command::new(npc_agent_bin())
            .args([
                "lab",
                "up",
                "--manifests",
                dir.to_str().expect("utf-8"),
                "--name",
                &name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lab up");
        let up = Self { name, dir, child };
        assert!(
            wait_for(Duration::from_secs(120), || up.record().is_some_and(|r| r.alive())),
            "lab up did not come up"
        );
        up
    }

    fn record(&self) -> Option<LabRecord> {
        LabRecord::load(&self.name).ok().flatten()
    }

    fn write(&self, file: &str, text: &str) {
        // Write then rename, as editors do: the watcher never sees half a file.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.dir.join(file)).expect("rename");
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.dir.join(file)).expect("remove");
    }

    fn probe(&self) -> Vec<Probe> {
        parse_probes(&stdout(&agent(&[
            "lab", "probe", "--output", "json", "--name", &self.name,
        ])))
    }

    /// The state the lab should be enforcing now: the directory's manifests with the addresses
    /// the lab gave its pods (from its record) and its node address.
    fn expected_state(&self) -> State {
        let loaded = manifests::load_dir(&self.dir).expect("read the scratch dir");
        let mut state = lab::lab_state(&loaded, &LabOptions::new("expected"));
        if let Some(record) = self.record() {
            for pod in record.pods {
                if let Some(p) = state.pods.get_mut(&ObjectRef::parse(&pod.id).expect("ns/name")) {
                    p.ips = pod.ips;
                }
            }
        }
        state
    }

    /// Probes until the lab agrees with the reference for the directory as it is now (the
    /// watcher applies edits asynchronously), or fails after a deadline.
    fn converges(&self, what: &str, check: impl Fn(&[Probe]) -> bool) {
        let mut last = Vec::new();
        let ok = wait_for(Duration::from_secs(20), || {
            let state = self.expected_state();
            let pods_match = self.record().is_some_and(|r| r.pods.len() == state.pods.len());
            last = self.probe();
            pods_match && check(&last) && reference_mismatches(&state, &last).is_empty()
        });
        assert!(ok, "{what}: the lab never matched the reference; last probes: {last:?}");
        check_against_reference(&self.expected_state(), &last);
    }

    /// Nothing of this lab is left on the machine.
    fn assert_gone(&self) {
        assert!(
            netns::list_with_prefix(&format!("{}-", self.name)).is_empty(),
            "network namespaces left"
        );
        assert!(!LabOptions::pin_root_of(&self.name).exists(), "pins left");
        assert!(!LabRecord::path(&self.name).exists(), "record left");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = lab::down(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nspec: {containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop, labels: {app: client}}\nspec: {containers: [{name: c}]}\n";
const DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n";
const ALLOW_TRUSTED: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {trusted: 'yes'}}}], ports: [{port: 80}]}]\n";
const EXTRA_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop, labels: {app: extra, trusted: 'yes'}}\nspec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}\n";
const BROKEN: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: broken, namespace: shop}\nspec: {podSelector: {}, ingress: [{ports: [{port: 90, endPort: 80}]}]}\n";

fn result(probes: &[Probe], from: &str, to: &str, port: u16, protocol: Protocol) -> Option<bool> {
    probes
        .iter()
        .find(|p| p.from == from && p.to == to && p.port == port && p.protocol == protocol)
        .map(|p| p.allowed)
}

#[test]
fn lab_up_applies_every_kind_of_edit_live_and_down_leaves_nothing() {
    let up = Up::start("up", &[("ns.yaml", NS), ("pods.yaml", PODS)]);
    let (web, client, extra) = ("shop/web", "shop/client", "shop/extra");
    up.converges("no policy", |p| result(p, client, web, 80, Protocol::Tcp) == Some(true));

    up.write("deny.yaml", DENY);
    up.converges("deny-all added", |p| {
        result(p, client, web, 80, Protocol::Tcp) == Some(false)
            && result(p, client, web, 53, Protocol::Udp) == Some(false)
    });

    up.write("allow.yaml", ALLOW_TRUSTED);
    up.write("broken.yaml", BROKEN);
    up.converges("allow for trusted pods, a broken policy beside it", |p| {
        result(p, client, web, 80, Protocol::Tcp) == Some(false)
    });

    // Relabel the client: a label edit in place.
    up.write(
        "pods.yaml",
        &PODS.replace("labels: {app: client}", "labels: {app: client, trusted: 'yes'}"),
    );
    up.converges("client relabelled trusted", |p| {
        result(p, client, web, 80, Protocol::Tcp) == Some(true)
            && result(p, client, web, 53, Protocol::Udp) == Some(false)
    });

    // A new pod, wired up live.
    up.write("extra.yaml", EXTRA_POD);
    up.converges("a pod added", |p| {
        result(p, extra, web, 80, Protocol::Tcp) == Some(true)
            && result(p, web, extra, 8080, Protocol::Tcp) == Some(false)
    });

    // A namespace relabel changes nothing here but must apply cleanly.
    up.write(
        "ns.yaml",
        &NS.replace("{name: shop}", "{name: shop, labels: {env: test}}"),
    );
    up.remove("deny.yaml");
    up.converges("deny-all removed", |p| {
        result(p, web, extra, 8080, Protocol::Tcp) == Some(true)
    });

    up.remove("extra.yaml");
    up.converges("a pod deleted", |p| p.iter().all(|x| x.from != extra && x.to != extra));

    // A second `lab up` of the same name refuses, saying why.
    let again = agent(&[
        "lab",
        "up",
        "--manifests",
        up.dir.to_str().expect("utf-8"),
        "--name",
        &up.name,
    ]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("is already up") && err.contains("lab down"), "{err}");

    let down = stdout(&agent(&["lab", "down", "--name", &up.name]));
    assert!(down.contains("removed process"), "{down}");
    up.exits_and_leaves_nothing(Duration::from_secs(10), "lab down");
}

#[test]
fn ctrl_c_stops_lab_up_and_leaves_nothing() {
    let up = Up::start("int", &[("ns.yaml", NS), ("pods.yaml", PODS)]);
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGINT) };
    up.exits_and_leaves_nothing(Duration::from_secs(15), "SIGINT");
}

#[test]
fn a_killed_lab_up_is_cleaned_up_by_down() {
    let mut up = Up::start("kill", &[("ns.yaml", NS), ("pods.yaml", PODS)]);
    up.child.kill().expect("SIGKILL");
    up.child.wait().expect("reap");
    assert!(
        !netns::list_with_prefix(&format!("{}-", up.name)).is_empty(),
        "a crash leaves namespaces"
    );
    let probe = agent(&["lab", "probe", "--name", &up.name]);
    assert!(!probe.status.success());
    assert!(String::from_utf8_lossy(&probe.stderr).contains("is gone"));
    let down = stdout(&agent(&["lab", "down", "--name", &up.name]));
    assert!(down.contains("removed netns"), "{down}");
    up.assert_gone();
    // And once more: nothing to do.
    assert!(stdout(&agent(&["lab", "down", "--name", &up.name])).contains("nothing to remove"));
}
