//! Prometheus metrics (`/metrics` on `--metrics-addr`), with prometheus-client.
//!
//! Two kinds: what the agent's loop records when it reconciles (sync duration, last
//! successful sync, services and backends programmed, source errors), kept in
//! prometheus-client metrics; and what the datapath counts, read from the pinned maps at
//! scrape time by [`DatapathCollector`] on the HTTP thread, with its own map handles, so a
//! scrape never waits for the loop and the loop never waits for a scrape.

use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    sync::{LazyLock, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use std::os::fd::AsFd as _;

use aya::maps::{MapData, MapInfo, MapType};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use proxy_common::{
    maps,
    service::{MAGLEV_SIZE, SCHED_MAGLEV},
    stats::SvcCounters,
};

use crate::{
    datapath::{KernelMaps, count, loader},
    model::Protocol,
    planner::{MapState, meta_to_name},
};

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "bpfproxy";

/// `Content-Type` of `/metrics` (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Errors of the source of Services and EndpointSlices, by source and reason. Global, so
/// the Kubernetes watchers can count without a handle.
static SOURCE_ERRORS: LazyLock<Family<[(&'static str, &'static str); 2], Counter>> =
    LazyLock::new(Family::default);

/// Counts one error of the Services/EndpointSlices source: `source` is `kubernetes` or
/// `manifests`; `reason` e.g. `watch` (a list/watch request failed), `decode` (an object
/// that does not decode), `parse` (a manifest file that does not parse).
pub fn source_error(source: &'static str, reason: &'static str) {
    SOURCE_ERRORS
        .get_or_create(&[("source", source), ("reason", reason)])
        .inc();
}

/// What the reconcile loop records.
#[derive(Clone)]
pub struct SyncMetrics {
    duration: Histogram,
    last_success: Gauge<f64, AtomicU64>,
    services: Gauge,
    backends: Gauge,
}

impl SyncMetrics {
    /// A reconcile that started at `started` programmed the maps from a complete source;
    /// `state` is the maps after it.
    pub fn synced(&self, started: Instant, state: &MapState) {
        self.duration.observe(started.elapsed().as_secs_f64());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        self.last_success.set(now.as_secs_f64());
        self.services.set(state.services.len() as i64);
        self.backends.set(
            state
                .services
                .values()
                .map(|s| s.backends.len() as i64)
                .sum(),
        );
    }
}

/// The registry behind `/metrics`.
pub struct Metrics {
    registry: Registry,
    pub sync: SyncMetrics,
}

impl Metrics {
    /// The agent's metrics, and those of the datapath read by `collector` (if any).
    pub fn new(collector: Option<DatapathCollector>) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let sync = SyncMetrics {
            // 0.5 ms .. 8 s.
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            last_success: Gauge::default(),
            services: Gauge::default(),
            backends: Gauge::default(),
        };
        registry.register(
            "sync_duration_seconds",
            "Time of one reconcile that programmed the maps: model, plan and map writes",
            sync.duration.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time when the maps were last programmed from a complete source",
            sync.last_success.clone(),
        );
        registry.register(
            "services_programmed",
            "Service frontends (ClusterIP, port, protocol) in the services map",
            sync.services.clone(),
        );
        registry.register(
            "backends_programmed",
            "Backends over all service frontends in the maps",
            sync.backends.clone(),
        );
        registry.register(
            "source_errors",
            "Errors reading Services and EndpointSlices (source: kubernetes or manifests)",
            SOURCE_ERRORS.clone(),
        );
        if let Some(collector) = collector {
            registry.register_collector(Box::new(collector));
        }
        Metrics { registry, sync }
    }

    /// The text of `/metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// Traffic of one service port (frontends with the same labels summed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: String,
    pub counters: SvcCounters,
}

/// Use of one hash map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

/// The datapath's state at one scrape.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `stats` counters summed over CPUs, by `stats::NAMES`.
    pub stats: Vec<(&'static str, u64)>,
    pub services: Vec<ServiceTraffic>,
    pub conntrack_entries: Option<u64>,
    pub maps: Vec<MapFill>,
}

/// The reason label of a `stats` counter that counts packets not served: `reject_*`,
/// `err_*`, `drop_*` and malformed packets. Generic, so counters added to `stats` later
/// show up without touching this.
pub fn drop_reason(stat: &str) -> Option<&str> {
    ["reject_", "err_", "drop_"]
        .iter()
        .find_map(|p| stat.strip_prefix(p))
        .or_else(|| (stat == "pass_malformed").then_some("malformed"))
}

/// Writes `snap` as metrics.
pub fn encode_snapshot(snap: &Snapshot, mut enc: DescriptorEncoder) -> fmt::Result {
    {
        let mut family = enc.encode_descriptor(
            "datapath_packets",
            "Packets seen by tc_ingress, by the path they took (stats map)",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in &snap.stats {
            let labels = [("path", *name)];
            ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
        }
    }
    {
        let mut family = enc.encode_descriptor(
            "datapath_drops",
            "Packets to a service (or malformed) that were not served, by reason",
            None,
            MetricType::Counter,
        )?;
        let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
        for (name, value) in &snap.stats {
            if let Some(reason) = drop_reason(name) {
                *reasons.entry(reason).or_default() += value;
            }
        }
        for (reason, value) in reasons {
            let labels = [("reason", reason)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
    }
    let service_labels = |s: &ServiceTraffic| {
        vec![
            ("namespace", s.namespace.clone()),
            ("name", s.name.clone()),
            ("port_name", s.port_name.clone()),
            ("protocol", s.protocol.clone()),
        ]
    };
    for (metric, help, forward, reply) in [
        (
            "service_packets",
            "Packets of a service port: forward (to the frontend) and reply (back from a backend)",
            (|c: &SvcCounters| c.packets) as fn(&SvcCounters) -> u64,
            (|c: &SvcCounters| c.reply_packets) as fn(&SvcCounters) -> u64,
        ),
        (
            "service_bytes",
            "Bytes (whole frames at tc) of a service port, forward and reply",
            |c| c.bytes,
            |c| c.reply_bytes,
        ),
    ] {
        let mut family = enc.encode_descriptor(metric, help, None, MetricType::Counter)?;
        for s in &snap.services {
            for (direction, value) in [
                ("forward", forward(&s.counters)),
                ("reply", reply(&s.counters)),
            ] {
                let mut labels = service_labels(s);
                labels.push(("direction", direction.to_string()));
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut family = enc.encode_descriptor(
            "service_new_connections",
            "Connections to a service port that the datapath gave a backend",
            None,
            MetricType::Counter,
        )?;
        for s in &snap.services {
            let labels = service_labels(s);
            ConstCounter::new(s.counters.new_connections).encode(family.encode_family(&labels)?)?;
        }
    }
    if let Some(entries) = snap.conntrack_entries {
        let family = enc.encode_descriptor(
            "conntrack_entries",
            "Entries in the conntrack maps, conntrack4 and conntrack6 (two per tracked connection)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(entries as i64).encode(family)?;
    }
    for (metric, help, value) in [
        (
            "map_entries",
            "Entries in a hash map of the datapath",
            (|m: &MapFill| m.entries as f64) as fn(&MapFill) -> f64,
        ),
        (
            "map_max_entries",
            "Capacity of a hash map of the datapath",
            |m| f64::from(m.max_entries),
        ),
        (
            "map_fill_ratio",
            "Entries / capacity of a hash map of the datapath (LRU maps evict near 1)",
            |m| {
                if m.max_entries == 0 {
                    0.0
                } else {
                    m.entries as f64 / f64::from(m.max_entries)
                }
            },
        ),
    ] {
        let mut family = enc.encode_descriptor(metric, help, None, MetricType::Gauge)?;
        for m in &snap.maps {
            let labels = [("map", m.map)];
            ConstGauge::new(value(m)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// How long counts of the big kernel-written maps are reused: counting a full conntrack
/// map copies its 262,144 entries out of the kernel, not something to do at every scrape.
const COUNT_CACHE: Duration = Duration::from_secs(10);

/// Maps the kernel writes, whose entries are counted by walking their keys (the maps the
/// agent writes are counted from `services4` and `services6`).
const COUNTED_MAPS: [&str; 8] = [
    maps::CONNTRACK4,
    maps::AFFINITY4,
    maps::COUNTED4,
    maps::BACKEND_CONNS4,
    maps::CONNTRACK6,
    maps::AFFINITY6,
    maps::COUNTED6,
    maps::BACKEND_CONNS6,
];

/// Entries of each counted map.
type MapCounts = Vec<(&'static str, u64)>;

/// Reads the datapath's counters from the pinned maps at each scrape.
pub struct DatapathCollector {
    maps: KernelMaps,
    /// (map, max_entries) of each hash map.
    capacities: Vec<(&'static str, u32)>,
    /// (map, handle, key size, value size) of the maps in [`COUNTED_MAPS`].
    counted: Vec<(&'static str, MapData, usize, usize)>,
    cache: Mutex<Option<(Instant, MapCounts)>>,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatapathCollector")
            .field("capacities", &self.capacities)
            .finish_non_exhaustive()
    }
}

impl DatapathCollector {
    /// Opens the maps pinned under `pin_dir` (handles of its own, apart from the loop's).
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let maps = KernelMaps::open_pinned(pin_dir)?;
        let mut capacities = Vec::new();
        for name in loader::map_names() {
            let info = MapInfo::from_pin(pin_dir.join(name))?;
            if matches!(info.map_type(), Ok(MapType::Hash | MapType::LruHash)) {
                capacities.push((name, info.max_entries()));
            }
        }
        let mut counted = Vec::new();
        for name in COUNTED_MAPS {
            let data = MapData::from_pin(pin_dir.join(name))?;
            let info = data.info()?;
            counted.push((
                name,
                data,
                info.key_size() as usize,
                info.value_size() as usize,
            ));
        }
        Ok(DatapathCollector {
            maps,
            capacities,
            counted,
            cache: Mutex::new(None),
        })
    }

    /// Reads everything a scrape shows.
    pub fn snapshot(&self) -> Snapshot {
        let mut by_labels: BTreeMap<(String, String, String, String), SvcCounters> =
            BTreeMap::new();
        let (mut services, mut slots, mut maglev_tables) = ([0u64; 2], [0u64; 2], 0u64);
        // Both families' services, as (family index, protocol number, value).
        let entries4 = self
            .maps
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (0, k.proto, v));
        let entries6 = self
            .maps
            .services6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (1, k.proto, v));
        for (family, proto, value) in entries4.chain(entries6) {
            services[family] += 1;
            slots[family] += u64::from(value.backend_count);
            if value.scheduler == SCHED_MAGLEV && value.backend_count > 0 {
                maglev_tables += 1;
            }
            let (namespace, name, port_name) = self
                .maps
                .meta
                .get(&value.svc_id, 0)
                .map(|m| meta_to_name(&m))
                .unwrap_or_default();
            let protocol =
                Protocol::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string());
            let counters = self
                .maps
                .svc_counters
                .get(&value.svc_id, 0)
                .map(|per_cpu| sum(per_cpu.iter()))
                .unwrap_or_default();
            let total = by_labels
                .entry((namespace, name, port_name, protocol))
                .or_default();
            *total = add(total, &counters);
        }
        let counted = self.counted_entries();
        let entries = |map: &str| -> u64 {
            match map {
                maps::SERVICES4 => services[0],
                maps::SERVICES6 => services[1],
                maps::SVC_META => services[0] + services[1],
                maps::BACKEND_SLOTS4 => slots[0],
                maps::BACKEND_SLOTS6 => slots[1],
                maps::MAGLEV => maglev_tables * u64::from(MAGLEV_SIZE),
                other => counted
                    .iter()
                    .find(|(m, _)| *m == other)
                    .map_or(0, |(_, n)| *n),
            }
        };
        Snapshot {
            stats: self.maps.counters(),
            services: by_labels
                .into_iter()
                .map(
                    |((namespace, name, port_name, protocol), counters)| ServiceTraffic {
                        namespace,
                        name,
                        port_name,
                        protocol,
                        counters,
                    },
                )
                .collect(),
            conntrack_entries: Some(entries(maps::CONNTRACK4) + entries(maps::CONNTRACK6)),
            maps: self
                .capacities
                .iter()
                .map(|&(map, max_entries)| MapFill {
                    map,
                    entries: entries(map),
                    max_entries,
                })
                .collect(),
        }
    }

    /// Entries of the kernel-written maps, counted at most every [`COUNT_CACHE`].
    fn counted_entries(&self) -> Vec<(&'static str, u64)> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, counts)) = cache.as_ref()
            && at.elapsed() < COUNT_CACHE
        {
            return counts.clone();
        }
        let counts: Vec<(&'static str, u64)> = self
            .counted
            .iter()
            .map(|(map, data, key_size, value_size)| {
                let n = count::hash_entries(data.fd().as_fd(), *key_size, *value_size)
                    .unwrap_or_else(|e| {
                        // Kernels before 5.6 have no batch lookup: walk the keys.
                        tracing::debug!(map, "batch lookup: {e}; walking keys");
                        self.walk_keys(map)
                    });
                (*map, n)
            })
            .collect();
        *cache = Some((Instant::now(), counts.clone()));
        counts
    }
}

impl DatapathCollector {
    fn walk_keys(&self, map: &str) -> u64 {
        (match map {
            maps::CONNTRACK4 => self.maps.conntrack.keys().count(),
            maps::AFFINITY4 => self.maps.affinity.keys().count(),
            maps::COUNTED4 => self.maps.counted.keys().count(),
            maps::CONNTRACK6 => self.maps.conntrack6.keys().count(),
            maps::AFFINITY6 => self.maps.affinity6.keys().count(),
            maps::COUNTED6 => self.maps.counted6.keys().count(),
            maps::BACKEND_CONNS6 => self.maps.backend_conns6.keys().count(),
            _ => self.maps.backend_conns.keys().count(),
        }) as u64
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        encode_snapshot(&self.snapshot(), encoder)
    }
}

fn add(a: &SvcCounters, b: &SvcCounters) -> SvcCounters {
    SvcCounters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_connections: a.new_connections + b.new_connections,
        reply_packets: a.reply_packets + b.reply_packets,
        reply_bytes: a.reply_bytes + b.reply_bytes,
    }
}

fn sum<'a>(per_cpu: impl Iterator<Item = &'a SvcCounters>) -> SvcCounters {
    per_cpu.fold(SvcCounters::default(), |acc, c| add(&acc, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::stats;

    /// A collector of a fixed snapshot, to test the rendering without a kernel.
    #[derive(Debug)]
    struct Fixed(Snapshot);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            encode_snapshot(&self.0, encoder)
        }
    }

    fn render(snap: Snapshot) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(Fixed(snap)));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            stats: stats::NAMES
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, i as u64 * 10))
                .collect(),
            services: vec![ServiceTraffic {
                namespace: "default".into(),
                name: "myapp".into(),
                port_name: "http".into(),
                protocol: "TCP".into(),
                counters: SvcCounters {
                    packets: 12,
                    bytes: 1200,
                    new_connections: 3,
                    reply_packets: 9,
                    reply_bytes: 900,
                },
            }],
            conntrack_entries: Some(6),
            maps: vec![MapFill {
                map: maps::CONNTRACK4,
                entries: 6,
                max_entries: 24,
            }],
        }
    }

    #[test]
    fn every_stats_counter_is_a_datapath_path() {
        let text = render(snapshot());
        assert!(
            text.contains("# TYPE bpfproxy_datapath_packets_total counter\n"),
            "{text}"
        );
        for (i, name) in stats::NAMES.iter().enumerate() {
            let line = format!(
                "bpfproxy_datapath_packets_total{{path=\"{name}\"}} {}\n",
                i * 10
            );
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn drops_by_reason_come_from_the_stats_names() {
        assert_eq!(drop_reason("reject_no_backend"), Some("no_backend"));
        assert_eq!(drop_reason("err_conntrack_full"), Some("conntrack_full"));
        assert_eq!(drop_reason("drop_source_range"), Some("source_range"));
        assert_eq!(drop_reason("pass_malformed"), Some("malformed"));
        assert_eq!(drop_reason("forward_new"), None);
        assert_eq!(drop_reason("pass_not_service"), None);

        let text = render(snapshot());
        let value = |name: &str| stats::NAMES.iter().position(|n| *n == name).unwrap() * 10;
        for (reason, stat) in [
            ("no_backend", "reject_no_backend"),
            ("conntrack_full", "err_conntrack_full"),
            ("malformed", "pass_malformed"),
            ("source_range", "drop_source_range"),
            ("snat_ports", "err_snat_ports"),
        ] {
            let line = format!(
                "bpfproxy_datapath_drops_total{{reason=\"{reason}\"}} {}\n",
                value(stat)
            );
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn service_counters_carry_the_service_labels() {
        let text = render(snapshot());
        let labels = r#"namespace="default",name="myapp",port_name="http",protocol="TCP""#;
        for line in [
            format!("bpfproxy_service_packets_total{{{labels},direction=\"forward\"}} 12\n"),
            format!("bpfproxy_service_packets_total{{{labels},direction=\"reply\"}} 9\n"),
            format!("bpfproxy_service_bytes_total{{{labels},direction=\"forward\"}} 1200\n"),
            format!("bpfproxy_service_bytes_total{{{labels},direction=\"reply\"}} 900\n"),
            format!("bpfproxy_service_new_connections_total{{{labels}}} 3\n"),
            "bpfproxy_conntrack_entries 6\n".to_string(),
            "bpfproxy_map_entries{map=\"conntrack4\"} 6.0\n".to_string(),
            "bpfproxy_map_max_entries{map=\"conntrack4\"} 24.0\n".to_string(),
            "bpfproxy_map_fill_ratio{map=\"conntrack4\"} 0.25\n".to_string(),
        ] {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn the_agent_metrics_follow_the_conventions() {
        let metrics = Metrics::new(None);
        metrics.sync.synced(Instant::now(), &MapState::default());
        source_error("manifests", "parse");
        let text = metrics.render();
        for line in [
            "# TYPE bpfproxy_sync_duration_seconds histogram\n",
            "bpfproxy_sync_duration_seconds_count 1\n",
            "# TYPE bpfproxy_last_sync_timestamp_seconds gauge\n",
            "bpfproxy_services_programmed 0\n",
            "bpfproxy_backends_programmed 0\n",
            "# TYPE bpfproxy_source_errors_total counter\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            text.lines().any(|l| l.starts_with(
                "bpfproxy_source_errors_total{source=\"manifests\",reason=\"parse\"} "
            )),
            "{text}"
        );
        let last: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("bpfproxy_last_sync_timestamp_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(last > 1.7e9, "{last}");
        // Every sample is bpfproxy_*.
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("bpfproxy_"), "{line}");
        }
    }
}
