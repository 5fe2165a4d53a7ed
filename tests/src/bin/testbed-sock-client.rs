//! `testbed-sock-client CGROUP NETNS_PATH MODE ADDR PORT`: one client call from a process
//! that first joins cgroup2 folder CGROUP (`-`: stays where it is) and then network
//! namespace NETNS_PATH, as a process on a node would be when socket-level load balancing
//! is attached to its cgroup (cgroup membership is per process, so the harness cannot do
//! this from a thread). Prints one JSON line and exits 0 whatever the call's outcome:
//!
//! - `tcp`: connect (2 s bound), `getpeername`, one `GET /`: `{"peer", "body"}`.
//! - `udp`: unconnected socket, `sendto` ADDR:PORT, `recvfrom`: `{"from", "body"}`.
//! - `udp-connect`: connect, `getpeername`, `send`, `recvfrom`: `{"peer", "from", "body"}`.
//!
//! A failed call gives `{"error": "<text>", "errno": N, "elapsed_ms": T}` instead.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, netns, mode, addr, port] = args.as_slice() else {
        bail!("usage: testbed-sock-client CGROUP|- NETNS_PATH tcp|udp|udp-connect ADDR PORT");
    };
    if cgroup != "-" {
        // "0" moves the writing process itself; sockets made after this belong to it.
        std::fs::write(format!("{cgroup}/cgroup.procs"), "0")
            .with_context(|| format!("joining cgroup {cgroup}"))?;
    }
    let ns = File::open(netns).with_context(|| format!("opening {netns}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
    let target = SocketAddr::V4(SocketAddrV4::new(addr.parse()?, port.parse()?));
    let start = Instant::now();
    let out = match mode.as_str() {
        "tcp" => tcp(target),
        "udp" => udp(target, false),
        "udp-connect" => udp(target, true),
        other => bail!("unknown mode {other}"),
    };
    let line = match out {
        Ok(v) => v,
        Err(e) => json!({
            "error": e.to_string(),
            "errno": e.raw_os_error(),
            "elapsed_ms": start.elapsed().as_millis() as u64,
        }),
    };
    println!("{line}");
    Ok(())
}

fn tcp(target: SocketAddr) -> std::io::Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let peer = s.peer_addr()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(json!({ "peer": peer.to_string(), "body": body }))
}

fn udp(target: SocketAddr, connect: bool) -> std::io::Result<serde_json::Value> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut out = json!({});
    if connect {
        s.connect(target)?;
        out["peer"] = s.peer_addr()?.to_string().into();
        s.send(b"ping")?;
    } else {
        s.send_to(b"ping", target)?;
    }
    let mut buf = [0u8; 1500];
    let (n, from) = s.recv_from(&mut buf)?;
    out["from"] = from.to_string().into();
    out["body"] = String::from_utf8_lossy(&buf[..n]).into_owned().into();
    Ok(out)
}
