//! The second part of `cargo xtask demo`: external traffic to a dual-stack NodePort.
//!
//! Two nodes on a LAN (`testbed::two_node`), each running its agent with XDP on its LAN
//! interface, pod a1 on node A and pod b1 on node B (each answers with the address it saw),
//! the `web` NodePort Service with both pods on IPv4 and IPv6, and a client outside the
//! cluster asking node A's NodePort over both families and protocols. Shows which pod
//! answered and what it saw: a1, on node A, sees the client (destination rewritten only);
//! b1, on node B, sees node A's address with a port of the SNAT range (externalTrafficPolicy
//! Cluster). Everything is removed at the end, also on failure or Ctrl-C. Needs root, and
//! the agent built (`BPFPROXY_BIN`, or `target/release/bpfproxy`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use testbed::{
    client::{ask_tcp, ask_udp},
    manifests,
    two_node::{CLIENT_IP, CLIENT_IP6, NODE_A_IP, NODE_A_IP6, TwoNode, Which, peer_service},
};

const WEB_NODE_PORT: u16 = 30080;
const WEB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const WEB_CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x80);
/// Questions per family and protocol; each is answered within `ASK_TIMEOUT` or counts as
/// failed.
const ASKS: usize = 6;
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

extern "C" fn on_signal(_: i32) {
    testbed::request_stop();
}

fn check_interrupted() -> Result<()> {
    if testbed::stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> Result<()> {
    testbed::require_root()?;
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }?;
    }

    println!(
        "==> demo: external traffic: nodes A ({NODE_A_IP}, {NODE_A_IP6}) and B on a LAN, \
         pod a1 on A, pod b1 on B, a client outside the cluster ({CLIENT_IP}, {CLIENT_IP6})"
    );
    let mut tb = TwoNode::new(1)?;
    let service = peer_service("web", "NodePort", WEB_CLUSTER_IP, Some(WEB_NODE_PORT))
        .dual_stack(WEB_CLUSTER_IP6, "RequireDualStack");
    let slices = vec![
        tb.peer_slice("web", &["a1", "b1"]),
        tb.peer_slice6("web", &["a1", "b1"]),
    ];
    let docs: Vec<String> = std::iter::once(service.to_yaml())
        .chain(slices.iter().map(|s| s.to_yaml()))
        .collect();
    println!("{}", manifests::documents(&docs));
    tb.write_services_slices("web.yaml", &[(service, slices)])?;
    // Each node's agent, with `--node-interfaces eth0` (its LAN side) for XDP.
    tb.start_agent(Which::A, &[])?;
    tb.start_agent(Which::B, &[])?;
    check_interrupted()?;

    println!(
        "==> demo: the client asks node A's NodePort {WEB_NODE_PORT}, {ASKS} times per family \
         and protocol; each pod answers with the address it saw"
    );
    println!("  a1 runs on node A: only the destination is rewritten, it sees the client");
    println!("  b1 runs on node B: source-NAT-ed to node A (externalTrafficPolicy Cluster)");
    let mut failures = 0;
    for node in [IpAddr::V4(NODE_A_IP), IpAddr::V6(NODE_A_IP6)] {
        tb.wait_for_answer(&tb.client, "tcp", node, WEB_NODE_PORT, "b1")?;
        for proto in ["tcp", "udp"] {
            for _ in 0..ASKS {
                check_interrupted()?;
                let asked = match proto {
                    "tcp" => ask_tcp(&tb.client, node, WEB_NODE_PORT, ASK_TIMEOUT)?,
                    _ => ask_udp(&tb.client, node, WEB_NODE_PORT, ASK_TIMEOUT)?,
                };
                let to = SocketAddr::new(node, WEB_NODE_PORT).to_string();
                match asked.reply() {
                    Some((pod, saw)) => {
                        println!("  {proto} {to:<20} answered by {pod}, which saw {saw}")
                    }
                    None => {
                        failures += 1;
                        println!("  {proto} {to:<20} no answer: {asked:?}");
                    }
                }
            }
        }
    }
    let agent = tb.node(Which::A).agent();
    println!(
        "==> demo: node A $ bpfproxy services --bpffs {}",
        agent.bpffs().display()
    );
    print!("{}", agent.cli(&["services"])?);
    println!(
        "==> demo: node A $ bpfproxy conntrack --bpffs {}",
        agent.bpffs().display()
    );
    print!("{}", agent.cli(&["conntrack"])?);
    println!("==> demo: removing the two nodes, the client and the LAN");
    drop(tb);
    if failures > 0 {
        bail!(
            "{failures} of {} external questions got no answer",
            4 * ASKS
        );
    }
    Ok(())
}
