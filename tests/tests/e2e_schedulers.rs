//! Schedulers and ClientIP session affinity end to end: the real agent, real TCP
//! connections from a client pod to `myapp` (10.96.0.10:80) over three backend pods,
//! checked the way a user would: which backend answered (each answers with its pod name)
//! and what `bpfproxy services -o json` says.
//!
//! Needs root and the agent binary, like `e2e_clusterip.rs`; the tests run one at a time.

use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    HttpConnection,
    client::http_get,
    cluster::{Cluster, HTTP_PORT, MYAPP_VIP, SERVICE_FILE},
    wait_until,
};

static SERIAL: Mutex<()> = Mutex::new(());

const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

/// The `myapp` Service with a scheduler annotation and, if `affinity_s` is set, ClientIP
/// session affinity with that timeout.
fn myapp_yaml(scheduler: &str, affinity_s: Option<u32>) -> String {
    let affinity = match affinity_s {
        Some(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: myapp\n  namespace: default\n  \
         annotations:\n    bpfproxy.io/scheduler: {scheduler}\nspec:\n  type: ClusterIP\n  \
         clusterIP: {MYAPP_VIP}\n{affinity}  ports:\n  - name: http\n    protocol: TCP\n    \
         port: {HTTP_PORT}\n    targetPort: {HTTP_PORT}\n"
    )
}

/// What `bpfproxy services -o json` says of myapp:80: (scheduler, backend ip -> open
/// connections as counted for lc/sed/nq).
fn shown(cluster: &Cluster) -> Result<(String, BTreeMap<String, u64>)> {
    let out = cluster.agent().cli(&["services", "-o", "json"])?;
    let rows: serde_json::Value = serde_json::from_str(&out).context("services -o json")?;
    let row = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "myapp" && r["port"] == HTTP_PORT)
        .with_context(|| format!("myapp:80 not listed: {out}"))?;
    let scheduler = row["scheduler"].as_str().unwrap_or_default().to_string();
    let mut open = BTreeMap::new();
    for b in row["backends"].as_array().into_iter().flatten() {
        open.insert(
            b["ip"].as_str().unwrap_or_default().to_string(),
            b["active_connections"].as_u64().unwrap_or(0),
        );
    }
    Ok((scheduler, open))
}

fn with_myapp(
    pods: &[&str],
    scheduler: &str,
    affinity_s: Option<u32>,
    body: impl FnOnce(&Cluster) -> Result<()>,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, 3).expect("building the testbed");
    let setup = |cluster: &mut Cluster| -> Result<()> {
        cluster
            .manifests
            .write(SERVICE_FILE, &myapp_yaml(scheduler, affinity_s))?;
        cluster.write_myapp_endpoints(pods, false)?;
        cluster.start_agent()?;
        cluster.wait_for_myapp_backends(pods)?;
        use_scheduler(cluster, scheduler, affinity_s)
    };
    if let Err(e) = setup(&mut cluster).and_then(|()| body(&cluster)) {
        panic!("{e:?}");
    }
}

/// Writes the Service with `scheduler` and waits until the kernel uses it.
fn use_scheduler(cluster: &Cluster, scheduler: &str, affinity_s: Option<u32>) -> Result<()> {
    cluster
        .manifests
        .write(SERVICE_FILE, &myapp_yaml(scheduler, affinity_s))?;
    wait_until(
        &format!("myapp to be scheduled by {scheduler}"),
        Duration::from_secs(20),
        || Ok((shown(cluster)?.0 == scheduler).then_some(())),
    )
}

/// GETs `n` times, each on a new connection; counts answers per backend.
fn spread(cluster: &Cluster, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let name = http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)
            .with_context(|| format!("request {} of {n}", i + 1))?;
        *counts.entry(name).or_default() += 1;
    }
    Ok(counts)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn each_scheduler_distributes_as_it_should() {
    with_myapp(&BACKENDS, "random", None, |cluster| {
        let table = cluster.agent().cli(&["services"])?;
        ensure!(
            table.contains("random"),
            "services shows no scheduler:\n{table}"
        );
        for scheduler in ["random", "rr", "lc", "sed", "nq", "sh", "dh", "maglev"] {
            use_scheduler(cluster, scheduler, None)?;
            let counts = spread(cluster, 30)?;
            println!("{scheduler}: {counts:?}");
            let used = counts.len();
            match scheduler {
                // One client, one frontend: one backend.
                "sh" | "dh" => ensure!(used == 1, "{scheduler}: {counts:?}"),
                _ => ensure!(used == 3, "{scheduler} left a backend out: {counts:?}"),
            }
            if scheduler == "rr" {
                // Round robin is kept per CPU: each CPU's share is even to within one.
                let (min, max) = (counts.values().min(), counts.values().max());
                let spread = max.unwrap_or(&0) - min.unwrap_or(&0);
                ensure!(spread <= cpus(), "rr: {counts:?}");
            }
        }
        let table = cluster.agent().cli(&["services"])?;
        ensure!(table.contains("maglev"), "services:\n{table}");
        Ok(())
    });
}

#[test]
fn lc_sends_new_connections_away_from_a_backend_holding_long_ones() {
    with_myapp(&["b1"], "lc", None, |cluster| {
        // Five long-lived connections, all on b1 (the only backend yet).
        let mut held = Vec::new();
        for _ in 0..5 {
            let mut c = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
            ensure!(c.get()? == "b1");
            held.push(c);
        }
        cluster.write_myapp_endpoints(&BACKENDS, false)?;
        cluster.wait_for_myapp_backends(&BACKENDS)?;
        let b1 = cluster.backend("b1").ip.to_string();
        let (_, open) = shown(cluster)?;
        ensure!(
            open.get(&b1) == Some(&5),
            "b1 should count 5 open: {open:?}"
        );

        let counts = spread(cluster, 20)?;
        println!("lc with 5 held on b1: {counts:?}");
        ensure!(
            !counts.contains_key("b1"),
            "lc sent new connections to b1: {counts:?}"
        );
        ensure!(counts.len() == 2, "{counts:?}");
        for c in &mut held {
            ensure!(c.get()? == "b1", "a held connection moved");
        }

        // Everything closed: every count is back to 0.
        drop(held);
        wait_until(
            "connection counts back to 0",
            Duration::from_secs(10),
            || {
                let (_, open) = shown(cluster)?;
                Ok(open.values().all(|n| *n == 0).then_some(()))
            },
        )
        .with_context(|| format!("{:?}", shown(cluster)))?;
        Ok(())
    });
}

#[test]
fn counts_return_to_zero_after_many_connections_under_each_counting_scheduler() {
    with_myapp(&BACKENDS, "lc", None, |cluster| {
        for scheduler in ["lc", "sed", "nq"] {
            use_scheduler(cluster, scheduler, None)?;
            let mut held = Vec::new();
            for i in 0..12 {
                let mut c = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
                c.get()?;
                if i % 2 == 0 {
                    held.push(c);
                }
                // Odd ones close now (FIN from the client).
            }
            // The six held are counted once the closed ones' FINs went through.
            wait_until(
                &format!("{scheduler}: 6 connections counted open"),
                Duration::from_secs(10),
                || {
                    let (_, open) = shown(cluster)?;
                    Ok((open.values().sum::<u64>() == 6).then_some(()))
                },
            )?;
            drop(held);
            wait_until(
                &format!("{scheduler}: counts back to 0"),
                Duration::from_secs(10),
                || {
                    let (_, open) = shown(cluster)?;
                    Ok(open.values().all(|n| *n == 0).then_some(()))
                },
            )?;
        }
        Ok(())
    });
}

#[test]
fn client_ip_affinity_holds_across_reconnects_and_drops_with_its_backend() {
    with_myapp(&BACKENDS, "rr", Some(3600), |cluster| {
        let counts = spread(cluster, 15)?;
        ensure!(
            counts.len() == 1,
            "affinity: every connection to one backend: {counts:?}"
        );
        let mine = counts.keys().next().cloned().unwrap_or_default();

        // Its backend goes: the client moves, and sticks to the new one.
        let rest: Vec<&str> = BACKENDS.into_iter().filter(|b| *b != mine).collect();
        cluster.write_myapp_endpoints(&rest, false)?;
        cluster.wait_for_myapp_backends(&rest)?;
        let counts = spread(cluster, 10)?;
        ensure!(counts.len() == 1, "after removal: {counts:?}");
        ensure!(
            !counts.contains_key(&mine),
            "still sent to the removed {mine}"
        );
        Ok(())
    });
}

#[test]
fn client_ip_affinity_expires_after_the_timeout() {
    with_myapp(&BACKENDS, "rr", Some(1), |cluster| {
        // Within a second the client sticks; after idling 1.5 s it is scheduled anew
        // (rr), so over a few idle gaps it reaches more than one backend.
        let mut seen = BTreeMap::new();
        for round in 0..6 {
            let counts = spread(cluster, 3)?;
            ensure!(counts.len() == 1, "round {round}: {counts:?}");
            for (k, v) in counts {
                *seen.entry(k).or_insert(0) += v;
            }
            std::thread::sleep(Duration::from_millis(1500));
        }
        if seen.len() < 2 {
            bail!("affinity never expired: {seen:?}");
        }
        Ok(())
    });
}
