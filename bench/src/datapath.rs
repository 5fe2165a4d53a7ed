//! Section 1: what `tc_ingress` costs per packet, with BPF_PROG_TEST_RUN, against the
//! `tc_floor` program of the same object measured in the same run.
//!
//! The object is loaded unpinned with the agent's own loader and programmed with the real
//! planner and `KernelMaps::apply`. The map sizes are the same at every scale (big enough
//! for the largest), so only the number of entries changes.
//!
//! `repeat` runs the program again and again on one skb, each run seeing what the previous
//! one wrote. The measured service is therefore its own backend (VIP:80 -> VIP:80): an
//! established packet is rewritten to the same tuple, and the next run takes the
//! established path again with the full rewrite (the helpers compute and store whatever the
//! values are, so the cost is that of any rewrite); a reply from the "backend" is rewritten
//! to come from the VIP, which is again the backend. Every repeated figure is checked
//! against the `stats` counter of the path it claims to measure.
//!
//! A new connection cannot simply be repeated (the first run creates the conntrack entry),
//! so it is measured two ways: as single runs (repeat 1) of SYNs from distinct source
//! ports, the figure being the median of the kernel-reported durations, against `tc_floor`
//! measured the same way, interleaved with them (a single run starts with cold caches); and
//! repeated, with a SYN+FIN: its entry is marked closing, so each run's SYN selects a
//! backend anew and creates the entries again (the new-connection path, counted as such,
//! plus a conntrack hit and the delete of the old reply entry: an upper bound).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use bpfproxy::{
    datapath::{
        Datapath, LoadOptions, MapSizes,
        loader::{PROG_TC_FLOOR, PROG_TC_INGRESS},
    },
    model::DesiredState,
    planner::{Capacity, MapState, plan},
};
use etherparse::PacketBuilder;
use proxy_common::{PROTO_TCP, reply_filter, stats};

use crate::{
    cluster::{self, SynthService},
    config::Settings,
    figures::{Figure, summary},
};

const TC_ACT_OK: u32 = 0;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The client of the established connection.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 240, 1, 1);
const CLIENT_PORT: u16 = 40_000;
/// A pod that is no service, for non-service packets.
const POD: Ipv4Addr = Ipv4Addr::new(10, 240, 2, 1);
const POD_PORT: u16 = 8443;

/// The object built by `cargo xtask build-ebpf` ($BPFPROXY_EBPF_OBJ, else the workspace's
/// build output); `None` loads the one embedded in the agent library.
pub use testbed::datapath::object_path;

/// Map sizes that fit `services` services of `endpoints` endpoints, with room for every
/// service's second backend table during a change, rounded up to powers of two.
pub fn sizes_for(services: usize, endpoints: usize) -> MapSizes {
    let services = (services + 16).next_power_of_two() as u32;
    MapSizes {
        services: services.max(1024),
        backend_slots: (services as usize * endpoints * 2).next_power_of_two() as u32,
        conntrack: 262_144,
    }
}

/// How long planning and writing the maps took, and how many writes.
#[derive(Clone, Copy, Debug)]
pub struct Programmed {
    pub plan: Duration,
    pub apply: Duration,
    pub ops: usize,
}

impl Programmed {
    pub fn total(&self) -> Duration {
        self.plan + self.apply
    }
}

/// The loaded object, its maps and the planner's mirror of them.
pub struct Loaded {
    pub dp: Datapath,
    pub state: MapState,
    pub capacity: Capacity,
}

impl Loaded {
    pub fn load(sizes: MapSizes) -> Result<Self> {
        Self::load_object(sizes, object_path())
    }

    /// Loads `object` (`None`: the one embedded in the agent library).
    pub fn load_object(sizes: MapSizes, object: Option<PathBuf>) -> Result<Self> {
        let opts = LoadOptions {
            object,
            pin_dir: None,
            sizes,
        };
        let dp = Datapath::load(&opts).with_context(|| {
            format!(
                "loading the eBPF object {:?} (root? built with `cargo xtask build-ebpf`?)",
                opts.object
            )
        })?;
        let state = dp.maps.read_state().context("reading the maps")?;
        Ok(Loaded {
            dp,
            state,
            capacity: Capacity {
                services: sizes.services,
                backend_slots: sizes.backend_slots,
            },
        })
    }

    /// Plans and applies `desired` as the agent does.
    pub fn program(&mut self, desired: &DesiredState) -> Result<Programmed> {
        let start = Instant::now();
        let (plan, refused) = plan(desired, &self.state, self.capacity);
        let planned = Instant::now();
        let report = self.dp.maps.apply(&plan, &mut self.state);
        let applied = Instant::now();
        if let Some(e) = refused.first() {
            bail!("{} services refused, e.g. {e}", refused.len());
        }
        if let Some(e) = report.failed.first() {
            bail!("{} steps failed, e.g. {e}", report.failed.len());
        }
        Ok(Programmed {
            plan: planned - start,
            apply: applied - planned,
            ops: report.ops,
        })
    }

    /// One BPF_PROG_TEST_RUN; returns the return code and the kernel's time per run.
    fn test_run(&mut self, prog: &str, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let mut out = vec![0u8; 2048];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        };
        let prog = self.dp.program_mut(prog)?;
        let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
        Ok((res.return_value, res.duration))
    }

    fn counter(&self, index: u32) -> u64 {
        self.dp.maps.counters()[index as usize].1
    }

    fn filter_bit(&self, addr: Ipv4Addr, port: u16) -> bool {
        let (word, mask) =
            reply_filter::word_and_mask(reply_filter::bit(addr.octets(), port, PROTO_TCP));
        self.state
            .reply_filter
            .get(word as usize)
            .is_some_and(|w| w & mask != 0)
    }

    /// Share of the reply-filter bits that are set.
    pub fn filter_fill(&self) -> f64 {
        let set: u32 = self.state.reply_filter.iter().map(|w| w.count_ones()).sum();
        f64::from(set) / f64::from(reply_filter::BITS)
    }

    /// Runs `frame` `repeat` times and checks that every run took the path counted by
    /// `stat`; returns ns per run.
    fn repeated(&mut self, frame: &[u8], repeat: u32, stat: u32, what: &str) -> Result<f64> {
        let before = self.counter(stat);
        let (ret, took) = self.test_run(PROG_TC_INGRESS, frame, repeat)?;
        let after = self.counter(stat);
        ensure!(ret == TC_ACT_OK, "{what}: tc_ingress returned {ret}");
        ensure!(
            after - before == u64::from(repeat),
            "{what}: {} of {repeat} runs took the {} path",
            after - before,
            stats::NAMES[stat as usize]
        );
        Ok(took.as_nanos() as f64)
    }
}

const PSH_ACK: u8 = 0x18;
const SYN: u8 = 0x02;
const FIN: u8 = 0x01;

fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 0x0101_0101, 64_240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & PSH_ACK == PSH_ACK {
        b = b.psh().ack(0x0202_0202);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("building a frame");
    v
}

/// The services of section 1: the self-backed measured service and `n - 1` fillers.
pub fn services(n: usize, endpoints: usize) -> Vec<SynthService> {
    let measured = SynthService {
        endpoints: vec![(cluster::MEASURED_VIP, cluster::MEASURED_PORT)],
        ..cluster::measured(&[])
    };
    cluster::with_measured(n, endpoints, measured)
}

/// A client tuple (address in 10.240.1.0/24, port) whose reply-filter bit is `set`.
fn tuple_with_filter_bit(l: &Loaded, set: bool) -> Option<(Ipv4Addr, u16)> {
    (2..=254u8)
        .flat_map(|host| (1024..=65_535u16).map(move |port| (host, port)))
        .map(|(host, port)| (Ipv4Addr::new(10, 240, 1, host), port))
        .find(|&(addr, port)| l.filter_bit(addr, port) == set)
}

/// The object programmed with `n` services, the measured connection open, and the frames
/// of the repeated figures: metric, frame, the counter of its path.
struct Prepared {
    l: Loaded,
    established: Vec<u8>,
    repeated: Vec<(&'static str, Vec<u8>, u32)>,
}

fn prepare(settings: &Settings, n: usize, notes: &mut Vec<String>) -> Result<Prepared> {
    prepare_object(settings, n, notes, object_path())
}

fn prepare_object(
    settings: &Settings,
    n: usize,
    notes: &mut Vec<String>,
    object: Option<PathBuf>,
) -> Result<Prepared> {
    let largest = settings
        .datapath_scales
        .iter()
        .copied()
        .max()
        .unwrap_or(n)
        .max(n);
    let mut l = Loaded::load_object(sizes_for(largest, settings.endpoints_per_service), object)?;
    let all = services(n, settings.endpoints_per_service);
    let p = l.program(&cluster::desired_state(&all))?;
    eprintln!(
        "  {n} services programmed ({} map writes, {:.0} ms); reply filter {:.1}% set",
        p.ops,
        p.total().as_secs_f64() * 1e3,
        l.filter_fill() * 100.0
    );
    notes.push(format!(
        "datapath, {n} services: reply filter {:.1}% set",
        l.filter_fill() * 100.0
    ));

    let vip = (cluster::MEASURED_VIP, cluster::MEASURED_PORT);
    let client = (CLIENT, CLIENT_PORT);
    // Open the measured connection.
    let syn = tcp_frame(client, vip, SYN, b"");
    let (ret, _) = l.test_run(PROG_TC_INGRESS, &syn, 1)?;
    ensure!(ret == TC_ACT_OK, "SYN: tc_ingress returned {ret}");
    let established = tcp_frame(client, vip, PSH_ACK, b"GET / HTTP/1.1\r\n\r\n");
    let reply = tcp_frame(vip, client, PSH_ACK, b"HTTP/1.1 200 OK\r\n\r\n");
    // Non-service packets whose source's reply-filter bit is clear (passed after the
    // service lookup and the filter read) and set (a conntrack lookup too). A filter with
    // every bit set has no clear tuple: then every non-service packet takes the second way.
    let miss = tuple_with_filter_bit(&l, false);
    if miss.is_none() {
        notes.push(format!(
            "datapath, {n} services: every reply-filter bit is set, so no non-service packet passes on the filter alone (no 'reply filter miss' figure)"
        ));
    }
    let hit = tuple_with_filter_bit(&l, true).context("no tuple with a set filter bit")?;
    // A SYN with FIN on a tuple whose entry is closing selects a backend anew on every run:
    // the new-connection path, plus a conntrack hit and the deletes of the old entries.
    let reopen = tcp_frame((CLIENT, CLIENT_PORT + 1), vip, SYN | FIN, b"");
    let (ret, _) = l.test_run(PROG_TC_INGRESS, &reopen, 1)?;
    ensure!(ret == TC_ACT_OK, "SYN+FIN: tc_ingress returned {ret}");

    let mut repeated: Vec<(&'static str, Vec<u8>, u32)> = Vec::new();
    if let Some(miss) = miss {
        repeated.push((
            "non_service",
            tcp_frame(miss, (POD, POD_PORT), PSH_ACK, b"data"),
            stats::PASS_NOT_SERVICE,
        ));
    }
    repeated.extend([
        (
            "non_service_filter_hit",
            tcp_frame(hit, (POD, POD_PORT), PSH_ACK, b"data"),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "established",
            established.clone(),
            stats::FORWARD_ESTABLISHED,
        ),
        ("reply", reply, stats::REPLY),
        ("new_connection_repeated", reopen, stats::FORWARD_NEW),
    ]);
    Ok(Prepared {
        l,
        established,
        repeated,
    })
}

/// Runs one repeated figure (`metric`) at `n` services again and again for `secs` seconds,
/// for a profiler watching (`perf record -a`); returns its ns per packet.
pub fn spin(settings: &Settings, metric: &str, n: usize, secs: f64) -> Result<f64> {
    let Prepared {
        mut l, repeated, ..
    } = prepare(settings, n, &mut Vec::new())?;
    let (_, frame, stat) = repeated
        .iter()
        .find(|(m, ..)| *m == metric)
        .with_context(|| {
            let names: Vec<&str> = repeated.iter().map(|(m, ..)| *m).collect();
            format!("no repeated figure {metric:?}; there are {names:?}")
        })?;
    let start = Instant::now();
    let mut ns = Vec::new();
    while start.elapsed().as_secs_f64() < secs && !testbed::stop_requested() {
        ns.push(l.repeated(frame, settings.datapath_repeat, *stat, metric)?);
    }
    Ok(summary(&ns).0)
}

/// The runs of one scale so far.
#[derive(Default)]
struct Runs {
    floor: Vec<f64>,
    floor_single: Vec<f64>,
    /// One list per repeated figure, in the order of `Prepared::repeated`.
    repeated: Vec<Vec<f64>>,
    new_connection: Vec<f64>,
}

/// Run `run` of every figure at one scale.
fn one_run(settings: &Settings, run: usize, p: &mut Prepared, runs: &mut Runs) -> Result<()> {
    let repeat = settings.datapath_repeat;
    let l = &mut p.l;
    let (ret, t) = l.test_run(PROG_TC_FLOOR, &p.established, repeat)?;
    ensure!(ret == TC_ACT_OK, "tc_floor returned {ret}");
    runs.floor.push(t.as_nanos() as f64);
    runs.repeated.resize(p.repeated.len(), Vec::new());
    for ((metric, frame, stat), slot) in p.repeated.iter().zip(&mut runs.repeated) {
        slot.push(l.repeated(frame, repeat, *stat, metric)?);
    }

    // New connections: single runs from distinct source ports, one source address per
    // run, interleaved with single runs of the floor.
    let vip = (cluster::MEASURED_VIP, cluster::MEASURED_PORT);
    let source = Ipv4Addr::new(10, 240, 3, (run % 250) as u8 + 1);
    let before = l.counter(stats::FORWARD_NEW);
    let mut new_ns = Vec::with_capacity(settings.new_conn_samples);
    let mut floor_ns = Vec::with_capacity(settings.new_conn_samples);
    for i in 0..settings.new_conn_samples {
        let syn = tcp_frame((source, 1024 + i as u16), vip, SYN, b"");
        let (ret, t) = l.test_run(PROG_TC_INGRESS, &syn, 1)?;
        ensure!(
            ret == TC_ACT_OK,
            "new connection: tc_ingress returned {ret}"
        );
        new_ns.push(t.as_nanos() as f64);
        let (_, t) = l.test_run(PROG_TC_FLOOR, &syn, 1)?;
        floor_ns.push(t.as_nanos() as f64);
    }
    let created = l.counter(stats::FORWARD_NEW) - before;
    ensure!(
        created == settings.new_conn_samples as u64,
        "new connection: {created} of {} SYNs took the new-connection path",
        settings.new_conn_samples
    );
    runs.new_connection.push(summary(&new_ns).0);
    runs.floor_single.push(summary(&floor_ns).0);
    Ok(())
}

/// `BPFPROXY_BASELINE_EBPF_OBJ`: another build of the object (e.g. the one before a change)
/// measured in the same run, side by side, as implementation `bpfproxy-baseline`. It must
/// keep the map layouts this agent library reads.
pub fn baseline_object_path() -> Option<PathBuf> {
    std::env::var_os("BPFPROXY_BASELINE_EBPF_OBJ").map(PathBuf::from)
}

fn figures_of(n: usize, implementation: &str, p: &Prepared, runs: Runs) -> Vec<Figure> {
    // Each object's own floor, so figure keys stay unique.
    let floor = match implementation.strip_prefix("bpfproxy") {
        Some(suffix) => format!("tc_floor{suffix}"),
        None => "tc_floor".to_string(),
    };
    let mut out = vec![
        Figure::new(
            "datapath",
            "floor",
            &floor,
            n,
            "ns/packet",
            runs.floor.clone(),
        ),
        Figure::new(
            "datapath",
            "floor_single",
            &floor,
            n,
            "ns/packet",
            runs.floor_single.clone(),
        ),
    ];
    for ((metric, ..), values) in p.repeated.iter().zip(runs.repeated) {
        out.push(
            Figure::new("datapath", metric, implementation, n, "ns/packet", values)
                .with_ratio(&format!("{floor} floor"), &runs.floor),
        );
    }
    out.push(
        Figure::new(
            "datapath",
            "new_connection",
            implementation,
            n,
            "ns/packet",
            runs.new_connection,
        )
        .with_ratio(&format!("{floor} floor_single"), &runs.floor_single),
    );
    out
}

/// Every scale is loaded and programmed first (one object each), then the runs go round
/// the scales, so that the scales are compared side by side as the figures are.
pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    let mut objects = vec![("bpfproxy", object_path())];
    if let Some(baseline) = baseline_object_path() {
        notes.push(format!(
            "datapath: bpfproxy-baseline is {} (BPFPROXY_BASELINE_EBPF_OBJ), measured in the same run",
            baseline.display()
        ));
        objects.push(("bpfproxy-baseline", Some(baseline)));
    }
    let mut scales = Vec::new();
    for &n in &settings.datapath_scales {
        for (implementation, object) in &objects {
            eprintln!("datapath: {n} services ({implementation})");
            let p = prepare_object(settings, n, notes, object.clone())
                .with_context(|| format!("{n} services ({implementation})"))?;
            scales.push((n, *implementation, p, Runs::default()));
        }
    }
    for run in 0..settings.datapath_runs {
        for (n, _, p, runs) in &mut scales {
            if testbed::stop_requested() {
                bail!("interrupted");
            }
            one_run(settings, run, p, runs).with_context(|| format!("{n} services"))?;
        }
        eprintln!("datapath: run {run} done");
    }
    Ok(scales
        .into_iter()
        .flat_map(|(n, implementation, p, runs)| figures_of(n, implementation, &p, runs))
        .collect())
}
