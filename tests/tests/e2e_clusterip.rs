//! bpfproxy end to end: the real agent in a node namespace serving the `myapp` ClusterIP
//! service to a client pod, checked the way a user would check it.
//!
//! Each test builds its own topology (client `c1`, backends `b1..`), writes the Service and
//! EndpointSlice, starts the agent and talks to 10.96.0.10. Needs root (CI runs as root)
//! and the agent binary (`$BPFPROXY_BIN`, else target/release/bpfproxy; `cargo xtask test`
//! builds it). Names are unique per test, and the tests run one at a time so that timing
//! bounds (like "refused within 1 s") are not disturbed by the other tests.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    ConnectOutcome, HttpConnection, UdpOutcome,
    client::{connect, http_get, udp_exchange, udp_request},
    cluster::{Cluster, DNS_PORT, HTTP_PORT, MYAPP, MYAPP_NAMESPACE, MYAPP_VIP, SERVICE_FILE},
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Builds a cluster with `backends` backend pods, writes `myapp` (with the UDP port if
/// `udp`) with the endpoints `initial`, starts the agent, waits until it serves them, then
/// runs `body`. On failure the agent's log is printed as the guards clean up.
fn with_myapp(
    backends: usize,
    initial: &[&str],
    udp: bool,
    body: impl FnOnce(&Cluster) -> Result<()>,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, backends).expect("building the testbed");
    let setup = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(udp)?;
        cluster.write_myapp_endpoints(initial, udp)?;
        cluster.start_agent()?;
        cluster.wait_for_myapp_backends(initial)?;
        Ok(())
    };
    if let Err(e) = setup(&mut cluster).and_then(|()| body(&cluster)) {
        // The agent's guard prints its log while this panic unwinds.
        panic!("{e:?}");
    }
}

/// GETs `n` times on new connections; counts answers per body.
fn spread(cluster: &Cluster, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let name = http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)
            .with_context(|| format!("request {} of {n}", i + 1))?;
        *counts.entry(name).or_default() += 1;
    }
    Ok(counts)
}

#[test]
fn requests_spread_over_all_backends() {
    with_myapp(3, &["b1", "b2", "b3"], false, |cluster| {
        let counts = spread(cluster, 60)?;
        for name in counts.keys() {
            ensure!(
                cluster.backend_names().contains(name),
                "answer {name:?} is not a backend name: {counts:?}"
            );
        }
        for name in ["b1", "b2", "b3"] {
            ensure!(
                counts.contains_key(name),
                "{name} got none of 60 requests: {counts:?}"
            );
        }
        ensure!(counts.values().sum::<usize>() == 60);
        Ok(())
    });
}

#[test]
fn long_lived_connection_keeps_its_backend_while_backends_change() {
    with_myapp(4, &["b1", "b2", "b3"], false, |cluster| {
        let mut conn = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        let mine = conn.get()?;
        ensure!(
            ["b1", "b2", "b3"].contains(&mine.as_str()),
            "first answer {mine:?}"
        );
        for _ in 0..3 {
            ensure!(conn.get()? == mine, "answer changed before any change");
        }

        // Add b4, remove a backend that is not this connection's.
        let removed = ["b1", "b2", "b3"]
            .into_iter()
            .find(|b| *b != mine)
            .expect("three backends");
        let now: Vec<&str> = ["b1", "b2", "b3", "b4"]
            .into_iter()
            .filter(|b| *b != removed)
            .collect();
        cluster.write_myapp_endpoints(&now, false)?;
        cluster.wait_for_myapp_backends(&now)?;

        for i in 0..20 {
            let name = conn
                .get()
                .with_context(|| format!("request {} after the change", i + 1))?;
            ensure!(
                name == mine,
                "request {} after the change went to {name}, not {mine}",
                i + 1
            );
        }
        Ok(())
    });
}

#[test]
fn removed_backend_gets_no_new_connections() {
    with_myapp(3, &["b1", "b2", "b3"], false, |cluster| {
        cluster.write_myapp_endpoints(&["b1", "b3"], false)?;
        let svc = cluster.wait_for_myapp_backends(&["b1", "b3"])?;
        ensure!(svc.backends.len() == 2, "{svc:?}");

        let counts = spread(cluster, 40)?;
        ensure!(
            !counts.contains_key("b2"),
            "removed backend b2 still answered: {counts:?}"
        );
        ensure!(
            counts.keys().all(|k| k == "b1" || k == "b3"),
            "unexpected answers {counts:?}"
        );
        Ok(())
    });
}

#[test]
fn removed_service_stops_answering() {
    with_myapp(3, &["b1", "b2", "b3"], false, |cluster| {
        ensure!(http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT).is_ok());

        cluster.manifests.remove(SERVICE_FILE)?;
        cluster
            .agent()
            .wait_for_service_gone(MYAPP_NAMESPACE, MYAPP)?;

        for _ in 0..5 {
            let out = connect(
                &cluster.client().ns,
                MYAPP_VIP,
                HTTP_PORT,
                Duration::from_secs(2),
            )?;
            ensure!(
                !out.is_connected(),
                "connected to a deleted service: {out:?}"
            );
            ensure!(out.elapsed() < Duration::from_secs(3), "{out:?}");
        }
        Ok(())
    });
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    with_myapp(3, &["b1", "b2", "b3"], true, |cluster| {
        // The slice stays, with no endpoint in it.
        cluster.write_myapp_endpoints(&[], true)?;
        cluster.wait_for_myapp_backends(&[])?;

        for _ in 0..3 {
            let out = connect(
                &cluster.client().ns,
                MYAPP_VIP,
                HTTP_PORT,
                Duration::from_secs(3),
            )?;
            match out {
                ConnectOutcome::Refused(t) if t < Duration::from_secs(1) => {}
                other => {
                    bail!("TCP to a service without endpoints: want refused < 1 s, got {other:?}")
                }
            }
        }

        let out = udp_exchange(
            &cluster.client().ns,
            MYAPP_VIP,
            DNS_PORT,
            Duration::from_secs(3),
        )?;
        match out {
            UdpOutcome::Refused(t) if t < Duration::from_secs(1) => {}
            other => bail!(
                "UDP to a service without endpoints: want ICMP port unreachable (ECONNREFUSED) \
                 < 1 s, got {other:?}"
            ),
        }
        Ok(())
    });
}

#[test]
fn udp_request_and_answer_through_the_cluster_ip() {
    with_myapp(3, &["b1", "b2", "b3"], true, |cluster| {
        cluster
            .agent()
            .wait_for_services("the UDP port of myapp", |all| {
                all.iter().any(|s| {
                    s.name == MYAPP
                        && s.port == DNS_PORT
                        && s.protocol == "UDP"
                        && s.backends.len() == 3
                })
            })?;
        let mut seen = BTreeMap::<String, usize>::new();
        for i in 0..30 {
            // udp_request fails unless the answer comes from 10.96.0.10:53 itself.
            let name = udp_request(&cluster.client().ns, MYAPP_VIP, DNS_PORT)
                .with_context(|| format!("UDP request {}", i + 1))?;
            ensure!(
                cluster.backend_names().contains(&name),
                "UDP answer {name:?} is not a backend name"
            );
            *seen.entry(name).or_default() += 1;
        }
        ensure!(
            seen.len() > 1,
            "30 UDP requests from fresh ports all went to one backend: {seen:?}"
        );
        Ok(())
    });
}

#[test]
fn cli_and_bpftool_show_the_service() {
    with_myapp(3, &["b1", "b2", "b3"], false, |cluster| {
        let agent = cluster.agent();
        let svc = agent
            .service(MYAPP_NAMESPACE, MYAPP, HTTP_PORT)?
            .context("myapp:80 missing from `bpfproxy services -o json`")?;
        ensure!(svc.namespace == "default", "{svc:?}");
        ensure!(svc.name == "myapp", "{svc:?}");
        ensure!(svc.port_name == "http", "{svc:?}");
        ensure!(svc.ip == MYAPP_VIP.to_string(), "{svc:?}");
        ensure!(svc.port == 80, "{svc:?}");
        ensure!(svc.protocol == "TCP", "{svc:?}");
        let want: Vec<String> = ["b1", "b2", "b3"]
            .iter()
            .map(|b| cluster.backend(b).ip.to_string())
            .collect();
        ensure!(svc.backend_ips() == want, "{svc:?}");
        ensure!(svc.backends.iter().all(|b| b.port == 80), "{svc:?}");

        let table = agent.cli(&["services"])?;
        ensure!(
            table.contains("myapp") && table.contains("10.96.0.10"),
            "`bpfproxy services` table:\n{table}"
        );

        let dump = agent.bpftool_dump("services4")?;
        ensure!(
            dump.contains("backend_count"),
            "bpftool shows no field names:\n{dump}"
        );
        ensure!(
            dump.contains("\"backend_count\": 3"),
            "bpftool does not show 3 backends:\n{dump}"
        );

        agent
            .cli(&["conntrack"])
            .context("`bpfproxy conntrack` failed")?;
        Ok(())
    });
}
