//! In-cluster traffic across the two nodes' uplinks (issue 4): a pod on node A reaches a
//! ClusterIP whose endpoint is on node B (the reply, coming in on A's uplink, is
//! translated back there by tc_ingress); internalTrafficPolicy Local; and a process on
//! node A reaching a NodePort on its own address through socket-level load balancing.
//! See `testbed::two_node`. Needs root (CI runs as root).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use testbed::{
    client::{Asked, ask_tcp},
    two_node::{NODE_A_IP, NodeProbe, SERVICE_PORT, TwoNode, Which, peer_service},
};

const PROBE: &str = env!("CARGO_BIN_EXE_testbed-probe");
/// How long a check that expects silence (a dropped SYN) waits.
const SILENCE: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(2);

const CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const ITP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);

#[test]
fn clusterip_across_nodes_and_internal_traffic_policy_local() {
    let mut tb = TwoNode::new(2).expect("building the two-node testbed");
    tb.write_services(
        "services.yaml",
        &[
            (
                peer_service("cip", "ClusterIP", CIP, None),
                tb.peer_slice("cip", &["b1"]),
            ),
            (
                peer_service("itp", "ClusterIP", ITP, None).internal_policy("Local"),
                tb.peer_slice("itp", &["b1"]),
            ),
        ],
    )
    .unwrap();
    tb.start_agent(Which::A, &[]).expect("agent on node A");
    tb.start_agent(Which::B, &[]).expect("agent on node B");
    let a1 = tb.pod("a1");

    // Pod a1 (node A) -> ClusterIP -> b1 (node B): b1 sees a1 itself, and the answer
    // comes from the ClusterIP (translated back on A's uplink).
    let asked = tb
        .wait_for_answer(&a1.ns, "tcp", CIP, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), a1.ip);
    let asked = tb
        .wait_for_answer(&a1.ns, "udp", CIP, SERVICE_PORT, "b1")
        .unwrap();
    let Asked::Answer { from, .. } = &asked else {
        unreachable!()
    };
    assert_eq!(*from, (CIP, SERVICE_PORT).into(), "{asked:?}");
    assert_eq!(*asked.answer().unwrap().1.ip(), a1.ip);

    // internalTrafficPolicy Local: from node B (which has b1) answered...
    let b2 = tb.pod("b2");
    let asked = tb
        .wait_for_answer(&b2.ns, "tcp", ITP, SERVICE_PORT, "b1")
        .unwrap();
    assert_eq!(*asked.answer().unwrap().1.ip(), b2.ip);
    // ...from node A (no local endpoint) dropped, once node A lists the service.
    tb.a.agent()
        .wait_for_services("itp on node A", |all| {
            all.iter()
                .any(|s| s.name == "itp" && s.ip == ITP.to_string())
        })
        .unwrap();
    let a2 = tb.pod("a2");
    let asked = ask_tcp(&a2.ns, ITP, SERVICE_PORT, SILENCE).unwrap();
    assert_eq!(asked, Asked::TimedOut, "a2 -> itp\n{}", tb.agent_logs());
}

#[test]
fn a_process_on_the_node_reaches_a_nodeport_on_its_own_address_through_socket_lb() {
    let mut tb = TwoNode::new(1).expect("building the two-node testbed");
    tb.write_services(
        "services.yaml",
        &[(
            peer_service("np", "NodePort", "10.96.0.72".parse().unwrap(), Some(30085)),
            tb.peer_slice("np", &["b1"]),
        )],
    )
    .unwrap();
    let cgroup = tb.make_cgroup(Which::A).unwrap();
    let cgroup_arg = cgroup.to_string_lossy().into_owned();
    tb.start_agent(Which::A, &["--socket-lb-cgroup", &cgroup_arg])
        .expect("agent on node A");
    tb.start_agent(Which::B, &[]).expect("agent on node B");
    let probe = NodeProbe {
        bin: Path::new(PROBE),
        cgroup: &cgroup,
    };
    let asked = testbed::wait_until(
        "a node A process to reach its own NodePort",
        Duration::from_secs(20),
        || {
            let asked = tb.ask_from_node(Which::A, &probe, "tcp", NODE_A_IP, 30085, WAIT)?;
            match asked.answer() {
                Some(_) => Ok(Some(asked)),
                None => anyhow::bail!("last outcome: {asked:?}"),
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()));
    assert_eq!(
        asked.answer().map(|(n, p)| (n, *p.ip())),
        Some(("b1".into(), NODE_A_IP))
    );
}
