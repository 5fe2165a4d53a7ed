//! Packet fixtures for the external view (`xdp_nodeport`) and the hairpin and drop rules of
//! `tc_ingress`, run through BPF_PROG_TEST_RUN on a freshly loaded object whose maps are
//! written with the agent's own code (`testbed::datapath::DatapathHarness`).
//!
//! Every translated frame is compared whole with the input rewritten here by hand (the
//! expected addresses and ports patched in, the IPv4 header and L4 checksums recomputed
//! from scratch by a reference sum, a UDP zero checksum kept), and its checksums are
//! checked again with etherparse. Every run checks the exact change of every `stats`
//! counter. Frames carry complete checksums, as frames from a wire do (see
//! `proxy-ebpf/src/nat.rs` on CHECKSUM_PARTIAL frames from local veths).
//!
//! Needs root and the object built by `cargo xtask build-ebpf`.

use std::collections::BTreeMap;

use etherparse::PacketBuilder;
use proxy_common::{
    PROTO_TCP, PROTO_UDP,
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_REPLIED, CT_FLAG_SNAT},
    service::{
        BACKEND_LOCAL, Backend4, NODE_F_FIB_FORWARD, NodeConfig4, SCOPE_CLUSTER_IP, SCOPE_EXTERNAL,
        SVC_F_DROP_EMPTY, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_SNAT, SVC_F_SOURCE_RANGES,
        Svc4Key,
    },
    stats,
};
use testbed::{
    datapath::{
        ACK, CLIENT_MAC, DatapathHarness, ETH_LEN, FIN, MapSizes, NODE_MAC, PROG_TC_INGRESS,
        PROG_XDP_NODEPORT, Run, SYN, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT,
        XDP_TX, assert_checksums, ct_key, fold, tcp_frame,
    },
    netns::NetNs,
    unique_run_id,
};

/// The node's address: NodePorts, and the source of SNAT-ed connections.
const NODE: [u8; 4] = [192, 168, 50, 2];
const CLIENT: [u8; 4] = [192, 168, 50, 100];
const CLIENT2: [u8; 4] = [192, 168, 50, 101];
const CLIENT3: [u8; 4] = [192, 168, 50, 102];
const CPORT: u16 = 40000;
const LOCAL_POD: [u8; 4] = [10, 244, 1, 5];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const POD_PORT: u16 = 8080;
const LB_IP: [u8; 4] = [203, 0, 113, 10];
/// SNAT ports: two, so that a third concurrent client finds none free.
const SNAT_MIN: u16 = 31000;
const SNAT_MAX: u16 = 31001;

const NP_LOCAL: u16 = 30080;
const NP_REMOTE: u16 = 30081;
const NP_EMPTY_LOCAL: u16 = 30082;
const NP_EMPTY: u16 = 30083;
const NP_UDP: u16 = 30053;

fn load() -> DatapathHarness {
    DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        conntrack: 4096,
    })
}

fn ext(addr: [u8; 4], port: u16, proto: u8) -> Svc4Key {
    Svc4Key {
        addr,
        port,
        proto,
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

fn node_cfg(flags: u32) -> NodeConfig4 {
    NodeConfig4 {
        snat_addr: NODE,
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags,
    }
}

/// The external frontends most fixtures use (scheduler random over one backend each).
fn harness() -> DatapathHarness {
    let mut h = load();
    h.set_node_config(node_cfg(0));
    // eTP Cluster, the backend on this node: DNAT only.
    h.add_frontend(
        1,
        ext(NODE, NP_LOCAL, PROTO_TCP),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(LOCAL_POD, POD_PORT, BACKEND_LOCAL)],
    );
    // eTP Cluster, the backend on another node: DNAT + SNAT.
    h.add_frontend(
        2,
        ext(NODE, NP_REMOTE, PROTO_TCP),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(REMOTE_POD, POD_PORT, 0)],
    );
    // eTP Local without a local endpoint.
    h.add_frontend(
        3,
        ext(NODE, NP_EMPTY_LOCAL, PROTO_TCP),
        SVC_F_NODE_PORT | SVC_F_DROP_EMPTY,
        &[],
    );
    // No endpoints at all.
    h.add_frontend(4, ext(NODE, NP_EMPTY, PROTO_TCP), SVC_F_NODE_PORT, &[]);
    // UDP, eTP Cluster to another node.
    h.add_frontend(
        5,
        ext(NODE, NP_UDP, PROTO_UDP),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend(REMOTE_POD, 5353, 0)],
    );
    h
}

// ---------------------------------------------------------------------------------------
// Frames and checks.

fn tcp(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: u8) -> Vec<u8> {
    tcp_frame(src, dst, flags, b"")
}

fn udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut v, payload)
        .unwrap();
    v
}

/// A UDP datagram sent without a checksum (field 0, allowed over IPv4).
fn udp_no_csum(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut v = udp(src, dst, b"no checksum");
    v[ETH_LEN + 20 + 6..ETH_LEN + 20 + 8].fill(0);
    v
}

/// `frame` (IPv4 without options, TCP or UDP) with its addresses and ports replaced and
/// both checksums recomputed from scratch; a UDP zero checksum stays zero.
fn rewritten(frame: &[u8], src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ip = ETH_LEN;
    let l4 = ip + 20;
    f[ip + 12..ip + 16].copy_from_slice(&src.0);
    f[ip + 16..ip + 20].copy_from_slice(&dst.0);
    f[l4..l4 + 2].copy_from_slice(&src.1.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&dst.1.to_be_bytes());
    f[ip + 10..ip + 12].fill(0);
    let c = !fold(&f[ip..l4], 0);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let proto = f[ip + 9];
    let csum_at = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    if proto == PROTO_UDP && frame[csum_at..csum_at + 2] == [0, 0] {
        return f;
    }
    f[csum_at..csum_at + 2].fill(0);
    let seg_len = (f.len() - l4) as u32;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[ip + 12..ip + 20]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(seg_len as u16).to_be_bytes());
    let sum = fold(&pseudo, 0) as u32;
    let mut c = !fold(&f[l4..], sum);
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// The output is the input rewritten to `src` -> `dst`, byte for byte, checksums valid.
fn assert_rewritten(
    desc: &str,
    input: &[u8],
    out: &[u8],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
) {
    assert_checksums(desc, out);
    let want = rewritten(input, src, dst);
    assert_eq!(
        out,
        &want[..],
        "{desc}: not the input rewritten to {src:?} -> {dst:?}"
    );
}

/// Change of each counter between two readings, only those that changed.
fn delta(before: &[u64], after: &[u64]) -> BTreeMap<&'static str, u64> {
    (0..stats::COUNT as usize)
        .filter(|&i| after[i] != before[i])
        .map(|i| (stats::NAMES[i], after[i] - before[i]))
        .collect()
}

fn counted(stats: &[u32]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for &s in stats {
        *m.entry(stats::NAMES[s as usize]).or_insert(0) += 1;
    }
    m
}

/// Runs `xdp_nodeport` once; checks the return code and that exactly `stats` were counted.
fn xdp(h: &mut DatapathHarness, desc: &str, frame: &[u8], ret: u32, want: &[u32]) -> Run {
    let before = h.stats();
    let run = h.run_xdp(frame);
    assert_eq!(run.ret, ret, "{desc}: XDP action");
    assert_eq!(
        delta(&before, &h.stats()),
        counted(want),
        "{desc}: counters"
    );
    run
}

/// Runs `tc_ingress` once; checks as [`xdp`].
fn tc(h: &mut DatapathHarness, desc: &str, frame: &[u8], ret: u32, want: &[u32]) -> Run {
    let before = h.stats();
    let run = h.run_prog(PROG_TC_INGRESS, frame, 1);
    assert_eq!(run.ret, ret, "{desc}: tc action");
    assert_eq!(
        delta(&before, &h.stats()),
        counted(want),
        "{desc}: counters"
    );
    run
}

// ---------------------------------------------------------------------------------------
// Verdicts of the external view.

#[test]
fn packets_for_no_external_frontend_pass_untouched() {
    let mut h = harness();
    // The same address and port in the in-cluster view only: not the external view's.
    h.add_frontend(
        9,
        Svc4Key {
            addr: NODE,
            port: 30999,
            proto: PROTO_TCP,
            scope: SCOPE_CLUSTER_IP,
        },
        SVC_F_NODE_PORT,
        &[backend(REMOTE_POD, POD_PORT, 0)],
    );
    let frames = [
        ("ssh to the node", tcp((CLIENT, CPORT), (NODE, 22), SYN)),
        (
            "an in-cluster-only frontend",
            tcp((CLIENT, CPORT), (NODE, 30999), SYN),
        ),
        (
            "UDP to a TCP NodePort",
            udp((CLIENT, CPORT), (NODE, NP_LOCAL), b"x"),
        ),
        (
            "to the SNAT address, port below the range",
            tcp((REMOTE_POD, POD_PORT), (NODE, SNAT_MIN - 1), SYN | ACK),
        ),
        (
            "to the SNAT address, in the range, no connection",
            tcp((REMOTE_POD, POD_PORT), (NODE, SNAT_MIN), SYN | ACK),
        ),
    ];
    for (desc, frame) in frames {
        let run = xdp(&mut h, desc, &frame, XDP_PASS, &[stats::XDP_PASS]);
        assert_eq!(run.out, frame, "{desc}: changed");
    }
    let mut arp = tcp((CLIENT, CPORT), (NODE, 22), SYN);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let run = xdp(&mut h, "not IPv4", &arp, XDP_PASS, &[stats::XDP_PASS]);
    assert_eq!(run.out, arp);
    assert_eq!(h.ct_len(), 0, "nothing tracked");
}

#[test]
fn a_local_backend_gets_dnat_only_and_its_reply_is_translated_at_the_pod_veth() {
    let mut h = harness();
    let c = (CLIENT, CPORT);
    let fe = (NODE, NP_LOCAL);
    let pod = (LOCAL_POD, POD_PORT);

    let syn = tcp(c, fe, SYN);
    let run = xdp(&mut h, "SYN", &syn, XDP_PASS, &[stats::XDP_FORWARD_NEW]);
    assert_rewritten("SYN", &syn, &run.out, c, pod);
    let f = h
        .ct(ct_key(CLIENT, CPORT, NODE, NP_LOCAL, PROTO_TCP))
        .expect("forward entry");
    assert_eq!(
        (f.nat_addr, f.nat_port, f.dir, f.flags, f.svc_id),
        (LOCAL_POD, POD_PORT, CT_DIR_FORWARD, 0, 1)
    );
    assert_eq!((f.nat2_addr, f.nat2_port), ([0; 4], 0));
    assert!(f.last_seen_ns > 0, "stamped");
    // The reply entry tc_ingress at the pod's veth finds: pod -> client.
    let r = h
        .ct(ct_key(LOCAL_POD, POD_PORT, CLIENT, CPORT, PROTO_TCP))
        .expect("reply entry");
    assert_eq!(
        (r.nat_addr, r.nat_port, r.dir, r.flags),
        (NODE, NP_LOCAL, CT_DIR_REPLY, 0)
    );
    assert_eq!(h.ct_len(), 2);

    let syn_ack = tcp(pod, c, SYN | ACK);
    let run = tc(
        &mut h,
        "SYN-ACK at the pod veth",
        &syn_ack,
        TC_ACT_OK,
        &[stats::REPLY],
    );
    assert_rewritten("SYN-ACK", &syn_ack, &run.out, fe, c);
    let r = h
        .ct(ct_key(LOCAL_POD, POD_PORT, CLIENT, CPORT, PROTO_TCP))
        .unwrap();
    assert_eq!(r.flags, CT_FLAG_REPLIED);

    let ack = tcp(c, fe, ACK);
    let run = xdp(
        &mut h,
        "ACK",
        &ack,
        XDP_PASS,
        &[stats::XDP_FORWARD_ESTABLISHED],
    );
    assert_rewritten("ACK", &ack, &run.out, c, pod);
    assert_eq!(h.ct_len(), 2, "no new entries");
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let mut h = harness();
    // No SVC_F_SNAT: whatever the backend, DNAT only (the model lists local ones only).
    h.add_frontend(
        7,
        ext(LB_IP, 443, PROTO_TCP),
        SVC_F_LOAD_BALANCER,
        &[backend(LOCAL_POD, 8443, BACKEND_LOCAL)],
    );
    let syn = tcp((CLIENT, CPORT), (LB_IP, 443), SYN);
    let run = xdp(&mut h, "SYN", &syn, XDP_PASS, &[stats::XDP_FORWARD_NEW]);
    assert_rewritten("SYN", &syn, &run.out, (CLIENT, CPORT), (LOCAL_POD, 8443));
}

#[test]
fn a_remote_backend_is_source_nated_to_a_free_port_and_its_reply_goes_back_to_the_client() {
    let mut h = harness();
    let fe = (NODE, NP_REMOTE);
    let pod = (REMOTE_POD, POD_PORT);

    // Two clients with the same source port get different SNAT ports of the range.
    let mut ports = Vec::new();
    for client in [CLIENT, CLIENT2] {
        let desc = format!("SYN from {client:?}");
        let syn = tcp((client, CPORT), fe, SYN);
        let run = xdp(&mut h, &desc, &syn, XDP_PASS, &[stats::XDP_FORWARD_NEW]);
        let port = u16::from_be_bytes([run.out[ETH_LEN + 20], run.out[ETH_LEN + 21]]);
        assert!(
            (SNAT_MIN..=SNAT_MAX).contains(&port),
            "{desc}: SNAT port {port} outside the range"
        );
        assert_rewritten(&desc, &syn, &run.out, (NODE, port), pod);

        let f = h
            .ct(ct_key(client, CPORT, NODE, NP_REMOTE, PROTO_TCP))
            .expect("forward entry");
        assert_eq!(
            (f.nat_addr, f.nat_port, f.dir, f.flags, f.svc_id),
            (REMOTE_POD, POD_PORT, CT_DIR_FORWARD, CT_FLAG_SNAT, 2)
        );
        assert_eq!((f.nat2_addr, f.nat2_port), (NODE, port));
        let rkey = ct_key(REMOTE_POD, POD_PORT, NODE, port, PROTO_TCP);
        let r = h.ct(rkey).expect("reply entry keyed on the SNAT port");
        assert_eq!(
            (r.nat_addr, r.nat_port, r.dir, r.flags, r.svc_id),
            (NODE, NP_REMOTE, CT_DIR_REPLY, CT_FLAG_SNAT, 2)
        );
        assert_eq!((r.nat2_addr, r.nat2_port), (client, CPORT));
        // The agent's collector finds the twin through nat2.
        assert_eq!(
            bpfproxy::conntrack_gc::reply_key_of(
                &ct_key(client, CPORT, NODE, NP_REMOTE, PROTO_TCP),
                &f
            ),
            rkey
        );
        ports.push(port);
    }
    assert_ne!(ports[0], ports[1], "two connections share an SNAT port");
    assert_eq!(h.ct_len(), 4);

    // The range is used up: a third client is dropped, nothing tracked.
    let syn = tcp((CLIENT3, CPORT), fe, SYN);
    xdp(
        &mut h,
        "SYN, no port free",
        &syn,
        XDP_DROP,
        &[stats::ERR_SNAT_PORTS],
    );
    assert_eq!(h.ct_len(), 4);

    // The backend answers each client through its own port.
    for (client, &port) in [CLIENT, CLIENT2].iter().zip(&ports) {
        let desc = format!("SYN-ACK to {client:?}");
        let syn_ack = tcp(pod, (NODE, port), SYN | ACK);
        let run = xdp(&mut h, &desc, &syn_ack, XDP_PASS, &[stats::XDP_SNAT_REPLY]);
        assert_rewritten(&desc, &syn_ack, &run.out, fe, (*client, CPORT));
        let r = h
            .ct(ct_key(REMOTE_POD, POD_PORT, NODE, port, PROTO_TCP))
            .unwrap();
        assert_eq!(r.flags, CT_FLAG_SNAT | CT_FLAG_REPLIED);
    }

    // Established, then closing.
    let ack = tcp((CLIENT, CPORT), fe, ACK);
    let run = xdp(
        &mut h,
        "ACK",
        &ack,
        XDP_PASS,
        &[stats::XDP_FORWARD_ESTABLISHED],
    );
    assert_rewritten("ACK", &ack, &run.out, (NODE, ports[0]), pod);
    let fin = tcp((CLIENT, CPORT), fe, FIN | ACK);
    let run = xdp(
        &mut h,
        "FIN",
        &fin,
        XDP_PASS,
        &[stats::XDP_FORWARD_ESTABLISHED],
    );
    assert_rewritten("FIN", &fin, &run.out, (NODE, ports[0]), pod);
    let f = h
        .ct(ct_key(CLIENT, CPORT, NODE, NP_REMOTE, PROTO_TCP))
        .unwrap();
    assert_eq!(f.flags, CT_FLAG_SNAT | CT_FLAG_CLOSING);
    // The backend's FIN marks the client's forward entry through the reply's nat2.
    let fin = tcp(pod, (NODE, ports[1]), FIN | ACK);
    xdp(
        &mut h,
        "backend FIN",
        &fin,
        XDP_PASS,
        &[stats::XDP_SNAT_REPLY],
    );
    let f = h
        .ct(ct_key(CLIENT2, CPORT, NODE, NP_REMOTE, PROTO_TCP))
        .unwrap();
    assert_eq!(f.flags & CT_FLAG_CLOSING, CT_FLAG_CLOSING);

    // A new SYN on the closed tuple takes a port anew and frees the old one.
    let syn = tcp((CLIENT, CPORT), fe, SYN);
    let run = xdp(
        &mut h,
        "SYN again",
        &syn,
        XDP_PASS,
        &[stats::XDP_FORWARD_NEW],
    );
    let port = u16::from_be_bytes([run.out[ETH_LEN + 20], run.out[ETH_LEN + 21]]);
    assert_eq!(port, ports[0], "the only free port is the one given back");
    assert_rewritten("SYN again", &syn, &run.out, (NODE, port), pod);
    assert_eq!(h.ct_len(), 4);
}

#[test]
fn udp_is_source_nated_with_its_checksum_kept_valid_or_zero() {
    let mut h = harness();
    let fe = (NODE, NP_UDP);
    let pod = (REMOTE_POD, 5353);
    let q = udp((CLIENT, CPORT), fe, b"\x12\x34\x01\x00\x00\x01query");
    let run = xdp(&mut h, "query", &q, XDP_PASS, &[stats::XDP_FORWARD_NEW]);
    let port = u16::from_be_bytes([run.out[ETH_LEN + 20], run.out[ETH_LEN + 21]]);
    assert_rewritten("query", &q, &run.out, (NODE, port), pod);
    let a = udp(pod, (NODE, port), b"\x12\x34\x81\x80answer");
    let run = xdp(&mut h, "answer", &a, XDP_PASS, &[stats::XDP_SNAT_REPLY]);
    assert_rewritten("answer", &a, &run.out, fe, (CLIENT, CPORT));

    let q = udp_no_csum((CLIENT, CPORT), fe);
    let run = xdp(
        &mut h,
        "query without checksum",
        &q,
        XDP_PASS,
        &[stats::XDP_FORWARD_ESTABLISHED],
    );
    assert_rewritten("query without checksum", &q, &run.out, (NODE, port), pod);
    assert_eq!(run.out[ETH_LEN + 26..ETH_LEN + 28], [0, 0], "stays zero");
}

#[test]
fn source_ranges_drop_clients_outside_them() {
    let mut h = harness();
    h.add_frontend(
        6,
        ext(LB_IP, 80, PROTO_TCP),
        SVC_F_LOAD_BALANCER | SVC_F_SNAT | SVC_F_SOURCE_RANGES,
        &[backend(LOCAL_POD, POD_PORT, BACKEND_LOCAL)],
    );
    h.allow_source_range(6, [192, 168, 50, 0], 28);
    // A range of another service allows everyone there, not here.
    h.allow_source_range(5, [0, 0, 0, 0], 0);

    let outside = tcp((CLIENT, CPORT), (LB_IP, 80), SYN);
    xdp(
        &mut h,
        "client outside the ranges",
        &outside,
        XDP_DROP,
        &[stats::DROP_SOURCE_RANGE],
    );
    assert_eq!(h.ct_len(), 0);

    let inside_client = [192, 168, 50, 7];
    let inside = tcp((inside_client, CPORT), (LB_IP, 80), SYN);
    let run = xdp(
        &mut h,
        "client inside",
        &inside,
        XDP_PASS,
        &[stats::XDP_FORWARD_NEW],
    );
    assert_rewritten(
        "client inside",
        &inside,
        &run.out,
        (inside_client, CPORT),
        (LOCAL_POD, POD_PORT),
    );
    // Established packets are checked too: the ranges are a property of the frontend.
    h.dp.maps
        .src_ranges
        .remove(&aya::maps::lpm_trie::Key::new(
            32 + 28,
            proxy_common::service::SourceRange4Key {
                svc_id_be: 6u32.to_be_bytes(),
                addr: [192, 168, 50, 0],
            },
        ))
        .unwrap();
    let ack = tcp((inside_client, CPORT), (LB_IP, 80), ACK);
    xdp(
        &mut h,
        "range removed",
        &ack,
        XDP_DROP,
        &[stats::DROP_SOURCE_RANGE],
    );
}

#[test]
fn no_local_endpoint_drops_and_no_endpoint_rejects() {
    let mut h = harness();
    let syn = tcp((CLIENT, CPORT), (NODE, NP_EMPTY_LOCAL), SYN);
    xdp(
        &mut h,
        "eTP Local, no local endpoint",
        &syn,
        XDP_DROP,
        &[stats::DROP_NO_LOCAL_BACKEND],
    );

    for (desc, frame) in [
        (
            "TCP SYN (grown)",
            tcp((CLIENT, CPORT), (NODE, NP_EMPTY), SYN),
        ),
        (
            "TCP with payload (cut)",
            tcp_frame((CLIENT, CPORT), (NODE, NP_EMPTY), ACK, &[0xab; 300]),
        ),
    ] {
        let run = xdp(&mut h, desc, &frame, XDP_TX, &[stats::REJECT_NO_BACKEND]);
        let out = &run.out;
        assert_eq!(out.len(), ETH_LEN + 20 + 8 + 20 + 8, "{desc}: length");
        assert_eq!(out[0..6], frame[6..12], "{desc}: back to the sender's MAC");
        assert_eq!(out[6..12], frame[0..6], "{desc}: from the node's MAC");
        let (ip, _) = assert_checksums(desc, out);
        assert_eq!(ip.source, NODE, "{desc}: from the frontend");
        assert_eq!(ip.destination, CLIENT, "{desc}: to the client");
        let icmp = &out[ETH_LEN + 20..];
        assert_eq!((icmp[0], icmp[1]), (3, 3), "{desc}: port unreachable");
        assert_eq!(fold(icmp, 0), 0xffff, "{desc}: ICMP checksum");
        assert_eq!(
            icmp[8..28],
            frame[ETH_LEN..ETH_LEN + 20],
            "{desc}: quoted header"
        );
        assert_eq!(
            icmp[28..36],
            frame[ETH_LEN + 20..ETH_LEN + 28],
            "{desc}: quoted ports"
        );
    }
    assert_eq!(h.ct_len(), 0);
}

// ---------------------------------------------------------------------------------------
// tc_ingress: hairpin, drop rule.

#[test]
fn hairpin_a_pod_reaching_its_own_service_is_source_nated_to_the_frontend() {
    let mut h = load();
    let vip = ([10, 96, 0, 20], 80);
    let pod = ([10, 244, 1, 9], 8080);
    let client = (pod.0, 45000);
    h.add_frontend(
        1,
        Svc4Key {
            addr: vip.0,
            port: vip.1,
            proto: PROTO_TCP,
            scope: SCOPE_CLUSTER_IP,
        },
        0,
        &[backend(pod.0, pod.1, BACKEND_LOCAL)],
    );
    let syn = tcp(client, vip, SYN);
    let run = tc(
        &mut h,
        "SYN to itself",
        &syn,
        TC_ACT_OK,
        &[stats::FORWARD_NEW, stats::HAIRPIN],
    );
    // From the frontend address at the client's own port, to the pod.
    assert_rewritten("SYN", &syn, &run.out, (vip.0, client.1), pod);
    let f = h
        .ct(ct_key(client.0, client.1, vip.0, vip.1, PROTO_TCP))
        .unwrap();
    assert_eq!(
        (f.nat_addr, f.nat_port, f.flags, f.nat2_addr, f.nat2_port),
        (pod.0, pod.1, CT_FLAG_SNAT, vip.0, client.1)
    );
    let r = h
        .ct(ct_key(pod.0, pod.1, vip.0, client.1, PROTO_TCP))
        .expect("reply entry keyed pod -> frontend:client port");
    assert_eq!(
        (
            r.nat_addr,
            r.nat_port,
            r.dir,
            r.flags,
            r.nat2_addr,
            r.nat2_port
        ),
        (vip.0, vip.1, CT_DIR_REPLY, CT_FLAG_SNAT, client.0, client.1)
    );

    let syn_ack = tcp(pod, (vip.0, client.1), SYN | ACK);
    let run = tc(&mut h, "SYN-ACK", &syn_ack, TC_ACT_OK, &[stats::REPLY]);
    assert_rewritten("SYN-ACK", &syn_ack, &run.out, vip, client);

    let ack = tcp(client, vip, ACK);
    let run = tc(
        &mut h,
        "ACK",
        &ack,
        TC_ACT_OK,
        &[stats::FORWARD_ESTABLISHED],
    );
    assert_rewritten("ACK", &ack, &run.out, (vip.0, client.1), pod);

    // Another pod of the same service is not hairpinned.
    let other = ([10, 244, 1, 10], 45000);
    let syn = tcp(other, vip, SYN);
    let run = tc(
        &mut h,
        "SYN from another pod",
        &syn,
        TC_ACT_OK,
        &[stats::FORWARD_NEW],
    );
    assert_rewritten("another pod", &syn, &run.out, other, pod);
}

#[test]
fn hairpin_reply_whose_client_port_is_a_frontend_port_is_still_a_reply() {
    let mut h = load();
    let vip = [10, 96, 0, 21];
    let pod = ([10, 244, 1, 11], 8080);
    // The pod's client port happens to be a port the VIP also serves.
    let client = (pod.0, 53);
    for (id, port) in [(1, 80), (2, 53)] {
        h.add_frontend(
            id,
            Svc4Key {
                addr: vip,
                port,
                proto: PROTO_TCP,
                scope: SCOPE_CLUSTER_IP,
            },
            0,
            &[backend(pod.0, pod.1, BACKEND_LOCAL)],
        );
    }
    let syn = tcp(client, (vip, 80), SYN);
    tc(
        &mut h,
        "SYN",
        &syn,
        TC_ACT_OK,
        &[stats::FORWARD_NEW, stats::HAIRPIN],
    );
    let syn_ack = tcp(pod, (vip, 53), SYN | ACK);
    let run = tc(&mut h, "SYN-ACK", &syn_ack, TC_ACT_OK, &[stats::REPLY]);
    assert_rewritten("SYN-ACK", &syn_ack, &run.out, (vip, 80), client);
}

#[test]
fn tc_drops_instead_of_rejecting_when_only_remote_endpoints_exist() {
    let mut h = load();
    let vip = [10, 96, 0, 30];
    h.add_frontend(
        1,
        Svc4Key {
            addr: vip,
            port: 80,
            proto: PROTO_TCP,
            scope: SCOPE_CLUSTER_IP,
        },
        SVC_F_DROP_EMPTY,
        &[],
    );
    let syn = tcp((CLIENT, CPORT), (vip, 80), SYN);
    tc(
        &mut h,
        "iTP Local, no local endpoint",
        &syn,
        TC_ACT_SHOT,
        &[stats::DROP_NO_LOCAL_BACKEND],
    );
}

// ---------------------------------------------------------------------------------------
// Forwarding with bpf_fib_lookup, in a namespace of the test's own.

/// The index of interface `name` in the calling thread's namespace.
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
fn fib_forwarding_sends_source_nated_packets_back_out_or_to_another_interface() {
    testbed::require_root().unwrap();
    let run_id = unique_run_id();
    let ns = NetNs::create(&format!("bp{run_id}-fib")).unwrap();
    // wire: the node's uplink (clients and node B on it); wire2: another network with
    // the pods of a third node; the peers only need to exist.
    for cmd in [
        "link add wire type veth peer name wirepeer",
        "link add wire2 type veth peer name wire2peer",
        "addr add 192.168.50.2/24 dev wire",
        "addr add 192.168.70.2/24 dev wire2",
        "link set wire up",
        "link set wirepeer up",
        "link set wire2 up",
        "link set wire2peer up",
        "route add 10.244.2.0/24 via 192.168.50.3 dev wire",
        "route add 10.244.3.0/24 via 192.168.70.3 dev wire2",
        "neigh add 192.168.50.3 lladdr 02:00:00:00:00:0b dev wire nud permanent",
        "neigh add 192.168.50.100 lladdr 02:00:00:00:00:05 dev wire nud permanent",
        "neigh add 192.168.70.3 lladdr 02:00:00:00:00:0c dev wire2 nud permanent",
    ] {
        ns.ip(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    ns.sysctl("ipv4/ip_forward", "1").unwrap();
    let wire_mac = mac_of(&ns, "wire");
    let wire2_mac = mac_of(&ns, "wire2");

    let mut h = harness();
    h.set_node_config(node_cfg(NODE_F_FIB_FORWARD));
    h.add_frontend(
        8,
        ext(NODE, 30090, PROTO_TCP),
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[backend([10, 244, 3, 4], POD_PORT, 0)],
    );
    let fe = (NODE, NP_REMOTE);

    let (tx, redirect, reply, no_neigh, local) = ns
        .run(|| {
            let wire = ifindex("wire");
            let mut xdp_on = |frame: &[u8]| {
                let before = h.stats();
                let run = h
                    .try_run_xdp(PROG_XDP_NODEPORT, frame, 1, Some(wire))
                    .expect("test run");
                (run, delta(&before, &h.stats()))
            };
            let tx = xdp_on(&tcp((CLIENT, CPORT), fe, SYN));
            let redirect = xdp_on(&tcp((CLIENT, CPORT), (NODE, 30090), SYN));
            let port = u16::from_be_bytes([tx.0.out[ETH_LEN + 20], tx.0.out[ETH_LEN + 21]]);
            let reply = xdp_on(&tcp((REMOTE_POD, POD_PORT), (NODE, port), SYN | ACK));
            // A client with no neighbour entry yet: the stack resolves it.
            let no_neigh = xdp_on(&tcp(([192, 168, 50, 200], CPORT), fe, SYN));
            let port =
                u16::from_be_bytes([no_neigh.0.out[ETH_LEN + 20], no_neigh.0.out[ETH_LEN + 21]]);
            let back = xdp_on(&tcp((REMOTE_POD, POD_PORT), (NODE, port), SYN | ACK));
            // A DNAT-only connection to a local pod always goes through the stack.
            let local = xdp_on(&tcp((CLIENT, CPORT), (NODE, NP_LOCAL), SYN));
            (tx, redirect, reply, back, local)
        })
        .unwrap();

    // Out of the interface it came in on: XDP_TX, next hop node B's MAC, TTL - 1.
    let (run, d) = tx;
    assert_eq!(run.ret, XDP_TX, "to node B: XDP_TX");
    assert_eq!(
        d,
        counted(&[stats::XDP_FORWARD_NEW, stats::XDP_FIB_REDIRECT])
    );
    assert_eq!(run.out[0..6], [2, 0, 0, 0, 0, 0x0b], "next hop's MAC");
    assert_eq!(run.out[6..12], wire_mac, "the uplink's MAC");
    let (ip, _) = assert_checksums("to node B", &run.out);
    assert_eq!(ip.time_to_live, 63, "TTL decremented");
    assert_eq!(ip.destination, REMOTE_POD);

    let (run, d) = redirect;
    assert_eq!(run.ret, XDP_REDIRECT, "to another interface: XDP_REDIRECT");
    assert_eq!(
        d,
        counted(&[stats::XDP_FORWARD_NEW, stats::XDP_FIB_REDIRECT])
    );
    assert_eq!(run.out[0..6], [2, 0, 0, 0, 0, 0x0c]);
    assert_eq!(run.out[6..12], wire2_mac);
    assert_checksums("to wire2", &run.out);

    let (run, d) = reply;
    assert_eq!(run.ret, XDP_TX, "reply to the client: XDP_TX");
    assert_eq!(
        d,
        counted(&[stats::XDP_SNAT_REPLY, stats::XDP_FIB_REDIRECT])
    );
    assert_eq!(run.out[0..6], CLIENT_MAC, "the client's MAC");
    let (ip, _) = assert_checksums("reply", &run.out);
    assert_eq!((ip.source, ip.destination), (NODE, CLIENT));
    assert_eq!(ip.time_to_live, 63);

    let (run, d) = no_neigh;
    assert_eq!(run.ret, XDP_PASS, "no neighbour entry: to the stack");
    assert_eq!(d, counted(&[stats::XDP_SNAT_REPLY]));
    let (ip, _) = assert_checksums("no neighbour", &run.out);
    assert_eq!(ip.time_to_live, 64, "the stack decrements it");

    let (run, d) = local;
    assert_eq!(run.ret, XDP_PASS, "local pod: to the stack");
    assert_eq!(d, counted(&[stats::XDP_FORWARD_NEW]));
}
