//! IPv6 and dual stack end to end on the two-node testbed (issue 4): an IPv6 ClusterIP
//! reached from a pod with backends on both nodes; a dual-stack Service answered on each
//! of its ClusterIPs by a backend of that family; IPv6 NodePorts from the external client
//! with externalTrafficPolicy Cluster (source-NAT-ed to node A's IPv6 address) and Local
//! (the client's address kept, dropped and counted on the node without an endpoint); an
//! IPv6 Service without endpoints refused at once; an IPv6 LoadBalancer ingress IP and its
//! loadBalancerSourceRanges; a dual-stack NodePort source-NAT-ed per family; IPv6 hairpin
//! and internalTrafficPolicy Local; an IPv6 connection and service across an agent
//! restart. The IPv6 plan of the testbed is in `testbed::two_node`. Needs root (CI runs as
//! root).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use testbed::{
    EchoServer, EndpointSlice, Service, ServiceInfo, UdpOutcome,
    client::{Asked, ask_tcp, ask_udp, http_get_any, udp_exchange},
    netns::NetNs,
    two_node::{
        CLIENT_IP6, NODE_A_IP6, NODE_B_IP6, SERVICE_NAMESPACE, SERVICE_PORT, TwoNode, Which,
        peer_service, peer_service6,
    },
};

/// How long a check that expects silence (a dropped SYN) waits: bounded, and long enough
/// for an answer on this testbed, where one takes well under a millisecond.
const SILENCE: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(2);
/// Bound on the questions asked while waiting to see every backend of a service.
const MAX_ASKS: usize = 60;
/// The agent's default SNAT port range (`--snat-ports`).
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

/// An address of the testbed's IPv6 ClusterIP range fd00:96::/112.
const fn cluster_ip6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last)
}

fn two_nodes(pods_per_node: usize) -> TwoNode {
    TwoNode::new(pods_per_node).expect("building the two-node testbed")
}

fn start_agents(tb: &mut TwoNode) {
    tb.start_agent(Which::A, &[]).expect("agent on node A");
    tb.start_agent(Which::B, &[]).expect("agent on node B");
}

/// The backend's name and the peer it saw, or a panic naming what came back instead.
fn reply(asked: &Asked, what: &str, tb: &TwoNode) -> (String, SocketAddr) {
    asked
        .reply()
        .unwrap_or_else(|| panic!("{what}: no answer ({asked:?})\n{}", tb.agent_logs()))
}

/// An address as `bpfproxy services -o json` prints it (bare, or in brackets).
fn listed_ip(s: &ServiceInfo) -> Option<IpAddr> {
    s.ip.trim_matches(|c| c == '[' || c == ']').parse().ok()
}

/// Asks `proto` `addr:port` from `from` (at most [`MAX_ASKS`] times) until every backend
/// in `want` answered; checks each answer with `check(name, peer, from)` on the way.
/// Returns the names seen.
fn ask_until_all(
    tb: &TwoNode,
    from: &NetNs,
    proto: &str,
    addr: IpAddr,
    want: &[&str],
    check: impl Fn(&str, SocketAddr, Option<SocketAddr>),
) -> BTreeSet<String> {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut seen = BTreeSet::new();
    for _ in 0..MAX_ASKS {
        let asked = match proto {
            "tcp" => ask_tcp(from, addr, SERVICE_PORT, WAIT).unwrap(),
            _ => ask_udp(from, addr, SERVICE_PORT, WAIT).unwrap(),
        };
        let what = format!("{proto} {}", SocketAddr::new(addr, SERVICE_PORT));
        let (name, peer) = reply(&asked, &what, tb);
        check(&name, peer, asked.from());
        seen.insert(name);
        if seen == want {
            break;
        }
    }
    assert_eq!(seen, want, "{proto} {addr}: backends that answered");
    seen
}

#[test]
fn ipv6_clusterip_from_a_pod_reaches_backends_on_both_nodes() {
    let cip = cluster_ip6(0x10);
    let mut tb = two_nodes(2);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("cip6", "ClusterIP", cip, None),
            tb.peer_slice6("cip6", &["a2", "b1"]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);
    let a1 = tb.pod("a1");

    // The agent lists the IPv6 frontend with the pods' IPv6 addresses as backends.
    let info =
        tb.a.agent()
            .wait_for_services("cip6 on node A", |all| {
                all.iter().any(|s| s.name == "cip6" && s.protocol == "TCP")
            })
            .unwrap()
            .into_iter()
            .find(|s| s.name == "cip6" && s.protocol == "TCP")
            .unwrap();
    assert_eq!(listed_ip(&info), Some(IpAddr::V6(cip)), "{info:?}");
    let mut want: Vec<String> = [tb.pod("a2").ip6(), tb.pod("b1").ip6()]
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    want.sort();
    let got: Vec<String> = info
        .backend_ips()
        .iter()
        .map(|ip| ip.trim_matches(|c| c == '[' || c == ']').to_owned())
        .collect();
    assert_eq!(got, want, "{info:?}");

    // TCP and UDP from a1 reach both backends, the one on node A and the one on node B;
    // each sees a1's own IPv6 address (no source NAT inside the cluster), and every UDP
    // answer comes from the ClusterIP (the reply from node B is translated back on node
    // A's uplink).
    tb.wait_for_answer(&a1.ns, "tcp", cip, SERVICE_PORT, "b1")
        .unwrap();
    let a1_ip6 = IpAddr::V6(a1.ip6());
    for proto in ["tcp", "udp"] {
        ask_until_all(
            &tb,
            &a1.ns,
            proto,
            cip.into(),
            &["a2", "b1"],
            |name, peer, from| {
                assert_eq!(peer.ip(), a1_ip6, "{proto}: {name} saw {peer}");
                assert_eq!(
                    from,
                    Some(SocketAddr::new(cip.into(), SERVICE_PORT)),
                    "{proto}: answer of {name}"
                );
            },
        );
    }
    // The kernel path counted them as new forwarded connections.
    assert!(tb.a.stat("forward_new").unwrap() >= 4);
}

#[test]
fn dual_stack_service_answers_each_family_from_a_backend_of_that_family() {
    const CIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
    let cip6 = cluster_ip6(0x90);
    let mut tb = two_nodes(2);
    // Different pods per family, so the answer tells which family's backends served it.
    tb.write_services_slices(
        "services.yaml",
        &[(
            peer_service("ds", "ClusterIP", CIP4, None).dual_stack(cip6, "RequireDualStack"),
            vec![tb.peer_slice("ds", &["a2"]), tb.peer_slice6("ds", &["b1"])],
        )],
    )
    .unwrap();
    start_agents(&mut tb);
    let a1 = tb.pod("a1");

    // `bpfproxy services` lists one row per family for each port, each with the backends
    // of its family.
    let rows =
        tb.a.agent()
            .wait_for_services("ds listed for both families on node A", |all| {
                all.iter().filter(|s| s.name == "ds").count() == 4
            })
            .unwrap();
    let rows: Vec<&ServiceInfo> = rows.iter().filter(|s| s.name == "ds").collect();
    for proto in ["TCP", "UDP"] {
        for (ip, backend) in [
            (IpAddr::V4(CIP4), tb.pod("a2").ip.to_string()),
            (IpAddr::V6(cip6), tb.pod("b1").ip6().to_string()),
        ] {
            let row = rows
                .iter()
                .find(|s| s.protocol == proto && listed_ip(s) == Some(ip))
                .unwrap_or_else(|| panic!("no {proto} row for {ip}: {rows:?}"));
            assert_eq!(row.namespace, SERVICE_NAMESPACE);
            assert_eq!(row.port, SERVICE_PORT);
            let got: Vec<String> = row
                .backend_ips()
                .iter()
                .map(|ip| ip.trim_matches(|c| c == '[' || c == ']').to_owned())
                .collect();
            assert_eq!(got, vec![backend], "{row:?}");
        }
    }

    // Over IPv4 the IPv4 backend answers, seeing a1's IPv4 address; over IPv6 the IPv6
    // backend, seeing a1's IPv6 address; answers come from the ClusterIP asked.
    for (cip, backend, peer_ip) in [
        (IpAddr::V4(CIP4), "a2", IpAddr::V4(a1.ip)),
        (IpAddr::V6(cip6), "b1", IpAddr::V6(a1.ip6())),
    ] {
        for proto in ["tcp", "udp"] {
            let asked = tb
                .wait_for_answer(&a1.ns, proto, cip, SERVICE_PORT, backend)
                .unwrap();
            let (_, peer) = reply(&asked, &format!("{proto} {cip}"), &tb);
            assert_eq!(peer.ip(), peer_ip, "{proto} {cip}: {backend} saw {peer}");
            assert_eq!(asked.from(), Some(SocketAddr::new(cip, SERVICE_PORT)));
            // And only that backend, every time.
            for _ in 0..5 {
                let asked = match proto {
                    "tcp" => ask_tcp(&a1.ns, cip, SERVICE_PORT, WAIT).unwrap(),
                    _ => ask_udp(&a1.ns, cip, SERVICE_PORT, WAIT).unwrap(),
                };
                assert_eq!(
                    reply(&asked, &format!("{proto} {cip}"), &tb).0,
                    backend,
                    "{asked:?}"
                );
            }
        }
    }
}

#[test]
fn ipv6_nodeport_cluster_policy_source_nats_to_node_a() {
    const NODE_PORT: u16 = 30090;
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("np6", "NodePort", cluster_ip6(0x40), Some(NODE_PORT)),
            tb.peer_slice6("np6", &["b1"]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);

    // Through node A, whose only endpoint is on node B: b1 sees node A's IPv6 address
    // with a port of the SNAT range (the reply must come back through A).
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_A_IP6, NODE_PORT, "b1")
        .unwrap();
    let (_, peer) = reply(&asked, "tcp via node A", &tb);
    assert_eq!(peer.ip(), IpAddr::V6(NODE_A_IP6), "b1 saw {peer}");
    for i in 0..5 {
        let asked = ask_tcp(&tb.client, NODE_A_IP6, NODE_PORT, WAIT).unwrap();
        let (name, peer) = reply(&asked, &format!("connection {i}"), &tb);
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("b1", IpAddr::V6(NODE_A_IP6)),
            "connection {i}"
        );
        assert!(SNAT_PORTS.contains(&peer.port()), "connection {i}: {peer}");
    }

    // UDP too; the answer comes from the address and port the client asked.
    let asked = tb
        .wait_for_answer(&tb.client, "udp", NODE_A_IP6, NODE_PORT, "b1")
        .unwrap();
    let (_, peer) = reply(&asked, "udp via node A", &tb);
    assert_eq!(peer.ip(), IpAddr::V6(NODE_A_IP6), "b1 saw {peer}");
    assert!(SNAT_PORTS.contains(&peer.port()), "{peer}");
    assert_eq!(
        asked.from(),
        Some(SocketAddr::new(NODE_A_IP6.into(), NODE_PORT))
    );
    // Node A's XDP program translated the replies back.
    assert!(tb.a.stat("xdp_snat_reply").unwrap() >= 7);

    // Through node B, where the endpoint runs: answered too.
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_B_IP6, NODE_PORT, "b1")
        .unwrap();
    assert_eq!(reply(&asked, "tcp via node B", &tb).0, "b1");
}

#[test]
fn ipv6_nodeport_local_policy_keeps_the_client_and_drops_without_a_local_endpoint() {
    const NODE_PORT: u16 = 30091;
    const HEALTH_PORT: u16 = 32002;
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6(
                "np6-local",
                "LoadBalancer",
                cluster_ip6(0x41),
                Some(NODE_PORT),
            )
            .external_policy("Local")
            .health_check_node_port(HEALTH_PORT),
            tb.peer_slice6("np6-local", &["b1"]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);

    // Through node B, which has the endpoint: b1 sees the client itself.
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&tb.client, proto, NODE_B_IP6, NODE_PORT, "b1")
            .unwrap();
        let (_, peer) = reply(&asked, &format!("{proto} via node B"), &tb);
        assert_eq!(peer.ip(), IpAddr::V6(CLIENT_IP6), "{proto}: b1 saw {peer}");
        assert_eq!(
            asked.from(),
            Some(SocketAddr::new(NODE_B_IP6.into(), NODE_PORT))
        );
    }

    // Node A has no local endpoint (once its agent lists the service): the connection
    // is dropped, so it times out, and the drop is counted.
    tb.a.agent()
        .wait_for_services("np6-local on node A", |all| {
            all.iter().any(|s| s.name == "np6-local")
        })
        .unwrap();
    let before = tb.a.stat("drop_no_local_backend").unwrap();
    let asked = ask_tcp(&tb.client, NODE_A_IP6, NODE_PORT, SILENCE).unwrap();
    assert_eq!(
        asked,
        Asked::TimedOut,
        "tcp via node A\n{}",
        tb.agent_logs()
    );
    let asked = ask_udp(&tb.client, NODE_A_IP6, NODE_PORT, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "udp via node A");
    let after = tb.a.stat("drop_no_local_backend").unwrap();
    assert!(
        after >= before + 2,
        "drop_no_local_backend {before} -> {after}"
    );

    // The health-check node port, asked over IPv6, counts the IPv6 endpoints on each
    // node (kube-proxy's IPv6 proxier): 200 on B, 503 on A.
    for (node, status, local) in [(NODE_B_IP6, 200, 1), (NODE_A_IP6, 503, 0)] {
        let answer = testbed::wait_until(
            "the health-check node port to answer over IPv6",
            Duration::from_secs(20),
            || {
                Ok(Some(http_get_any(
                    &tb.client,
                    node,
                    HEALTH_PORT,
                    "/healthz",
                )?))
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()));
        assert_eq!(answer.status, status, "[{node}]:{HEALTH_PORT}: {answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("{node}: body {:?}: {e}", answer.body));
        assert_eq!(body["service"]["name"], "np6-local", "{body}");
        assert_eq!(body["localEndpoints"], local, "{body}");
    }
}

#[test]
fn ipv6_service_without_endpoints_is_refused_at_once() {
    const NODE_PORT: u16 = 30092;
    let cip = cluster_ip6(0x50);
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("empty6", "NodePort", cip, Some(NODE_PORT)),
            tb.peer_slice6("empty6", &[]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);
    for node in [&tb.a, &tb.b] {
        node.agent()
            .wait_for_services("empty6 listed", |all| {
                all.iter().any(|s| s.name == "empty6")
            })
            .unwrap();
    }
    let a1 = tb.pod("a1");
    let before = tb.a.stat("reject_no_backend").unwrap() + tb.b.stat("reject_no_backend").unwrap();

    // From a pod to the ClusterIP, and from the client to the NodePort on either node:
    // TCP gets a RST, UDP an ICMPv6 port unreachable (ECONNREFUSED on a connected
    // socket), within the wait (not a silent drop).
    let targets = [
        (&a1.ns, IpAddr::V6(cip), SERVICE_PORT),
        (&tb.client, IpAddr::V6(NODE_A_IP6), NODE_PORT),
        (&tb.client, IpAddr::V6(NODE_B_IP6), NODE_PORT),
    ];
    for (from, addr, port) in targets {
        let asked = ask_tcp(from, addr, port, WAIT).unwrap();
        assert_eq!(
            asked,
            Asked::Refused,
            "tcp {} from {}\n{}",
            SocketAddr::new(addr, port),
            from.name(),
            tb.agent_logs()
        );
        let udp = udp_exchange(from, addr, port, WAIT).unwrap();
        assert!(
            matches!(udp, UdpOutcome::Refused(_)),
            "udp {} from {}: {udp:?}",
            SocketAddr::new(addr, port),
            from.name()
        );
    }
    let after = tb.a.stat("reject_no_backend").unwrap() + tb.b.stat("reject_no_backend").unwrap();
    assert!(after >= before + 6, "reject_no_backend {before} -> {after}");
}

#[test]
fn ipv6_lb_ingress_ip_from_the_external_client() {
    let lb_ip = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x20);
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("lb6", "LoadBalancer", cluster_ip6(0x60), Some(30093)).lb_ingress(lb_ip),
            tb.peer_slice6("lb6", &["b1"]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);

    // The client routes fd00:203::/64 via node A; the endpoint is on node B: with the
    // Cluster policy b1 sees node A's IPv6 address, and the answer comes from the LB IP.
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&tb.client, proto, lb_ip, SERVICE_PORT, "b1")
            .unwrap();
        let (_, peer) = reply(&asked, &format!("{proto} {lb_ip}"), &tb);
        assert_eq!(peer.ip(), IpAddr::V6(NODE_A_IP6), "{proto}: b1 saw {peer}");
        assert!(SNAT_PORTS.contains(&peer.port()), "{proto}: {peer}");
        assert_eq!(
            asked.from(),
            Some(SocketAddr::new(lb_ip.into(), SERVICE_PORT))
        );
    }
    // A pod reaches the LB IP too, short-circuited: b1 sees the pod itself.
    let a1 = tb.pod("a1");
    let asked = tb
        .wait_for_answer(&a1.ns, "tcp", lb_ip, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(
        reply(&asked, "a1 -> lb ip", &tb).1.ip(),
        IpAddr::V6(a1.ip6())
    );
}

#[test]
fn dual_stack_nodeport_source_nats_each_family_to_the_node_address_of_that_family() {
    const NODE_PORT: u16 = 30094;
    const CIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 94);
    let mut tb = two_nodes(1);
    tb.write_services_slices(
        "services.yaml",
        &[(
            peer_service("ds-np", "NodePort", CIP4, Some(NODE_PORT))
                .dual_stack(cluster_ip6(0x94), "RequireDualStack"),
            vec![
                tb.peer_slice("ds-np", &["b1"]),
                tb.peer_slice6("ds-np", &["b1"]),
            ],
        )],
    )
    .unwrap();
    start_agents(&mut tb);

    // One nodePort, served on node A's IPv4 and IPv6 addresses: the pod on node B sees
    // node A's address of the family asked, with a port of the SNAT range, and the
    // answer comes from the address and port the client asked.
    for (node, proto) in [
        (IpAddr::V4(testbed::two_node::NODE_A_IP), "tcp"),
        (IpAddr::V4(testbed::two_node::NODE_A_IP), "udp"),
        (IpAddr::V6(NODE_A_IP6), "tcp"),
        (IpAddr::V6(NODE_A_IP6), "udp"),
    ] {
        let asked = tb
            .wait_for_answer(&tb.client, proto, node, NODE_PORT, "b1")
            .unwrap();
        let (_, peer) = reply(&asked, &format!("{proto} {node}"), &tb);
        assert_eq!(peer.ip(), node, "{proto} via {node}: b1 saw {peer}");
        assert!(SNAT_PORTS.contains(&peer.port()), "{proto}: {peer}");
        assert_eq!(asked.from(), Some(SocketAddr::new(node, NODE_PORT)));
    }
}

#[test]
fn ipv6_lb_source_ranges_admit_the_client_inside_and_drop_it_outside() {
    let open = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x21);
    let closed = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x22);
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[
            (
                peer_service6("lb6-open", "LoadBalancer", cluster_ip6(0x21), Some(30095))
                    .lb_ingress(open)
                    .source_range(&format!("{CLIENT_IP6}/128")),
                tb.peer_slice6("lb6-open", &["b1"]),
            ),
            (
                peer_service6("lb6-closed", "LoadBalancer", cluster_ip6(0x22), Some(30096))
                    .lb_ingress(closed)
                    .source_range("fd00:99::/64"),
                tb.peer_slice6("lb6-closed", &["b1"]),
            ),
        ],
    )
    .unwrap();
    start_agents(&mut tb);

    // Inside the ranges: answered (through node A, source-NAT-ed to it).
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", open, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(reply(&asked, "open", &tb).1.ip(), IpAddr::V6(NODE_A_IP6));
    // The closed one's NodePort answers (NodePorts bypass the ranges), which also shows
    // node A has the service...
    tb.wait_for_answer(&tb.client, "tcp", NODE_A_IP6, 30096, "b1")
        .unwrap();
    // ...but its LB IP, from outside its ranges, drops the client, and counts it.
    let before = tb.a.stat("drop_source_range").unwrap();
    let asked = ask_tcp(&tb.client, closed, SERVICE_PORT, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "{closed}\n{}", tb.agent_logs());
    let after = tb.a.stat("drop_source_range").unwrap();
    assert!(after > before, "drop_source_range {before} -> {after}");
}

#[test]
fn ipv6_hairpin_and_internal_traffic_policy_local() {
    let (own, itp) = (cluster_ip6(0x62), cluster_ip6(0x71));
    let mut tb = two_nodes(2);
    tb.write_services(
        "services.yaml",
        &[
            (
                peer_service6("self6", "ClusterIP", own, None),
                tb.peer_slice6("self6", &["a1"]),
            ),
            (
                peer_service6("itp6", "ClusterIP", itp, None).internal_policy("Local"),
                tb.peer_slice6("itp6", &["b1"]),
            ),
        ],
    )
    .unwrap();
    start_agents(&mut tb);
    let (a1, a2, b2) = (tb.pod("a1"), tb.pod("a2"), tb.pod("b2"));

    // a1 -> its own IPv6 service -> a1: answered, and a1 sees the connection come from
    // the service address (so its reply goes back through the node to be translated).
    let hairpins = tb.a.stat("hairpin").unwrap();
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&a1.ns, proto, own, SERVICE_PORT, "a1")
            .unwrap();
        let (_, peer) = reply(&asked, &format!("{proto} a1 -> self6"), &tb);
        assert_eq!(peer.ip(), IpAddr::V6(own), "{proto}: a1 saw {peer}");
        assert_eq!(
            asked.from(),
            Some(SocketAddr::new(own.into(), SERVICE_PORT))
        );
    }
    assert!(tb.a.stat("hairpin").unwrap() >= hairpins + 2);
    // Another pod reaching that service is not source-NAT-ed.
    let asked = ask_tcp(&a2.ns, own, SERVICE_PORT, WAIT).unwrap();
    assert_eq!(
        asked.reply().map(|(n, p)| (n, p.ip())),
        Some(("a1".into(), IpAddr::V6(a2.ip6()))),
        "{asked:?}"
    );

    // internalTrafficPolicy Local: from node B (which has b1) answered, b1 seeing b2...
    let asked = tb
        .wait_for_answer(&b2.ns, "tcp", itp, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(
        reply(&asked, "b2 -> itp6", &tb).1.ip(),
        IpAddr::V6(b2.ip6())
    );
    // ...from node A (no local endpoint) dropped, once node A lists the service.
    tb.a.agent()
        .wait_for_services("itp6 on node A", |all| {
            all.iter()
                .any(|s| s.name == "itp6" && listed_ip(s) == Some(IpAddr::V6(itp)))
        })
        .unwrap();
    let asked = ask_tcp(&a2.ns, itp, SERVICE_PORT, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "a2 -> itp6\n{}", tb.agent_logs());
}

#[test]
fn an_ipv6_connection_and_service_survive_an_agent_restart() {
    const ECHO_PORT: u16 = 9000;
    let cip = cluster_ip6(0x80);
    let mut tb = two_nodes(1);
    let b1_ip6 = tb.pod("b1").ip6();
    let echo =
        EchoServer::start_on(&tb.pod("b1").ns, Ipv6Addr::UNSPECIFIED.into(), ECHO_PORT).unwrap();
    tb.write_services(
        "services.yaml",
        &[(
            Service::cluster_ip(SERVICE_NAMESPACE, "echo6", cip)
                .ip_family_policy("SingleStack")
                .port("tcp", "TCP", SERVICE_PORT, ECHO_PORT),
            EndpointSlice::for_service(SERVICE_NAMESPACE, "echo6", "s6")
                .address_type("IPv6")
                .port("tcp", "TCP", ECHO_PORT)
                .ready_on("b1", b1_ip6, "node-b"),
        )],
    )
    .unwrap();
    start_agents(&mut tb);
    let a1 = tb.pod("a1");

    // Bytes sent are echoed back whole.
    let exchange = |stream: &mut TcpStream, what: &[u8]| -> std::io::Result<Vec<u8>> {
        stream.write_all(what)?;
        let mut back = vec![0u8; what.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    };
    let mut stream = testbed::wait_until(
        "a1 to reach the IPv6 echo service",
        Duration::from_secs(20),
        || match testbed::connect(&a1.ns, cip, SERVICE_PORT, WAIT)? {
            testbed::ConnectOutcome::Connected(s, _) => Ok(Some(s)),
            other => anyhow::bail!("{other:?}"),
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    assert_eq!(exchange(&mut stream, b"before\n").unwrap(), b"before\n");

    // Node A's agent (the pod's node, whose conntrack6 entry translates the replies)
    // stops and starts again on its pins.
    let agent = tb.a.agent();
    let status = agent.stop_keeping_pins().unwrap();
    assert!(status.success(), "the agent exited with {status}");
    agent.start_again().unwrap();
    agent.wait_until_running().unwrap();

    // The open connection goes on (its conntrack6 entry and the service were kept)...
    assert_eq!(
        exchange(&mut stream, b"after\n").unwrap_or_else(|e| panic!(
            "the IPv6 connection did not survive the restart: {e}\n{}",
            tb.agent_logs()
        )),
        b"after\n"
    );
    // ...and a new one is served.
    let mut fresh = match testbed::connect(&a1.ns, cip, SERVICE_PORT, WAIT).unwrap() {
        testbed::ConnectOutcome::Connected(s, _) => s,
        other => panic!("a new connection after the restart: {other:?}"),
    };
    fresh.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(exchange(&mut fresh, b"new\n").unwrap(), b"new\n");
    // The server counts after echoing: wait (bounded) for its count of all three.
    let want = (b"before\n".len() + b"after\n".len() + b"new\n".len()) as u64;
    testbed::wait_until("the echo server to count every byte", WAIT, || {
        Ok((echo.echoed() == want).then_some(()))
    })
    .unwrap();
    drop((stream, fresh));
}

#[test]
fn ipv6_connections_are_listed_by_bpfproxy_conntrack() {
    let cip = cluster_ip6(0x30);
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("ct6", "ClusterIP", cip, None),
            tb.peer_slice6("ct6", &["b1"]),
        )],
    )
    .unwrap();
    start_agents(&mut tb);
    let a1 = tb.pod("a1");
    tb.wait_for_answer(&a1.ns, "tcp", cip, SERVICE_PORT, "b1")
        .unwrap();

    // An open connection from a1 to the IPv6 ClusterIP (kept open: the server waits for
    // a line) is listed on node A with its client, service and backend.
    let stream = match testbed::connect(&a1.ns, cip, SERVICE_PORT, WAIT).unwrap() {
        testbed::ConnectOutcome::Connected(s, _) => s,
        other => panic!("connecting to [{cip}]:{SERVICE_PORT}: {other:?}"),
    };
    let local = stream.local_addr().unwrap();
    let json = tb.a.agent().cli(&["conntrack", "-o", "json"]).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let row = rows
        .iter()
        .find(|r| r["client_port"].as_u64() == Some(u64::from(local.port())))
        .unwrap_or_else(|| panic!("no connection from {local} in {json}"));
    let ip = |field: &str| -> IpAddr {
        row[field]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {row}"))
    };
    assert_eq!(ip("client_ip"), local.ip(), "{row}");
    assert_eq!(ip("service_ip"), IpAddr::V6(cip), "{row}");
    assert_eq!(row["service_port"], SERVICE_PORT, "{row}");
    assert_eq!(ip("backend_ip"), IpAddr::V6(tb.pod("b1").ip6()), "{row}");
    assert_eq!(row["backend_port"], testbed::two_node::PEER_PORT, "{row}");
    // The table shows the IPv6 addresses as [addr]:port.
    let table = tb.a.agent().cli(&["conntrack"]).unwrap();
    assert!(
        table.contains(&format!("[{cip}]:{SERVICE_PORT}")),
        "{table}"
    );
    drop(stream);
}

#[test]
fn idle_ipv6_udp_conntrack_entries_expire() {
    let cip = cluster_ip6(0x31);
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[(
            peer_service6("gc6", "ClusterIP", cip, None),
            tb.peer_slice6("gc6", &["b1"]),
        )],
    )
    .unwrap();
    // A 2 s UDP timeout, collected every second.
    let short = ["--ct-udp-timeout", "2", "--ct-gc-interval", "1"];
    tb.start_agent(Which::A, &short).expect("agent on node A");
    tb.start_agent(Which::B, &short).expect("agent on node B");
    let a1 = tb.pod("a1");
    tb.wait_for_answer(&a1.ns, "udp", cip, SERVICE_PORT, "b1")
        .unwrap();

    // The UDP flows a1 opened are tracked in conntrack6 on node A (only UDP was sent)...
    let entries = || -> usize {
        let dump = tb.a.agent().bpftool_dump("conntrack6").unwrap();
        dump.matches("\"key\"").count()
    };
    assert!(
        entries() >= 2,
        "{}",
        tb.a.agent().bpftool_dump("conntrack6").unwrap()
    );
    // ...and removed once idle past the timeout (bounded wait: timeout + a few passes).
    testbed::wait_until(
        "node A's idle IPv6 UDP conntrack entries to expire",
        Duration::from_secs(15),
        || Ok((entries() == 0).then_some(())),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nconntrack6:\n{}",
            tb.a.agent().bpftool_dump("conntrack6").unwrap()
        )
    });
    // The service still answers afterwards, as a new flow.
    let asked = ask_udp(&a1.ns, cip, SERVICE_PORT, WAIT).unwrap();
    assert_eq!(reply(&asked, "udp after expiry", &tb).0, "b1");
}

#[test]
fn an_open_ipv6_connection_outlives_the_removal_of_its_backend() {
    const ECHO_PORT: u16 = 9000;
    let cip = cluster_ip6(0x81);
    let mut tb = two_nodes(2);
    let echo_b1 =
        EchoServer::start_on(&tb.pod("b1").ns, Ipv6Addr::UNSPECIFIED.into(), ECHO_PORT).unwrap();
    let echo_a2 =
        EchoServer::start_on(&tb.pod("a2").ns, Ipv6Addr::UNSPECIFIED.into(), ECHO_PORT).unwrap();
    let write = |tb: &TwoNode, pods: &[&str]| {
        let mut slice = EndpointSlice::for_service(SERVICE_NAMESPACE, "churn6", "s6")
            .address_type("IPv6")
            .port("tcp", "TCP", ECHO_PORT);
        for pod in pods {
            slice = slice.ready_on(pod, tb.pod(pod).ip6(), &tb.node_of(pod).name);
        }
        tb.write_services(
            "services.yaml",
            &[(
                Service::cluster_ip(SERVICE_NAMESPACE, "churn6", cip)
                    .ip_family_policy("SingleStack")
                    .port("tcp", "TCP", SERVICE_PORT, ECHO_PORT),
                slice,
            )],
        )
        .unwrap();
    };
    write(&tb, &["b1"]);
    start_agents(&mut tb);
    let a1 = tb.pod("a1");
    let exchange = |stream: &mut TcpStream, what: &[u8]| -> std::io::Result<Vec<u8>> {
        stream.write_all(what)?;
        let mut back = vec![0u8; what.len()];
        stream.read_exact(&mut back)?;
        Ok(back)
    };
    let connect = || -> TcpStream {
        let s = testbed::wait_until("a1 to reach churn6", Duration::from_secs(20), || {
            match testbed::connect(&a1.ns, cip, SERVICE_PORT, WAIT)? {
                testbed::ConnectOutcome::Connected(s, _) => Ok(Some(s)),
                other => anyhow::bail!("{other:?}"),
            }
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()));
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    };

    // A connection to b1, the only backend (on node B: its replies are translated back
    // on node A's uplink).
    let mut old = connect();
    assert_eq!(exchange(&mut old, b"to b1\n").unwrap(), b"to b1\n");
    testbed::wait_until("b1 to count its echo", WAIT, || {
        Ok((echo_b1.echoed() == 6).then_some(()))
    })
    .unwrap();

    // b1 leaves the service (a rolling update: the pod still runs); a2 replaces it.
    write(&tb, &["a2"]);
    let want = [tb.pod("a2").ip6().to_string()];
    tb.a.agent()
        .wait_for_services("churn6 served by a2 only on node A", |all| {
            all.iter().any(|s| {
                s.name == "churn6"
                    && s.backend_ips()
                        .iter()
                        .map(|ip| ip.trim_matches(|c| c == '[' || c == ']'))
                        .eq(want.iter().map(String::as_str))
            })
        })
        .unwrap();

    // The open connection keeps talking to b1, as with kube-proxy (its conntrack entry
    // stays, and so must the translation of b1's replies)...
    assert_eq!(
        exchange(&mut old, b"still b1\n").unwrap_or_else(|e| panic!(
            "the open connection to the removed backend broke: {e}\n{}",
            tb.a.agent().bpftool_dump("conntrack6").unwrap_or_default()
        )),
        b"still b1\n"
    );
    // ...while a new connection goes to a2.
    let mut new = connect();
    assert_eq!(exchange(&mut new, b"to a2\n").unwrap(), b"to a2\n");
    let want_b1 = (b"to b1\n".len() + b"still b1\n".len()) as u64;
    testbed::wait_until("the echo servers to count", WAIT, || {
        Ok((echo_b1.echoed() == want_b1 && echo_a2.echoed() == 6).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: b1 echoed {}, a2 {}",
            echo_b1.echoed(),
            echo_a2.echoed()
        )
    });
    drop((old, new));
}
