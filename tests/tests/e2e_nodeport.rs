//! NodePorts end to end on two nodes (issue 4): an external client reaches a pod through
//! either node's address; externalTrafficPolicy Cluster source-NATs to the node it came
//! through when the pod is on another node, Local keeps the client's address and drops on
//! a node without a local endpoint; the health-check node port says which node has one;
//! a NodePort with no endpoints at all refuses. Each agent runs in its own node namespace
//! (see `testbed::two_node`). Needs root (CI runs as root).

use std::{net::SocketAddr, time::Duration};

use testbed::{
    client::{Asked, ask_tcp, ask_udp, http_get_any},
    two_node::{CLIENT_IP, NODE_A_IP, NODE_B_IP, TwoNode, Which, peer_service},
};

/// How long a check that expects silence (a dropped SYN) waits: bounded, and long enough
/// for an answer on this testbed, where one takes well under a millisecond.
const SILENCE: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(2);

fn two_nodes(pods_per_node: usize) -> TwoNode {
    TwoNode::new(pods_per_node).expect("building the two-node testbed")
}

fn start_agents(tb: &mut TwoNode) {
    tb.start_agent(Which::A, &[]).expect("agent on node A");
    tb.start_agent(Which::B, &[]).expect("agent on node B");
}

#[test]
fn nodeport_cluster_policy_reaches_a_pod_on_the_other_node_through_snat() {
    let mut tb = two_nodes(1);
    tb.write_services(
        "services.yaml",
        &[
            (
                peer_service(
                    "np-cluster",
                    "NodePort",
                    "10.96.0.40".parse().unwrap(),
                    Some(30080),
                ),
                tb.peer_slice("np-cluster", &["b1"]),
            ),
            (
                peer_service(
                    "np-empty",
                    "NodePort",
                    "10.96.0.41".parse().unwrap(),
                    Some(30089),
                ),
                tb.peer_slice("np-empty", &[]),
            ),
        ],
    )
    .unwrap();
    start_agents(&mut tb);

    // Through node A, whose only endpoint is on node B: the backend sees node A's address
    // (the reply must come back through A to be translated), and the client gets it.
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_A_IP, 30080, "b1")
        .unwrap();
    let (_, peer) = asked.answer().unwrap();
    assert_eq!(
        *peer.ip(),
        NODE_A_IP,
        "b1 saw {peer}: not source-NAT-ed to node A"
    );
    // More connections, each answered, each from node A.
    for i in 0..5 {
        let asked = ask_tcp(&tb.client, NODE_A_IP, 30080, WAIT).unwrap();
        let (name, peer) = asked
            .answer()
            .unwrap_or_else(|| panic!("connection {i}: {asked:?}\n{}", tb.agent_logs()));
        assert_eq!(
            (name.as_str(), *peer.ip()),
            ("b1", NODE_A_IP),
            "connection {i}"
        );
        // From the SNAT port range (the default, above the kernel's ephemeral ports).
        assert!(
            (61000..=65535).contains(&peer.port()),
            "connection {i}: {peer}"
        );
    }

    // UDP too, and the answer comes from the address the client asked.
    let asked = tb
        .wait_for_answer(&tb.client, "udp", NODE_A_IP, 30080, "b1")
        .unwrap();
    let (_, peer) = asked.answer().unwrap();
    assert_eq!(*peer.ip(), NODE_A_IP);
    let Asked::Answer { from, .. } = &asked else {
        unreachable!()
    };
    assert_eq!(*from, SocketAddr::from((NODE_A_IP, 30080)));
    // Node A's XDP program translated the replies back (not the kernel stack).
    assert!(tb.a.stat("xdp_snat_reply").unwrap() >= 6);

    // Through node B, where the endpoint runs: answered too.
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_B_IP, 30080, "b1")
        .unwrap();
    assert_eq!(asked.answer().unwrap().0, "b1");

    // A NodePort whose service has no endpoints at all is refused (RST), not left to
    // time out, on either node.
    for node in [NODE_A_IP, NODE_B_IP] {
        let asked = ask_tcp(&tb.client, node, 30089, WAIT).unwrap();
        assert_eq!(asked, Asked::Refused, "{node}:30089\n{}", tb.agent_logs());
    }
}

#[test]
fn nodeport_local_policy_keeps_the_client_address_and_drops_without_a_local_endpoint() {
    const HEALTH_PORT: u16 = 32001;
    let mut tb = two_nodes(1);
    let service = peer_service(
        "np-local",
        "LoadBalancer",
        "10.96.0.42".parse().unwrap(),
        Some(30081),
    )
    .external_policy("Local")
    .health_check_node_port(HEALTH_PORT);
    tb.write_services(
        "services.yaml",
        &[(service.clone(), tb.peer_slice("np-local", &["b1"]))],
    )
    .unwrap();
    start_agents(&mut tb);

    // Through node B, which has the endpoint: the backend sees the client itself.
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&tb.client, proto, NODE_B_IP, 30081, "b1")
            .unwrap();
        let (_, peer) = asked.answer().unwrap();
        assert_eq!(*peer.ip(), CLIENT_IP, "{proto}: b1 saw {peer}");
    }

    // The health-check node port tells a load balancer which node to use: 200 on B (one
    // local endpoint), 503 on A (none), with kube-proxy's JSON body.
    let health = |node| {
        testbed::wait_until(
            "the health-check node port to answer",
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
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()))
    };
    for (node, status, local) in [(NODE_B_IP, 200, 1), (NODE_A_IP, 503, 0)] {
        let answer = health(node);
        assert_eq!(answer.status, status, "{node}: {answer:?}");
        let body: serde_json::Value = serde_json::from_str(&answer.body)
            .unwrap_or_else(|e| panic!("{node}: body {:?}: {e}", answer.body));
        assert_eq!(body["service"]["namespace"], "default", "{body}");
        assert_eq!(body["service"]["name"], "np-local", "{body}");
        assert_eq!(body["localEndpoints"], local, "{body}");
        assert_eq!(
            answer.header("content-type"),
            Some("application/json"),
            "{answer:?}"
        );
    }

    // Node A has no local endpoint (and its agent has the service: its health check
    // answered 503 above): the connection is dropped, so it times out.
    let asked = ask_tcp(&tb.client, NODE_A_IP, 30081, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "via node A\n{}", tb.agent_logs());
    let asked = ask_udp(&tb.client, NODE_A_IP, 30081, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "UDP via node A");
    assert!(tb.a.stat("drop_no_local_backend").unwrap() >= 2);

    // Pod a1 on node A becomes an endpoint: A answers with it, keeping the client's
    // address, and its health check turns 200.
    tb.write_services(
        "services.yaml",
        &[(service, tb.peer_slice("np-local", &["b1", "a1"]))],
    )
    .unwrap();
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_A_IP, 30081, "a1")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), CLIENT_IP);
    let answer = testbed::wait_until(
        "node A's health check to turn 200",
        Duration::from_secs(20),
        || {
            let a = http_get_any(&tb.client, NODE_A_IP, HEALTH_PORT, "/healthz")?;
            Ok((a.status == 200).then_some(a))
        },
    )
    .unwrap();
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(body["localEndpoints"], 1, "{body}");
}
