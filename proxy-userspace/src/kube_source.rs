//! The Kubernetes API source: Services, EndpointSlices and this Node, watched with
//! kube-runtime's watcher into reflector stores.
//!
//! - Services and `discovery.k8s.io/v1` EndpointSlices are watched with kube-proxy's label
//!   selector ([`PROXY_LABEL_SELECTOR`]); the Node with `metadata.name=<node>`.
//! - Each watcher retries with kube-runtime's default backoff; a 410 Gone makes it relist,
//!   and the reflector store then drops whatever was not listed again.
//! - Objects are received untyped and decoded one by one: an object that does not decode
//!   is logged with its namespace/name and left out (the store forgets it), so one bad
//!   object never stops the stream for every other service.
//! - [`KubeSource::ready`] turns true once both the Service and the EndpointSlice streams
//!   finished their initial list; the agent programs nothing before.
//!
//! Every change after that records the object's namespace/name and sends one trigger to
//! the agent, which hands [`KubeSource::update_model`] its model: only the recorded objects
//! are read from the stores and rebuilt (everything after a list), so an event costs what
//! its Service costs.

use std::{
    collections::BTreeSet,
    fmt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::model::{Model, incremental::ObjectKey};

/// kube-proxy's label selector for Services and EndpointSlices: objects handed to another
/// proxy, and headless ones, are not watched at all.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Where the cluster is and who this node is.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// A kubeconfig file; without it `KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// service account are tried (kube's `Config::infer`).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`--node-name`, `NODE_NAME` or the hostname).
    pub node_name: String,
}

/// Builds the client configuration from [`KubeOptions`].
pub async fn client_config(options: &KubeOptions) -> anyhow::Result<Config> {
    match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))
        }
        None => Config::infer().await.context(
            "no cluster configuration: pass --kubeconfig, set KUBECONFIG, write ~/.kube/config, \
             or run in a pod with a service account (or use --manifests)",
        ),
    }
}

/// The node name to use: the given one, else the hostname.
pub fn node_name_or_hostname(given: Option<String>) -> String {
    given.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
}

/// Objects changed since the model last read the stores.
#[derive(Debug, Default)]
struct Dirty {
    services: BTreeSet<ObjectKey>,
    slices: BTreeSet<ObjectKey>,
    /// A list finished (the first, or after a 410): the store was replaced as a whole.
    relisted: bool,
}

type SharedDirty = Arc<Mutex<Dirty>>;

fn lock(dirty: &SharedDirty) -> std::sync::MutexGuard<'_, Dirty> {
    dirty.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watched objects, readable at any time.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    services_listed: Arc<AtomicBool>,
    slices_listed: Arc<AtomicBool>,
    dirty: SharedDirty,
    node_name: String,
}

impl KubeSource {
    /// Connects and starts the three watchers; each change (after the initial lists) sends
    /// `()` on `changed`. Returns at once: the lists arrive in the background.
    pub async fn start(
        options: &KubeOptions,
        changed: mpsc::UnboundedSender<()>,
    ) -> anyhow::Result<Self> {
        let config = client_config(options).await?;
        tracing::info!(
            server = %config.cluster_url,
            node = %options.node_name,
            "watching the Kubernetes API"
        );
        let client = Client::try_from(config).context("creating the Kubernetes client")?;
        Ok(Self::start_with_client(client, options, changed))
    }

    /// [`KubeSource::start`] with a ready client.
    pub fn start_with_client(
        client: Client,
        options: &KubeOptions,
        changed: mpsc::UnboundedSender<()>,
    ) -> Self {
        let selector = watcher::Config::default().labels(PROXY_LABEL_SELECTOR);
        let services_listed = Arc::new(AtomicBool::new(false));
        let slices_listed = Arc::new(AtomicBool::new(false));
        let dirty = SharedDirty::default();
        let marks = |pick: fn(&mut Dirty) -> &mut BTreeSet<ObjectKey>| {
            let dirty = dirty.clone();
            move |changed: Option<ObjectKey>| {
                let mut d = lock(&dirty);
                match changed {
                    Some(key) => {
                        pick(&mut d).insert(key);
                    }
                    None => d.relisted = true,
                }
            }
        };
        let services = spawn_watch::<Service>(
            &client,
            selector.clone(),
            services_listed.clone(),
            changed.clone(),
            marks(|d| &mut d.services),
        );
        let slices = spawn_watch::<EndpointSlice>(
            &client,
            selector,
            slices_listed.clone(),
            changed.clone(),
            marks(|d| &mut d.slices),
        );
        // The Node is not used yet: its changes mark nothing.
        let node = spawn_watch::<Node>(
            &client,
            watcher::Config::default().fields(&format!("metadata.name={}", options.node_name)),
            Arc::new(AtomicBool::new(false)),
            changed,
            |_| {},
        );
        KubeSource {
            services,
            slices,
            node,
            services_listed,
            slices_listed,
            dirty,
            node_name: options.node_name.clone(),
        }
    }

    /// Brings `model` up to date with the stores: the Services and EndpointSlices changed
    /// since the last call are read again (gone ones removed), or, after a list or when
    /// `full`, every object (the model then rebuilds only what differs).
    pub fn update_model(&self, model: &mut Model, full: bool) {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        if full || dirty.relisted {
            let (services, slices) = (self.services.state(), self.slices.state());
            model.replace_all(services.iter().map(|s| &**s), slices.iter().map(|s| &**s));
            return;
        }
        for (ns, name) in dirty.services {
            match self.services.get(&ObjectRef::new(&name).within(&ns)) {
                Some(svc) => model.set_service(&svc),
                None => model.remove_service(&ns, &name),
            }
        }
        for (ns, name) in dirty.slices {
            match self.slices.get(&ObjectRef::new(&name).within(&ns)) {
                Some(slice) => model.set_slice(&slice),
                None => model.remove_slice(&ns, &name),
            }
        }
    }

    /// Both the Service and the EndpointSlice streams finished their initial list.
    pub fn ready(&self) -> bool {
        self.services_listed.load(Ordering::SeqCst) && self.slices_listed.load(Ordering::SeqCst)
    }

    /// Copies of the stored Services and EndpointSlices, for `desired_state`.
    pub fn objects(&self) -> (Vec<Service>, Vec<EndpointSlice>) {
        (
            self.services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            self.slices.state().iter().map(|s| (**s).clone()).collect(),
        )
    }

    /// This node's object, once seen.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.state().into_iter().next()
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

/// `Service`, `EndpointSlice`, `Node`, for the log.
fn kind_of<K: Resource<DynamicType = ()>>() -> String {
    K::kind(&()).into_owned()
}

/// `namespace/name` (or `name` for cluster-scoped objects).
struct ObjName<'a>(&'a DynamicObject);

impl fmt::Display for ObjName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ns) = &self.0.metadata.namespace {
            write!(f, "{ns}/")?;
        }
        f.write_str(self.0.metadata.name.as_deref().unwrap_or(""))
    }
}

/// Decodes one untyped object into `K` (without its `managedFields`).
fn decode<K>(obj: &DynamicObject) -> Result<K, String>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    let mut value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    serde_json::from_value::<K>(value).map_err(|e| e.to_string())
}

/// A `K` carrying only `metadata`: enough for the store to forget the object.
fn stub<K>(obj: DynamicObject) -> K
where
    K: Resource + Default,
{
    let mut k = K::default();
    *k.meta_mut() = obj.metadata;
    k
}

/// Typed events from untyped ones. An object that does not decode is logged and left out:
/// during a list it is not added; as a change it is removed from the store (it is not
/// served until a version that decodes arrives).
fn typed_event<K>(event: Event<DynamicObject>) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Default,
{
    let report = |obj: &DynamicObject, e: &str| {
        crate::metrics::source_error("kubernetes", "decode");
        tracing::error!(
            "{} {}: cannot be decoded ({e}); skipped, every other object is still served",
            kind_of::<K>(),
            ObjName(obj)
        );
    };
    Some(match event {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(obj) => match decode::<K>(&obj) {
            Ok(k) => Event::InitApply(k),
            Err(e) => {
                report(&obj, &e);
                return None;
            }
        },
        Event::Apply(obj) => match decode::<K>(&obj) {
            Ok(k) => Event::Apply(k),
            Err(e) => {
                report(&obj, &e);
                Event::Delete(stub(obj))
            }
        },
        Event::Delete(obj) => match decode::<K>(&obj) {
            Ok(k) => Event::Delete(k),
            Err(_) => Event::Delete(stub(obj)),
        },
    })
}

/// Starts one watcher of `K` (all namespaces) feeding a reflector store; returns the store.
/// Each change calls `mark` with the object's namespace/name once the store holds it (and
/// `None` when a list finished), then sends on `changed`.
fn spawn_watch<K>(
    client: &Client,
    config: watcher::Config,
    listed: Arc<AtomicBool>,
    changed: mpsc::UnboundedSender<()>,
    mark: impl Fn(Option<ObjectKey>) + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + DeserializeOwned
        + Default
        + Clone
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let kind = kind_of::<K>();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<K>(&()));
    let (store, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .try_filter_map(|event| futures::future::ready(Ok(typed_event::<K>(event))))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Whether the last item was an error, to log the recovery once.
        let mut failing = false;
        let mut relists = 0u64;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    if failing {
                        tracing::info!(kind, "API connection back");
                        failing = false;
                    }
                    match event {
                        Event::Init => {
                            relists += 1;
                            if relists > 1 {
                                tracing::info!(kind, "listing again (watch expired or restarted)");
                            }
                        }
                        Event::InitApply(_) => {}
                        Event::InitDone => {
                            tracing::info!(kind, "initial list done");
                            mark(None);
                            listed.store(true, Ordering::SeqCst);
                            let _ = changed.send(());
                        }
                        Event::Apply(ref o) | Event::Delete(ref o) => {
                            tracing::debug!(kind, object = %o.name_any(), "changed");
                            mark(Some((o.namespace().unwrap_or_default(), o.name_any())));
                            let _ = changed.send(());
                        }
                    }
                }
                Err(e) => {
                    crate::metrics::source_error("kubernetes", "watch");
                    // The datapath keeps serving what it has; the watcher retries with backoff.
                    if !failing {
                        tracing::error!(
                            kind,
                            "Kubernetes API unreachable or failing ({e}); the maps keep what they have; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(kind, "still failing: {e}");
                    }
                    failing = true;
                }
            }
        }
    });
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_bad_object_is_left_out_of_a_list_and_removed_on_change() {
        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "default"},
            "spec": {"ports": [{"port": "eighty"}]}
        }));
        assert!(typed_event::<Service>(Event::InitApply(bad.clone())).is_none());
        match typed_event::<Service>(Event::Apply(bad)) {
            Some(Event::Delete(s)) => {
                assert_eq!(s.metadata.name.as_deref(), Some("bad"));
                assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_good_object_decodes() {
        let good = dynamic(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default", "managedFields": [{}]},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}
        }));
        match typed_event::<Service>(Event::Apply(good)) {
            Some(Event::Apply(s)) => {
                assert_eq!(s.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.1"));
                assert!(s.metadata.managed_fields.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn node_name_falls_back_to_the_hostname() {
        assert_eq!(node_name_or_hostname(Some("n1".into())), "n1");
        assert!(!node_name_or_hostname(None).is_empty());
    }
}
