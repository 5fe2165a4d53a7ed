//! Section 5: the Kubernetes API source, end to end (issue 3's figures).
//!
//! The real agent (`bpfproxy run --kubeconfig`) runs in a throw-away namespace and watches
//! the test API server (`testbed::ApiServer`, listening on that namespace's loopback), which
//! holds N services of `endpoints` endpoints each (one Service and one EndpointSlice per
//! service). The bench reads the agent's pinned maps itself (aya's `MapData::from_pin`, with
//! no layout check, so an agent from before the pins had a layout version can be measured
//! too, with `BPFPROXY_BIN`).
//!
//! - Event to map: the clock starts just before the test API server stores the change (the
//!   watch event goes out from there), and stops when a poll of `services4` every ~50 µs
//!   sees it: for an endpoint change, the service entry's live backend table flips (the
//!   planner publishes a changed backend set by switching tables); for a new service, its
//!   entry appears. One change at a time, each waited for, so the figure is a latency, not a
//!   queue. p50 and p99 over the events.
//! - Initial sync: the agent started on empty pins against a server holding every object;
//!   from spawning the agent to its log saying every service is in the maps (seen by
//!   polling the log every 5 ms), and, from the agent's own log timestamps, from both
//!   initial lists done to the maps written.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use proxy_common::{
    PROTO_TCP, maps as map_names,
    service::{Backend4, BackendSlotKey, SCOPE_CLUSTER_IP, Svc4Key, SvcValue},
};
use serde_json::{Value, json};
use testbed::{
    Agent, ApiServer, NetNs,
    agent::{BPFFS_ROOT, TEST_PIN_PREFIX, strip_ansi},
};

use crate::{
    cluster::{self, PORT_NAME, SynthService},
    config::Settings,
    figures::{Figure, quantile},
};

/// Where the new services of the "service added" events get their addresses.
const ADDED_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 112, 0, 0);
/// Addresses given to the changed endpoint of each endpoint event.
const EVENT_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(10, 176, 0, 0);
/// An interface glob that matches nothing: the maps are what is measured.
const NO_INTERFACES: &str = "bpbench-none*";
const POLL: Duration = Duration::from_micros(50);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

fn service_json(s: &SynthService) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": s.vip.to_string(),
            "clusterIPs": [s.vip.to_string()],
            "ports": [{
                "name": PORT_NAME,
                "port": s.port,
                "protocol": "TCP",
                "targetPort": s.endpoints.first().map_or(8080, |e| e.1),
            }],
        },
    })
}

fn slice_json(s: &SynthService) -> Value {
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .map(|(ip, _)| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-slice", s.name),
            "namespace": s.namespace,
            "labels": {"kubernetes.io/service-name": s.name},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{
            "name": PORT_NAME,
            "port": s.endpoints.first().map_or(8080, |e| e.1),
            "protocol": "TCP",
        }],
    })
}

fn key_of(s: &SynthService) -> Svc4Key {
    Svc4Key {
        addr: s.vip.octets(),
        port: s.port,
        proto: PROTO_TCP,
        scope: SCOPE_CLUSTER_IP,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A namespace with the test API server holding `services`, and the agent watching it.
/// Fields drop in order: the agent first, then the server, then the namespace.
struct Setup {
    agent: Agent,
    server: ApiServer,
    _ns: NetNs,
    /// From spawning the agent to its log saying every service is programmed.
    synced_after: Duration,
}

impl Setup {
    fn start(services: &[SynthService]) -> Result<Setup> {
        let run = format!("bp{}-api", testbed::unique_run_id());
        let ns = NetNs::create(&run)?;
        let server = ApiServer::start_in(&ns)?;
        for s in services {
            server.apply(slice_json(s))?;
            server.apply(service_json(s))?;
        }
        // The history is not needed (the agent lists first): every watch then scans a
        // short one.
        server.compact();
        let bpffs = PathBuf::from(BPFFS_ROOT).join(format!("{TEST_PIN_PREFIX}{run}"));
        let start = Instant::now();
        let agent = Agent::start_kube(
            &ns,
            server.kubeconfig(),
            "bench-node",
            NO_INTERFACES,
            &bpffs,
            // No periodic resync while measuring.
            &["--resync-seconds", "3600"],
        )?;
        let timeout = Duration::from_secs(60) + Duration::from_millis(services.len() as u64 * 2);
        let synced_after = crate::agent::wait_programmed(
            &agent,
            services.len(),
            start,
            timeout,
            Duration::from_millis(5),
        )?;
        Ok(Setup {
            agent,
            server,
            _ns: ns,
            synced_after,
        })
    }

    fn maps(&self) -> Result<Maps> {
        let open = |name: &str| -> Result<Map> {
            let path = self.agent.bpffs().join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening the pinned map {}", path.display()))?;
            Map::from_map_data(data).with_context(|| format!("map {name}"))
        };
        Ok(Maps {
            services: HashMap::try_from(open(map_names::SERVICES4)?)?,
            backend_slots: HashMap::try_from(open(map_names::BACKEND_SLOTS4)?)?,
        })
    }
}

/// The agent's maps the bench reads.
struct Maps {
    services: HashMap<MapData, Svc4Key, SvcValue>,
    backend_slots: HashMap<MapData, BackendSlotKey, Backend4>,
}

/// Polls `services4` until `done` says the entry of `key` is as expected.
fn wait_for(maps: &Maps, key: &Svc4Key, done: impl Fn(Option<SvcValue>) -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if done(maps.services.get(key, 0).ok()) {
            return Ok(());
        }
        if start.elapsed() > EVENT_TIMEOUT {
            bail!("the map did not reflect the event within {EVENT_TIMEOUT:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// Event-to-map latencies in ms: `events` endpoint changes, then `events` new services.
fn events(n: usize, endpoints: usize, events: usize) -> Result<(Vec<f64>, Vec<f64>, Duration)> {
    let mut services = cluster::fillers(n, endpoints);
    let setup = Setup::start(&services)?;
    let maps = setup.maps()?;
    let mut changes = Vec::with_capacity(events);
    for k in 0..events {
        if testbed::stop_requested() {
            bail!("interrupted");
        }
        // Spread over the cluster; the last endpoint gets a fresh address each time.
        let i = (k * 7919) % n;
        let s = &mut services[i];
        if let Some(last) = s.endpoints.last_mut() {
            last.0 = offset(EVENT_ENDPOINT_BASE, k);
        }
        let key = key_of(s);
        let before = maps
            .services
            .get(&key, 0)
            .with_context(|| format!("service {} is not in the map", s.name))?
            .table;
        let t0 = Instant::now();
        setup.server.apply(slice_json(s))?;
        wait_for(&maps, &key, |v| v.is_some_and(|v| v.table != before))
            .with_context(|| format!("endpoint change {k} of {}", s.name))?;
        changes.push(ms(t0.elapsed()));
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut adds = Vec::with_capacity(events);
    for k in 0..events {
        if testbed::stop_requested() {
            bail!("interrupted");
        }
        let mut s = cluster::filler(n + k, endpoints);
        s.name = format!("added-{k}");
        s.vip = offset(ADDED_VIP_BASE, k);
        let key = key_of(&s);
        // The slice first: the measured event is the Service that makes it a service.
        setup.server.apply(slice_json(&s))?;
        let t0 = Instant::now();
        setup.server.apply(service_json(&s))?;
        wait_for(&maps, &key, |v| {
            v.is_some_and(|v| v.backend_count as usize == endpoints)
        })
        .with_context(|| format!("service {} added", s.name))?;
        adds.push(ms(t0.elapsed()));
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((changes, adds, setup.synced_after))
}

/// The timestamp that starts a log line of the agent (tracing's default format).
fn log_time(line: &str) -> Option<jiff::Timestamp> {
    line.split_whitespace().next()?.parse().ok()
}

/// Initial sync of `n` services with `endpoints` each: (spawn to programmed, lists done to
/// programmed) in ms.
fn initial_sync(n: usize, endpoints: usize) -> Result<(f64, f64)> {
    let services = cluster::fillers(n, endpoints);
    let setup = Setup::start(&services)?;
    let log = strip_ansi(&setup.agent.log());
    let lists_done = log
        .lines()
        .filter(|l| l.contains("initial list done"))
        .filter_map(log_time)
        .max()
        .context("no `initial list done` in the agent log")?;
    let want = format!("maps updated services={n} ");
    let programmed = log
        .lines()
        .find(|l| l.contains(&want))
        .and_then(log_time)
        .context("no time on the agent's `maps updated` line")?;
    let after_lists = programmed.duration_since(lists_done).as_secs_f64() * 1e3;
    // Everything is in the kernel maps: every service, every backend.
    let maps = setup.maps()?;
    let in_map = maps.services.keys().filter(|k| k.is_ok()).count();
    ensure!(in_map == n, "services4 holds {in_map} services, not {n}");
    let slots = maps.backend_slots.keys().filter(|k| k.is_ok()).count();
    ensure!(
        slots == n * endpoints,
        "backend_slots4 holds {slots} backends, not {}",
        n * endpoints
    );
    Ok((ms(setup.synced_after), after_lists.max(0.001)))
}

pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &n in &settings.api_scales {
        let (mut changes, mut adds, synced) =
            events(n, settings.api_endpoints, settings.api_events)
                .with_context(|| format!("events at {n} services"))?;
        let (cs, as_) = (sorted(&changes), sorted(&adds));
        eprintln!(
            "api: {n} services: endpoint change p50 {:.2} ms p99 {:.2} ms; service added p50 {:.2} ms p99 {:.2} ms (agent synced in {:.2} s)",
            quantile(&cs, 0.5),
            quantile(&cs, 0.99),
            quantile(&as_, 0.5),
            quantile(&as_, 0.99),
            synced.as_secs_f64()
        );
        for (metric, values) in [
            ("endpoint_event", &mut changes),
            ("service_added", &mut adds),
        ] {
            let sorted = sorted(values);
            figures.push(Figure::new(
                "api",
                &format!("{metric}_p50"),
                "bpfproxy",
                n,
                "ms",
                vec![quantile(&sorted, 0.5)],
            ));
            figures.push(Figure::new(
                "api",
                &format!("{metric}_p99"),
                "bpfproxy",
                n,
                "ms",
                vec![quantile(&sorted, 0.99)],
            ));
            figures.push(Figure::new(
                "api",
                metric,
                "bpfproxy",
                n,
                "ms",
                std::mem::take(values),
            ));
        }
    }
    let n = settings.api_sync_services;
    let (mut total, mut after_lists) = (Vec::new(), Vec::new());
    for run in 0..settings.api_sync_runs {
        if testbed::stop_requested() {
            bail!("interrupted");
        }
        let (t, l) = initial_sync(n, settings.api_sync_endpoints)
            .with_context(|| format!("initial sync of {n} services"))?;
        eprintln!(
            "api: initial sync of {n} services x {} endpoints, run {run}: {t:.0} ms from agent start, {l:.0} ms after the lists",
            settings.api_sync_endpoints
        );
        total.push(t);
        after_lists.push(l);
    }
    notes.push(format!(
        "api: initial sync with {} endpoints per service; event figures with {} endpoints per service, {} events of each kind per scale",
        settings.api_sync_endpoints, settings.api_endpoints, settings.api_events
    ));
    figures.push(Figure::new(
        "api",
        "initial_sync",
        "bpfproxy",
        n,
        "ms",
        total,
    ));
    figures.push(Figure::new(
        "api",
        "initial_sync_after_lists",
        "bpfproxy",
        n,
        "ms",
        after_lists,
    ));
    Ok(figures)
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}
