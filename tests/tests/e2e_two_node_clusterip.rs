//! In-cluster traffic on the two-node testbed that needs no node-interface setup: pods
//! reaching a service's LB and external IPs (short-circuited, not source-NAT-ed); hairpin
//! (a pod reaching its own service lands on itself) and a client process on node A (not
//! in a pod) reaching a ClusterIP whose endpoint is on node B, through socket-level load
//! balancing on a cgroup the test makes. See `testbed::two_node`. Needs root (CI runs as
//! root).

use std::{net::Ipv4Addr, path::Path, time::Duration};

use testbed::{
    client::{Asked, ask_tcp, ask_udp},
    two_node::{NODE_A_IP, NodeProbe, SERVICE_PORT, TwoNode, Which, peer_service},
};

const PROBE: &str = env!("CARGO_BIN_EXE_testbed-probe");
const WAIT: Duration = Duration::from_secs(2);

const CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 62);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

#[test]
fn pods_reach_lb_ips_and_external_ips_without_snat() {
    let mut tb = TwoNode::new(2).expect("building the two-node testbed");
    tb.write_services(
        "services.yaml",
        &[
            (
                peer_service(
                    "lb",
                    "LoadBalancer",
                    "10.96.0.63".parse().unwrap(),
                    Some(30086),
                )
                .lb_ingress(LB_IP),
                tb.peer_slice("lb", &["a2"]),
            ),
            (
                peer_service("ext", "ClusterIP", "10.96.0.64".parse().unwrap(), None)
                    .external_ip(EXTERNAL_IP),
                tb.peer_slice("ext", &["a2"]),
            ),
        ],
    )
    .unwrap();
    tb.start_pod_agent(Which::A, &[]).expect("agent on node A");
    let a1 = tb.pod("a1");

    // kube-proxy short-circuits pod traffic to a service's external addresses: the
    // endpoint answers and sees the pod itself; the answer comes from the address asked.
    for addr in [LB_IP, EXTERNAL_IP] {
        for proto in ["tcp", "udp"] {
            let asked = tb
                .wait_for_answer(&a1.ns, proto, addr, SERVICE_PORT, "a2")
                .unwrap();
            let (_, peer) = asked.answer().unwrap();
            assert_eq!(*peer.ip(), a1.ip, "{proto} {addr}: a2 saw {peer}");
            if proto == "udp" {
                let Asked::Answer { from, .. } = &asked else {
                    unreachable!()
                };
                assert_eq!(*from, (addr, SERVICE_PORT).into(), "{asked:?}");
            }
        }
    }
}

#[test]
fn hairpin_a_pod_reaching_its_own_service_lands_on_itself() {
    let mut tb = TwoNode::new(2).expect("building the two-node testbed");
    tb.write_services(
        "services.yaml",
        &[(
            peer_service("self", "ClusterIP", SELF, None),
            tb.peer_slice("self", &["a1"]),
        )],
    )
    .unwrap();
    tb.start_pod_agent(Which::A, &[]).expect("agent on node A");
    let (a1, a2) = (tb.pod("a1"), tb.pod("a2"));

    // a1 -> its own service -> a1: answered, and a1 sees the connection come from the
    // service address (so its reply goes back through the node to be translated).
    for proto in ["tcp", "udp"] {
        let asked = tb
            .wait_for_answer(&a1.ns, proto, SELF, SERVICE_PORT, "a1")
            .unwrap();
        let (_, peer) = asked.answer().unwrap();
        assert_eq!(*peer.ip(), SELF, "{proto}: a1 saw {peer}");
        if proto == "udp" {
            let Asked::Answer { from, .. } = &asked else {
                unreachable!()
            };
            assert_eq!(*from, (SELF, SERVICE_PORT).into(), "{asked:?}");
        }
    }
    assert!(tb.a.stat("hairpin").unwrap() >= 2);
    // Another pod reaching that service is not source-NAT-ed.
    let asked = ask_tcp(&a2.ns, SELF, SERVICE_PORT, WAIT).unwrap();
    assert_eq!(
        asked.answer().map(|(n, p)| (n, *p.ip())),
        Some(("a1".into(), a2.ip)),
        "{asked:?}"
    );
}

#[test]
fn a_process_on_the_node_reaches_a_clusterip_on_another_node_through_socket_lb() {
    let mut tb = TwoNode::new(1).expect("building the two-node testbed");
    tb.write_services(
        "services.yaml",
        &[(
            peer_service("cip", "ClusterIP", CIP, None),
            tb.peer_slice("cip", &["b1"]),
        )],
    )
    .unwrap();
    let cgroup = tb.make_cgroup(Which::A).unwrap();
    let cgroup_arg = cgroup.to_string_lossy().into_owned();
    tb.start_pod_agent(Which::A, &["--socket-lb-cgroup", &cgroup_arg])
        .expect("agent on node A");
    let probe = NodeProbe {
        bin: Path::new(PROBE),
        cgroup: &cgroup,
    };
    let ask = |proto: &str, addr: Ipv4Addr, port: u16| {
        testbed::wait_until(
            &format!("a node A process to reach {proto} {addr}:{port}"),
            Duration::from_secs(20),
            || {
                let asked = tb.ask_from_node(Which::A, &probe, proto, addr, port, WAIT)?;
                match asked.answer() {
                    Some(_) => Ok(Some(asked)),
                    None => anyhow::bail!("last outcome: {asked:?}"),
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", tb.agent_logs()))
    };

    // TCP and UDP: b1 on node B answers, seeing node A's address; the UDP answer reads
    // as coming from the ClusterIP.
    let asked = ask("tcp", CIP, SERVICE_PORT);
    assert_eq!(
        asked.answer().map(|(n, p)| (n, *p.ip())),
        Some(("b1".into(), NODE_A_IP))
    );
    let asked = ask("udp", CIP, SERVICE_PORT);
    assert_eq!(
        asked.answer().map(|(n, p)| (n, *p.ip())),
        Some(("b1".into(), NODE_A_IP))
    );
    let Asked::Answer { from, .. } = &asked else {
        unreachable!()
    };
    assert_eq!(*from, (CIP, SERVICE_PORT).into(), "{asked:?}");
    assert!(tb.a.stat("sock_lb").unwrap() >= 2);

    // Outside that cgroup (a thread of this test in node A's namespace), nothing
    // translates a ClusterIP: the hooks are on that cgroup only.
    let asked = ask_udp(&tb.a.ns, CIP, SERVICE_PORT, Duration::from_millis(500)).unwrap();
    assert!(asked.answer().is_none(), "{asked:?}");
}
