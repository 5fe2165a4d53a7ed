//! Conntrack timeouts end to end: the agent runs with short timeouts (set by flag); an idle
//! UDP flow's and an idle TCP connection's entries disappear, a TCP connection that keeps
//! talking keeps its entry, and the idle connection's next packet shows in
//! `bpfproxy stats` as a lost connection. Needs root and the agent binary.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    HttpConnection,
    client::udp_request,
    cluster::{Cluster, DNS_PORT, HTTP_PORT, MYAPP_VIP},
};

/// The client ports `bpfproxy conntrack -o json` lists, by protocol ("TCP"/"UDP").
fn tracked(cluster: &Cluster) -> Result<Vec<(String, u16)>> {
    let json = cluster.agent().cli(&["conntrack", "-o", "json"])?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&json).with_context(|| format!("conntrack JSON {json:?}"))?;
    rows.iter()
        .map(|r| {
            let proto = r["protocol"].as_str().context("protocol")?.to_uppercase();
            let port = r["client_port"].as_u64().context("client_port")? as u16;
            Ok((proto, port))
        })
        .collect()
}

fn stat(cluster: &Cluster, name: &str) -> Result<u64> {
    let json = cluster.agent().cli(&["stats", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    v[name]
        .as_u64()
        .with_context(|| format!("{name} in {json}"))
}

fn port(addr: SocketAddr) -> u16 {
    addr.port()
}

#[test]
fn idle_entries_expire_and_active_ones_stay() {
    let mut cluster = Cluster::new(1, 1).expect("building the testbed");
    let body = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(true)?;
        cluster.write_myapp_endpoints(&["b1"], true)?;
        let glob = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(
            &glob,
            &[
                "--ct-udp-timeout",
                "2",
                "--ct-tcp-timeout",
                "3",
                "--ct-gc-interval",
                "1",
            ],
        )?;
        cluster.wait_for_myapp_backends(&["b1"])?;
        let ns = &cluster.client().ns;
        let mut active = HttpConnection::open(ns, MYAPP_VIP, HTTP_PORT)?;
        let mut idle = HttpConnection::open(ns, MYAPP_VIP, HTTP_PORT)?;
        ensure!(active.get()? == "b1" && idle.get()? == "b1");
        ensure!(udp_request(ns, MYAPP_VIP, DNS_PORT)?.trim() == "b1");
        let (active_port, idle_port) = (port(active.local_addr()?), port(idle.local_addr()?));
        let rows = tracked(cluster)?;
        ensure!(
            rows.contains(&("TCP".into(), active_port))
                && rows.contains(&("TCP".into(), idle_port))
                && rows.iter().any(|(p, _)| p == "UDP"),
            "both TCP connections and the UDP flow tracked: {rows:?}"
        );

        // Talk on `active` every 400 ms for at least 6 s (twice the TCP timeout) until
        // the idle flows are gone; `active` must be tracked all along.
        let start = Instant::now();
        loop {
            ensure!(active.get()? == "b1", "active connection answered by b1");
            let rows = tracked(cluster)?;
            ensure!(
                rows.contains(&("TCP".into(), active_port)),
                "the active connection lost its entry after {:?}: {rows:?}",
                start.elapsed()
            );
            let udp_gone = !rows.iter().any(|(p, _)| p == "UDP");
            let idle_gone = !rows.contains(&("TCP".into(), idle_port));
            if udp_gone && idle_gone && start.elapsed() >= Duration::from_secs(6) {
                break;
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!(
                    "idle entries still tracked after 15 s (udp gone {udp_gone}, idle TCP gone {idle_gone}): {rows:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(400));
        }

        // The idle connection talks again: its packet finds no entry, is counted, and (one
        // backend) reaches b1 again.
        let lost = stat(cluster, "ct_miss_midstream")?;
        ensure!(idle.get()? == "b1", "idle connection picked up again");
        ensure!(
            stat(cluster, "ct_miss_midstream")? > lost,
            "the lost connection is counted"
        );
        Ok(())
    };
    if let Err(e) = body(&mut cluster) {
        panic!("{e:?}");
    }
}
