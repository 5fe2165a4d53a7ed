//! `xdp_nodeport` on real interfaces, without the agent: a node namespace with the program
//! on its two interfaces (maps written by `testbed::datapath::DatapathHarness`), a client
//! namespace on one, a "remote node" namespace holding the backend pod's address on the
//! other. UDP datagrams to the NodePort are source-NAT-ed to the node's address and a port
//! of the SNAT range, and the backend's answers come back to the client from the NodePort,
//! through the stack and with `bpf_fib_lookup` forwarding (XDP_REDIRECT between the two
//! interfaces; the peers run `xdp_floor` so that redirected frames are received).
//!
//! The sockets send UDP without checksums (SO_NO_CHECK): a locally sent datagram over a
//! veth is CHECKSUM_PARTIAL, which XDP cannot complete (see `proxy-ebpf/src/nat.rs`); a
//! zero checksum stays zero through the rewrite. The node interfaces have `accept_local`
//! set: the stack drops a packet whose source is one of its own addresses (the SNAT
//! address, and the NodePort's address on replies) unless told otherwise, and such packets
//! go through the stack when the FIB cannot forward them yet (no neighbour entry).

use std::{net::UdpSocket, os::fd::AsRawFd, time::Duration};

use aya::programs::XdpMode;
use proxy_common::{
    PROTO_UDP,
    service::{
        Backend4, NODE_F_FIB_FORWARD, NodeConfig4, SCOPE_EXTERNAL, SVC_F_NODE_PORT, SVC_F_SNAT,
        Svc4Key,
    },
    stats,
};
use testbed::{
    datapath::{DatapathHarness, MapSizes, PROG_XDP_FLOOR, PROG_XDP_NODEPORT},
    netns::NetNs,
    unique_run_id,
};

const NODE: &str = "192.168.50.2";
const NODE_PORT: u16 = 30053;
const POD: &str = "10.244.2.7";
const POD_PORT: u16 = 5353;
const SNAT_MIN: u16 = 31000;
const SNAT_MAX: u16 = 31099;
const ROUNDS: usize = 5;

/// UDP without checksums (SO_NO_CHECK).
fn udp_socket(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_NO_CHECK");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn ip(ns: &NetNs, cmds: &[&str]) {
    for c in cmds {
        ns.ip(&c.split(' ').collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("ip -n {} {c}: {e:#}", ns.name()));
    }
}

/// The peer addresses the backend saw, the answers the client got (text, source), and the
/// counters.
fn nodeport_round_trips(fib: bool) -> (Vec<String>, Vec<(String, String)>, Vec<u64>) {
    let run = unique_run_id();
    let node = NetNs::create(&format!("bp{run}-node")).unwrap();
    let client = NetNs::create(&format!("bp{run}-cl")).unwrap();
    let remote = NetNs::create(&format!("bp{run}-nb")).unwrap();
    ip(
        &node,
        &[
            &format!(
                "link add wire type veth peer name cwire netns {}",
                client.name()
            ),
            &format!(
                "link add wireb type veth peer name bwire netns {}",
                remote.name()
            ),
            "addr add 192.168.50.2/24 dev wire",
            "addr add 192.168.60.2/24 dev wireb",
            "link set wire up",
            "link set wireb up",
            "route add 10.244.2.0/24 via 192.168.60.3",
        ],
    );
    ip(
        &client,
        &["addr add 192.168.50.100/24 dev cwire", "link set cwire up"],
    );
    ip(
        &remote,
        &[
            "addr add 192.168.60.3/24 dev bwire",
            "addr add 10.244.2.7/32 dev lo",
            "link set bwire up",
            "route add default via 192.168.60.2",
        ],
    );
    node.sysctl("ipv4/ip_forward", "1").unwrap();
    for ifname in ["wire", "wireb"] {
        node.sysctl(&format!("ipv4/conf/{ifname}/accept_local"), "1")
            .unwrap();
    }

    let mut h = DatapathHarness::load(MapSizes {
        services: 64,
        backend_slots: 256,
        conntrack: 4096,
    });
    h.set_node_config(NodeConfig4 {
        snat_addr: [192, 168, 50, 2],
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags: if fib { NODE_F_FIB_FORWARD } else { 0 },
    });
    h.add_frontend(
        1,
        Svc4Key {
            addr: [192, 168, 50, 2],
            port: NODE_PORT,
            proto: PROTO_UDP,
            scope: SCOPE_EXTERNAL,
        },
        SVC_F_NODE_PORT | SVC_F_SNAT,
        &[Backend4 {
            addr: [10, 244, 2, 7],
            port: POD_PORT,
            flags: 0,
            weight: 1,
        }],
    );
    // The links live as long as the harness's program, detached when it drops.
    let attach = |ns: &NetNs, h: &mut DatapathHarness, prog: &str, ifname: &str| {
        ns.run(|| {
            h.dp.xdp_program_mut(prog)
                .unwrap()
                .attach(ifname, XdpMode::default())
                .unwrap_or_else(|e| panic!("attaching {prog} to {ifname}: {e}"))
        })
        .unwrap();
    };
    attach(&node, &mut h, PROG_XDP_NODEPORT, "wire");
    attach(&node, &mut h, PROG_XDP_NODEPORT, "wireb");
    attach(&client, &mut h, PROG_XDP_FLOOR, "cwire");
    attach(&remote, &mut h, PROG_XDP_FLOOR, "bwire");

    let server = remote
        .run(|| udp_socket(&format!("{POD}:{POD_PORT}")))
        .unwrap();
    let backend = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..ROUNDS {
            let Ok((_, peer)) = server.recv_from(&mut buf) else {
                break;
            };
            seen.push(peer.to_string());
            server.send_to(b"pong", peer).unwrap();
        }
        seen
    });
    let sock = client.run(|| udp_socket("192.168.50.100:0")).unwrap();
    let mut answers = Vec::new();
    for _ in 0..ROUNDS {
        sock.send_to(b"ping", (NODE, NODE_PORT)).unwrap();
        let mut buf = [0u8; 64];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => answers.push((
                String::from_utf8_lossy(&buf[..n]).into_owned(),
                from.to_string(),
            )),
            Err(e) => answers.push((format!("no answer: {e}"), String::new())),
        }
    }
    let seen = backend.join().unwrap();
    (seen, answers, h.stats().to_vec())
}

fn check(fib: bool) -> Vec<u64> {
    let (seen, answers, counters) = nodeport_round_trips(fib);
    assert_eq!(seen.len(), ROUNDS, "datagrams at the backend: {seen:?}");
    let port: u16 = seen[0]
        .strip_prefix(&format!("{NODE}:"))
        .unwrap_or_else(|| panic!("the backend saw {}, not the node", seen[0]))
        .parse()
        .unwrap();
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&port),
        "SNAT port {port} outside the range"
    );
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "one flow, one SNAT port: {seen:?}"
    );
    let from_nodeport = format!("{NODE}:{NODE_PORT}");
    for (text, from) in &answers {
        assert_eq!(
            (text.as_str(), from.as_str()),
            ("pong", from_nodeport.as_str()),
            "answers: {answers:?}"
        );
    }
    assert_eq!(counters[stats::XDP_FORWARD_NEW as usize], 1);
    assert_eq!(
        counters[stats::XDP_FORWARD_ESTABLISHED as usize],
        ROUNDS as u64 - 1
    );
    assert_eq!(counters[stats::XDP_SNAT_REPLY as usize], ROUNDS as u64);
    counters
}

#[test]
fn nodeport_snat_through_the_stack() {
    let counters = check(false);
    assert_eq!(counters[stats::XDP_FIB_REDIRECT as usize], 0);
}

#[test]
fn nodeport_snat_forwarded_from_xdp() {
    let counters = check(true);
    // The first packet each way goes through the stack, which resolves the next hop; the
    // rest are redirected from XDP.
    let translated = 2 * ROUNDS as u64;
    let redirected = counters[stats::XDP_FIB_REDIRECT as usize];
    assert!(
        redirected >= translated - 2 && redirected <= translated,
        "{redirected} of {translated} translated packets forwarded from XDP"
    );
}
