//! IPv6 through the kernel programs, run through BPF_PROG_TEST_RUN on a freshly loaded
//! object (`testbed::datapath::DatapathHarness`).
//!
//! What the object does with IPv6 today: `tc_ingress` and `xdp_nodeport` parse it
//! (fragments and cut-short headers are counted as such) and pass it untouched, IPv4 is
//! unaffected, and `conns_release` adds to `backend_conns6` counters when given the IPv6
//! frame. Serving IPv6 frontends is not wired yet (see `proxy-ebpf/src/family.rs`).
//!
//! Needs root and the object built by `cargo xtask build-ebpf`.

use aya::maps::{HashMap, Map};
use etherparse::{IpNumber, Ipv6Header, PacketBuilder};
use proxy_common::{
    service::{BackendConns, BackendConns6Key},
    stats,
};
use testbed::datapath::{
    CLIENT_MAC, DatapathHarness, ETH_LEN, MapSizes, NODE_MAC, TC_ACT_OK, XDP_PASS, tcp_frame,
};

const CLIENT6: [u8; 16] = [0xfd, 0, 0x02, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0];
const VIP6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
const POD6: [u8; 16] = [0xfd, 0, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];

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
