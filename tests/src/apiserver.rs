//! A test Kubernetes API server: plain HTTP on a loopback address, speaking enough of the
//! real protocol for a kube-rs (or client-go) reflector.
//!
//! - Resources: core/v1 `services` and `nodes`, `discovery.k8s.io/v1` `endpointslices`,
//!   cluster-wide (`/api/v1/services`) or per namespace (`/api/v1/namespaces/NS/services`).
//! - List: items sorted by namespace/name, `metadata.resourceVersion` of the snapshot,
//!   pagination with `limit` and `continue` (pages come from one snapshot, as etcd serves
//!   them); a `continue` token or `resourceVersion` older than the last [`ApiServer::compact`]
//!   answers HTTP 410 with a `Status` (reason `Expired`).
//! - Watch (`watch=true`): JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
//!   "object": ...}` over a chunked response, from the given `resourceVersion` (or the
//!   current objects as ADDED when none is given); BOOKMARKs when `allowWatchBookmarks=true`;
//!   an ERROR event with a 410 `Status` when the version was compacted away; ends after
//!   `timeoutSeconds`.
//! - Selectors: `labelSelector` with `key`, `!key`, `key=value`, `key==value`, `key!=value`
//!   (comma = and); `fieldSelector` on `metadata.name` and `metadata.namespace`. An object
//!   changed into or out of a watch's selector is sent as ADDED or DELETED, as the real
//!   server does.
//!
//! The test drives it in process: [`ApiServer::apply_yaml`], [`ApiServer::delete`], and
//! the faults [`ApiServer::interrupt_watches`], [`ApiServer::compact`],
//! [`ApiServer::set_available`]. Clients reach it through the kubeconfig file it writes
//! ([`ApiServer::kubeconfig`]). It listens on 127.0.0.1 of the caller's namespace, or of a
//! test namespace ([`ApiServer::start_in`]), and never anywhere else.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::netns::NetNs;

/// A resource the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    pub fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Resource::Nodes)
    }

    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Resource::Services),
            "EndpointSlice" => Some(Resource::EndpointSlices),
            "Node" => Some(Resource::Nodes),
            _ => None,
        }
    }

    /// (api prefix, plural) -> resource.
    fn from_path(group_version: &str, plural: &str) -> Option<Self> {
        match (group_version, plural) {
            ("v1", "services") => Some(Resource::Services),
            ("v1", "nodes") => Some(Resource::Nodes),
            ("discovery.k8s.io/v1", "endpointslices") => Some(Resource::EndpointSlices),
            _ => None,
        }
    }
}

/// (resource, namespace, name).
type Key = (Resource, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    /// The object before (absent for a creation).
    old: Option<Value>,
    /// The object after; for a deletion, the last state (with the deletion's version).
    new: Value,
    deleted: bool,
}

/// Requests served, by what they were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub lists: BTreeMap<String, u64>,
    pub watches: BTreeMap<String, u64>,
    /// Answers 410 Gone (list or watch).
    pub gone: u64,
    /// Connections or requests dropped while unavailable.
    pub refused: u64,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Versions at or below this are gone (410).
    compacted: u64,
    /// Paged list snapshots by token id: (resourceVersion, items).
    snapshots: HashMap<u64, (u64, Vec<Value>)>,
    next_snapshot: u64,
    /// Bumped to end every open watch.
    watch_epoch: u64,
    available: bool,
    counts: RequestCounts,
    /// Label selectors seen per resource (the last one), for tests to check.
    selectors: BTreeMap<String, String>,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running server; stops (and removes its kubeconfig) on drop.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    kubeconfig: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

type Body = BoxBody<Bytes, Infallible>;

static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl ApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port) of the caller's network namespace.
    pub fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        Self::serve(listener)
    }

    /// Listens on 127.0.0.1 of `ns`, for an agent running there.
    pub fn start_in(ns: &NetNs) -> Result<Self> {
        let listener = ns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))?
            .with_context(|| format!("binding 127.0.0.1:0 in netns {}", ns.name()))?;
        Self::serve(listener)
    }

    fn serve(listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1,
                available: true,
                ..Inner::default()
            }),
            changed: Notify::new(),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let s = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As Go's net package (so the real API server) does: without it, a watch
                // event written in several small pieces waits for the client's delayed
                // ACK (40 ms) behind Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                if !s.lock().available {
                    // Lost: the connection is closed at once.
                    s.lock().counts.refused += 1;
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let s = s.clone();
                        async move {
                            if !s.lock().available {
                                // A kept-alive connection: aborted without an answer.
                                s.lock().counts.refused += 1;
                                return Err(std::io::Error::other("unavailable"));
                            }
                            Ok(handle(s, req).await)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let kubeconfig = std::env::temp_dir().join(format!(
            "bpfproxy-test-kubeconfig-{}-{id}.yaml",
            std::process::id()
        ));
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr))
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        Ok(ApiServer {
            addr,
            shared,
            kubeconfig,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// What was requested so far.
    pub fn counts(&self) -> RequestCounts {
        self.shared.lock().counts.clone()
    }

    /// The last label selector a client used on `plural` (e.g. `services`).
    pub fn label_selector(&self, plural: &str) -> Option<String> {
        self.shared.lock().selectors.get(plural).cloned()
    }

    /// Creates or replaces each object of a YAML (or JSON) stream of documents. Namespaced
    /// kinds default to namespace `default`. Returns the new resourceVersion.
    pub fn apply_yaml(&self, yaml: &str) -> Result<u64> {
        let mut rv = self.resource_version();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(doc).context("parsing YAML")?;
            if value.is_null() {
                continue;
            }
            rv = self.apply(value)?;
        }
        Ok(rv)
    }

    /// Creates or replaces one object (JSON with `kind`). Returns the new resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let Some(resource) = Resource::from_kind(&kind) else {
            bail!("kind {kind:?} is not served by the test API server");
        };
        object["apiVersion"] = json!(resource.api_version());
        let name = object["metadata"]["name"]
            .as_str()
            .context("metadata.name missing")?
            .to_string();
        let namespace = if resource.namespaced() {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut inner = self.shared.lock();
        inner.rv += 1;
        let rv = inner.rv;
        let key = (resource, namespace, name);
        let old = inner.objects.get(&key).cloned();
        let uid = old
            .as_ref()
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("uid-{rv}"));
        object["metadata"]["uid"] = json!(uid);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["creationTimestamp"].is_null() {
            object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        inner.objects.insert(key, object.clone());
        inner.history.push(Change {
            rv,
            resource,
            old,
            new: object,
            deleted: false,
        });
        drop(inner);
        self.shared.changed.notify_waiters();
        Ok(rv)
    }

    /// Deletes `kind namespace/name` (namespace empty for Nodes). Fails if it does not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<u64> {
        let Some(resource) = Resource::from_kind(kind) else {
            bail!("kind {kind:?} is not served by the test API server");
        };
        let mut inner = self.shared.lock();
        let key = (resource, namespace.to_string(), name.to_string());
        let Some(old) = inner.objects.remove(&key) else {
            bail!("{kind} {namespace}/{name} does not exist");
        };
        inner.rv += 1;
        let rv = inner.rv;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push(Change {
            rv,
            resource,
            old: Some(old),
            new: last,
            deleted: true,
        });
        drop(inner);
        self.shared.changed.notify_waiters();
        Ok(rv)
    }

    /// Ends every open watch (cleanly, as a server or proxy timing out would); clients
    /// resume from their last resourceVersion.
    pub fn interrupt_watches(&self) {
        self.shared.lock().watch_epoch += 1;
        self.shared.changed.notify_waiters();
    }

    /// Forgets the change history and open list snapshots: a watch resuming from an older
    /// version gets a 410 Gone ERROR event, and must list again.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
        inner.snapshots.clear();
    }

    /// While unavailable the server is "lost": open watches end, and every connection or
    /// request is closed without an answer (not a 503, which clients retry in place).
    pub fn set_available(&self, available: bool) {
        let mut inner = self.shared.lock();
        inner.available = available;
        if !available {
            inner.watch_epoch += 1;
        }
        drop(inner);
        self.shared.changed.notify_waiters();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: http://{addr}
contexts:
- name: test
  context:
    cluster: test
    user: test
current-context: test
users:
- name: test
  user: {{}}
"
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("valid response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code.as_u16(), reason, message))
}

/// Percent-decoding of a query component (`+` is a space).
fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode_component(k), decode_component(v)),
            None => (decode_component(p), String::new()),
        })
        .collect()
}

/// One term of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelTerm {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

/// Parses the equality-based selector forms (`key`, `!key`, `key=v`, `key==v`, `key!=v`).
fn parse_label_selector(s: &str) -> Result<Vec<LabelTerm>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if let Some(k) = t.strip_prefix('!') {
                Ok(LabelTerm::NotExists(k.trim().to_string()))
            } else if let Some((k, v)) = t.split_once("!=") {
                Ok(LabelTerm::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Ok(LabelTerm::Equals(k.trim().into(), v.trim().into()))
            } else if t.contains(' ') || t.contains('(') {
                Err(format!("unsupported selector term {t:?}"))
            } else {
                Ok(LabelTerm::Exists(t.to_string()))
            }
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelTerm>,
    /// (field, value) pairs that must be equal.
    fields: Vec<(String, String)>,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|t| match t {
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
        });
        labels_ok
            && self.fields.iter().all(|(f, v)| {
                let actual = match f.as_str() {
                    "metadata.name" => meta["name"].as_str(),
                    "metadata.namespace" => meta["namespace"].as_str(),
                    _ => None,
                };
                actual.unwrap_or("") == v
            })
    }
}

/// (resource, namespace) of a collection path.
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    match rest {
        [plural] => Some((Resource::from_path(&gv, plural)?, None)),
        ["namespaces", ns, plural] => {
            let r = Resource::from_path(&gv, plural)?;
            r.namespaced().then(|| (r, Some(ns.to_string())))
        }
        _ => None,
    }
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server only serves GET",
        );
    }
    let Some((resource, namespace)) = route(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource ({})",
                req.uri().path()
            ),
        );
    };
    let query = parse_query(req.uri().query());
    let labels = match parse_label_selector(query.get("labelSelector").map_or("", String::as_str)) {
        Ok(l) => l,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let mut fields = Vec::new();
    for term in query
        .get("fieldSelector")
        .map_or("", String::as_str)
        .split(',')
        .filter(|t| !t.is_empty())
    {
        let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) else {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unsupported field selector {term:?}"),
            );
        };
        if f != "metadata.name" && f != "metadata.namespace" {
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("field label not supported: {f}"),
            );
        }
        fields.push((f.to_string(), v.to_string()));
    }
    let plural = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if let Some(sel) = query.get("labelSelector") {
        shared.lock().selectors.insert(plural.clone(), sel.clone());
    }
    let filter = Filter {
        namespace,
        labels,
        fields,
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        *shared.lock().counts.watches.entry(plural).or_default() += 1;
        watch(shared, resource, filter, &query)
    } else {
        *shared.lock().counts.lists.entry(plural).or_default() += 1;
        list(&shared, resource, &filter, &query)
    }
}

fn list(
    shared: &Shared,
    resource: Resource,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let mut inner = shared.lock();
    let gone = |inner: &mut Inner, what: &str| {
        inner.counts.gone += 1;
        error(StatusCode::GONE, "Expired", what)
    };
    let (rv, items, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .split_once(':')
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            let Some((id, offset)) = parsed else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid continue token",
                );
            };
            match inner.snapshots.get(&id) {
                Some((rv, items)) => (*rv, items.clone(), offset),
                None => {
                    return gone(
                        &mut inner,
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    );
                }
            }
        }
        None => {
            if let Some(asked) = query
                .get("resourceVersion")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|&v| v > 0)
                && asked <= inner.compacted
            {
                let message = format!(
                    "too old resource version: {asked} ({})",
                    inner.compacted + 1
                );
                return gone(&mut inner, &message);
            }
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|((r, _, _), o)| *r == resource && filter.matches(o))
                .map(|(_, o)| list_item(o))
                .collect();
            (inner.rv, items, 0)
        }
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let page: Vec<Value> = items[offset.min(end)..end].to_vec();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        let id = match query.get("continue").and_then(|t| t.split_once(':')) {
            Some((id, _)) => id.parse::<u64>().unwrap_or_default(),
            None => {
                inner.next_snapshot += 1;
                let id = inner.next_snapshot;
                inner.snapshots.insert(id, (rv, items.clone()));
                id
            }
        };
        metadata["continue"] = json!(format!("{id}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", resource.kind()),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    )
}

/// List items carry no kind/apiVersion, as the real server sends them.
fn list_item(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// The watch event a change is for a client with `filter`, if any.
fn event_for(change: &Change, filter: &Filter) -> Option<(&'static str, Value)> {
    let was = change.old.as_ref().is_some_and(|o| filter.matches(o));
    let is = filter.matches(&change.new);
    match (change.deleted, was, is) {
        (true, true, _) => Some(("DELETED", change.new.clone())),
        (true, false, _) => None,
        (false, false, true) => Some(("ADDED", change.new.clone())),
        (false, true, true) => Some(("MODIFIED", change.new.clone())),
        (false, true, false) => Some(("DELETED", change.new.clone())),
        (false, false, false) => None,
    }
}

fn watch(
    shared: Arc<Shared>,
    resource: Resource,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800),
    );
    let from = query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&v| v > 0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let start = Instant::now();
        // What to send first: a 410, or the current objects (no version given), or nothing.
        let (epoch, mut last, first, expired) = {
            let mut inner = shared.lock();
            let epoch = inner.watch_epoch;
            match from {
                Some(v) if v < inner.compacted => {
                    inner.counts.gone += 1;
                    let status = status_object(
                        410,
                        "Expired",
                        &format!("too old resource version: {v} ({})", inner.compacted + 1),
                    );
                    (epoch, v, vec![event_line("ERROR", &status)], true)
                }
                Some(v) => (epoch, v, Vec::new(), false),
                None => {
                    let added: Vec<Bytes> = inner
                        .objects
                        .iter()
                        .filter(|((r, _, _), o)| *r == resource && filter.matches(o))
                        .map(|(_, o)| event_line("ADDED", o))
                        .collect();
                    (epoch, inner.rv, added, false)
                }
            }
        };
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let mut last_bookmark = Instant::now() - Duration::from_secs(60);
        loop {
            let notified = shared.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let (lines, rv, end) = {
                let inner = shared.lock();
                let end = inner.watch_epoch != epoch
                    || !inner.available
                    || start.elapsed() >= timeout
                    || last < inner.compacted;
                let lines: Vec<Bytes> = inner
                    .history
                    .iter()
                    .filter(|c| c.rv > last && c.resource == resource)
                    .filter_map(|c| event_for(c, &filter))
                    .map(|(kind, obj)| event_line(kind, &obj))
                    .collect();
                (lines, inner.rv, end)
            };
            if end {
                return;
            }
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            last = rv;
            if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
                let bookmark = json!({
                    "kind": resource.kind(),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                });
                if tx.send(event_line("BOOKMARK", &bookmark)).await.is_err() {
                    return;
                }
                last_bookmark = Instant::now();
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_as_kube_proxy_writes_them() {
        let f = Filter {
            labels: parse_label_selector(
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
            )
            .unwrap(),
            ..Filter::default()
        };
        let plain = json!({"metadata": {"name": "a"}});
        let named = json!({"metadata": {"name": "a", "labels": {"service.kubernetes.io/service-proxy-name": "x"}}});
        assert!(f.matches(&plain));
        assert!(!f.matches(&named));
        let eq = Filter {
            labels: parse_label_selector("app=web,tier!=db").unwrap(),
            ..Filter::default()
        };
        assert!(eq.matches(&json!({"metadata": {"labels": {"app": "web"}}})));
        assert!(!eq.matches(&json!({"metadata": {"labels": {"app": "web", "tier": "db"}}})));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/services"), Some((Resource::Services, None)));
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/x/endpointslices"),
            Some((Resource::EndpointSlices, Some("x".into())))
        );
        assert_eq!(route("/api/v1/nodes"), Some((Resource::Nodes, None)));
        assert_eq!(route("/api/v1/pods"), None);
        assert_eq!(decode_component("a%3Db%2Cc"), "a=b,c");
    }
}
