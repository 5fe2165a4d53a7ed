//! The node agent's run loop: Services and EndpointSlices in (from a manifest directory or
//! the Kubernetes API), maps out, interfaces kept attached.
//!
//! Every trigger (a manifest file changed, an API object changed, a link appeared or went,
//! a periodic resync) runs the same reconcile: bring the model up to date with the source,
//! plan against the map mirror, apply. An event rebuilds and plans only the services it
//! touched (`model::Model`, `planner::plan_changes`); the first reconcile and the periodic
//! resync plan every service, the resync after reading the maps back from the kernel, so
//! an entry changed or deleted by hand is repaired.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use notify::Watcher as _;
use rtnetlink::sys::AsyncSocket as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    conntrack_gc::{self, Timeouts},
    datapath::{
        Datapath, KernelMaps, LoadOptions,
        attach::{Attachments, InterfacePatterns, list_interfaces},
        loader::{PROG_TC_INGRESS, PROG_XDP_NODEPORT},
        sock_lb::{self, SocketLb},
        xdp_attach::{self, XdpAttachments},
    },
    health::Health,
    health_check::HealthCheckServers,
    http,
    kube_source::{KubeOptions, KubeSource},
    manifest::ManifestDir,
    metrics::{self, DatapathCollector, Metrics, SyncMetrics},
    model::{DesiredState, Family, Frontend, Model, ModelOptions, Protocol, Scheduler, Severity},
    node,
    planner::{
        Capacity, MapState, Plan, keep_reply_bits, node_config, node_config6, plan, plan_changes,
        plan_node_config, plan_node_config6,
    },
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML/JSON manifests (standalone mode), watched live.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kube(KubeOptions),
}

pub struct AgentConfig {
    pub source: SourceConfig,
    /// This node: its name and external interfaces, NodePort addresses, SNAT.
    pub node: NodeConfig,
    pub interfaces: Vec<String>,
    pub load: LoadOptions,
    /// Full resync period, a safety net for missed events.
    pub resync: Duration,
    /// Scheduler of Services without a `bpfproxy.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
    /// Where to answer `/healthz` and `/livez` (see [`Health`]); `None`: nowhere.
    pub healthz_addr: Option<std::net::SocketAddr>,
    /// Where to answer `/metrics`; `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Take the programs off the interfaces on exit (and remove their link pins) instead of
    /// leaving them attached for the next agent to take over.
    pub detach_on_exit: bool,
    /// Conntrack timeouts and how often the collector applies them.
    pub conntrack_gc: ConntrackGc,
    /// Attach the socket-level load-balancing programs to this cgroup2 folder
    /// (`--socket-lb-cgroup`); `None`: off.
    pub socket_lb_cgroup: Option<PathBuf>,
}

/// What the external view needs to know about this node (see [`crate::node`]).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Endpoints whose `nodeName` is this are local; `None`: none is.
    pub name: Option<String>,
    /// `--node-interfaces`: names or globs; empty: no external view.
    pub interfaces: Vec<String>,
    /// `--nodeport-addresses` (either family); a family without a range here: the node
    /// interfaces' addresses of that family.
    pub nodeport_addresses: Vec<crate::model::IpRange>,
    /// `--snat-address`, one per family; a family without: the first address of that
    /// family on a node interface.
    pub snat_address: node::SnatAddresses,
    pub snat_ports: std::ops::RangeInclusive<u16>,
    /// Set `NODE_F_FIB_FORWARD` in `node_cfg4`.
    pub xdp_fib_forward: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            interfaces: Vec::new(),
            nodeport_addresses: Vec::new(),
            snat_address: node::SnatAddresses::default(),
            snat_ports: node::DEFAULT_SNAT_PORTS,
            xdp_fib_forward: true,
        }
    }
}

/// The node's addresses as last read: what the model, `node_cfg4` and `node_cfg6` were
/// given.
struct NodeAddresses {
    config: NodeConfig,
    patterns: Option<InterfacePatterns>,
    nodeport: Vec<std::net::IpAddr>,
    snat: node::SnatAddresses,
}

impl NodeAddresses {
    /// Reads the interfaces' addresses; an error for a --snat-address that is not one.
    fn read(
        config: &NodeConfig,
        patterns: Option<InterfacePatterns>,
    ) -> anyhow::Result<NodeAddresses> {
        let mut addresses = NodeAddresses {
            config: config.clone(),
            patterns,
            nodeport: Vec::new(),
            snat: node::SnatAddresses::default(),
        };
        addresses.refresh()?;
        Ok(addresses)
    }

    /// Reads the addresses again; true if the NodePort addresses or the SNAT address
    /// changed.
    fn refresh(&mut self) -> anyhow::Result<bool> {
        let addrs = node::interface_addresses().context("reading the interfaces' addresses")?;
        let nodeport = node::nodeport_addresses(
            &addrs,
            self.patterns.as_ref(),
            &self.config.nodeport_addresses,
        );
        let snat = node::snat_addresses(self.config.snat_address, &addrs, self.patterns.as_ref())
            .map_err(anyhow::Error::msg)?;
        for family in [Family::V4, Family::V6] {
            let cidrs: Vec<String> = self
                .config
                .nodeport_addresses
                .iter()
                .filter(|c| c.family() == family)
                .map(ToString::to_string)
                .collect();
            if !cidrs.is_empty() && !nodeport.iter().any(|a| Family::of(a) == family) {
                tracing::warn!(
                    "--nodeport-addresses {}: no {} address of this node is in these ranges (yet); {} NodePorts are served nowhere",
                    cidrs.join(","),
                    family.name(),
                    family.name()
                );
            }
        }
        let changed = nodeport != self.nodeport || snat != self.snat;
        if changed {
            tracing::info!(
                nodeport = ?nodeport.iter().map(ToString::to_string).collect::<Vec<_>>(),
                snat4 = ?snat.v4.map(|a| a.to_string()),
                snat6 = ?snat.v6.map(|a| a.to_string()),
                "node addresses"
            );
        }
        self.nodeport = nodeport;
        self.snat = snat;
        Ok(changed)
    }

    fn model_options(&self, default_scheduler: Scheduler) -> ModelOptions {
        ModelOptions {
            default_scheduler,
            node_name: self.config.name.clone(),
            node_addresses: self.nodeport.clone(),
        }
    }

    /// The `node_cfg4` and `node_cfg6` values: each family's SNAT address, the same port
    /// range and flags.
    fn node_cfg(&self) -> NodeCfgs {
        (
            node_config(
                self.snat.v4,
                self.config.snat_ports.clone(),
                self.config.xdp_fib_forward,
            ),
            node_config6(
                self.snat.v6,
                self.config.snat_ports.clone(),
                self.config.xdp_fib_forward,
            ),
        )
    }
}

/// The values of `node_cfg4` and `node_cfg6`.
type NodeCfgs = (
    proxy_common::service::NodeConfig4,
    proxy_common::service::NodeConfig6,
);

/// Writes `node_cfg4` and `node_cfg6` where they differ from `cfg`.
fn write_node_config(maps: &mut KernelMaps, state: &mut MapState, cfg: NodeCfgs) {
    let prologue: Vec<_> = plan_node_config(&cfg.0, state)
        .into_iter()
        .chain(plan_node_config6(&cfg.1, state))
        .collect();
    if !prologue.is_empty() {
        let plan = Plan {
            prologue,
            ..Plan::default()
        };
        for e in maps.apply(&plan, state).failed {
            tracing::error!("writing node_cfg4/node_cfg6: {e}");
        }
    }
}

/// The conntrack collector's settings (see [`crate::conntrack_gc`]).
#[derive(Clone, Copy, Debug)]
pub struct ConntrackGc {
    pub interval: Duration,
    pub timeouts: Timeouts,
}

enum Trigger {
    Manifests,
    Kube,
    Links,
}

enum Source {
    Manifests(ManifestDir),
    Kube {
        source: KubeSource,
        /// Said once that the maps wait for the initial lists.
        waiting_logged: bool,
    },
}

/// Logs each problem once while it lasts, not on every reconcile.
#[derive(Default)]
struct ProblemLog {
    current: BTreeSet<String>,
}

impl ProblemLog {
    fn report(&mut self, problems: BTreeSet<String>) {
        for p in problems.difference(&self.current) {
            tracing::error!("{p}");
        }
        for p in self.current.difference(&problems) {
            tracing::info!("resolved: {p}");
        }
        self.current = problems;
    }
}

struct Reconciler {
    source: Source,
    health: Health,
    metrics: SyncMetrics,
    state: MapState,
    capacity: Capacity,
    problems: ProblemLog,
    /// The health-check node ports of `DesiredState::health_checks`.
    health_checks: HealthCheckServers,
    model: Model,
    /// Services refused last time (a full map): planned again with the next change.
    retry: BTreeSet<crate::model::SvcKey>,
    /// The next plan covers every service (at start, and after a write failed).
    plan_all: bool,
}

impl Reconciler {
    /// Reads the maps back from the kernel into the mirror (repairing drift on the next
    /// reconcile), then reconciles.
    fn resync(&mut self, maps: &mut KernelMaps) {
        match maps.read_state() {
            Ok(mut read) => {
                read.reindex();
                if read != self.state {
                    tracing::warn!(
                        "the maps differ from what the agent wrote (changed by hand?); repairing"
                    );
                    match maps.remove_orphans(&read) {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(orphans = n, "removed map entries no service refers to")
                        }
                        Err(e) => tracing::error!("removing orphan map entries: {e}"),
                    }
                    self.state = read;
                }
            }
            Err(e) => tracing::error!("reading the maps back for the periodic resync: {e}"),
        }
        self.sync(maps, true);
    }

    fn reconcile(&mut self, maps: &mut KernelMaps) {
        self.sync(maps, false);
    }

    /// Brings the model up to date with the source, then plans the services that changed
    /// (or every service when `full`, at start, or after a failed write) and applies.
    fn sync(&mut self, maps: &mut KernelMaps, full: bool) {
        let started = Instant::now();
        let mut problems = BTreeSet::new();
        match &mut self.source {
            Source::Manifests(dir) => {
                let report = dir.reload();
                for skip in &report.skipped {
                    tracing::debug!("{skip}");
                }
                for e in &report.errors {
                    metrics::source_error("manifests", "parse");
                    problems.insert(e.to_string());
                }
                let objects = dir.objects();
                self.model.replace_all(&objects.services, &objects.slices);
            }
            Source::Kube {
                source,
                waiting_logged,
            } => {
                if !source.ready() {
                    // Program nothing from a partial list: the pinned maps keep serving.
                    if !*waiting_logged {
                        tracing::info!(
                            "waiting for the initial lists of Services and EndpointSlices before programming the maps"
                        );
                        *waiting_logged = true;
                    }
                    return;
                }
                source.update_model(&mut self.model, full);
            }
        }
        for issue in self.model.issues() {
            match issue.severity {
                Severity::Warning => {
                    problems.insert(issue.to_string());
                }
                Severity::Notice => tracing::debug!("{issue}"),
            }
        }
        let changed = self.model.take_changed();
        let desired = self.model.desired();
        problems.extend(self.health_checks.sync(&desired.health_checks));
        let (mut plan, refused) = if full || std::mem::take(&mut self.plan_all) {
            plan(desired, &self.state, self.capacity)
        } else {
            let mut keys: BTreeSet<_> = changed.iter().map(Frontend::key).collect();
            keys.append(&mut self.retry);
            plan_changes(desired, &keys, &self.state, self.capacity)
        };
        self.retry = refused.iter().map(|e| e.frontend().key()).collect();
        problems.extend(refused.iter().map(|e| e.to_string()));
        if !plan.is_empty() {
            // The epilogue clears the reply bits of backends that left. Connections to them
            // that are still open keep their bits (their replies must still be reverse
            // NAT-ed, as kube-proxy's conntrack does); they are looked up once the steps
            // are in, so no new connection can pick those backends any more.
            let epilogue = std::mem::take(&mut plan.epilogue);
            let mut applied = maps.apply(&plan, &mut self.state);
            // After a failed (rolled-back) step the bits stay: a superset is safe.
            if !epilogue.is_empty() && applied.failed.is_empty() {
                let mut rest = Plan {
                    epilogue,
                    ..Plan::default()
                };
                let kept = keep_reply_bits(&mut rest, &self.state, &maps.reply_bits_in_use());
                if kept > 0 {
                    tracing::debug!(words = kept, "reply-filter bits kept for open connections");
                }
                let more = maps.apply(&rest, &mut self.state);
                applied.ops += more.ops;
                applied.failed.extend(more.failed);
            }
            self.plan_all |= !applied.failed.is_empty();
            problems.extend(applied.failed);
            tracing::info!(
                services = desired.services.len(),
                changed = plan.steps.len(),
                writes = applied.ops,
                "maps updated"
            );
        }
        // Synced even if a service was refused or rolled back: those are named and retried;
        // what stalls health is a loop that stops reconciling.
        self.health.synced(started);
        self.metrics.synced(started, &self.state);
        self.problems.report(problems);
    }
}

/// The desired state less what the datapath cannot serve (SCTP: its programs parse TCP and
/// UDP only), each left out named in `problems` rather than programmed to never match.
pub fn without_unsupported(
    mut desired: DesiredState,
    problems: &mut BTreeSet<String>,
) -> DesiredState {
    desired.services.retain(|frontend, service| {
        if frontend.protocol == Protocol::Sctp {
            problems.insert(format!(
                "Service {}/{}: {frontend}: SCTP is not supported by the datapath; not programmed",
                service.name.namespace, service.name.name
            ));
            return false;
        }
        true
    });
    desired
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up must still end the agent in order.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    if let SourceConfig::Manifests(dir) = &config.source
        && !dir.is_dir()
    {
        bail!("--manifests {}: not a directory", dir.display());
    }
    // tc_ingress also runs on the node interfaces: replies from pods on other nodes to
    // ClusterIP connections made here come back through them.
    let tc_interfaces: Vec<String> = config
        .interfaces
        .iter()
        .chain(&config.node.interfaces)
        .cloned()
        .collect();
    let patterns = InterfacePatterns::parse(&tc_interfaces)?;
    let node_patterns = if config.node.interfaces.is_empty() {
        None
    } else {
        Some(InterfacePatterns::parse(&config.node.interfaces)?)
    };
    if let Some(ephemeral) = node::ephemeral_ports()
        && node::overlaps(&ephemeral, &config.node.snat_ports)
    {
        tracing::warn!(
            snat_ports = ?config.node.snat_ports,
            ephemeral = ?ephemeral,
            "--snat-ports overlaps the kernel's ephemeral ports (net.ipv4.ip_local_port_range): a SNAT-ed connection may collide with a connection of a process on the node"
        );
    }
    let mut node_addresses = NodeAddresses::read(&config.node, node_patterns.clone())?;
    // A wrong path fails the start before anything is loaded.
    if let Some(cgroup) = &config.socket_lb_cgroup {
        sock_lb::open_cgroup2(cgroup)?;
    }
    // Bound before loading anything: a port in use fails the start with nothing changed.
    let healthz_listener = match config.healthz_addr {
        Some(addr) => Some(http::bind("--healthz-addr", addr).await?),
        None => None,
    };
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(http::bind("--metrics-addr", addr).await?),
        None => None,
    };
    let mut datapath = Datapath::load(&config.load)?;
    let state = datapath
        .maps
        .read_state()
        .context("reading the pinned maps")?;
    if !state.services.is_empty() {
        tracing::info!(
            services = state.services.len(),
            "found services in the pinned maps; keeping them while reconciling"
        );
    }
    let orphans = datapath.maps.remove_orphans(&state)?;
    if orphans > 0 {
        tracing::info!(orphans, "removed map entries no service refers to");
    }

    let present = list_interfaces().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "listing the interfaces");
        Vec::new()
    });
    for name in node_patterns.iter().flat_map(|p| p.literal_names()) {
        if !present.is_empty() && !present.iter().any(|(_, n)| n == name) {
            bail!("--node-interfaces {name}: no such interface");
        }
    }
    for name in patterns.literal_names() {
        if !present.is_empty() && !present.iter().any(|(_, n)| n == name) {
            tracing::error!(
                interface = name,
                "interface does not exist (yet); it will be attached when it appears"
            );
        }
    }

    let node_name = config.node.name.clone();
    // kube-proxy's timeout: twice its sync period.
    let health = Health::new(config.resync * 2, node_name);
    let sync_metrics = serve_endpoints(
        healthz_listener,
        metrics_listener,
        &health,
        config.load.pin_dir.as_deref(),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let source = match &config.source {
        SourceConfig::Manifests(dir) => Source::Manifests(ManifestDir::new(dir.clone())),
        SourceConfig::Kube(options) => {
            let (kube_tx, mut kube_rx) = mpsc::unbounded_channel();
            let source = KubeSource::start(options, kube_tx).await?;
            let tx = tx.clone();
            let health = health.clone();
            tokio::spawn(async move {
                while kube_rx.recv().await.is_some() {
                    health.queued();
                    if tx.send(Trigger::Kube).is_err() {
                        break;
                    }
                }
            });
            Source::Kube {
                source,
                waiting_logged: false,
            }
        }
    };
    // Watch before the first reconcile, so changes made during start-up are queued, not
    // lost until the next resync. Kept alive for the whole run.
    let _manifest_watcher = match &config.source {
        SourceConfig::Manifests(dir) => {
            let manifest_tx = tx.clone();
            let health = health.clone();
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    // Not on access: every reload opens the files, and reacting to that
                    // reloaded forever (a core busy at 10,000 services).
                    if event.is_ok_and(|e| !e.kind.is_access()) {
                        health.queued();
                        let _ = manifest_tx.send(Trigger::Manifests);
                    }
                })
                .context("starting the manifest watcher")?;
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
            Some(watcher)
        }
        SourceConfig::Kube(_) => None,
    };
    spawn_link_monitor(tx.clone())?;
    spawn_resync_due(health.clone(), config.resync);
    let mut reconciler = Reconciler {
        source,
        health_checks: HealthCheckServers::new(health.clone()),
        health,
        metrics: sync_metrics,
        state,
        capacity: Capacity {
            services: config.load.sizes.services,
            backend_slots: config.load.sizes.backend_slots,
        },
        problems: ProblemLog::default(),
        // SCTP left out (named in the problems): the datapath parses TCP and UDP only.
        model: Model::new(
            node_addresses.model_options(config.default_scheduler),
            false,
        ),
        retry: BTreeSet::new(),
        plan_all: true,
    };
    // Program the maps before attaching, so the first attached packet already sees them.
    reconciler.reconcile(&mut datapath.maps);
    write_node_config(
        &mut datapath.maps,
        &mut reconciler.state,
        node_addresses.node_cfg(),
    );
    // Links pinned next to the maps: they outlive the agent, and the next one swaps its
    // program into them (see `Attachments`).
    let mut attachments = match &datapath.pin_dir {
        Some(dir) => Attachments::pinned(dir.join(proxy_common::maps::LINKS_DIR)),
        None => Attachments::default(),
    };
    sync_links(&mut datapath, &mut attachments, &patterns)?;
    let mut xdp_attachments = match &datapath.pin_dir {
        Some(dir) => XdpAttachments::pinned(
            dir.join(proxy_common::maps::LINKS_DIR)
                .join(xdp_attach::LINKS_SUBDIR),
        ),
        None => XdpAttachments::default(),
    };
    if let Some(node_patterns) = &node_patterns {
        // At start a node interface that cannot take the program fails the agent, naming
        // it; later ones are logged.
        let prog = datapath.xdp_program_mut(PROG_XDP_NODEPORT)?;
        if let Some(e) = xdp_attachments.sync(prog, node_patterns).into_iter().next() {
            return Err(e.into());
        }
    } else if let Some(dir) = &datapath.pin_dir {
        // No node interfaces now: links an earlier agent pinned go.
        let mut none = XdpAttachments::pinned(
            dir.join(proxy_common::maps::LINKS_DIR)
                .join(xdp_attach::LINKS_SUBDIR),
        );
        let nothing = InterfacePatterns::parse(&[])?;
        let prog = datapath.xdp_program_mut(PROG_XDP_NODEPORT)?;
        for e in none.sync(prog, &nothing) {
            tracing::error!("{e}");
        }
    }
    let socket_lb = match &config.socket_lb_cgroup {
        Some(cgroup) => Some(SocketLb::attach(&mut datapath, cgroup)?),
        None => {
            if let Some(dir) = &datapath.pin_dir {
                sock_lb::remove_pinned(dir);
            }
            None
        }
    };

    let mut resync = tokio::time::interval(config.resync);
    let mut ct_gc = tokio::time::interval(config.conntrack_gc.interval);
    let source_name = match &config.source {
        SourceConfig::Manifests(dir) => format!("manifests {}", dir.display()),
        SourceConfig::Kube(o) => format!("Kubernetes API (node {})", o.node_name),
    };
    tracing::info!(
        source = %source_name,
        interfaces = %config.interfaces.join(","),
        "bpfproxy running"
    );
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = ct_gc.tick() => collect_conntrack(&mut datapath, &config.conntrack_gc.timeouts),
            _ = resync.tick() => {
                clear_stale_monitor(&datapath);
                collect_connection_counts(&mut datapath, &reconciler.state);
                reconciler.resync(&mut datapath.maps);
                sync_links(&mut datapath, &mut attachments, &patterns)?;
                sync_xdp(&mut datapath, &mut xdp_attachments, node_patterns.as_ref())?;
            }
            Some(trigger) = rx.recv() => {
                // Editors write a file in several events; let them settle, then take all.
                // API events apply at once (what queued meanwhile is taken together).
                if !matches!(trigger, Trigger::Kube) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut objects = matches!(trigger, Trigger::Manifests | Trigger::Kube);
                let mut links = matches!(trigger, Trigger::Links);
                while let Ok(t) = rx.try_recv() {
                    objects |= matches!(t, Trigger::Manifests | Trigger::Kube);
                    links |= matches!(t, Trigger::Links);
                }
                if objects {
                    reconciler.reconcile(&mut datapath.maps);
                }
                if links {
                    sync_links(&mut datapath, &mut attachments, &patterns)?;
                    sync_xdp(&mut datapath, &mut xdp_attachments, node_patterns.as_ref())?;
                    // An address came or went: NodePorts follow the node's addresses.
                    match node_addresses.refresh() {
                        Ok(true) => {
                            reconciler
                                .model
                                .set_options(node_addresses.model_options(config.default_scheduler));
                            reconciler.sync(&mut datapath.maps, true);
                            write_node_config(
                                &mut datapath.maps,
                                &mut reconciler.state,
                                node_addresses.node_cfg(),
                            );
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!("{e:#}"),
                    }
                }
            }
        }
    }
    if config.detach_on_exit {
        tracing::info!("stopping: detaching programs; maps stay pinned for the CLI and a restart");
        attachments.detach_all();
        xdp_attachments.detach_all();
        if let Some(socket_lb) = socket_lb {
            socket_lb.detach_all();
        }
    } else {
        let kept = attachments.leave_attached()
            + xdp_attachments.leave_attached()
            + socket_lb.map_or(0, SocketLb::leave_attached);
        tracing::info!(
            links = kept,
            "stopping: programs stay attached and maps pinned, so traffic keeps flowing until the next agent takes over (`bpfproxy cleanup` removes them)"
        );
    }
    Ok(())
}

/// Starts `/healthz` and `/livez`, and `/metrics`, on their listeners; returns what the
/// reconcile records.
fn serve_endpoints(
    healthz: Option<tokio::net::TcpListener>,
    metrics: Option<tokio::net::TcpListener>,
    health: &Health,
    pin_dir: Option<&std::path::Path>,
) -> SyncMetrics {
    let collector = match (&metrics, pin_dir) {
        (Some(_), Some(dir)) => match DatapathCollector::open(dir) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(
                    "metrics: opening the pinned maps: {e:#}; datapath metrics left out"
                );
                None
            }
        },
        _ => None,
    };
    let registry = Arc::new(Metrics::new(collector));
    let sync = registry.sync.clone();
    if let Some(listener) = healthz {
        let health = health.clone();
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "health endpoints: /healthz /livez");
        }
        http::serve(
            listener,
            Arc::new(move |path| match path {
                "/healthz" | "/livez" => {
                    let status = health.status();
                    Some(http::Response::new(
                        if status.healthy { 200 } else { 503 },
                        "application/json",
                        status.body,
                    ))
                }
                _ => None,
            }),
        );
    }
    if let Some(listener) = metrics {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics endpoint: /metrics");
        }
        http::serve(
            listener,
            Arc::new(move |path| {
                (path == "/metrics")
                    .then(|| http::Response::new(200, metrics::CONTENT_TYPE, registry.render()))
            }),
        );
    }
    sync
}

/// Marks a resync as due every `period`, so health notices a loop that stopped taking
/// them (the loop's own timer would stop with it).
fn spawn_resync_due(health: Health, period: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            health.queued();
        }
    });
}

fn sync_links(
    datapath: &mut Datapath,
    attachments: &mut Attachments,
    patterns: &InterfacePatterns,
) -> anyhow::Result<()> {
    let prog = datapath.program_mut(PROG_TC_INGRESS)?;
    for e in attachments.sync(prog, patterns) {
        tracing::error!("{e}");
    }
    Ok(())
}

fn sync_xdp(
    datapath: &mut Datapath,
    attachments: &mut XdpAttachments,
    patterns: Option<&InterfacePatterns>,
) -> anyhow::Result<()> {
    let Some(patterns) = patterns else {
        return Ok(());
    };
    let prog = datapath.xdp_program_mut(PROG_XDP_NODEPORT)?;
    for e in attachments.sync(prog, patterns) {
        tracing::error!("{e}");
    }
    Ok(())
}

/// Sends a trigger on every rtnetlink link, IPv4 or IPv6 address message (RTMGRP_LINK,
/// RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR: NodePorts follow the node's addresses).
fn spawn_link_monitor(tx: mpsc::UnboundedSender<Trigger>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink")?;
    let addr = rtnetlink::sys::SocketAddr::new(
        0,
        rtnetlink::constants::RTMGRP_LINK
            | rtnetlink::constants::RTMGRP_IPV4_IFADDR
            | rtnetlink::constants::RTMGRP_IPV6_IFADDR,
    );
    connection
        .socket_mut()
        .socket_mut()
        .bind(&addr)
        .context("subscribing to link events")?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            if tx.send(Trigger::Links).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Turns monitor events off if the monitor that turned them on was killed.
fn clear_stale_monitor(datapath: &Datapath) {
    if let Some(dir) = &datapath.pin_dir {
        match crate::monitor::clear_if_stale(dir) {
            Ok(true) => tracing::info!("monitor events turned off: their monitor is gone"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "checking the monitor switch"),
        }
    }
}

/// Deletes the conntrack entries of expired connections.
fn collect_conntrack(datapath: &mut Datapath, timeouts: &Timeouts) {
    match conntrack_gc::collect(datapath, timeouts) {
        Ok(r) if r.expired > 0 => tracing::debug!(
            entries = r.entries,
            expired = r.expired,
            released = r.released,
            "expired conntrack entries removed"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "collecting expired conntrack entries"),
    }
}

/// Releases the counts of connections whose conntrack entry was evicted, and drops the
/// counters of drained, removed backends (lc, sed, nq; see
/// `Datapath::collect_connection_counts`).
fn collect_connection_counts(datapath: &mut Datapath, state: &MapState) {
    match datapath.collect_connection_counts(state) {
        Ok(r) if r.released > 0 || r.removed > 0 => tracing::info!(
            released = r.released,
            removed = r.removed,
            "connection counts collected"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "collecting connection counts"),
    }
}
