//! Conntrack lifecycle through BPF_PROG_TEST_RUN: the datapath's last-seen stamps, the
//! agent's collector expiring idle connections (both directions, counts released), and
//! the full-table behaviour (LRU: the idle go first; a lost connection is counted).
//!
//! The kernel clock cannot be moved, so connections are made old by writing their
//! `last_seen_ns` through the map from here, then the agent's own collector runs
//! (`bpfproxy::conntrack_gc::collect`). Needs root and the object built by
//! `cargo xtask build-ebpf` (or at $BPFPROXY_EBPF_OBJ).

use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions};
use bpfproxy::{
    conntrack_gc::{self, Timeouts, monotonic_coarse_ns},
    datapath::{Datapath, LoadOptions, MapSizes, loader::PROG_TC_INGRESS},
    planner::{MapOp, MapState},
};
use etherparse::PacketBuilder;
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_FLAG_CLOSING, CT_FLAG_REPLIED, Ct4Key, Ct4Value, LAST_SEEN_REFRESH_NS},
    reply_filter,
    service::{
        Backend4, BackendSlotKey, SCHED_LC, SCHED_RANDOM, SCOPE_CLUSTER_IP, Svc4Key, SvcValue,
    },
    stats,
};
use testbed::datapath::{
    ACK, CLIENT_MAC, FIN, NODE_MAC, SYN, TC_ACT_OK, fixture_plan, object_path, tcp_frame,
};
const S: u64 = 1_000_000_000;

const CLIENT: [u8; 4] = [10, 244, 1, 5];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND: [u8; 4] = [10, 244, 2, 7];
const DNS_VIP: [u8; 4] = [10, 96, 0, 53];
const DNS_BACKEND: [u8; 4] = [10, 244, 3, 9];

struct Harness {
    dp: Datapath,
    state: MapState,
}

impl Harness {
    fn load(conntrack: u32) -> Harness {
        let opts = LoadOptions {
            object: object_path(),
            pin_dir: None,
            sizes: MapSizes {
                services: 64,
                backend_slots: 256,
                conntrack,
            },
        };
        let dp = Datapath::load(&opts)
            .unwrap_or_else(|e| panic!("loading {:?} (root? built?): {e}", opts.object));
        let state = dp.maps.read_state().expect("reading the maps");
        let mut h = Harness { dp, state };
        h.add_service(1, (VIP, 80), PROTO_TCP, SCHED_LC, (BACKEND, 8080));
        h.add_service(
            2,
            (DNS_VIP, 53),
            PROTO_UDP,
            SCHED_RANDOM,
            (DNS_BACKEND, 5353),
        );
        h
    }

    fn apply(&mut self, prologue: Vec<MapOp>, ops: Vec<MapOp>) {
        let plan = fixture_plan(prologue, ops);
        let report = self.dp.maps.apply(&plan, &mut self.state);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    /// One backend in table `svc_id * 2`, its reply-filter bit, then the service.
    fn add_service(
        &mut self,
        svc_id: u32,
        (addr, port): ([u8; 4], u16),
        proto: u8,
        scheduler: u8,
        (baddr, bport): ([u8; 4], u16),
    ) {
        let (index, mask) = reply_filter::word_and_mask(reply_filter::bit(baddr, bport, proto));
        let word = self.state.reply_filter[index as usize] | mask;
        let ops = vec![
            MapOp::PutBackend {
                key: BackendSlotKey {
                    table: svc_id * 2,
                    slot: 0,
                },
                value: Backend4 {
                    addr: baddr,
                    port: bport,
                    flags: 0,
                    weight: 1,
                }
                .into(),
            },
            MapOp::PutService {
                key: Svc4Key {
                    addr,
                    port,
                    proto,
                    scope: SCOPE_CLUSTER_IP,
                }
                .into(),
                value: SvcValue {
                    svc_id,
                    table: svc_id * 2,
                    backend_count: 1,
                    scheduler,
                    flags: 0,
                    _pad: 0,
                    affinity_timeout_s: 0,
                },
            },
        ];
        self.apply(vec![MapOp::SetReplyFilterWord { index, word }], ops);
    }

    fn run(&mut self, frame: &[u8]) {
        let mut out = vec![0u8; 2048];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let prog = self.dp.program_mut(PROG_TC_INGRESS).expect("program");
        let res = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(res.return_value, TC_ACT_OK);
    }

    fn ct(&self, key: Ct4Key) -> Option<Ct4Value> {
        self.dp.maps.conntrack.get(&key, 0).ok()
    }

    /// Sets an entry's last-seen time `age_s` seconds before now.
    fn age(&mut self, key: Ct4Key, age_s: u64) {
        let mut v = self.ct(key).expect("entry to age");
        v.last_seen_ns = monotonic_coarse_ns() - age_s * S;
        self.dp
            .maps
            .conntrack
            .insert(key, v, 0)
            .expect("writing the entry");
    }

    fn stat(&self, index: u32) -> u64 {
        self.dp.maps.counters()[index as usize].1
    }

    fn active_connections(&self) -> u64 {
        self.dp
            .maps
            .connection_counts()
            .iter()
            .map(|(_, c)| c.active())
            .sum()
    }
}

fn key(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8) -> Ct4Key {
    Ct4Key {
        saddr: src.0,
        daddr: dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
        _pad: [0; 3],
    }
}

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Vec<u8> {
    tcp_frame(src, dst, flags, b"")
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, b"q")
        .unwrap();
    v
}

/// A TCP connection from client port `port`: SYN, and with `answered` the SYN-ACK.
fn open_tcp(h: &mut Harness, port: u16, answered: bool) -> (Ct4Key, Ct4Key) {
    h.run(&tcp((CLIENT, port), (VIP, 80), SYN));
    if answered {
        h.run(&tcp((BACKEND, 8080), (CLIENT, port), SYN | ACK));
    }
    (
        key((CLIENT, port), (VIP, 80), PROTO_TCP),
        key((BACKEND, 8080), (CLIENT, port), PROTO_TCP),
    )
}

/// A UDP flow from client port `port`: a query and its answer.
fn open_udp(h: &mut Harness, port: u16) -> (Ct4Key, Ct4Key) {
    h.run(&udp((CLIENT, port), (DNS_VIP, 53)));
    h.run(&udp((DNS_BACKEND, 5353), (CLIENT, port)));
    (
        key((CLIENT, port), (DNS_VIP, 53), PROTO_UDP),
        key((DNS_BACKEND, 5353), (CLIENT, port), PROTO_UDP),
    )
}

/// The coarse clock ticks every few ms: a stamp read around a run may be a tick off.
const TICK_SLACK: u64 = 20_000_000;

#[test]
fn last_seen_is_stamped_and_refreshed_only_when_over_a_second_old() {
    let mut h = Harness::load(4096);
    let before = monotonic_coarse_ns();
    let (fwd, rev) = open_tcp(&mut h, 40000, false);
    let after = monotonic_coarse_ns();
    let f = h.ct(fwd).unwrap();
    assert!(
        f.last_seen_ns + TICK_SLACK >= before && f.last_seen_ns <= after + TICK_SLACK,
        "created now: {} not in [{before}, {after}]",
        f.last_seen_ns
    );
    assert_eq!(h.ct(rev).unwrap().last_seen_ns, f.last_seen_ns);
    assert_eq!(h.ct(rev).unwrap().flags & CT_FLAG_REPLIED, 0);

    // The backend answers: the reply entry is marked replied.
    h.run(&tcp((BACKEND, 8080), (CLIENT, 40000), SYN | ACK));
    assert_eq!(h.ct(rev).unwrap().flags, CT_FLAG_REPLIED);

    // Stamped 5 s ago: the next packet refreshes it, in both directions.
    h.age(fwd, 5);
    h.age(rev, 5);
    let before = monotonic_coarse_ns();
    h.run(&tcp((CLIENT, 40000), (VIP, 80), ACK));
    h.run(&tcp((BACKEND, 8080), (CLIENT, 40000), ACK));
    for k in [fwd, rev] {
        assert!(
            h.ct(k).unwrap().last_seen_ns + TICK_SLACK >= before,
            "refreshed after 5 s idle"
        );
    }

    // Stamped half a second ago: left as it is (no write on the hot path).
    let mut v = h.ct(fwd).unwrap();
    v.last_seen_ns = monotonic_coarse_ns() - LAST_SEEN_REFRESH_NS / 2;
    h.dp.maps.conntrack.insert(fwd, v, 0).unwrap();
    h.run(&tcp((CLIENT, 40000), (VIP, 80), ACK));
    assert_eq!(h.ct(fwd).unwrap().last_seen_ns, v.last_seen_ns);
}

#[test]
fn collector_expires_idle_connections_by_state_and_releases_counts() {
    let mut h = Harness::load(4096);
    let t = Timeouts {
        tcp_established: Duration::from_secs(300),
        tcp_closing: Duration::from_secs(10),
        tcp_syn: Duration::from_secs(60),
        udp: Duration::from_secs(60),
    };
    // lc counts every TCP connection of service 1.
    let busy = open_tcp(&mut h, 40001, true);
    let idle = open_tcp(&mut h, 40002, true);
    let syn_only = open_tcp(&mut h, 40003, false);
    let young_syn = open_tcp(&mut h, 40004, false);
    let closing = open_tcp(&mut h, 40005, true);
    h.run(&tcp((CLIENT, 40005), (VIP, 80), FIN | ACK));
    assert_eq!(
        h.ct(closing.0).unwrap().flags & CT_FLAG_CLOSING,
        CT_FLAG_CLOSING
    );
    let idle_udp = open_udp(&mut h, 53001);
    let recent_udp = open_udp(&mut h, 53002);
    // The FIN released the closing connection's count; four remain open.
    assert_eq!(h.active_connections(), 4);

    // Ages: the client side idle, the backend side recent, keeps `busy` alive.
    for (k, age) in [
        (busy.0, 400),
        (busy.1, 100),
        (idle.0, 400),
        (idle.1, 301),
        (syn_only.0, 61),
        (syn_only.1, 61),
        (young_syn.0, 30),
        (young_syn.1, 30),
        (closing.0, 11),
        (closing.1, 11),
        (idle_udp.0, 61),
        (idle_udp.1, 61),
        (recent_udp.0, 59),
        (recent_udp.1, 59),
    ] {
        h.age(k, age);
    }
    let report = conntrack_gc::collect(&mut h.dp, &t).expect("collector");
    assert_eq!(report.entries, 14);
    assert_eq!(report.expired, 4, "{report:?}");
    assert_eq!(
        report.released, 2,
        "the idle and the SYN-only TCP connections held counts"
    );
    for (name, conn, kept) in [
        ("busy", busy, true),
        ("idle", idle, false),
        ("syn_only", syn_only, false),
        ("young_syn", young_syn, true),
        ("closing", closing, false),
        ("idle_udp", idle_udp, false),
        ("recent_udp", recent_udp, true),
    ] {
        assert_eq!(h.ct(conn.0).is_some(), kept, "{name}: forward entry");
        assert_eq!(h.ct(conn.1).is_some(), kept, "{name}: reply entry");
    }
    assert_eq!(h.active_connections(), 2, "busy and young_syn still count");
    assert!(h.dp.maps.counted.get(&idle.0, 0).is_err(), "token gone");

    // A second pass finds nothing more; the idle connection's next packet is counted as
    // a lost connection and given a backend again.
    assert_eq!(conntrack_gc::collect(&mut h.dp, &t).unwrap().expired, 0);
    let lost = h.stat(stats::CT_MISS_MIDSTREAM);
    let new = h.stat(stats::FORWARD_NEW);
    h.run(&tcp((CLIENT, 40002), (VIP, 80), ACK));
    assert_eq!(h.stat(stats::CT_MISS_MIDSTREAM), lost + 1);
    assert_eq!(h.stat(stats::FORWARD_NEW), new);
    assert!(h.ct(idle.0).is_some());
}

/// A full table (LRU) makes room by evicting the least recently used entries: a
/// connection with traffic in both directions keeps its entries while hundreds of new
/// connections come; idle ones go, and their next packet is counted.
#[test]
fn full_table_evicts_idle_connections_first_and_counts_the_loss() {
    const SIZE: u32 = 512;
    let mut h = Harness::load(SIZE);
    let busy = open_tcp(&mut h, 30000, true);
    let first_idle = open_tcp(&mut h, 30001, true);
    for port in 30002..30002 + 4 * SIZE as u16 {
        open_tcp(&mut h, port, false);
        // The busy connection's traffic, both ways.
        h.run(&tcp((CLIENT, 30000), (VIP, 80), ACK));
        h.run(&tcp((BACKEND, 8080), (CLIENT, 30000), ACK));
    }
    let entries = h.dp.maps.conntrack_entries().len();
    assert!(
        entries <= SIZE as usize,
        "{entries} entries in a map of {SIZE}"
    );
    assert!(h.ct(busy.0).is_some(), "busy forward entry kept");
    assert!(h.ct(busy.1).is_some(), "busy reply entry kept");
    assert!(
        h.ct(first_idle.0).is_none(),
        "the oldest idle connection was evicted"
    );
    assert_eq!(
        h.stat(stats::ERR_CONNTRACK_FULL),
        0,
        "LRU made room every time"
    );

    let lost = h.stat(stats::CT_MISS_MIDSTREAM);
    h.run(&tcp((CLIENT, 30001), (VIP, 80), ACK));
    assert_eq!(h.stat(stats::CT_MISS_MIDSTREAM), lost + 1);
}
