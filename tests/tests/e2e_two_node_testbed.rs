//! The two-node testbed itself, without any agent: pods reach pods on the other node
//! through the nodes' uplinks, the external client reaches both nodes, a process run in a
//! node's namespace and in a test cgroup reaches pods, the LAN is set up as a wire
//! (checksum offload off, `xdp_floor` on the LAN side), and everything is gone after the
//! guards drop. Needs root (CI runs as root).

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use testbed::{
    NetNs, PeerServer,
    client::{Asked, ask_tcp, ask_udp},
    two_node::{
        CLIENT_IP, CLIENT_IP6, NODE_A_IP, NODE_A_IP6, NODE_B_IP, NODE_B_IP6, NodeProbe, PEER_PORT,
        TwoNode, UPLINK, Which, tx_checksum_on,
    },
};

const PROBE: &str = env!("CARGO_BIN_EXE_testbed-probe");
const WAIT: Duration = Duration::from_secs(2);

/// The backend's name and the peer it saw, or a panic naming what came back instead.
fn answer(asked: Asked, what: &str) -> (String, SocketAddrV4) {
    asked
        .answer()
        .unwrap_or_else(|| panic!("{what}: no answer ({asked:?})"))
}

/// Like [`answer`] for a peer of either family.
fn reply(asked: Asked, what: &str) -> (String, SocketAddr) {
    asked
        .reply()
        .unwrap_or_else(|| panic!("{what}: no answer ({asked:?})"))
}

fn ip_link_show(ns: &NetNs, ifname: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-d", "link", "show", ifname])
        .output()
        .expect("running ip");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_two_nodes_carry_traffic_between_pods_client_and_node_processes() {
    let (namespaces, pins, cgroup): (Vec<String>, Vec<PathBuf>, PathBuf) = {
        let mut tb = TwoNode::new(2).expect("building the two-node testbed");

        // Pod to pod across the nodes, both ways, TCP and UDP: no NAT anywhere.
        for (from, to) in [("a1", "b1"), ("b2", "a2"), ("a1", "a2")] {
            let (src, dst) = (tb.pod(from), tb.pod(to));
            for asked in [
                ask_tcp(&src.ns, dst.ip, PEER_PORT, WAIT).unwrap(),
                ask_udp(&src.ns, dst.ip, PEER_PORT, WAIT).unwrap(),
            ] {
                let (name, peer) = answer(asked, &format!("{from} -> {to}"));
                assert_eq!(name, to);
                assert_eq!(*peer.ip(), src.ip, "{from} -> {to}: the backend saw {peer}");
            }
        }

        // The client reaches a process on each node through the LAN.
        let on_a = PeerServer::start(&tb.a.ns, "node-a", PEER_PORT).unwrap();
        let on_b = PeerServer::start(&tb.b.ns, "node-b", PEER_PORT).unwrap();
        for (ip, want) in [(NODE_A_IP, "node-a"), (NODE_B_IP, "node-b")] {
            for asked in [
                ask_tcp(&tb.client, ip, PEER_PORT, WAIT).unwrap(),
                ask_udp(&tb.client, ip, PEER_PORT, WAIT).unwrap(),
            ] {
                let (name, peer) = answer(asked, &format!("client -> {ip}"));
                assert_eq!(name, want);
                assert_eq!(*peer.ip(), CLIENT_IP);
            }
        }
        assert_eq!((on_a.answered(), on_b.answered()), (2, 2));

        // A process in node A's namespace and in a cgroup of its own reaches a pod on
        // node B, from node A's address.
        let cgroup = tb.make_cgroup(Which::A).unwrap();
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
        assert!(procs.trim().is_empty(), "a fresh cgroup holds {procs:?}");
        for proto in ["tcp", "udp"] {
            let asked = tb
                .ask_from_node(
                    Which::A,
                    &NodeProbe {
                        bin: Path::new(PROBE),
                        cgroup: &cgroup,
                    },
                    proto,
                    tb.pod("b1").ip,
                    PEER_PORT,
                    WAIT,
                )
                .unwrap();
            let (name, peer) = answer(asked, &format!("node A process -> b1 ({proto})"));
            assert_eq!(name, "b1");
            assert_eq!(*peer.ip(), NODE_A_IP);
        }

        // Nothing listens on this port: refused at once, from a pod of the other node.
        let refused = ask_tcp(&tb.pod("a1").ns, tb.pod("b1").ip, PEER_PORT + 1, WAIT).unwrap();
        assert_eq!(refused, Asked::Refused);

        // The LAN is a wire: no checksum left for hardware on what feeds it, and the LAN
        // side of each veth runs xdp_floor in native mode.
        for ns in [&tb.a.ns, &tb.b.ns, &tb.client] {
            assert!(!tx_checksum_on(ns, UPLINK).unwrap(), "{}", ns.name());
        }
        for letter in ["a", "b", "c"] {
            let ifname = format!("bpl{}-{letter}", tb.run);
            assert!(!tx_checksum_on(&tb.lan, &ifname).unwrap(), "{ifname}");
            let shown = ip_link_show(&tb.lan, &ifname);
            assert!(shown.contains("prog/xdp"), "{ifname}: {shown}");
            assert!(shown.contains("master br0"), "{ifname}: {shown}");
        }
        // Pods keep the default (offload on): only the LAN is a wire.
        assert!(tx_checksum_on(&tb.pod("a1").ns, "eth0").unwrap());

        drop((on_a, on_b));
        let namespaces = [&tb.lan, &tb.client, &tb.a.ns, &tb.b.ns, &tb.pod("b2").ns]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        let pins = vec![tb.a.bpffs().to_owned(), tb.b.bpffs().to_owned()];
        (namespaces, pins, cgroup)
    };
    for n in &namespaces {
        assert!(!Path::new("/run/netns").join(n).exists(), "{n} left behind");
    }
    for p in &pins {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}

#[test]
fn ipv6_runs_alongside_ipv4_between_pods_client_and_nodes() {
    let mut tb = TwoNode::new(2).expect("building the two-node testbed");
    assert_eq!(tb.pod("a1").ip6().to_string(), "fd00:244:1::11");
    assert_eq!(tb.pod("b2").ip6().to_string(), "fd00:244:2::12");

    // Pod to pod over IPv6, across the nodes both ways and on one node, TCP and UDP: the
    // answer comes from the address asked, and the backend sees the asking pod's IPv6
    // address (no NAT anywhere).
    for (from, to) in [("a1", "b1"), ("b2", "a2"), ("a1", "a2")] {
        let (src, dst) = (tb.pod(from), tb.pod(to));
        for asked in [
            ask_tcp(&src.ns, dst.ip6(), PEER_PORT, WAIT).unwrap(),
            ask_udp(&src.ns, dst.ip6(), PEER_PORT, WAIT).unwrap(),
        ] {
            let what = format!("{from} -> {to} over IPv6");
            assert_eq!(
                asked.from(),
                Some(SocketAddr::new(dst.ip6().into(), PEER_PORT)),
                "{what}: {asked:?}"
            );
            let (name, peer) = reply(asked, &what);
            assert_eq!(name, to);
            assert_eq!(
                peer.ip(),
                IpAddr::V6(src.ip6()),
                "{what}: the backend saw {peer}"
            );
        }
        // IPv4 still answers as before, with an IPv4 peer.
        let (_, peer) = answer(
            ask_tcp(&src.ns, dst.ip, PEER_PORT, WAIT).unwrap(),
            &format!("{from} -> {to} over IPv4"),
        );
        assert_eq!(*peer.ip(), src.ip);
    }

    // The external client reaches a process on each node over the LAN's IPv6.
    let on_a = PeerServer::start(&tb.a.ns, "node-a", PEER_PORT).unwrap();
    let on_b = PeerServer::start(&tb.b.ns, "node-b", PEER_PORT).unwrap();
    for (ip, want) in [(NODE_A_IP6, "node-a"), (NODE_B_IP6, "node-b")] {
        for asked in [
            ask_tcp(&tb.client, ip, PEER_PORT, WAIT).unwrap(),
            ask_udp(&tb.client, ip, PEER_PORT, WAIT).unwrap(),
        ] {
            let (name, peer) = reply(asked, &format!("client -> {ip}"));
            assert_eq!(name, want);
            assert_eq!(peer.ip(), IpAddr::V6(CLIENT_IP6));
        }
    }
    // A node reaches a pod of the other node over IPv6 from its LAN address (the route
    // to the other pod range goes via the other node).
    let (_, peer) = reply(
        ask_tcp(&tb.a.ns, tb.pod("b1").ip6(), PEER_PORT, WAIT).unwrap(),
        "node A -> b1 over IPv6",
    );
    assert_eq!(peer.ip(), IpAddr::V6(NODE_A_IP6));
    assert_eq!((on_a.answered(), on_b.answered()), (2, 2));

    // The node-side veth answers neighbour solicitations for the pod's gateway, and the
    // node resolved the pod: both neighbour entries are there after the traffic.
    let a1 = tb.pod("a1");
    let shown = ip_out(&a1.ns, &["-6", "neigh", "show", "dev", "eth0"]);
    assert!(shown.contains("fe80::1 "), "a1's neighbours: {shown}");
    let shown = ip_out(&tb.a.ns, &["-6", "neigh", "show", "dev", &a1.node_if]);
    assert!(
        shown.contains("fd00:244:1::11 "),
        "node A's neighbours: {shown}"
    );

    // A process of node A in a cgroup of its own reaches b1 over IPv6 (the probe takes
    // either family).
    let cgroup = tb.make_cgroup(Which::A).unwrap();
    for proto in ["tcp", "udp"] {
        let asked = tb
            .ask_from_node(
                Which::A,
                &NodeProbe {
                    bin: Path::new(PROBE),
                    cgroup: &cgroup,
                },
                proto,
                tb.pod("b1").ip6(),
                PEER_PORT,
                WAIT,
            )
            .unwrap();
        let (name, peer) = reply(asked, &format!("node A process -> b1 ({proto}, IPv6)"));
        assert_eq!(name, "b1");
        assert_eq!(peer.ip(), IpAddr::V6(NODE_A_IP6));
    }

    // Nothing listens on this port: refused at once over IPv6 too (TCP RST; ICMPv6 port
    // unreachable for UDP on a connected socket).
    let refused = ask_tcp(&tb.pod("a1").ns, tb.pod("b1").ip6(), PEER_PORT + 1, WAIT).unwrap();
    assert_eq!(refused, Asked::Refused);
    let udp =
        testbed::client::udp_exchange(&tb.pod("a1").ns, tb.pod("b1").ip6(), PEER_PORT + 1, WAIT)
            .unwrap();
    assert!(
        matches!(udp, testbed::UdpOutcome::Refused(_)),
        "UDP to a closed IPv6 port: {udp:?}"
    );
}

fn ip_out(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("running ip");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
