//! NodePorts end to end on two nodes (issue 4): an external client reaches a pod through
//! either node's address; externalTrafficPolicy Cluster source-NATs to the node it came
//! through when the pod is on another node, Local keeps the client's address and drops on
//! a node without a local endpoint; the health-check node port says which node has one;
//! a NodePort with no endpoints at all refuses. Each agent runs in its own node namespace
//! (see `testbed::two_node`). Needs root (CI runs as root).

use std::{net::SocketAddr, time::Duration};

use testbed::{
    client::{Asked, ask_tcp},
    two_node::{NODE_A_IP, NODE_B_IP, TwoNode, Which, peer_service},
};

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
