//! A fake Kubernetes API server, in-process, that speaks the real list/watch protocol over
//! plain HTTP for pods, namespaces, networkpolicies, services and endpointslices (cluster-wide paths), so that the real
//! kube-rs client and watchers can be driven through every situation a node agent meets:
//!
//! - lists carry `metadata.resourceVersion`; watches start from a resourceVersion and replay
//!   what happened since, then stream live events as chunked JSON lines;
//! - `allowWatchBookmarks=true` gets BOOKMARK events;
//! - [`FakeApi::compact`] forgets history, so a watch from an older resourceVersion gets an
//!   ERROR event with a 410 Gone Status (the client must relist);
//! - [`FakeApi::disconnect`] aborts every watch stream mid-way (no terminating chunk);
//! - [`FakeApi::set_down`] answers 503 to everything and aborts streams until brought back.
//!
//! Test code changes objects with [`FakeApi::apply`] and [`FakeApi::delete`].
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Service,
    EndpointSlice,
}

impl Kind {
    const ALL: [Self; 5] = [
        Self::Pod,
        Self::Namespace,
        Self::NetworkPolicy,
        Self::Service,
        Self::EndpointSlice,
    ];

    /// (kind, apiVersion, the cluster-wide collection path kube-rs lists and watches).
    fn table(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Pod => ("Pod", "v1", "/api/v1/pods"),
            Self::Namespace => ("Namespace", "v1", "/api/v1/namespaces"),
            Self::NetworkPolicy => (
                "NetworkPolicy",
                "networking.k8s.io/v1",
                "/apis/networking.k8s.io/v1/networkpolicies",
            ),
            Self::Service => ("Service", "v1", "/api/v1/services"),
            Self::EndpointSlice => (
                "EndpointSlice",
                "discovery.k8s.io/v1",
                "/apis/discovery.k8s.io/v1/endpointslices",
            ),
        }
    }

    fn of(object: &Value) -> Self {
        let kind = object["kind"].as_str();
        Self::ALL
            .into_iter()
            .find(|k| Some(k.name()) == kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve {kind:?}"))
    }

    fn list_kind(self) -> String {
        format!("{}List", self.name())
    }

    fn api_version(self) -> &'static str {
        self.table().1
    }

    fn name(self) -> &'static str {
        self.table().0
    }
}

type Key = (Kind, String, String);
type Stream = UnboundedSender<Result<Bytes, std::io::Error>>;

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, kind, event type, object) since the last compaction.
    history: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    watchers: Vec<(Kind, Stream)>,
    down: bool,
    lists: u64,
    watches: u64,
}

/// The server; stops when dropped.
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

#[derive(serde::Deserialize)]
struct Params {
    watch: Option<String>,
    #[serde(rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(rename = "allowWatchBookmarks")]
    allow_watch_bookmarks: Option<String>,
}

impl FakeApi {
    /// Starts on 127.0.0.1 (of the calling thread's network namespace) on a free port.
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let inner = Arc::new(Mutex::new(Inner {
            rv: 1,
            oldest: 1,
            ..Inner::default()
        }));
        let mut app = Router::new();
        for kind in Kind::ALL {
            app = app.route(
                kind.table().2,
                get(move |state: State<Arc<Mutex<Inner>>>, q: Query<Params>| async move { handle(kind, state, q) }),
            );
        }
        let app = app.with_state(inner.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            inner,
            addr,
            _runtime: runtime,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Creates or replaces an object (JSON with kind, apiVersion and metadata).
    pub fn apply(&self, mut object: Value) {
        let kind = Kind::of(&object);
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        }
        let event = if inner.objects.insert((kind, ns, name), object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.history.push((rv, kind, event, object.clone()));
        broadcast(&mut inner, kind, event, &object);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let Some(mut object) = inner.objects.remove(&(kind, namespace.to_string(), name.to_string())) else {
            return;
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push((rv, kind, "DELETED", object.clone()));
        broadcast(&mut inner, kind, "DELETED", &object);
    }

    /// Aborts every open watch mid-stream.
    pub fn disconnect(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        for (_, w) in inner.watchers.drain(..) {
            let _ = w.send(Err(std::io::Error::other("connection reset by the fake API server")));
        }
    }

    /// Forgets all history: a watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.history.clear();
        inner.oldest = inner.rv + 1;
    }

    /// Down: 503 for every request, open watches aborted. Up again: back to normal.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().expect("not poisoned").down = down;
        if down {
            self.disconnect();
        }
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (u64, u64) {
        let inner = self.inner.lock().expect("not poisoned");
        (inner.lists, inner.watches)
    }
}

fn line(event: &str, object: &Value) -> Bytes {
    let mut text = serde_json::to_string(&json!({ "type": event, "object": object })).expect("JSON");
    text.push('\n');
    Bytes::from(text)
}

fn broadcast(inner: &mut Inner, kind: Kind, event: &str, object: &Value) {
    let l = line(event, object);
    inner
        .watchers
        .retain(|(k, w)| *k != kind || w.send(Ok(l.clone())).is_ok());
}

fn handle(kind: Kind, State(inner): State<Arc<Mutex<Inner>>>, Query(q): Query<Params>) -> Response {
    let mut guard = inner.lock().expect("not poisoned");
    if guard.down {
        return (StatusCode::SERVICE_UNAVAILABLE, "the fake API server is down").into_response();
    }
    let json_response = |body: Value| {
        (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&body).expect("JSON"),
        )
            .into_response()
    };
    if q.watch.as_deref() != Some("true") && q.watch.as_deref() != Some("1") {
        guard.lists += 1;
        let items: Vec<&Value> = guard
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v)
            .collect();
        return json_response(json!({
            "apiVersion": kind.api_version(),
            "kind": kind.list_kind(),
            "metadata": {"resourceVersion": guard.rv.to_string()},
            "items": items,
        }));
    }
    guard.watches += 1;
    let from: u64 = q
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(guard.rv);
    let (tx, mut rx) = unbounded_channel::<Result<Bytes, std::io::Error>>();
    if from + 1 < guard.oldest {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", guard.oldest),
            "reason": "Expired", "code": 410,
        });
        let _ = tx.send(Ok(line("ERROR", &status)));
        drop(tx);
    } else {
        for (rv, k, event, object) in &guard.history {
            if *k == kind && *rv > from {
                let _ = tx.send(Ok(line(event, object)));
            }
        }
        if q.allow_watch_bookmarks.as_deref() == Some("true") {
            let bookmark = json!({
                "kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": guard.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}},
            });
            let _ = tx.send(Ok(line("BOOKMARK", &bookmark)));
        }
        guard.watchers.push((kind, tx));
    }
    drop(guard);
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response()
}
