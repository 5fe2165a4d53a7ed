//! Scheduler and session-affinity fixtures for `tc_ingress`, run through
//! BPF_PROG_TEST_RUN on crafted TCP packets.
//!
//! Services are programmed the way the agent does it (a `DesiredState` with its
//! scheduling, `planner::plan`, `KernelMaps::apply`), so these also check that the
//! planner's scheduler, weights and Maglev tables reach the kernel. Counters of lc/sed/nq
//! are set up by writing `backend_conns4` directly (a test-only shortcut), and the
//! counters' lifecycle is driven by real packets. Needs root and the built object, like
//! `packet_fixtures.rs`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpfproxy::{
    model::{
        DesiredService, DesiredState, Endpoint, Frontend, Protocol, Scheduler, Scheduling,
        ServicePortName,
    },
    planner::{Capacity, plan},
};
use etherparse::{SlicedPacket, TransportSlice};
use proxy_common::{
    PROTO_TCP,
    conntrack::Ct4Key,
    service::{AffinityKey, BackendConns, BackendConnsKey, SCOPE_CLUSTER_IP, Svc4Key},
    stats,
};
use testbed::datapath::{ACK, DatapathHarness, FIN, MapSizes, RST, SYN, tcp_frame};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

/// Round robin keeps its position per CPU: keep this thread on one.
fn pin_to_one_cpu() {
    let mut set = nix::sched::CpuSet::new();
    let cpu = nix::sched::sched_getcpu().unwrap_or(0);
    set.set(cpu).expect("cpu set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pinning");
}

struct Harness {
    bpf: DatapathHarness,
    desired: DesiredState,
}

/// The object, its maps and the planner's mirror (`h.dp`, `h.state`) are the shared
/// harness's.
impl std::ops::Deref for Harness {
    type Target = DatapathHarness;
    fn deref(&self) -> &DatapathHarness {
        &self.bpf
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut DatapathHarness {
        &mut self.bpf
    }
}

fn backend_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2 + (i / 250) as u8, (i % 250) as u8 + 1)
}

impl Harness {
    fn load() -> Harness {
        pin_to_one_cpu();
        let bpf = DatapathHarness::load(MapSizes {
            services: 64,
            backend_slots: 4096,
            conntrack: 131_072,
        });
        Harness {
            bpf,
            desired: DesiredState::default(),
        }
    }

    /// Serves VIP:PORT/TCP with `backends` (10.244.2.1.. as `backend_ip`), scheduled by
    /// `scheduler`, with `weights` and ClientIP affinity `affinity_s` (0: none).
    fn serve(
        &mut self,
        backends: &[Ipv4Addr],
        scheduler: Scheduler,
        weights: &[(Ipv4Addr, u8)],
        affinity_s: u32,
    ) {
        let frontend = Frontend::cluster(VIP, PORT, Protocol::Tcp);
        let mut endpoints: Vec<Endpoint> = backends
            .iter()
            .map(|&addr| Endpoint {
                addr: addr.into(),
                port: BACKEND_PORT,
                terminating: false,
                local: false,
            })
            .collect();
        endpoints.sort();
        self.desired.services.insert(
            frontend,
            DesiredService {
                frontend,
                name: ServicePortName {
                    namespace: "fixtures".into(),
                    name: "sched".into(),
                    port_name: String::new(),
                    protocol: Protocol::Tcp,
                },
                endpoints,
                affinity_timeout_s: affinity_s,
                kind: Default::default(),
                flags: 0,
                source_ranges: Vec::new(),
            },
        );
        self.desired.scheduling.insert(
            frontend,
            Scheduling {
                scheduler,
                weights: weights.iter().map(|&(a, w)| (a.into(), w)).collect(),
            },
        );
        let capacity = Capacity {
            services: 64,
            backend_slots: 4096,
        };
        let (p, errors) = plan(&self.desired, &self.bpf.state, capacity);
        assert!(errors.is_empty(), "{errors:?}");
        self.bpf.apply_plan(&p);
    }

    fn svc_id(&self) -> u32 {
        self.bpf.state.services[&svc_key().into()].value.svc_id
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.bpf.run(frame)
    }

    /// Sends a client packet to the VIP; returns the backend address it went to.
    fn send(&mut self, client: (Ipv4Addr, u16), flags: u8) -> Ipv4Addr {
        let (ret, out) = self.run(&tcp(client, (VIP, PORT), flags));
        assert_eq!(ret, 0, "TC_ACT_OK");
        let (dst, dport) = destination(&out);
        assert_eq!(dport, BACKEND_PORT, "DNAT to the backend port");
        dst
    }

    /// A new connection (SYN) from `client`; returns its backend.
    fn connect(&mut self, client: (Ipv4Addr, u16)) -> Ipv4Addr {
        let before = self.counter(stats::FORWARD_NEW);
        let b = self.send(client, SYN);
        assert_eq!(
            self.counter(stats::FORWARD_NEW),
            before + 1,
            "a new connection"
        );
        b
    }

    /// A packet from `backend` to `client` on an existing connection.
    fn reply(&mut self, backend: Ipv4Addr, client: (Ipv4Addr, u16), flags: u8) {
        let (ret, out) = self.run(&tcp((backend, BACKEND_PORT), client, flags));
        assert_eq!(ret, 0);
        assert_eq!(source(&out), (VIP, PORT), "SNAT back to the VIP");
    }

    fn counter(&self, index: u32) -> u64 {
        self.bpf.counter(index)
    }

    fn conns(&self, backend: Ipv4Addr) -> BackendConns {
        let key = conns_key(self.svc_id(), backend);
        self.dp.maps.backend_conns.get(&key, 0).unwrap_or_default()
    }

    fn set_conns(&mut self, backend: Ipv4Addr, open: u64) {
        let key = conns_key(self.svc_id(), backend);
        let value = BackendConns {
            opened: open,
            closed: 0,
        };
        self.dp.maps.backend_conns.insert(key, value, 0).unwrap();
    }

    fn clear_conntrack(&mut self) {
        let keys: Vec<Ct4Key> = self
            .dp
            .maps
            .conntrack
            .keys()
            .filter_map(Result::ok)
            .collect();
        for k in keys {
            let _ = self.dp.maps.conntrack.remove(&k);
        }
    }
}

fn svc_key() -> Svc4Key {
    Svc4Key {
        addr: VIP.octets(),
        port: PORT,
        proto: PROTO_TCP,
        scope: SCOPE_CLUSTER_IP,
    }
}

fn conns_key(svc_id: u32, backend: Ipv4Addr) -> BackendConnsKey {
    BackendConnsKey {
        svc_id,
        addr: backend.octets(),
        port: BACKEND_PORT,
        _pad: 0,
    }
}

fn fwd_key(client: (Ipv4Addr, u16)) -> Ct4Key {
    Ct4Key {
        saddr: client.0.octets(),
        daddr: VIP.octets(),
        sport: client.1,
        dport: PORT,
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    tcp_frame((src.0.octets(), src.1), (dst.0.octets(), dst.1), flags, &[])
}

fn destination(frame: &[u8]) -> (Ipv4Addr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    (ip.header().destination_addr(), t.destination_port())
}

fn source(frame: &[u8]) -> (Ipv4Addr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    (ip.header().source_addr(), t.source_port())
}

fn three() -> Vec<Ipv4Addr> {
    (0..3).map(backend_ip).collect()
}

fn client(i: u32) -> (Ipv4Addr, u16) {
    let c = 0x0af4_0000_u32 + 256 + i / 50_000 * 65_536 + (i % 50_000) / 200;
    (Ipv4Addr::from(c), 20_000 + (i % 200) as u16)
}

// ---------------------------------------------------------------------------------------

#[test]
fn rr_cycles_exactly() {
    let mut h = Harness::load();
    let backends = three();
    h.serve(&backends, Scheduler::RR, &[], 0);
    let first = h.connect((CLIENT, 30_000));
    let start = backends.iter().position(|b| *b == first).unwrap();
    for i in 1..30u16 {
        let got = h.connect((CLIENT, 30_000 + i));
        assert_eq!(
            got,
            backends[(start + i as usize) % 3],
            "connection {i} breaks the cycle"
        );
    }
}

#[test]
fn sh_maps_a_source_to_one_backend_and_spreads_sources() {
    let mut h = Harness::load();
    let backends = three();
    h.serve(&backends, Scheduler::SH, &[], 0);
    let mine = h.connect((CLIENT, 31_000));
    for port in 31_001..31_030 {
        assert_eq!(h.connect((CLIENT, port)), mine, "same source, same backend");
    }
    let mut per: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for i in 0..300u32 {
        let c = Ipv4Addr::from(0x0af4_0a00_u32 + i);
        *per.entry(h.connect((c, 40_000))).or_default() += 1;
    }
    assert_eq!(per.len(), 3, "{per:?}");
    for (b, n) in &per {
        assert!(*n >= 60, "{b} got {n} of 300 sources: {per:?}");
    }
}

#[test]
fn dh_maps_a_frontend_to_one_backend() {
    let mut h = Harness::load();
    h.serve(&three(), Scheduler::DH, &[], 0);
    let first = h.connect(client(0));
    for i in 1..50 {
        assert_eq!(h.connect(client(i * 997)), first);
    }
}

#[test]
fn lc_sed_nq_choose_the_least_loaded_given_the_counts() {
    let b = three();
    // (scheduler, weights, open connections, expected choice)
    let cases: [(Scheduler, [u8; 3], [u64; 3], usize); 6] = [
        (Scheduler::LC, [1, 1, 1], [5, 2, 7], 1),
        (Scheduler::LC, [1, 10, 1], [0, 1, 5], 0),
        (Scheduler::SED, [1, 10, 1], [0, 1, 5], 1),
        (Scheduler::NQ, [1, 10, 1], [0, 1, 5], 0),
        (Scheduler::NQ, [1, 10, 1], [1, 1, 5], 1),
        (Scheduler::SED, [3, 1, 1], [3, 1, 2], 0),
    ];
    for (n, (sched, weights, open, want)) in cases.into_iter().enumerate() {
        let mut h = Harness::load();
        let w: Vec<(Ipv4Addr, u8)> = b.iter().copied().zip(weights).collect();
        h.serve(&b, sched, &w, 0);
        for (backend, k) in b.iter().zip(open) {
            h.set_conns(*backend, k);
        }
        // Several new connections in a row while nothing closes: each goes to the least
        // loaded as counted at that moment, starting with `want`.
        let got = h.connect((CLIENT, 32_000));
        assert_eq!(
            got, b[want],
            "case {n}: {sched} weights {weights:?} open {open:?}"
        );
        assert_eq!(h.conns(got).active(), open[want] + 1, "case {n}: counted");
    }
}

#[test]
fn lc_spreads_equal_loads_and_follows_the_counts() {
    let mut h = Harness::load();
    let b = three();
    h.serve(&b, Scheduler::LC, &[], 0);
    // Held-open connections: each new one goes to a backend with the fewest.
    for i in 0..30u16 {
        h.connect((CLIENT, 33_000 + i));
        let open: Vec<u64> = b.iter().map(|x| h.conns(*x).active()).collect();
        let (min, max) = (open.iter().min().unwrap(), open.iter().max().unwrap());
        assert!(max - min <= 1, "after {} connections: {open:?}", i + 1);
    }
}

#[test]
fn connection_counts_return_to_zero_after_any_mix_of_closes() {
    let mut h = Harness::load();
    let b = three();
    h.serve(&b, Scheduler::LC, &[], 0);
    let mut conns = Vec::new();
    for i in 0..60u16 {
        let c = (CLIENT, 34_000 + i);
        let be = h.connect(c);
        conns.push((c, be));
    }
    let total: u64 = b.iter().map(|x| h.conns(*x).active()).sum();
    assert_eq!(total, 60);
    for (i, &(c, be)) in conns.iter().enumerate() {
        // A retransmitted SYN on a live connection counts nothing.
        h.send(c, SYN);
        h.reply(be, c, SYN | ACK);
        h.send(c, ACK);
        match i % 6 {
            // FIN both ways, both orders; repeated FINs.
            0 => {
                h.send(c, FIN | ACK);
                h.reply(be, c, FIN | ACK);
                h.send(c, ACK);
            }
            1 => {
                h.reply(be, c, FIN | ACK);
                h.send(c, FIN | ACK);
                h.send(c, FIN | ACK);
            }
            // RST from either side, then more RSTs.
            2 => {
                h.send(c, RST);
                h.reply(be, c, RST);
            }
            3 => h.reply(be, c, RST | ACK),
            // The tuple is reused by a new connection, which then closes.
            4 => {
                h.send(c, FIN | ACK);
                h.reply(be, c, FIN | ACK);
                let be2 = h.connect(c);
                h.send(c, FIN | ACK);
                h.reply(be2, c, FIN | ACK);
            }
            // The conntrack entries are evicted without any FIN: the agent's collector.
            _ => {
                let fwd = fwd_key(c);
                let _ = h.dp.maps.conntrack.remove(&fwd);
            }
        }
    }
    let open: Vec<u64> = b.iter().map(|x| h.conns(*x).active()).collect();
    assert_eq!(
        open.iter().sum::<u64>(),
        10,
        "only the evicted ones: {open:?}"
    );
    let report = h.collect_connection_counts();
    assert_eq!(report.released, 10);
    for x in &b {
        let c = h.conns(*x);
        assert_eq!(c.active(), 0, "{x}: {c:?}");
        assert_eq!(c.opened, c.closed, "{x}: {c:?}");
    }
    assert_eq!(h.dp.maps.counted.keys().count(), 0, "no token left");
    // A second pass finds nothing more to do.
    let again = h.collect_connection_counts();
    assert_eq!(again.released, 0);
}

#[test]
fn counters_of_a_removed_backend_drain_and_go() {
    let mut h = Harness::load();
    let b = three();
    h.serve(&b, Scheduler::LC, &[], 0);
    let c = (CLIENT, 35_000);
    let be = h.connect(c);
    let rest: Vec<Ipv4Addr> = b.iter().copied().filter(|x| *x != be).collect();
    h.serve(&rest, Scheduler::LC, &[], 0);
    // Still open: the counter stays.
    h.collect_connection_counts();
    assert_eq!(h.conns(be).active(), 1);
    // The established connection still reaches it and closes.
    assert_eq!(h.send(c, ACK), be);
    h.send(c, FIN | ACK);
    assert_eq!(h.conns(be).active(), 0);
    let report = h.collect_connection_counts();
    assert_eq!(report.removed, 1);
    let key = conns_key(h.svc_id(), be);
    assert!(h.dp.maps.backend_conns.get(&key, 0).is_err());
}

#[test]
fn maglev_spreads_evenly_and_a_removal_moves_only_that_backends_flows() {
    const BACKENDS: u32 = 10;
    const FLOWS: u32 = 20_000;
    let mut h = Harness::load();
    let all: Vec<Ipv4Addr> = (0..BACKENDS).map(backend_ip).collect();
    h.serve(&all, Scheduler::MAGLEV, &[], 0);
    let before: Vec<Ipv4Addr> = (0..FLOWS).map(|i| h.connect(client(i))).collect();
    let mut per: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for b in &before {
        *per.entry(*b).or_default() += 1;
    }
    let even = FLOWS as f64 / BACKENDS as f64;
    let worst = per
        .values()
        .map(|&n| (n as f64 - even).abs() / even)
        .fold(0.0, f64::max);
    println!(
        "maglev: {FLOWS} flows over {BACKENDS} backends, worst deviation from even {:.1}%",
        worst * 100.0
    );
    assert_eq!(per.len(), BACKENDS as usize);
    assert!(worst < 0.08, "spread {per:?}");

    // The same flows again, as new connections, after one backend went.
    let gone = all[4];
    let rest: Vec<Ipv4Addr> = all.iter().copied().filter(|b| *b != gone).collect();
    h.serve(&rest, Scheduler::MAGLEV, &[], 0);
    h.clear_conntrack();
    let mut moved = 0;
    let mut others = 0;
    for (i, old) in before.iter().enumerate() {
        let new = h.connect(client(i as u32));
        assert_ne!(new, gone);
        if *old != gone {
            others += 1;
            moved += (new != *old) as u32;
        }
    }
    let share = moved as f64 / others as f64;
    println!(
        "maglev: removing 1 of {BACKENDS} backends moved {moved} of {others} flows of the others ({:.2}%)",
        share * 100.0
    );
    assert!(
        share < 0.02,
        "{moved} of {others} flows of other backends moved"
    );
}

#[test]
fn affinity_sticks_expires_and_is_dropped_with_its_backend() {
    let mut h = Harness::load();
    let b: Vec<Ipv4Addr> = (0..4).map(backend_ip).collect();
    // rr underneath: without affinity every connection would go elsewhere.
    h.serve(&b[..3], Scheduler::RR, &[], 60);
    let a = (CLIENT, 36_000);
    let mine = h.connect(a);
    for port in 36_001..36_010 {
        assert_eq!(h.connect((CLIENT, port)), mine, "sticks across connections");
    }
    let other = (Ipv4Addr::new(10, 244, 1, 6), 36_000);
    let theirs = h.connect(other);
    assert_ne!(theirs, mine, "another client goes through rr");

    // A new backend sorting first shifts every slot: affinity follows the address.
    h.serve(
        &[backend_ip(0), b[1], b[2], Ipv4Addr::new(10, 244, 1, 200)],
        Scheduler::RR,
        &[],
        60,
    );
    assert_eq!(
        h.connect((CLIENT, 36_020)),
        mine,
        "kept across a table change"
    );

    // Idle longer than the timeout: expired, rr picks (the next one is not `mine`).
    let key = AffinityKey {
        svc_id: h.svc_id(),
        client: CLIENT.octets(),
    };
    let mut v = h.dp.maps.affinity.get(&key, 0).expect("affinity entry");
    v.last_ns -= 61_000_000_000;
    h.dp.maps.affinity.insert(key, v, 0).unwrap();
    let after = h.connect((CLIENT, 36_030));
    let fresh = h.dp.maps.affinity.get(&key, 0).unwrap();
    assert!(fresh.last_ns > v.last_ns + 60_000_000_000, "a new entry");
    assert_eq!(fresh.addr, after.octets());
    // Within the timeout it sticks to the new choice.
    assert_eq!(h.connect((CLIENT, 36_031)), after);

    // Its backend is removed: the affinity is dropped and a live backend chosen.
    let rest: Vec<Ipv4Addr> = [backend_ip(0), b[1], b[2], Ipv4Addr::new(10, 244, 1, 200)]
        .into_iter()
        .filter(|x| *x != after)
        .collect();
    h.serve(&rest, Scheduler::RR, &[], 60);
    let moved = h.connect((CLIENT, 36_040));
    assert_ne!(moved, after);
    assert!(rest.contains(&moved));
    assert_eq!(
        h.dp.maps.affinity.get(&key, 0).unwrap().addr,
        moved.octets()
    );
    assert_eq!(h.connect((CLIENT, 36_041)), moved);
}
