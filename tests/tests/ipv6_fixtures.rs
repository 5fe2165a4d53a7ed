//! IPv6 through the kernel programs, run through BPF_PROG_TEST_RUN on a freshly loaded
//! object (`testbed::datapath::DatapathHarness`).
//!
//! The maps are written directly (the IPv6 maps are found through the programs that use
//! them, `DatapathHarness::prog_map`), as the agent lays them out: reply-filter bits,
//! backends in table `svc_id * 2`, then the frontend. Every translated frame is compared
//! whole with the input rewritten here by hand (addresses and ports patched in, the L4
//! checksum recomputed from scratch over the IPv6 pseudo header), and checked again with
//! etherparse; every run checks the exact change of the `stats` counters, shared with
//! IPv4. Non-service IPv6 (and ICMPv6, fragments, cut-short headers) passes untouched;
//! `conns_release` takes the IPv6 frame.
//!
//! Needs root and the object built by `cargo xtask build-ebpf`.

use std::collections::BTreeSet;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use bpfproxy::planner::MapOp;
use etherparse::{
    Icmpv6Slice, Icmpv6Type, IpNumber, Ipv6Header, NetHeaders, PacketBuilder, PacketHeaders,
    TransportHeader, icmpv6::DestUnreachableCode,
};
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_SNAT, Ct6Key, Ct6Value},
    reply_filter,
    service::{
        BACKEND_LOCAL, Backend6, BackendConns, BackendConns6Key, BackendSlotKey, MAGLEV_SIZE,
        MaglevKey, NODE_F_FIB_FORWARD, NodeConfig6, SCHED_LC, SCHED_MAGLEV, SCHED_RANDOM, SCHED_RR,
        SCHED_SH, SCOPE_CLUSTER_IP, SCOPE_EXTERNAL, SVC_F_DROP_EMPTY, SVC_F_NODE_PORT, SVC_F_SNAT,
        SVC_F_SOURCE_RANGES, SourceRange6Key, Svc6Key, SvcValue,
    },
    stats,
};
use testbed::{
    datapath::{
        ACK, CLIENT_MAC, DatapathHarness, ETH_LEN, FIN, MapSizes, NODE_MAC, PROG_TC_INGRESS,
        PROG_XDP_NODEPORT, SYN, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS,
        XDP_REDIRECT, XDP_TX, fold, tcp_frame,
    },
    netns::NetNs,
    unique_run_id,
};

/// An address of fd00:<a>:<b>::<c> (the testbed's plan: fd00:251::/64 LAN, fd00:244:1::/64
/// pods, fd00:96::/112 ClusterIPs).
const fn a6(a: u16, b: u16, last: u16) -> [u8; 16] {
    let a = a.to_be_bytes();
    let b = b.to_be_bytes();
    let l = last.to_be_bytes();
    [
        0xfd, 0, a[0], a[1], b[0], b[1], 0, 0, 0, 0, 0, 0, 0, 0, l[0], l[1],
    ]
}

const CLIENT6: [u8; 16] = a6(0x251, 0, 0x100);
const CLIENT6B: [u8; 16] = a6(0x251, 0, 0x101);
const CLIENT6C: [u8; 16] = a6(0x251, 0, 0x102);
const NODE6: [u8; 16] = a6(0x251, 0, 1);
const VIP6: [u8; 16] = a6(0x96, 0, 0x0a);
const POD6: [u8; 16] = a6(0x244, 1, 0x11);
const REMOTE6: [u8; 16] = a6(0x244, 2, 0x11);
const CPORT: u16 = 40000;
const SNAT_MIN: u16 = 31000;
const SNAT_MAX: u16 = 31001;

fn load() -> DatapathHarness {
    DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        conntrack: 4096,
    })
}

fn tcp6(flags_syn: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .tcp(40000, 80, 1, 64240);
    if flags_syn {
        b = b.syn();
    }
    let mut v = Vec::new();
    b.write(&mut v, b"hello").unwrap();
    v
}

fn udp6() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .udp(40000, 53)
        .write(&mut v, b"query")
        .unwrap();
    v
}

fn icmp6_echo() -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT6, VIP6, 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut v, b"ping")
        .unwrap();
    v
}

/// An IPv6 packet whose next header is a Fragment header (first fragment of a UDP
/// datagram).
fn fragment6() -> Vec<u8> {
    // Fragment header: next header UDP, reserved, offset 0 with M set, identification.
    let frag = [17u8, 0, 0, 1, 0, 0, 0, 7];
    let udp = [0x9c, 0x40, 0, 53, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (frag.len() + udp.len()) as u16,
        next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
        hop_limit: 64,
        source: CLIENT6,
        destination: VIP6,
    };
    let mut v = Vec::new();
    v.extend_from_slice(&NODE_MAC);
    v.extend_from_slice(&CLIENT_MAC);
    v.extend_from_slice(&0x86ddu16.to_be_bytes());
    ip.write(&mut v).unwrap();
    v.extend_from_slice(&frag);
    v.extend_from_slice(&udp);
    v
}

/// The counters that changed between two reads, by name.
fn delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    (0..stats::COUNT as usize)
        .filter(|&i| after[i] != before[i])
        .map(|i| (stats::NAMES[i], after[i] - before[i]))
        .collect()
}

fn tc(h: &mut DatapathHarness, desc: &str, frame: &[u8], want: &[(&'static str, u64)]) {
    let before = h.stats();
    let (ret, out) = h.run(frame);
    assert_eq!(ret, TC_ACT_OK, "{desc}: tc verdict");
    assert_eq!(out, frame, "{desc}: tc changed the frame");
    assert_eq!(delta(&before, &h.stats()), want, "{desc}: tc counters");
}

fn xdp(h: &mut DatapathHarness, desc: &str, frame: &[u8]) {
    let before = h.stats();
    let r = h.run_xdp(frame);
    assert_eq!(r.ret, XDP_PASS, "{desc}: XDP verdict");
    assert_eq!(r.out, frame, "{desc}: XDP changed the frame");
    assert_eq!(
        delta(&before, &h.stats()),
        [("xdp_pass", 1)],
        "{desc}: XDP counters"
    );
}

#[test]
fn ipv6_passes_untouched_and_is_counted_by_what_it_is() {
    let mut h = load();
    let pass = [("pass_not_service", 1)];
    for (desc, frame) in [
        ("IPv6 TCP SYN", tcp6(true)),
        ("IPv6 TCP data", tcp6(false)),
        ("IPv6 UDP", udp6()),
        ("ICMPv6 echo", icmp6_echo()),
    ] {
        tc(&mut h, desc, &frame, &pass);
        xdp(&mut h, desc, &frame);
    }
    let frag = fragment6();
    tc(&mut h, "IPv6 fragment", &frag, &[("pass_fragment", 1)]);
    xdp(&mut h, "IPv6 fragment", &frag);
    // Ethernet and half an IPv6 header (XDP only: BPF_PROG_TEST_RUN refuses such an skb).
    let cut = tcp6(true)[..ETH_LEN + 20].to_vec();
    xdp(&mut h, "cut-short IPv6", &cut);
    // IPv4 still goes its way next to IPv6: a frontend-less TCP packet passes as before.
    let v4 = tcp_frame(([10, 0, 0, 1], 40000), ([10, 96, 0, 10], 80), 0x02, b"");
    tc(&mut h, "IPv4 TCP", &v4, &pass);
    assert_eq!(h.ct_len(), 0, "nothing tracked");
}

/// The IPv6 frame of `conns_release`: 14 ignored bytes, a `BackendConns6Key`, a
/// native-endian u64.
fn release_frame6(key: &BackendConns6Key, n: u64) -> Vec<u8> {
    let mut f = vec![0u8; ETH_LEN];
    f.extend_from_slice(&key.svc_id.to_ne_bytes());
    f.extend_from_slice(&key.addr);
    f.extend_from_slice(&key.port.to_ne_bytes());
    f.extend_from_slice(&key._pad.to_ne_bytes());
    f.extend_from_slice(&n.to_ne_bytes());
    assert_eq!(f.len(), 46);
    f
}

#[test]
fn conns_release_adds_to_an_ipv6_backend_counter_told_apart_by_length() {
    let mut h = load();
    let mut conns: HashMap<_, BackendConns6Key, BackendConns> =
        HashMap::try_from(Map::HashMap(h.prog_map("conns_release", "backend_conns6")))
            .expect("backend_conns6");
    let key = BackendConns6Key {
        svc_id: 7,
        addr: POD6,
        port: 8080,
        _pad: 0,
    };
    conns
        .insert(
            key,
            BackendConns {
                opened: 5,
                closed: 1,
            },
            0,
        )
        .unwrap();
    let run = |h: &mut DatapathHarness, frame: &[u8]| h.run_prog("conns_release", frame, 1).ret;
    assert_eq!(run(&mut h, &release_frame6(&key, 3)), 0, "added");
    assert_eq!(
        conns.get(&key, 0).unwrap(),
        BackendConns {
            opened: 5,
            closed: 4
        }
    );
    let other = BackendConns6Key { port: 9, ..key };
    assert_eq!(run(&mut h, &release_frame6(&other, 3)), 1, "no counters");
    assert_eq!(conns.get(&key, 0).unwrap().closed, 4, "untouched by a miss");
    // An IPv4 frame (34 bytes) is read as a BackendConnsKey: no such IPv4 backend.
    let mut v4 = vec![0u8; 34];
    v4[ETH_LEN..ETH_LEN + 4].copy_from_slice(&7u32.to_ne_bytes());
    assert_eq!(run(&mut h, &v4), 1, "IPv4 frame, unknown backend");
    assert_eq!(
        conns.get(&key, 0).unwrap().closed,
        4,
        "IPv6 counter untouched"
    );
    // Neither length: refused.
    assert_eq!(run(&mut h, &[0u8; 40]), 2, "a 40-byte frame");
}

// ---------------------------------------------------------------------------------------
// Serving IPv6 frontends.

/// The IPv6 maps of a harness, found through the programs that use them.
struct Maps6 {
    services: HashMap<MapData, Svc6Key, SvcValue>,
    slots: HashMap<MapData, BackendSlotKey, Backend6>,
    ct: HashMap<MapData, Ct6Key, Ct6Value>,
    ranges: LpmTrie<MapData, SourceRange6Key, u8>,
}

fn maps6(h: &mut DatapathHarness) -> Maps6 {
    let mut m = |name: &str| h.prog_map(PROG_TC_INGRESS, name);
    Maps6 {
        services: HashMap::try_from(Map::HashMap(m("services6"))).unwrap(),
        slots: HashMap::try_from(Map::HashMap(m("backend_slots6"))).unwrap(),
        ct: HashMap::try_from(Map::LruHashMap(m("conntrack6"))).unwrap(),
        ranges: LpmTrie::try_from(Map::LpmTrie(m("src_ranges6"))).unwrap(),
    }
}

fn set_node_cfg6(h: &mut DatapathHarness, cfg: NodeConfig6) {
    let mut node: Array<MapData, NodeConfig6> =
        Array::try_from(Map::Array(h.prog_map(PROG_XDP_NODEPORT, "node_cfg6"))).unwrap();
    node.set(0, cfg, 0).unwrap();
}

fn backend6(addr: [u8; 16], port: u16, flags: u8) -> Backend6 {
    Backend6 {
        addr,
        port,
        flags,
        weight: 1,
    }
}

fn key6(addr: [u8; 16], port: u16, proto: u8, scope: u8) -> Svc6Key {
    Svc6Key {
        addr,
        port,
        proto,
        scope,
    }
}

/// Programs frontend `key` as the agent does: reply-filter bits (`bit6`), the backends in
/// table `svc_id * 2`, then the service.
#[allow(clippy::too_many_arguments)]
fn add6(
    h: &mut DatapathHarness,
    m: &mut Maps6,
    svc_id: u32,
    key: Svc6Key,
    flags: u8,
    scheduler: u8,
    affinity_timeout_s: u32,
    backends: &[Backend6],
) {
    for b in backends {
        let (index, mask) =
            reply_filter::word_and_mask(reply_filter::bit6(b.addr, b.port, key.proto));
        let word = h.state.reply_filter[index as usize] | mask;
        h.apply(vec![MapOp::SetReplyFilterWord { index, word }], Vec::new());
    }
    for (slot, b) in backends.iter().enumerate() {
        let k = BackendSlotKey {
            table: svc_id * 2,
            slot: slot as u32,
        };
        m.slots.insert(k, *b, 0).unwrap();
    }
    let value = SvcValue {
        svc_id,
        table: svc_id * 2,
        backend_count: backends.len() as u32,
        scheduler,
        flags,
        _pad: 0,
        affinity_timeout_s,
    };
    m.services.insert(key, value, 0).unwrap();
}

fn tcp6f(src: ([u8; 16], u16), dst: ([u8; 16], u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(1);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn udp6f(src: ([u8; 16], u16), dst: ([u8; 16], u16), payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, payload)
        .unwrap();
    v
}

const IP6: usize = ETH_LEN;
const L4: usize = ETH_LEN + 40;

/// `frame` (IPv6, TCP or UDP right after the header) with its addresses and ports
/// replaced and its L4 checksum recomputed from scratch over the pseudo header (a UDP
/// result of zero sent as 0xffff).
fn rewritten6(frame: &[u8], src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[IP6 + 8..IP6 + 24].copy_from_slice(&src.0);
    f[IP6 + 24..IP6 + 40].copy_from_slice(&dst.0);
    f[L4..L4 + 2].copy_from_slice(&src.1.to_be_bytes());
    f[L4 + 2..L4 + 4].copy_from_slice(&dst.1.to_be_bytes());
    let proto = f[IP6 + 6];
    let at = L4 + if proto == PROTO_TCP { 16 } else { 6 };
    f[at..at + 2].fill(0);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[IP6 + 8..IP6 + 40]);
    pseudo.extend_from_slice(&((f.len() - L4) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    let mut c = !fold(&f[L4..], fold(&pseudo, 0) as u32);
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// The output parses as IPv6 and its TCP/UDP checksum is what etherparse computes.
fn assert_checksum6(desc: &str, frame: &[u8]) {
    let h = PacketHeaders::from_ethernet_slice(frame)
        .unwrap_or_else(|e| panic!("{desc}: output does not parse: {e:?}"));
    let Some(NetHeaders::Ipv6(ip, _)) = &h.net else {
        panic!("{desc}: output is not IPv6");
    };
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => assert_eq!(
            t.checksum,
            t.calc_checksum_ipv6(ip, payload).unwrap(),
            "{desc}: TCP checksum"
        ),
        Some(TransportHeader::Udp(u)) => assert_eq!(
            u.checksum,
            u.calc_checksum_ipv6(ip, payload).unwrap(),
            "{desc}: UDP checksum"
        ),
        other => panic!("{desc}: not TCP/UDP: {other:?}"),
    }
}

fn assert_rewritten6(
    desc: &str,
    input: &[u8],
    out: &[u8],
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
) {
    assert_checksum6(desc, out);
    assert_eq!(
        out,
        &rewritten6(input, src, dst)[..],
        "{desc}: not the input rewritten to {src:?} -> {dst:?}"
    );
}

/// Runs tc_ingress; checks the verdict and the counters that changed; returns the output.
fn tc6(h: &mut DatapathHarness, desc: &str, frame: &[u8], ret: u32, want: &[&str]) -> Vec<u8> {
    let before = h.stats();
    let (got, out) = h.run(frame);
    assert_eq!(got, ret, "{desc}: tc verdict");
    let want: Vec<(&str, u64)> = want.iter().map(|n| (*n, 1)).collect();
    assert_eq!(delta(&before, &h.stats()), want, "{desc}: counters");
    out
}

fn xdp6(h: &mut DatapathHarness, desc: &str, frame: &[u8], ret: u32, want: &[&str]) -> Vec<u8> {
    let before = h.stats();
    let r = h.run_xdp(frame);
    assert_eq!(r.ret, ret, "{desc}: XDP verdict");
    let want: Vec<(&str, u64)> = want.iter().map(|n| (*n, 1)).collect();
    assert_eq!(delta(&before, &h.stats()), want, "{desc}: counters");
    r.out
}

fn ct6(src: ([u8; 16], u16), dst: ([u8; 16], u16), proto: u8) -> Ct6Key {
    Ct6Key {
        saddr: src.0,
        daddr: dst.0,
        sport: src.1,
        dport: dst.1,
        proto,
        _pad: [0; 3],
    }
}

#[test]
fn tc_translates_ipv6_tcp_and_udp_both_ways() {
    let mut h = load();
    let mut m = maps6(&mut h);
    let fe = (VIP6, 80);
    let be = (POD6, 8080);
    add6(
        &mut h,
        &mut m,
        1,
        key6(VIP6, 80, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 8080, 0)],
    );
    let client = (CLIENT6, CPORT);

    let syn = tcp6f(client, fe, SYN, b"");
    let out = tc6(&mut h, "SYN", &syn, TC_ACT_OK, &["forward_new"]);
    assert_rewritten6("SYN", &syn, &out, client, be);
    let fwd =
        m.ct.get(&ct6(client, fe, PROTO_TCP), 0)
            .expect("forward entry");
    assert_eq!(
        (fwd.dir, fwd.nat_addr, fwd.nat_port),
        (CT_DIR_FORWARD, POD6, 8080)
    );
    let rev =
        m.ct.get(&ct6(be, client, PROTO_TCP), 0)
            .expect("reply entry");
    assert_eq!(
        (rev.dir, rev.nat_addr, rev.nat_port),
        (CT_DIR_REPLY, VIP6, 80)
    );

    let data = tcp6f(client, fe, ACK, b"GET / HTTP/1.1\r\n\r\n");
    let out = tc6(&mut h, "data", &data, TC_ACT_OK, &["forward_established"]);
    assert_rewritten6("data", &data, &out, client, be);

    let reply = tcp6f(be, client, SYN | ACK, b"");
    let out = tc6(&mut h, "SYN-ACK", &reply, TC_ACT_OK, &["reply"]);
    assert_rewritten6("SYN-ACK", &reply, &out, fe, client);
    let rev = m.ct.get(&ct6(be, client, PROTO_TCP), 0).unwrap();
    assert_ne!(
        rev.flags & proxy_common::conntrack::CT_FLAG_REPLIED,
        0,
        "replied"
    );

    // UDP, whose checksum the rewrite keeps valid too.
    add6(
        &mut h,
        &mut m,
        2,
        key6(VIP6, 53, PROTO_UDP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 5353, 0)],
    );
    let q = udp6f(client, (VIP6, 53), b"query");
    let out = tc6(&mut h, "UDP query", &q, TC_ACT_OK, &["forward_new"]);
    assert_rewritten6("UDP query", &q, &out, client, (POD6, 5353));
    let q2 = udp6f(client, (VIP6, 53), b"again");
    let out = tc6(
        &mut h,
        "UDP again",
        &q2,
        TC_ACT_OK,
        &["forward_established"],
    );
    assert_rewritten6("UDP again", &q2, &out, client, (POD6, 5353));
    let a = udp6f((POD6, 5353), client, b"answer");
    let out = tc6(&mut h, "UDP answer", &a, TC_ACT_OK, &["reply"]);
    assert_rewritten6("UDP answer", &a, &out, (VIP6, 53), client);

    // A backend's packet on no tracked connection passes untouched.
    let stray = udp6f((POD6, 5353), (CLIENT6B, 1234), b"stray");
    let out = tc6(&mut h, "stray", &stray, TC_ACT_OK, &["pass_not_service"]);
    assert_eq!(out, stray);
}

#[test]
fn tc_hairpin_ipv6_is_source_nated_to_the_frontend() {
    let mut h = load();
    let mut m = maps6(&mut h);
    add6(
        &mut h,
        &mut m,
        1,
        key6(VIP6, 80, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 8080, 0)],
    );
    let me = (POD6, CPORT);
    let syn = tcp6f(me, (VIP6, 80), SYN, b"");
    let out = tc6(
        &mut h,
        "hairpin SYN",
        &syn,
        TC_ACT_OK,
        &["forward_new", "hairpin"],
    );
    assert_rewritten6("hairpin SYN", &syn, &out, (VIP6, CPORT), (POD6, 8080));
    let rev =
        m.ct.get(&ct6((POD6, 8080), (VIP6, CPORT), PROTO_TCP), 0)
            .expect("reply entry");
    assert_ne!(rev.flags & CT_FLAG_SNAT, 0);
    let reply = tcp6f((POD6, 8080), (VIP6, CPORT), SYN | ACK, b"");
    let out = tc6(&mut h, "hairpin reply", &reply, TC_ACT_OK, &["reply"]);
    assert_rewritten6("hairpin reply", &reply, &out, (VIP6, 80), me);
}

/// The output is an ICMPv6 port unreachable from the frontend to the client quoting the
/// input's IPv6 header and first 8 L4 bytes, with a valid checksum.
fn assert_port_unreachable6(desc: &str, input: &[u8], out: &[u8]) {
    assert_eq!(out.len(), ETH_LEN + 40 + 8 + 40 + 8, "{desc}: length");
    assert_eq!(
        &out[0..6],
        &input[6..12],
        "{desc}: back to the sender's MAC"
    );
    assert_eq!(
        &out[6..12],
        &input[0..6],
        "{desc}: from the MAC it was sent to"
    );
    let h = PacketHeaders::from_ethernet_slice(out).expect("parses");
    let Some(NetHeaders::Ipv6(ip, _)) = &h.net else {
        panic!("{desc}: not IPv6");
    };
    assert_eq!(
        ip.source,
        input[IP6 + 24..IP6 + 40],
        "{desc}: from the frontend"
    );
    assert_eq!(
        ip.destination,
        input[IP6 + 8..IP6 + 24],
        "{desc}: to the client"
    );
    assert_eq!(ip.next_header, IpNumber::IPV6_ICMP, "{desc}: ICMPv6");
    assert_eq!(ip.payload_length, 56, "{desc}: payload length");
    let icmp = Icmpv6Slice::from_slice(&out[L4..]).expect("ICMPv6");
    assert_eq!(
        icmp.icmp_type(),
        Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port),
        "{desc}: port unreachable"
    );
    assert!(
        icmp.is_checksum_valid(ip.source, ip.destination),
        "{desc}: ICMPv6 checksum"
    );
    assert_eq!(&out[L4 + 8..], &input[IP6..L4 + 8], "{desc}: quote");
}

#[test]
fn no_ipv6_backends_reject_with_icmpv6_port_unreachable_or_drop_for_a_local_policy() {
    let mut h = load();
    let mut m = maps6(&mut h);
    add6(
        &mut h,
        &mut m,
        1,
        key6(VIP6, 80, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        0,
        &[],
    );
    add6(
        &mut h,
        &mut m,
        2,
        key6(VIP6, 53, PROTO_UDP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        0,
        &[],
    );
    add6(
        &mut h,
        &mut m,
        3,
        key6(VIP6, 81, PROTO_TCP, SCOPE_CLUSTER_IP),
        SVC_F_DROP_EMPTY,
        SCHED_RANDOM,
        0,
        &[],
    );
    let syn = tcp6f((CLIENT6, CPORT), (VIP6, 80), SYN, b"");
    let out = tc6(&mut h, "TCP", &syn, TC_ACT_REDIRECT, &["reject_no_backend"]);
    assert_port_unreachable6("TCP", &syn, &out);
    let q = udp6f((CLIENT6, CPORT), (VIP6, 53), b"query with some payload");
    let out = tc6(&mut h, "UDP", &q, TC_ACT_REDIRECT, &["reject_no_backend"]);
    assert_port_unreachable6("UDP", &q, &out);
    let syn = tcp6f((CLIENT6, CPORT), (VIP6, 81), SYN, b"");
    tc6(
        &mut h,
        "local policy",
        &syn,
        TC_ACT_SHOT,
        &["drop_no_local_backend"],
    );

    // XDP: the same from the external view (XDP_TX back out).
    add6(
        &mut h,
        &mut m,
        4,
        key6(NODE6, 30083, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT,
        SCHED_RANDOM,
        0,
        &[],
    );
    add6(
        &mut h,
        &mut m,
        5,
        key6(NODE6, 30082, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_DROP_EMPTY,
        SCHED_RANDOM,
        0,
        &[],
    );
    let syn = tcp6f((CLIENT6, CPORT), (NODE6, 30083), SYN, b"");
    let out = xdp6(&mut h, "XDP TCP", &syn, XDP_TX, &["reject_no_backend"]);
    assert_port_unreachable6("XDP TCP", &syn, &out);
    let syn = tcp6f((CLIENT6, CPORT), (NODE6, 30082), SYN, b"");
    xdp6(
        &mut h,
        "XDP local policy",
        &syn,
        XDP_DROP,
        &["drop_no_local_backend"],
    );
}

#[test]
fn ipv6_source_ranges_admit_clients_inside_and_drop_others() {
    let mut h = load();
    let mut m = maps6(&mut h);
    let lb = a6(0x203, 0, 0x10);
    add6(
        &mut h,
        &mut m,
        1,
        key6(lb, 80, PROTO_TCP, SCOPE_CLUSTER_IP),
        SVC_F_SOURCE_RANGES,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 8080, 0)],
    );
    add6(
        &mut h,
        &mut m,
        2,
        key6(lb, 80, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_SOURCE_RANGES,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 8080, BACKEND_LOCAL)],
    );
    // fd00:251::/64 allowed for both frontends.
    for svc_id in [1u32, 2] {
        let key = Key::new(
            32 + 64,
            SourceRange6Key {
                svc_id_be: svc_id.to_be_bytes(),
                addr: a6(0x251, 0, 0),
            },
        );
        m.ranges.insert(&key, 1, 0).unwrap();
    }
    let inside = tcp6f((CLIENT6, CPORT), (lb, 80), SYN, b"");
    let out = tc6(&mut h, "tc inside", &inside, TC_ACT_OK, &["forward_new"]);
    assert_rewritten6("tc inside", &inside, &out, (CLIENT6, CPORT), (POD6, 8080));
    let outsider = a6(0x9, 0, 1);
    let outside = tcp6f((outsider, CPORT), (lb, 80), SYN, b"");
    tc6(
        &mut h,
        "tc outside",
        &outside,
        TC_ACT_SHOT,
        &["drop_source_range"],
    );
    let inside = tcp6f((CLIENT6B, CPORT), (lb, 80), SYN, b"");
    let out = xdp6(
        &mut h,
        "XDP inside",
        &inside,
        XDP_PASS,
        &["xdp_forward_new"],
    );
    assert_rewritten6("XDP inside", &inside, &out, (CLIENT6B, CPORT), (POD6, 8080));
    xdp6(
        &mut h,
        "XDP outside",
        &outside,
        XDP_DROP,
        &["drop_source_range"],
    );
}

/// The backend a new connection from `client` went to (its forward entry).
fn chosen(
    h: &mut DatapathHarness,
    m: &Maps6,
    client: ([u8; 16], u16),
    fe: ([u8; 16], u16),
) -> [u8; 16] {
    let syn = tcp6f(client, fe, SYN, b"");
    let (ret, out) = h.run(&syn);
    assert_eq!(ret, TC_ACT_OK);
    let to: [u8; 16] = out[IP6 + 24..IP6 + 40].try_into().unwrap();
    assert_checksum6("scheduled SYN", &out);
    let fwd =
        m.ct.get(&ct6(client, fe, PROTO_TCP), 0)
            .expect("forward entry");
    assert_eq!(fwd.nat_addr, to, "packet and conntrack agree");
    to
}

#[test]
fn ipv6_schedulers_pick_backends_of_the_table_and_affinity_sticks() {
    let mut h = load();
    let mut m = maps6(&mut h);
    let pods: Vec<[u8; 16]> = (0..4).map(|i| a6(0x244, 1, 0x20 + i)).collect();
    let table: Vec<Backend6> = pods.iter().map(|&p| backend6(p, 8080, 0)).collect();
    let all: BTreeSet<[u8; 16]> = pods.iter().copied().collect();

    // sh: a client always lands on the same backend; clients spread over the table.
    add6(
        &mut h,
        &mut m,
        1,
        key6(VIP6, 81, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_SH,
        0,
        &table,
    );
    let mut seen = BTreeSet::new();
    for c in 0..24u16 {
        let client = a6(0x251, 0, 0x200 + c);
        let first = chosen(&mut h, &m, (client, 1000), (VIP6, 81));
        assert!(all.contains(&first), "sh picked a backend of the table");
        assert_eq!(
            chosen(&mut h, &m, (client, 1001), (VIP6, 81)),
            first,
            "sh: same client, same backend"
        );
        seen.insert(first);
    }
    assert!(
        seen.len() >= 3,
        "sh spreads 24 clients over 4 backends: {}",
        seen.len()
    );

    // maglev: the shared `maglev` table decides; all its entries name slot 2 here.
    add6(
        &mut h,
        &mut m,
        2,
        key6(VIP6, 82, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_MAGLEV,
        0,
        &table,
    );
    for index in 0..MAGLEV_SIZE {
        h.dp.maps
            .maglev
            .insert(MaglevKey { table: 4, index }, 2, 0)
            .unwrap();
    }
    for c in 0..8u16 {
        let client = a6(0x251, 0, 0x300 + c);
        assert_eq!(
            chosen(&mut h, &m, (client, 2000 + c), (VIP6, 82)),
            pods[2],
            "maglev: the table's slot"
        );
    }

    // rr: each backend in turn.
    add6(
        &mut h,
        &mut m,
        3,
        key6(VIP6, 83, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RR,
        0,
        &table,
    );
    let turns: BTreeSet<[u8; 16]> = (0..4u16)
        .map(|i| chosen(&mut h, &m, (CLIENT6, 3000 + i), (VIP6, 83)))
        .collect();
    assert_eq!(turns, all, "rr: four connections, four backends");

    // ClientIP affinity: random scheduler, but one client keeps its backend.
    add6(
        &mut h,
        &mut m,
        4,
        key6(VIP6, 84, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_RANDOM,
        60,
        &table,
    );
    let first = chosen(&mut h, &m, (CLIENT6, 4000), (VIP6, 84));
    for i in 1..12u16 {
        assert_eq!(
            chosen(&mut h, &m, (CLIENT6, 4000 + i), (VIP6, 84)),
            first,
            "affinity sticks"
        );
    }
    let mut others = BTreeSet::new();
    for c in 0..16u16 {
        others.insert(chosen(
            &mut h,
            &m,
            (a6(0x251, 0, 0x400 + c), 5000),
            (VIP6, 84),
        ));
    }
    assert!(others.len() > 1, "other clients are spread at random");
}

fn node_cfg6(flags: u32) -> NodeConfig6 {
    NodeConfig6 {
        snat_addr: NODE6,
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags,
    }
}

#[test]
fn xdp_ipv6_local_backend_is_dnat_only_and_passed() {
    let mut h = load();
    let mut m = maps6(&mut h);
    set_node_cfg6(&mut h, node_cfg6(0));
    add6(
        &mut h,
        &mut m,
        1,
        key6(NODE6, 30080, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        SCHED_RANDOM,
        0,
        &[backend6(POD6, 8080, BACKEND_LOCAL)],
    );
    let client = (CLIENT6, CPORT);
    let syn = tcp6f(client, (NODE6, 30080), SYN, b"");
    let out = xdp6(&mut h, "SYN", &syn, XDP_PASS, &["xdp_forward_new"]);
    assert_rewritten6("SYN", &syn, &out, client, (POD6, 8080));
    let data = tcp6f(client, (NODE6, 30080), ACK, b"payload");
    let out = xdp6(
        &mut h,
        "data",
        &data,
        XDP_PASS,
        &["xdp_forward_established"],
    );
    assert_rewritten6("data", &data, &out, client, (POD6, 8080));
    // The pod's reply is translated back by tc at its veth, from the entries XDP made.
    let reply = tcp6f((POD6, 8080), client, SYN | ACK, b"");
    let out = tc6(
        &mut h,
        "reply at the pod veth",
        &reply,
        TC_ACT_OK,
        &["reply"],
    );
    assert_rewritten6("reply", &reply, &out, (NODE6, 30080), client);
    // Not a frontend, not an SNAT reply: passed untouched.
    let other = tcp6f(client, (NODE6, 22), SYN, b"");
    let out = xdp6(&mut h, "ssh", &other, XDP_PASS, &["xdp_pass"]);
    assert_eq!(out, other);
}

#[test]
fn xdp_ipv6_remote_backend_is_source_nated_to_a_free_port_and_its_reply_goes_back() {
    let mut h = load();
    let mut m = maps6(&mut h);
    set_node_cfg6(&mut h, node_cfg6(0));
    let fe = (NODE6, 30081);
    add6(
        &mut h,
        &mut m,
        2,
        key6(NODE6, 30081, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        SCHED_RANDOM,
        0,
        &[backend6(REMOTE6, 8080, 0)],
    );
    let mut ports = Vec::new();
    for client in [CLIENT6, CLIENT6B] {
        let syn = tcp6f((client, CPORT), fe, SYN, b"");
        let out = xdp6(&mut h, "SYN", &syn, XDP_PASS, &["xdp_forward_new"]);
        let port = u16::from_be_bytes([out[L4], out[L4 + 1]]);
        assert!(
            (SNAT_MIN..=SNAT_MAX).contains(&port),
            "SNAT port {port} in range"
        );
        assert_rewritten6("SNAT SYN", &syn, &out, (NODE6, port), (REMOTE6, 8080));
        let rev =
            m.ct.get(&ct6((REMOTE6, 8080), (NODE6, port), PROTO_TCP), 0)
                .expect("reply entry");
        assert_eq!((rev.nat2_addr, rev.nat2_port), (client, CPORT));
        ports.push(port);
    }
    assert_ne!(
        ports[0], ports[1],
        "two clients with the same port get different SNAT ports"
    );
    // The range (two ports) is used up: a third client is dropped.
    let syn = tcp6f((CLIENT6C, CPORT), fe, SYN, b"");
    xdp6(&mut h, "no port left", &syn, XDP_DROP, &["err_snat_ports"]);
    // The backend's reply, to the SNAT address and port, goes back to the client.
    let reply = tcp6f((REMOTE6, 8080), (NODE6, ports[1]), SYN | ACK, b"");
    let out = xdp6(&mut h, "SNAT reply", &reply, XDP_PASS, &["xdp_snat_reply"]);
    assert_rewritten6("SNAT reply", &reply, &out, fe, (CLIENT6B, CPORT));
    // UDP, the same way (its checksum kept valid).
    add6(
        &mut h,
        &mut m,
        5,
        key6(NODE6, 30053, PROTO_UDP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        SCHED_RANDOM,
        0,
        &[backend6(REMOTE6, 5353, 0)],
    );
    let q = udp6f((CLIENT6, CPORT), (NODE6, 30053), b"udp query");
    let out = xdp6(&mut h, "UDP", &q, XDP_PASS, &["xdp_forward_new"]);
    let port = u16::from_be_bytes([out[L4], out[L4 + 1]]);
    assert_rewritten6("UDP", &q, &out, (NODE6, port), (REMOTE6, 5353));
    let a = udp6f((REMOTE6, 5353), (NODE6, port), b"udp answer");
    let out = xdp6(&mut h, "UDP reply", &a, XDP_PASS, &["xdp_snat_reply"]);
    assert_rewritten6("UDP reply", &a, &out, (NODE6, 30053), (CLIENT6, CPORT));
}

// Forwarding with bpf_fib_lookup (AF_INET6), in a namespace of the test's own.

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

fn mac_of(ns: &NetNs, name: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-j", "link", "show", name])
        .output()
        .expect("ip link show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let s = v[0]["address"].as_str().expect("address");
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

#[test]
fn xdp_ipv6_fib_forwarding_sends_source_nated_packets_out_with_the_hop_limit_decremented() {
    testbed::require_root().unwrap();
    let run_id = unique_run_id();
    let ns = NetNs::create(&format!("bp{run_id}-fib6")).unwrap();
    // wire: the node's uplink (clients and node B); wire2: another network with the pods
    // of a third node. The peers only need to exist.
    for cmd in [
        "link add wire type veth peer name wirepeer",
        "link add wire2 type veth peer name wire2peer",
        "link set wire up",
        "link set wirepeer up",
        "link set wire2 up",
        "link set wire2peer up",
        "addr add fd00:251::1/64 dev wire nodad",
        "addr add fd00:270::1/64 dev wire2 nodad",
        "route add fd00:244:2::/64 via fd00:251::3 dev wire",
        "route add fd00:244:3::/64 via fd00:270::3 dev wire2",
        "neigh add fd00:251::3 lladdr 02:00:00:00:00:0b dev wire nud permanent",
        "neigh add fd00:251::100 lladdr 02:00:00:00:00:05 dev wire nud permanent",
        "neigh add fd00:270::3 lladdr 02:00:00:00:00:0c dev wire2 nud permanent",
    ] {
        ns.ip(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    ns.sysctl("ipv6/conf/all/forwarding", "1").unwrap();
    let wire_mac = mac_of(&ns, "wire");
    let wire2_mac = mac_of(&ns, "wire2");

    let mut h = load();
    let mut m = maps6(&mut h);
    set_node_cfg6(&mut h, node_cfg6(NODE_F_FIB_FORWARD));
    let fe = (NODE6, 30081);
    add6(
        &mut h,
        &mut m,
        2,
        key6(NODE6, 30081, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        SCHED_RANDOM,
        0,
        &[backend6(REMOTE6, 8080, 0)],
    );
    let third = a6(0x244, 3, 4);
    add6(
        &mut h,
        &mut m,
        8,
        key6(NODE6, 30090, PROTO_TCP, SCOPE_EXTERNAL),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        SCHED_RANDOM,
        0,
        &[backend6(third, 8080, 0)],
    );
    let stranger = a6(0x251, 0, 0x200);

    let runs = ns
        .run(|| {
            let wire = ifindex("wire");
            let mut on_wire = |frame: &[u8]| {
                let before = h.stats();
                let run = h
                    .try_run_xdp(PROG_XDP_NODEPORT, frame, 1, Some(wire))
                    .expect("test run");
                (run, delta(&before, &h.stats()))
            };
            let tx = on_wire(&tcp6f((CLIENT6, CPORT), fe, SYN, b""));
            let redirect = on_wire(&tcp6f((CLIENT6, CPORT), (NODE6, 30090), SYN, b""));
            let port = u16::from_be_bytes([tx.0.out[L4], tx.0.out[L4 + 1]]);
            let reply = on_wire(&tcp6f((REMOTE6, 8080), (NODE6, port), SYN | ACK, b""));
            // A client with no neighbour entry: its reply goes to the stack, which resolves it.
            let first = on_wire(&tcp6f((stranger, CPORT), fe, SYN, b""));
            let port = u16::from_be_bytes([first.0.out[L4], first.0.out[L4 + 1]]);
            let no_neigh = on_wire(&tcp6f((REMOTE6, 8080), (NODE6, port), SYN | ACK, b""));
            [tx, redirect, reply, no_neigh]
        })
        .unwrap();
    let [tx, redirect, reply, no_neigh] = runs;
    let hop_limit = |out: &[u8]| out[IP6 + 7];
    let fwd = [("xdp_forward_new", 1), ("xdp_fib_redirect", 1)];

    let (run, d) = tx;
    assert_eq!(run.ret, XDP_TX, "to node B: XDP_TX");
    assert_eq!(d, fwd);
    assert_eq!(run.out[0..6], [2, 0, 0, 0, 0, 0x0b], "next hop's MAC");
    assert_eq!(run.out[6..12], wire_mac, "the uplink's MAC");
    assert_checksum6("to node B", &run.out);
    assert_eq!(hop_limit(&run.out), 63, "hop limit decremented");
    assert_eq!(run.out[IP6 + 24..IP6 + 40], REMOTE6);

    let (run, d) = redirect;
    assert_eq!(run.ret, XDP_REDIRECT, "to another interface: XDP_REDIRECT");
    assert_eq!(d, fwd);
    assert_eq!(run.out[0..6], [2, 0, 0, 0, 0, 0x0c]);
    assert_eq!(run.out[6..12], wire2_mac);
    assert_checksum6("to wire2", &run.out);
    assert_eq!(hop_limit(&run.out), 63);

    let (run, d) = reply;
    assert_eq!(run.ret, XDP_TX, "reply to the client: XDP_TX");
    assert_eq!(d, [("xdp_snat_reply", 1), ("xdp_fib_redirect", 1)]);
    assert_eq!(run.out[0..6], CLIENT_MAC, "the client's MAC");
    assert_checksum6("reply", &run.out);
    assert_eq!(run.out[IP6 + 8..IP6 + 24], NODE6);
    assert_eq!(run.out[IP6 + 24..IP6 + 40], CLIENT6);
    assert_eq!(hop_limit(&run.out), 63);

    let (run, d) = no_neigh;
    assert_eq!(run.ret, XDP_PASS, "no neighbour entry: to the stack");
    assert_eq!(d, [("xdp_snat_reply", 1)]);
    assert_checksum6("no neighbour", &run.out);
    assert_eq!(hop_limit(&run.out), 64, "the stack decrements it");
}

#[test]
fn ipv6_least_connections_counts_in_backend_conns6_and_releases_on_fin() {
    let mut h = load();
    let mut m = maps6(&mut h);
    let conns: HashMap<MapData, BackendConns6Key, BackendConns> =
        HashMap::try_from(Map::HashMap(h.prog_map(PROG_TC_INGRESS, "backend_conns6"))).unwrap();
    let counted: HashMap<MapData, Ct6Key, BackendConns6Key> =
        HashMap::try_from(Map::HashMap(h.prog_map(PROG_TC_INGRESS, "counted6"))).unwrap();
    let pods = [a6(0x244, 1, 0x31), a6(0x244, 1, 0x32)];
    let table: Vec<Backend6> = pods.iter().map(|&p| backend6(p, 8080, 0)).collect();
    add6(
        &mut h,
        &mut m,
        1,
        key6(VIP6, 80, PROTO_TCP, SCOPE_CLUSTER_IP),
        0,
        SCHED_LC,
        0,
        &table,
    );
    let fe = (VIP6, 80);
    // Two connections: lc gives one to each backend.
    let first = chosen(&mut h, &m, (CLIENT6, 6000), fe);
    let second = chosen(&mut h, &m, (CLIENT6, 6001), fe);
    assert_ne!(
        first, second,
        "lc: the idle backend gets the second connection"
    );
    let key = |addr: [u8; 16]| BackendConns6Key {
        svc_id: 1,
        addr,
        port: 8080,
        _pad: 0,
    };
    for b in [first, second] {
        let c = conns.get(&key(b), 0).expect("counters");
        assert_eq!((c.opened, c.closed), (1, 0));
    }
    let token = ct6((CLIENT6, 6000), fe, PROTO_TCP);
    assert_eq!(
        counted.get(&token, 0).unwrap(),
        key(first),
        "the connection's token"
    );
    // The first connection ends: its backend is free again and takes the next one.
    let fin = tcp6f((CLIENT6, 6000), fe, ACK | FIN, b"");
    let out = tc6(&mut h, "FIN", &fin, TC_ACT_OK, &["forward_established"]);
    assert_rewritten6("FIN", &fin, &out, (CLIENT6, 6000), (first, 8080));
    let c = conns.get(&key(first), 0).unwrap();
    assert_eq!((c.opened, c.closed), (1, 1), "released once");
    assert!(counted.get(&token, 0).is_err(), "token gone");
    assert_eq!(
        chosen(&mut h, &m, (CLIENT6, 6002), fe),
        first,
        "lc: back to the idle one"
    );
}
