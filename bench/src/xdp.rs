//! Section 6: what `xdp_nodeport` (the external view) costs per packet, with
//! BPF_PROG_TEST_RUN, against the `xdp_floor` program of the same object measured in the
//! same run.
//!
//! The object is loaded unpinned (`testbed::datapath::DatapathHarness`) and programmed with
//! the agent's own map writes: a NodePort served by a backend on this node (DNAT only), one
//! served by a backend on another node (DNAT + SNAT), the node's SNAT address and port
//! range, with `NODE_F_FIB_FORWARD` off (the FIB answer depends on the machine's routes;
//! the fixtures check that path in a namespace of their own).
//!
//! As in section 1, a repeated run sees what the previous one wrote, so each repeated
//! figure uses a connection whose translation gives back the same tuple: the local
//! NodePort's backend is the NodePort itself; the SNAT-ed connection's conntrack entries
//! are written directly with the backend being the frontend and the SNAT source being the
//! client (so an established packet and a reply are rewritten, in full, to themselves).
//! Every repeated figure is checked against the `stats` counter of its path.
//!
//! IPv6 (`services6`, `conntrack6`, `node_cfg6`) is measured the same way in the same run,
//! with the same frontends on the node's IPv6 address (the `*6` metrics).
//!
//! New connections cannot be repeated: they are single runs (repeat 1) of SYNs from
//! distinct source ports, the figure being the median of the kernel-reported durations,
//! against `xdp_floor` single runs interleaved with them; the conntrack entries they
//! created are removed after each run, so every run allocates SNAT ports from the same,
//! empty range.

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData};
use etherparse::PacketBuilder;
use proxy_common::{
    PROTO_TCP,
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_SNAT, Ct4Key, Ct4Value, Ct6Key, Ct6Value},
    service::{
        BACKEND_LOCAL, Backend4, Backend6, BackendSlotKey, NodeConfig4, NodeConfig6, SCHED_RANDOM,
        SCOPE_EXTERNAL, SVC_F_NODE_PORT, SVC_F_SNAT, Svc4Key, Svc6Key, SvcValue,
    },
    stats,
};
use testbed::datapath::{
    DatapathHarness, MapSizes, PROG_XDP_FLOOR, PROG_XDP_NODEPORT, XDP_PASS, ct_key,
};

use crate::{
    config::Settings,
    figures::{Figure, summary},
};

pub const SECTION: &str = "xdp";
/// The figures are of one small set of frontends; recorded at this "services" scale.
pub const SERVICES: usize = 1;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE: [u8; 4] = [192, 168, 50, 2];
const CLIENT: [u8; 4] = [192, 168, 50, 100];
const CPORT: u16 = 40_000;
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const POD_PORT: u16 = 8080;
const NP_LOCAL: u16 = 30_080;
const NP_REMOTE: u16 = 30_081;
/// The SNAT-ed connection measured repeatedly: its frontend is its own backend.
const NP_SNAT_SELF: u16 = 30_082;
const SNAT_MIN: u16 = 20_000;
const SNAT_MAX: u16 = 29_999;
/// The port of the SNAT reply measured repeatedly (in the range).
const SNAT_SELF_PORT: u16 = 20_000;

/// The IPv6 twins: node fd00:251::2, client fd00:251::100, a pod on another node.
const NODE6: [u8; 16] = [0xfd, 0, 2, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT6: [u8; 16] = [0xfd, 0, 2, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
const REMOTE_POD6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

const SYN: u8 = 0x02;
const PSH_ACK: u8 = 0x18;

fn tcp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 0x0101_0101, 64_240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & PSH_ACK == PSH_ACK {
        b = b.psh().ack(0x0202_0202);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("building a frame");
    v
}

fn tcp6_frame(src: ([u8; 16], u16), dst: ([u8; 16], u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 0x0101_0101, 64_240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & PSH_ACK == PSH_ACK {
        b = b.psh().ack(0x0202_0202);
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("building a frame");
    v
}

/// A SYN of a new connection from the `i`th source port of `run`, to `port` of the node
/// (IPv4 or IPv6).
fn new_syn(v6: bool, run: usize, i: usize, port: u16) -> Vec<u8> {
    let sport = 1024 + i as u16;
    if v6 {
        let mut source = CLIENT6;
        source[13] = 0xfa;
        source[14] = (run % 250) as u8;
        tcp6_frame((source, sport), (NODE6, port), SYN, b"")
    } else {
        let source = [10, 250, (run % 250) as u8, 1];
        tcp_frame((source, sport), (NODE, port), SYN, b"")
    }
}

/// The IPv6 maps the figures need, found through `xdp_nodeport`.
struct Maps6 {
    services: HashMap<MapData, Svc6Key, SvcValue>,
    slots: HashMap<MapData, BackendSlotKey, Backend6>,
    ct: HashMap<MapData, Ct6Key, Ct6Value>,
}

fn maps6(h: &mut DatapathHarness) -> Result<Maps6> {
    let mut m = |name: &str| h.prog_map(PROG_XDP_NODEPORT, name);
    Ok(Maps6 {
        services: HashMap::try_from(Map::HashMap(m("services6"))).context("services6")?,
        slots: HashMap::try_from(Map::HashMap(m("backend_slots6"))).context("backend_slots6")?,
        ct: HashMap::try_from(Map::LruHashMap(m("conntrack6"))).context("conntrack6")?,
    })
}

/// An IPv6 NodePort (random scheduler) over one backend, in table `svc_id * 2`.
fn add_nodeport6(m: &mut Maps6, svc_id: u32, port: u16, backend: Backend6) -> Result<()> {
    let slot = BackendSlotKey {
        table: svc_id * 2,
        slot: 0,
    };
    m.slots.insert(slot, backend, 0)?;
    let key = Svc6Key {
        addr: NODE6,
        port,
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    };
    let value = SvcValue {
        svc_id,
        table: svc_id * 2,
        backend_count: 1,
        scheduler: SCHED_RANDOM,
        flags: SVC_F_NODE_PORT | SVC_F_SNAT,
        _pad: 0,
        affinity_timeout_s: 0,
    };
    m.services.insert(key, value, 0)?;
    Ok(())
}

fn ct6_key(src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> Ct6Key {
    Ct6Key {
        saddr: src.0,
        daddr: dst.0,
        sport: src.1,
        dport: dst.1,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

fn nodeport(port: u16) -> Svc4Key {
    Svc4Key {
        addr: NODE,
        port,
        proto: PROTO_TCP,
        scope: SCOPE_EXTERNAL,
    }
}

fn backend(addr: [u8; 4], port: u16, flags: u8) -> Backend4 {
    Backend4 {
        addr,
        port,
        flags,
        weight: 1,
    }
}

/// The repeated figures: metric, frame, the counter of its path.
const REPEATED: [&str; 7] = [
    "non_service",
    "established_dnat",
    "established_snat",
    "snat_reply",
    "established_dnat6",
    "established_snat6",
    "snat_reply6",
];

/// The single-run figures: metric, frontend port, IPv6.
const NEW: [(&str, u16, bool); 4] = [
    ("new_dnat", NP_LOCAL, false),
    ("new_snat", NP_REMOTE, false),
    ("new_dnat6", NP_LOCAL, true),
    ("new_snat6", NP_REMOTE, true),
];

struct Prepared {
    h: DatapathHarness,
    m6: Maps6,
    repeated: Vec<(&'static str, Vec<u8>, u32)>,
    /// Conntrack keys of the repeated connections (kept when a run's new ones are removed).
    keep: Vec<Ct4Key>,
    keep6: Vec<Ct6Key>,
}

fn prepare() -> Result<Prepared> {
    let mut h = DatapathHarness::load(MapSizes {
        services: 1024,
        backend_slots: 4096,
        conntrack: 262_144,
    });
    h.set_node_config(NodeConfig4 {
        snat_addr: NODE,
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags: 0,
    });
    // eTP Cluster, the backend on this node (the NodePort itself, so a repeated DNAT
    // gives the same tuple).
    h.add_frontend(
        1,
        nodeport(NP_LOCAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(NODE, NP_LOCAL, BACKEND_LOCAL)],
    );
    // eTP Cluster, the backend on another node.
    h.add_frontend(
        2,
        nodeport(NP_REMOTE),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(REMOTE_POD, POD_PORT, 0)],
    );
    h.add_frontend(
        3,
        nodeport(NP_SNAT_SELF),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(REMOTE_POD, POD_PORT, 0)],
    );
    let entry = |dir, nat: ([u8; 4], u16), nat2: ([u8; 4], u16), svc_id| Ct4Value {
        nat_addr: nat.0,
        nat_port: nat.1,
        dir,
        flags: CT_FLAG_SNAT,
        svc_id,
        counted: 0,
        last_seen_ns: 0,
        nat2_addr: nat2.0,
        nat2_port: nat2.1,
        _pad: 0,
    };
    // client -> NODE:NP_SNAT_SELF becomes client -> NODE:NP_SNAT_SELF (backend = frontend,
    // SNAT source = client).
    let fwd = ct_key(CLIENT, CPORT, NODE, NP_SNAT_SELF, PROTO_TCP);
    h.put_ct(
        fwd,
        entry(CT_DIR_FORWARD, (NODE, NP_SNAT_SELF), (CLIENT, CPORT), 3),
    );
    // REMOTE_POD -> NODE:SNAT_SELF_PORT becomes the same (frontend = backend, client =
    // SNAT source).
    let rev = ct_key(REMOTE_POD, POD_PORT, NODE, SNAT_SELF_PORT, PROTO_TCP);
    h.put_ct(
        rev,
        entry(
            CT_DIR_REPLY,
            (REMOTE_POD, POD_PORT),
            (NODE, SNAT_SELF_PORT),
            3,
        ),
    );

    // Open the local connection.
    let syn = tcp_frame((CLIENT, CPORT), (NODE, NP_LOCAL), SYN, b"");
    let run = h.try_run_xdp(PROG_XDP_NODEPORT, &syn, 1, None)?;
    ensure!(
        run.ret == XDP_PASS,
        "SYN: xdp_nodeport returned {}",
        run.ret
    );
    let keep = vec![
        fwd,
        rev,
        ct_key(CLIENT, CPORT, NODE, NP_LOCAL, PROTO_TCP),
        ct_key(NODE, NP_LOCAL, CLIENT, CPORT, PROTO_TCP),
    ];
    let data = b"GET / HTTP/1.1\r\n\r\n";
    let repeated = vec![
        (
            REPEATED[0],
            tcp_frame((CLIENT, CPORT), (NODE, 22), PSH_ACK, data),
            stats::XDP_PASS,
        ),
        (
            REPEATED[1],
            tcp_frame((CLIENT, CPORT), (NODE, NP_LOCAL), PSH_ACK, data),
            stats::XDP_FORWARD_ESTABLISHED,
        ),
        (
            REPEATED[2],
            tcp_frame((CLIENT, CPORT), (NODE, NP_SNAT_SELF), PSH_ACK, data),
            stats::XDP_FORWARD_ESTABLISHED,
        ),
        (
            REPEATED[3],
            tcp_frame(
                (REMOTE_POD, POD_PORT),
                (NODE, SNAT_SELF_PORT),
                PSH_ACK,
                b"HTTP/1.1 200 OK\r\n\r\n",
            ),
            stats::XDP_SNAT_REPLY,
        ),
    ];
    let (m6, keep6) = prepare6(&mut h)?;
    let mut repeated = repeated;
    repeated.extend([
        (
            REPEATED[4],
            tcp6_frame((CLIENT6, CPORT), (NODE6, NP_LOCAL), PSH_ACK, data),
            stats::XDP_FORWARD_ESTABLISHED,
        ),
        (
            REPEATED[5],
            tcp6_frame((CLIENT6, CPORT), (NODE6, NP_SNAT_SELF), PSH_ACK, data),
            stats::XDP_FORWARD_ESTABLISHED,
        ),
        (
            REPEATED[6],
            tcp6_frame(
                (REMOTE_POD6, POD_PORT),
                (NODE6, SNAT_SELF_PORT),
                PSH_ACK,
                b"HTTP/1.1 200 OK\r\n\r\n",
            ),
            stats::XDP_SNAT_REPLY,
        ),
    ]);
    Ok(Prepared {
        h,
        m6,
        repeated,
        keep,
        keep6,
    })
}

/// The IPv6 frontends and connections, as `prepare` makes the IPv4 ones.
fn prepare6(h: &mut DatapathHarness) -> Result<(Maps6, Vec<Ct6Key>)> {
    let mut m = maps6(h)?;
    let mut node: Array<MapData, NodeConfig6> =
        Array::try_from(Map::Array(h.prog_map(PROG_XDP_NODEPORT, "node_cfg6")))
            .context("node_cfg6")?;
    node.set(
        0,
        NodeConfig6 {
            snat_addr: NODE6,
            snat_port_min: SNAT_MIN,
            snat_port_max: SNAT_MAX,
            flags: 0,
        },
        0,
    )?;
    let b6 = |addr, port, flags| Backend6 {
        addr,
        port,
        flags,
        weight: 1,
    };
    add_nodeport6(&mut m, 11, NP_LOCAL, b6(NODE6, NP_LOCAL, BACKEND_LOCAL))?;
    add_nodeport6(&mut m, 12, NP_REMOTE, b6(REMOTE_POD6, POD_PORT, 0))?;
    add_nodeport6(&mut m, 13, NP_SNAT_SELF, b6(REMOTE_POD6, POD_PORT, 0))?;
    let entry = |dir, nat: ([u8; 16], u16), nat2: ([u8; 16], u16)| Ct6Value {
        nat_addr: nat.0,
        nat2_addr: nat2.0,
        nat_port: nat.1,
        nat2_port: nat2.1,
        dir,
        flags: CT_FLAG_SNAT,
        _pad: 0,
        svc_id: 13,
        counted: 0,
        last_seen_ns: 0,
    };
    let fwd = ct6_key((CLIENT6, CPORT), (NODE6, NP_SNAT_SELF));
    m.ct.insert(
        fwd,
        entry(CT_DIR_FORWARD, (NODE6, NP_SNAT_SELF), (CLIENT6, CPORT)),
        0,
    )?;
    let rev = ct6_key((REMOTE_POD6, POD_PORT), (NODE6, SNAT_SELF_PORT));
    m.ct.insert(
        rev,
        entry(
            CT_DIR_REPLY,
            (REMOTE_POD6, POD_PORT),
            (NODE6, SNAT_SELF_PORT),
        ),
        0,
    )?;
    let syn = tcp6_frame((CLIENT6, CPORT), (NODE6, NP_LOCAL), SYN, b"");
    let run = h.try_run_xdp(PROG_XDP_NODEPORT, &syn, 1, None)?;
    ensure!(
        run.ret == XDP_PASS,
        "IPv6 SYN: xdp_nodeport returned {}",
        run.ret
    );
    let keep = vec![
        fwd,
        rev,
        ct6_key((CLIENT6, CPORT), (NODE6, NP_LOCAL)),
        ct6_key((NODE6, NP_LOCAL), (CLIENT6, CPORT)),
    ];
    Ok((m, keep))
}

/// Runs `frame` through `prog` `repeat` times; the return code and ns per run.
fn test_run(h: &mut DatapathHarness, prog: &str, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let run = h.try_run_xdp(prog, frame, repeat, None)?;
    Ok((run.ret, run.duration.as_nanos() as f64))
}

#[derive(Default)]
struct Runs {
    floor: Vec<f64>,
    floor_single: Vec<f64>,
    repeated: Vec<Vec<f64>>,
    new: Vec<Vec<f64>>,
}

fn one_run(settings: &Settings, run: usize, p: &mut Prepared, runs: &mut Runs) -> Result<()> {
    let repeat = settings.datapath_repeat;
    let h = &mut p.h;
    let (ret, ns) = test_run(h, PROG_XDP_FLOOR, &p.repeated[1].1, repeat)?;
    ensure!(ret == XDP_PASS, "xdp_floor returned {ret}");
    runs.floor.push(ns);
    runs.repeated.resize(p.repeated.len(), Vec::new());
    for ((metric, frame, stat), slot) in p.repeated.iter().zip(&mut runs.repeated) {
        let before = h.counter(*stat);
        let (ret, ns) = test_run(h, PROG_XDP_NODEPORT, frame, repeat)?;
        ensure!(ret == XDP_PASS, "{metric}: xdp_nodeport returned {ret}");
        let took = h.counter(*stat) - before;
        ensure!(
            took == u64::from(repeat),
            "{metric}: {took} of {repeat} runs took the {} path",
            stats::NAMES[*stat as usize]
        );
        slot.push(ns);
    }

    // New connections, single runs from distinct source ports, interleaved with single
    // runs of the floor.
    runs.new.resize(NEW.len(), Vec::new());
    let mut floor_ns = Vec::new();
    for ((metric, port, v6), slot) in NEW.iter().zip(&mut runs.new) {
        let before = h.counter(stats::XDP_FORWARD_NEW);
        let mut ns = Vec::with_capacity(settings.new_conn_samples);
        for i in 0..settings.new_conn_samples {
            let syn = new_syn(*v6, run, i, *port);
            let (ret, t) = test_run(h, PROG_XDP_NODEPORT, &syn, 1)?;
            ensure!(ret == XDP_PASS, "{metric}: xdp_nodeport returned {ret}");
            ns.push(t);
            let (_, t) = test_run(h, PROG_XDP_FLOOR, &syn, 1)?;
            floor_ns.push(t);
        }
        let created = h.counter(stats::XDP_FORWARD_NEW) - before;
        ensure!(
            created == settings.new_conn_samples as u64,
            "{metric}: {created} of {} SYNs took the new-connection path",
            settings.new_conn_samples
        );
        slot.push(summary(&ns).0);
    }
    runs.floor_single.push(summary(&floor_ns).0);
    // Back to the repeated connections only, so the next run starts from the same maps.
    let stale: Vec<Ct4Key> =
        h.dp.maps
            .conntrack_entries()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !p.keep.contains(k))
            .collect();
    for k in stale {
        let _ = h.dp.maps.conntrack.remove(&k);
    }
    let stale6: Vec<Ct6Key> =
        p.m6.ct
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !p.keep6.contains(k))
            .collect();
    for k in stale6 {
        let _ = p.m6.ct.remove(&k);
    }
    Ok(())
}

pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    eprintln!("xdp: preparing");
    let mut p = prepare()?;
    let mut runs = Runs::default();
    for run in 0..settings.datapath_runs {
        if testbed::stop_requested() {
            bail!("interrupted");
        }
        one_run(settings, run, &mut p, &mut runs)?;
        eprintln!("xdp: run {run} done");
    }
    notes.push(
        "xdp: NODE_F_FIB_FORWARD off, so the SNAT figures do not include bpf_fib_lookup"
            .to_string(),
    );
    let n = SERVICES;
    let mut out = vec![
        Figure::new(
            SECTION,
            "floor",
            "xdp_floor",
            n,
            "ns/packet",
            runs.floor.clone(),
        ),
        Figure::new(
            SECTION,
            "floor_single",
            "xdp_floor",
            n,
            "ns/packet",
            runs.floor_single.clone(),
        ),
    ];
    for ((metric, ..), values) in p.repeated.iter().zip(runs.repeated) {
        out.push(
            Figure::new(SECTION, metric, "bpfproxy", n, "ns/packet", values)
                .with_ratio("xdp_floor floor", &runs.floor),
        );
    }
    for ((metric, ..), values) in NEW.iter().zip(runs.new) {
        out.push(
            Figure::new(SECTION, metric, "bpfproxy", n, "ns/packet", values)
                .with_ratio("xdp_floor floor_single", &runs.floor_single),
        );
    }
    Ok(out)
}
