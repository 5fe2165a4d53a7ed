//! `bpfproxy monitor`: prints the datapath's decisions live (new connection -> backend,
//! first reply translated back, drop/reject with its reason), read from the pinned
//! `monitor_events` ring buffer with no agent needed.
//!
//! The datapath writes events only while `monitor_cfg` is on. The monitor turns it on
//! when it starts and off when it ends, by Ctrl-C, SIGTERM, a closed output or a panic
//! (a drop guard); if it is killed outright, the agent turns it off at its next resync,
//! seeing that the process recorded in `monitor_cfg` is gone.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, RingBuf};
use proxy_common::{
    maps,
    monitor::{
        EV_DROP, EV_NEW, EV_REPLY, MonitorConfig, MonitorEvent, REASON_MIDSTREAM, REASON_NAMES,
    },
};
use serde::Serialize;

use crate::{
    datapath::{DatapathError, KernelMaps},
    model::{Protocol, Scheduler},
    planner::meta_to_name,
};

/// Which events to print.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `namespace/name` of a Service (all its ports).
    pub service: Option<(String, String)>,
    pub client: Option<Ipv4Addr>,
}

impl Filter {
    /// Parses `--service NS/NAME`.
    pub fn parse_service(text: &str) -> Result<(String, String), String> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
        }
    }

    fn matches(&self, row: &EventRow) -> bool {
        if let Some((ns, name)) = &self.service
            && (&row.namespace != ns || &row.name != name)
        {
            return false;
        }
        if let Some(client) = self.client
            && row.client != client
        {
            return false;
        }
        true
    }
}

/// One event as printed (`-o json`: one object per line).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EventRow {
    /// `new`, `reply` or `drop`.
    pub event: &'static str,
    /// Why (drops; `midstream` for a lost connection given a backend again); else empty.
    pub reason: &'static str,
    pub protocol: String,
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub svc_id: u32,
    pub client: Ipv4Addr,
    pub client_port: u16,
    pub service_ip: Ipv4Addr,
    pub service_port: u16,
    /// The chosen backend (`new`), the answering one (`reply`); none for drops.
    pub backend: Option<Ipv4Addr>,
    pub backend_port: Option<u16>,
    /// The scheduler that chose (`new`).
    pub scheduler: Option<String>,
    /// Kernel CLOCK_MONOTONIC time of the decision, in ns.
    pub time_ns: u64,
}

/// Decodes an event; names come from `svc_meta` through `meta`.
pub fn event_row(
    e: &MonitorEvent,
    meta: impl Fn(u32) -> Option<(String, String, String)>,
) -> EventRow {
    let (namespace, name, port_name) = meta(e.svc_id).unwrap_or_default();
    let event = match e.kind {
        EV_NEW => "new",
        EV_REPLY => "reply",
        EV_DROP => "drop",
        _ => "unknown",
    };
    let has_backend = matches!(e.kind, EV_NEW | EV_REPLY);
    EventRow {
        event,
        reason: REASON_NAMES
            .get(e.reason as usize)
            .copied()
            .unwrap_or("unknown"),
        protocol: Protocol::from_number(e.proto)
            .map_or_else(|| e.proto.to_string(), |p| p.to_string()),
        namespace,
        name,
        port_name,
        svc_id: e.svc_id,
        client: Ipv4Addr::from(e.client),
        client_port: e.client_port,
        service_ip: Ipv4Addr::from(e.vip),
        service_port: e.vip_port,
        backend: has_backend.then(|| Ipv4Addr::from(e.backend)),
        backend_port: has_backend.then_some(e.backend_port),
        scheduler: (e.kind == EV_NEW).then(|| Scheduler::from_value(e.scheduler).name()),
        time_ns: e.ts_ns,
    }
}

/// The one-line text form.
pub fn event_line(r: &EventRow) -> String {
    let mut service = format!("{}/{}", r.namespace, r.name);
    if r.namespace.is_empty() {
        service = format!("svc#{}", r.svc_id);
    } else if !r.port_name.is_empty() {
        service.push(':');
        service.push_str(&r.port_name);
    }
    let client = format!("{}:{}", r.client, r.client_port);
    let frontend = format!("{}:{}", r.service_ip, r.service_port);
    let backend = match (r.backend, r.backend_port) {
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        _ => String::new(),
    };
    match r.event {
        "new" => {
            let again = if r.reason == REASON_NAMES[REASON_MIDSTREAM as usize] {
                " (lost conntrack entry: picked again)"
            } else {
                ""
            };
            format!(
                "NEW    {:<4} {client} -> {service} {frontend} => backend {backend} [{}]{again}",
                r.protocol,
                r.scheduler.as_deref().unwrap_or("")
            )
        }
        "reply" => format!(
            "REPLY  {:<4} {client} <- {service} {frontend} <= backend {backend}",
            r.protocol
        ),
        _ if r.reason == "malformed" => "DROP   malformed packet (passed untouched)".to_string(),
        _ => format!(
            "DROP   {:<4} {client} -> {service} {frontend} reason {}",
            r.protocol, r.reason
        ),
    }
}

fn cfg_map(bpffs: &Path) -> Result<Array<MapData, MonitorConfig>, DatapathError> {
    let path = bpffs.join(maps::MONITOR_CFG);
    let err = |source| DatapathError::Map {
        name: maps::MONITOR_CFG.to_string(),
        source,
    };
    if !path.exists() {
        return Err(DatapathError::NotPinned(bpffs.to_path_buf()));
    }
    let data = MapData::from_pin(&path).map_err(err)?;
    Array::try_from(Map::Array(data)).map_err(err)
}

/// What `monitor_cfg` holds now.
pub fn config(bpffs: &Path) -> Result<MonitorConfig, DatapathError> {
    cfg_map(bpffs)?
        .get(&0, 0)
        .map_err(|source| DatapathError::Map {
            name: maps::MONITOR_CFG.to_string(),
            source,
        })
}

/// Turns the events off if the monitor that turned them on is gone (killed without
/// cleaning up). Returns whether it did. Called by the agent.
pub fn clear_if_stale(bpffs: &Path) -> Result<bool, DatapathError> {
    let mut map = cfg_map(bpffs)?;
    let cfg = map.get(&0, 0).unwrap_or_default();
    let alive = cfg.pid != 0 && Path::new(&format!("/proc/{}", cfg.pid)).exists();
    if cfg.enabled == 0 || alive {
        return Ok(false);
    }
    map.set(0, MonitorConfig::default(), 0)
        .map_err(|source| DatapathError::Map {
            name: maps::MONITOR_CFG.to_string(),
            source,
        })?;
    Ok(true)
}

/// Events on while alive; off again when dropped (also while a panic unwinds), unless
/// another monitor took over meanwhile.
struct EventsOn {
    map: Array<MapData, MonitorConfig>,
    pid: u32,
}

impl EventsOn {
    fn new(bpffs: &Path) -> anyhow::Result<Self> {
        let mut map = cfg_map(bpffs)?;
        let pid = std::process::id();
        map.set(0, MonitorConfig { enabled: 1, pid }, 0)
            .with_context(|| format!("turning on {}", maps::MONITOR_CFG))?;
        Ok(EventsOn { map, pid })
    }
}

impl Drop for EventsOn {
    fn drop(&mut self) {
        let mine = self.map.get(&0, 0).is_ok_and(|c| c.pid == self.pid);
        if mine {
            let _ = self.map.set(0, MonitorConfig::default(), 0);
        }
    }
}

/// Runs the monitor until Ctrl-C / SIGTERM or until its output is closed.
pub fn run(bpffs: PathBuf, filter: Filter, json: bool) -> anyhow::Result<()> {
    let kernel = KernelMaps::open_pinned(&bpffs)?;
    let ring_path = bpffs.join(maps::MONITOR_EVENTS);
    let ring = MapData::from_pin(&ring_path)
        .and_then(|d| RingBuf::try_from(Map::RingBuf(d)))
        .with_context(|| format!("opening {}", ring_path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Handlers before turning events on, so Ctrl-C always reaches the clean-up.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // SAFETY: the ring buffer owns its fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the ring buffer.
        let mut ring = unsafe { tokio::io::unix::AsyncFd::register(ring)? };
        let _on = EventsOn::new(&bpffs)?;
        eprintln!("monitoring {} (Ctrl-C to stop)", bpffs.display());
        let mut out = std::io::stdout().lock();
        loop {
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                ready = ring.readable_mut() => {
                    let mut guard = ready?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        if item.len() < std::mem::size_of::<MonitorEvent>() {
                            continue;
                        }
                        // SAFETY: the kernel wrote a whole MonitorEvent (repr(C), any bytes
                        // valid); read unaligned from the ring's page.
                        let e: MonitorEvent = unsafe { item.as_ptr().cast::<MonitorEvent>().read_unaligned() };
                        let row = event_row(&e, |id| kernel.meta.get(&id, 0).ok().map(|m| meta_to_name(&m)));
                        if !filter.matches(&row) {
                            continue;
                        }
                        let line = if json { serde_json::to_string(&row)? } else { event_line(&row) };
                        if writeln!(out, "{line}").is_err() {
                            // The reader went away (e.g. `| head`): stop cleanly.
                            return Ok(());
                        }
                    }
                    guard.clear_ready();
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::monitor::{REASON_CT_FULL, REASON_NO_BACKEND};

    fn meta(id: u32) -> Option<(String, String, String)> {
        (id == 3).then(|| ("default".into(), "myapp".into(), "http".into()))
    }

    fn event(kind: u8, reason: u8) -> MonitorEvent {
        MonitorEvent {
            ts_ns: 5,
            svc_id: 3,
            kind,
            reason,
            proto: 6,
            scheduler: 1,
            client: [10, 0, 0, 5],
            vip: [10, 96, 0, 10],
            backend: [10, 1, 0, 7],
            client_port: 40000,
            vip_port: 80,
            backend_port: 8080,
            _pad: [0; 6],
        }
    }

    #[test]
    fn events_read_as_sentences() {
        let new = event_row(&event(EV_NEW, 0), meta);
        assert_eq!(
            event_line(&new),
            "NEW    TCP  10.0.0.5:40000 -> default/myapp:http 10.96.0.10:80 => backend 10.1.0.7:8080 [rr]"
        );
        let reply = event_row(&event(EV_REPLY, 0), meta);
        assert_eq!(
            event_line(&reply),
            "REPLY  TCP  10.0.0.5:40000 <- default/myapp:http 10.96.0.10:80 <= backend 10.1.0.7:8080"
        );
        let drop = event_row(&event(EV_DROP, REASON_NO_BACKEND), meta);
        assert_eq!(drop.backend, None);
        assert_eq!(
            event_line(&drop),
            "DROP   TCP  10.0.0.5:40000 -> default/myapp:http 10.96.0.10:80 reason no_backend"
        );
        let mut unknown = event(EV_DROP, REASON_CT_FULL);
        unknown.svc_id = 9;
        assert!(event_line(&event_row(&unknown, meta)).contains("svc#9"));
    }

    #[test]
    fn filters_by_service_and_client() {
        let row = event_row(&event(EV_NEW, 0), meta);
        let svc = |s: &str| Filter {
            service: Some(Filter::parse_service(s).unwrap()),
            client: None,
        };
        assert!(svc("default/myapp").matches(&row));
        assert!(!svc("default/other").matches(&row));
        assert!(!svc("kube-system/myapp").matches(&row));
        let client = |ip: [u8; 4]| Filter {
            service: None,
            client: Some(Ipv4Addr::from(ip)),
        };
        assert!(client([10, 0, 0, 5]).matches(&row));
        assert!(!client([10, 0, 0, 6]).matches(&row));
        assert!(Filter::parse_service("myapp").is_err());
        assert!(Filter::parse_service("a/b/c").is_err());
    }

    #[test]
    fn json_names_every_field() {
        let row = event_row(&event(EV_NEW, 0), meta);
        let v: serde_json::Value = serde_json::to_value(&row).unwrap();
        assert_eq!(v["event"], "new");
        assert_eq!(v["backend"], "10.1.0.7");
        assert_eq!(v["scheduler"], "rr");
        assert_eq!(v["namespace"], "default");
        assert_eq!(v["client"], "10.0.0.5");
    }
}
