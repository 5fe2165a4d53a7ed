//! LoadBalancer ingress IPs and external IPs end to end on two nodes (issue 4): the
//! external client reaches them through node A (its route for those ranges); source
//! ranges let the allowed client in and drop others, while the same service's NodePort
//! ignores them, as in kube-proxy. See `testbed::two_node`. Needs root (CI runs as root).

use std::{net::Ipv4Addr, time::Duration};

use testbed::{
    client::{Asked, ask_tcp},
    two_node::{CLIENT_IP, NODE_A_IP, SERVICE_PORT, TwoNode, Which, peer_service},
};

/// How long a check that expects silence (a dropped SYN) waits.
const SILENCE: Duration = Duration::from_millis(1500);

const LB_OPEN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const LB_CLOSED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

#[test]
fn lb_ingress_ips_external_ips_and_source_ranges_from_an_external_client() {
    let mut tb = TwoNode::new(2).expect("building the two-node testbed");
    let node_a_pods = tb.a.pod_cidr();
    let lb_open = peer_service(
        "lb-open",
        "LoadBalancer",
        "10.96.0.50".parse().unwrap(),
        Some(30082),
    )
    .lb_ingress(LB_OPEN)
    .source_range(&format!("{CLIENT_IP}/32"))
    // Whitespace is trimmed, as kube-proxy does.
    .source_range(" 10.77.0.0/16 ")
    // Node A's pods, which reach the LB IP from inside the cluster.
    .source_range(&node_a_pods);
    let lb_closed = peer_service(
        "lb-closed",
        "LoadBalancer",
        "10.96.0.51".parse().unwrap(),
        Some(30083),
    )
    .lb_ingress(LB_CLOSED)
    .source_range("10.99.0.0/16");
    let ext =
        peer_service("ext", "ClusterIP", "10.96.0.52".parse().unwrap(), None).external_ip(EXTERNAL);
    tb.write_services(
        "services.yaml",
        &[
            (lb_open, tb.peer_slice("lb-open", &["b1"])),
            (lb_closed, tb.peer_slice("lb-closed", &["b1"])),
            (ext, tb.peer_slice("ext", &["b2"])),
        ],
    )
    .unwrap();
    tb.start_agent(Which::A, &[]).expect("agent on node A");
    tb.start_agent(Which::B, &[]).expect("agent on node B");

    // The LB IP, from a source inside its ranges: answered by the pod on node B, which
    // sees node A's address (externalTrafficPolicy Cluster).
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&tb.client, proto, LB_OPEN, SERVICE_PORT, "b1")
            .unwrap();
        let (_, peer) = asked.answer().unwrap();
        assert_eq!(*peer.ip(), NODE_A_IP, "{proto}: b1 saw {peer}");
    }

    // An external IP (a ClusterIP service's spec.externalIPs), the same way.
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", EXTERNAL, SERVICE_PORT, "b2")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), NODE_A_IP);

    // The NodePort of the service whose ranges leave the client out: NodePorts bypass
    // loadBalancerSourceRanges. (It also shows node A has that service programmed.)
    let asked = tb
        .wait_for_answer(&tb.client, "tcp", NODE_A_IP, 30083, "b1")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), NODE_A_IP);

    // Its LB IP, from outside its ranges: dropped.
    let asked = ask_tcp(&tb.client, LB_CLOSED, SERVICE_PORT, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "{LB_CLOSED}\n{}", tb.agent_logs());
    // ...and counted as such by node A's datapath.
    assert!(tb.a.stat("drop_source_range").unwrap() >= 1);
    // Pods are held to the ranges too, as by kube-proxy (tc_ingress at the pod's veth): a1,
    // inside lb-open's ranges, reaches it without SNAT; lb-closed drops it.
    let a1 = tb.pod("a1");
    let asked = tb
        .wait_for_answer(&a1.ns, "tcp", LB_OPEN, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), a1.ip);
    let dropped = tb.a.stat("drop_source_range").unwrap();
    let asked = ask_tcp(&a1.ns, LB_CLOSED, SERVICE_PORT, SILENCE).unwrap();
    assert_eq!(
        asked,
        Asked::TimedOut,
        "a1 -> {LB_CLOSED}\n{}",
        tb.agent_logs()
    );
    assert!(tb.a.stat("drop_source_range").unwrap() > dropped);

    // And the open LB IP still answers afterwards.
    let asked = ask_tcp(&tb.client, LB_OPEN, SERVICE_PORT, Duration::from_secs(2)).unwrap();
    assert_eq!(
        asked.answer().map(|a| a.0).as_deref(),
        Some("b1"),
        "{asked:?}"
    );
}
