//! The harness itself, without the agent: pods reach each other through the node, servers
//! answer with their names, and everything is gone after the guards drop.
//! Needs root (CI runs as root).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use testbed::{
    ConnectOutcome, HttpConnection, Topology, UdpOutcome,
    client::{connect, http_get, udp_exchange, udp_request},
    cluster::{Cluster, DNS_PORT, HTTP_PORT},
};

#[test]
fn pods_reach_backends_through_the_node() {
    let cluster = Cluster::new(1, 2).expect("building the testbed");
    let client = &cluster.client().ns;
    for name in ["b1", "b2"] {
        let ip = cluster.backend(name).ip;
        assert_eq!(http_get(client, ip, HTTP_PORT).unwrap(), name);
        assert_eq!(udp_request(client, ip, DNS_PORT).unwrap(), name);
    }

    // Kept-alive connection: several answers over one connection.
    let mut conn = HttpConnection::open(client, cluster.backend("b1").ip, HTTP_PORT).unwrap();
    for _ in 0..5 {
        assert_eq!(conn.get().unwrap(), "b1");
    }
    assert_eq!(cluster.http_servers[0].requests(), 6);
}

#[test]
fn closed_ports_refuse_and_the_outcomes_say_so() {
    let cluster = Cluster::new(1, 1).expect("building the testbed");
    let client = &cluster.client().ns;
    let b1 = cluster.backend("b1").ip;

    let out = connect(client, b1, 81, Duration::from_secs(2)).unwrap();
    assert!(matches!(out, ConnectOutcome::Refused(_)), "{out:?}");
    assert!(out.elapsed() < Duration::from_secs(1));

    let out = udp_exchange(client, b1, 54, Duration::from_secs(2)).unwrap();
    assert!(matches!(out, UdpOutcome::Refused(_)), "{out:?}");

    // No route in the node for this address: unreachable (or silence), never connected.
    let out = connect(
        client,
        Ipv4Addr::new(10, 96, 0, 99),
        80,
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(!out.is_connected(), "{out:?}");
}

#[test]
fn guards_remove_the_namespaces() {
    let (names, glob) = {
        let topo = Topology::new(1, 1).expect("building the testbed");
        let names: Vec<String> = [&topo.node, &topo.clients[0].ns, &topo.backends[0].ns]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        for n in &names {
            assert!(Path::new("/run/netns").join(n).exists(), "{n} missing");
        }
        assert!(topo.backends[0].node_if.len() <= 15);
        (names, topo.node_interfaces_glob())
    };
    assert!(glob.starts_with("bpv") && glob.ends_with("-*"), "{glob}");
    for n in &names {
        assert!(!Path::new("/run/netns").join(n).exists(), "{n} left behind");
    }
}
