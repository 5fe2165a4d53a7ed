//! `testbed-probe tcp|udp ADDR PORT TIMEOUT_MS` (ADDR IPv4 or IPv6): asks a `PeerServer` behind ADDR:PORT once
//! and prints how it ended as one line (`testbed::client::Asked::to_line`). A process of
//! its own, so that a test can run it in a cgroup of its own inside a node's namespace
//! (`testbed::two_node::TwoNode::ask_from_node`): socket-level load balancing hooks a
//! cgroup, and a thread of the test process cannot leave the test's cgroup.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use testbed::client::{ask_tcp_here, ask_udp_here};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, addr, port, timeout_ms] = args.as_slice() else {
        bail!("usage: testbed-probe tcp|udp ADDR PORT TIMEOUT_MS");
    };
    let addr: IpAddr = addr.parse().context("ADDR")?;
    let port: u16 = port.parse().context("PORT")?;
    let timeout = Duration::from_millis(timeout_ms.parse().context("TIMEOUT_MS")?);
    let asked = match proto.as_str() {
        "tcp" => ask_tcp_here(addr, port, timeout),
        "udp" => ask_udp_here(addr, port, timeout),
        other => bail!("protocol {other:?}: tcp or udp"),
    };
    println!("{}", asked.to_line());
    Ok(())
}
