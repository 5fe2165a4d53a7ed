//! The node agent's run loop: manifests in, maps out, interfaces kept attached.
//!
//! Every trigger (a manifest file changed, a link appeared or went, a periodic resync) runs
//! the same reconcile: read the sources, build the desired model, plan against the map
//! mirror, apply. Reconciling from scratch each time keeps the loop free of event-ordering
//! bugs; the planner makes it cheap, since unchanged services produce no writes.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use notify::Watcher as _;
use rtnetlink::sys::AsyncSocket as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    datapath::{
        Datapath, KernelMaps, LoadOptions,
        attach::{Attachments, InterfacePatterns, list_interfaces},
        loader::PROG_TC_INGRESS,
    },
    manifest::ManifestDir,
    model::{ModelOptions, Scheduler, Severity, desired_state_with},
    planner::{Capacity, MapState, plan},
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub interfaces: Vec<String>,
    pub load: LoadOptions,
    /// Full resync period, a safety net for missed events.
    pub resync: Duration,
    /// Scheduler of Services without a `bpfproxy.io/scheduler` annotation.
    pub default_scheduler: Scheduler,
}

enum Trigger {
    Manifests,
    Links,
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
    dir: ManifestDir,
    state: MapState,
    capacity: Capacity,
    problems: ProblemLog,
    options: ModelOptions,
}

impl Reconciler {
    fn reconcile(&mut self, maps: &mut KernelMaps) {
        let mut problems = BTreeSet::new();
        let report = self.dir.reload();
        for skip in &report.skipped {
            tracing::debug!("{skip}");
        }
        problems.extend(report.errors.iter().map(|e| e.to_string()));
        let objects = self.dir.objects();
        let (desired, issues) =
            desired_state_with(&objects.services, &objects.slices, &self.options);
        for issue in &issues {
            match issue.severity {
                Severity::Warning => {
                    problems.insert(issue.to_string());
                }
                Severity::Notice => tracing::debug!("{issue}"),
            }
        }
        let (plan, refused) = plan(&desired, &self.state, self.capacity);
        problems.extend(refused.iter().map(|e| e.to_string()));
        let ops: usize = plan.steps.iter().map(|s| s.ops.len()).sum::<usize>()
            + plan.prologue.len()
            + plan.epilogue.len();
        if ops > 0 {
            let applied = maps.apply(&plan, &mut self.state);
            problems.extend(applied.failed);
            tracing::info!(
                services = desired.services.len(),
                changed = plan.steps.len(),
                writes = applied.ops,
                "maps updated"
            );
        }
        self.problems.report(problems);
    }
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    if !config.manifests.is_dir() {
        bail!(
            "--manifests {}: not a directory",
            config.manifests.display()
        );
    }
    let patterns = InterfacePatterns::parse(&config.interfaces)?;
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

    let present = list_interfaces();
    for name in patterns.literal_names() {
        if !present.iter().any(|(_, n)| n == name) {
            tracing::error!(
                interface = name,
                "interface does not exist (yet); it will be attached when it appears"
            );
        }
    }

    let mut reconciler = Reconciler {
        dir: ManifestDir::new(config.manifests.clone()),
        state,
        capacity: Capacity {
            services: config.load.sizes.services,
            backend_slots: config.load.sizes.backend_slots,
        },
        problems: ProblemLog::default(),
        options: ModelOptions {
            default_scheduler: config.default_scheduler,
        },
    };
    // Program the maps before attaching, so the first attached packet already sees them.
    reconciler.reconcile(&mut datapath.maps);
    let mut attachments = Attachments::default();
    sync_links(&mut datapath, &mut attachments, &patterns)?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let manifest_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = manifest_tx.send(Trigger::Manifests);
        }
    })
    .context("starting the manifest watcher")?;
    watcher
        .watch(&config.manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", config.manifests.display()))?;
    spawn_link_monitor(tx)?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(config.resync);
    tracing::info!(
        manifests = %config.manifests.display(),
        interfaces = %config.interfaces.join(","),
        "bpfproxy running"
    );
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = resync.tick() => {
                collect_connection_counts(&mut datapath, &reconciler.state);
                reconciler.reconcile(&mut datapath.maps);
                sync_links(&mut datapath, &mut attachments, &patterns)?;
            }
            Some(trigger) = rx.recv() => {
                // Editors write a file in several events; let them settle, then take all.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut manifests = matches!(trigger, Trigger::Manifests);
                let mut links = matches!(trigger, Trigger::Links);
                while let Ok(t) = rx.try_recv() {
                    manifests |= matches!(t, Trigger::Manifests);
                    links |= matches!(t, Trigger::Links);
                }
                if manifests {
                    reconciler.reconcile(&mut datapath.maps);
                }
                if links {
                    sync_links(&mut datapath, &mut attachments, &patterns)?;
                }
            }
        }
    }
    tracing::info!("stopping: detaching programs; maps stay pinned for the CLI and a restart");
    attachments.detach_all(datapath.program_mut(PROG_TC_INGRESS)?);
    Ok(())
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

/// Sends a trigger on every rtnetlink link message (RTMGRP_LINK).
fn spawn_link_monitor(tx: mpsc::UnboundedSender<Trigger>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink")?;
    let addr = rtnetlink::sys::SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK);
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
