//! The agent's `/metrics`, `/healthz` and `/livez`, scraped from inside the node namespace
//! (where the agent listens, on kube-proxy's default addresses) the way Prometheus and the
//! kubelet would, after real connections through a ClusterIP.

use std::{ffi::OsString, sync::Mutex, time::Duration};

use anyhow::{Context, Result, ensure};
use testbed::{
    Agent, ApiServer, ConnectOutcome, EndpointSlice, HttpConnection, Service,
    client::{connect, http_get},
    cluster::{Cluster, HTTP_PORT, MYAPP, MYAPP_NAMESPACE, MYAPP_VIP, SERVICE_FILE, SLICE_FILE},
    scrape::{self, HEALTHZ_ADDR, METRICS_ADDR, sample},
    wait_until,
};

static SERIAL: Mutex<()> = Mutex::new(());

const EMPTY_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 20);
const OTHER_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 30);
const WAIT: Duration = Duration::from_secs(30);

fn labels(name: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("namespace", MYAPP_NAMESPACE),
        ("name", name),
        ("port_name", "http"),
        ("protocol", "TCP"),
    ]
}

fn with_direction<'a>(l: [(&'a str, &'a str); 4], direction: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut v = l.to_vec();
    v.push(("direction", direction));
    v
}

/// The metrics page, checked to be Prometheus text.
fn metrics(cluster: &Cluster) -> Result<String> {
    let page = scrape::get(&cluster.topo.node, METRICS_ADDR, "/metrics")?;
    ensure!(page.status == 200, "/metrics answered {}", page.status);
    let ctype = page.header("content-type").unwrap_or_default();
    ensure!(
        ctype.starts_with("text/plain; version=0.0.4"),
        "content-type {ctype:?}"
    );
    Ok(page.body)
}

fn value(page: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    sample(page, name, labels).with_context(|| format!("no sample {name}{labels:?} in\n{page}"))
}

/// `svc_id` of `name` as `bpfproxy services -o json` shows it.
fn svc_id(agent: &Agent, name: &str) -> Result<u64> {
    let rows: serde_json::Value = serde_json::from_str(&agent.cli(&["services", "-o", "json"])?)?;
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .and_then(|r| r["svc_id"].as_u64())
        .with_context(|| format!("{name} not in {rows}"))
}

#[test]
fn metrics_count_a_services_connections_and_drops_and_health_is_ok() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    testbed::require_root().unwrap();
    let mut cluster = Cluster::new(1, 2).expect("building the testbed");
    let run = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(false)?;
        cluster.write_myapp_endpoints(&["b1", "b2"], false)?;
        let empty = Service::cluster_ip(MYAPP_NAMESPACE, "empty", EMPTY_VIP)
            .port("http", "TCP", HTTP_PORT, HTTP_PORT);
        cluster.manifests.write("empty.yaml", &empty.to_yaml())?;
        cluster.start_agent()?;
        cluster.wait_for_myapp_backends(&["b1", "b2"])?;
        cluster
            .agent()
            .wait_for_services("empty listed", |all| all.iter().any(|s| s.name == "empty"))?;

        // Health after the first sync: 200, kube-proxy's JSON.
        for path in ["/healthz", "/livez"] {
            let h = scrape::get(&cluster.topo.node, HEALTHZ_ADDR, path)?;
            ensure!(h.status == 200, "{path}: {} {}", h.status, h.body);
            ensure!(h.header("content-type") == Some("application/json"));
            let body: serde_json::Value = serde_json::from_str(&h.body)?;
            let last = body["lastUpdated"].as_str().context("lastUpdated")?;
            let now = body["currentTime"].as_str().context("currentTime")?;
            ensure!(last.ends_with('Z') && last <= now, "{body}");
        }
        let nope = scrape::get(&cluster.topo.node, HEALTHZ_ADDR, "/nope")?;
        ensure!(nope.status == 404, "/nope: {}", nope.status);

        const CONNECTIONS: usize = 5;
        for _ in 0..CONNECTIONS {
            http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        }
        let refused = connect(
            &cluster.client().ns,
            EMPTY_VIP,
            HTTP_PORT,
            Duration::from_secs(2),
        )?;
        ensure!(
            matches!(refused, ConnectOutcome::Refused(_)),
            "a service without endpoints: {refused:?}"
        );

        // One connection stays open: its two conntrack entries must be counted.
        let mut open = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        open.get()?;

        let page = metrics(cluster)?;
        let myapp = labels(MYAPP);
        let new = value(&page, "bpfproxy_service_new_connections_total", &myapp)?;
        ensure!(new == CONNECTIONS as f64 + 1.0, "new connections {new}");
        // At least SYN, ACK with the request, and FIN per connection; SYN-ACK and the
        // answer back.
        let fwd = value(
            &page,
            "bpfproxy_service_packets_total",
            &with_direction(myapp, "forward"),
        )?;
        let reply = value(
            &page,
            "bpfproxy_service_packets_total",
            &with_direction(myapp, "reply"),
        )?;
        ensure!(fwd >= 3.0 * CONNECTIONS as f64, "forward packets {fwd}");
        ensure!(reply >= 2.0 * CONNECTIONS as f64, "reply packets {reply}");
        let fwd_bytes = value(
            &page,
            "bpfproxy_service_bytes_total",
            &with_direction(myapp, "forward"),
        )?;
        // Each frame carries at least Ethernet, IPv4 and TCP headers.
        ensure!(
            fwd_bytes >= 54.0 * fwd,
            "forward bytes {fwd_bytes} for {fwd} packets"
        );

        let empty = labels("empty");
        ensure!(value(&page, "bpfproxy_service_new_connections_total", &empty)? == 0.0);
        ensure!(
            value(
                &page,
                "bpfproxy_service_packets_total",
                &with_direction(empty, "forward")
            )? >= 1.0
        );
        let no_backend = value(
            &page,
            "bpfproxy_datapath_drops_total",
            &[("reason", "no_backend")],
        )?;
        ensure!(no_backend >= 1.0, "no_backend drops {no_backend}");
        ensure!(
            value(
                &page,
                "bpfproxy_datapath_packets_total",
                &[("path", "reject_no_backend")]
            )? == no_backend
        );
        ensure!(
            value(
                &page,
                "bpfproxy_datapath_packets_total",
                &[("path", "forward_new")]
            )? >= CONNECTIONS as f64
        );
        ensure!(
            value(
                &page,
                "bpfproxy_datapath_drops_total",
                &[("reason", "source_range")]
            )? == 0.0
        );

        // Map use: two services of one port each, two backends in all.
        let ct = [("map", "conntrack4")];
        ensure!(value(&page, "bpfproxy_map_max_entries", &ct)? == 262_144.0);
        let entries = value(&page, "bpfproxy_map_entries", &ct)?;
        ensure!(
            entries >= 2.0,
            "conntrack entries {entries} with a connection open"
        );
        ensure!(value(&page, "bpfproxy_conntrack_entries", &[])? == entries);
        let ratio = value(&page, "bpfproxy_map_fill_ratio", &ct)?;
        ensure!((ratio - entries / 262_144.0).abs() < 1e-9, "ratio {ratio}");
        ensure!(value(&page, "bpfproxy_map_entries", &[("map", "services4")])? == 2.0);
        ensure!(value(&page, "bpfproxy_map_entries", &[("map", "backend_slots4")])? == 2.0);
        for map in [
            "services4",
            "backend_slots4",
            "svc_meta",
            "affinity4",
            "counted4",
        ] {
            value(&page, "bpfproxy_map_fill_ratio", &[("map", map)])?;
        }

        // The reconcile's own metrics.
        ensure!(value(&page, "bpfproxy_sync_duration_seconds_count", &[])? >= 1.0);
        ensure!(value(&page, "bpfproxy_last_sync_timestamp_seconds", &[])? > 1.7e9);
        ensure!(value(&page, "bpfproxy_services_programmed", &[])? == 2.0);
        ensure!(value(&page, "bpfproxy_backends_programmed", &[])? == 2.0);

        // bpftool shows the counters by field name.
        let dump = cluster.agent().bpftool_dump("svc_counters")?;
        ensure!(dump.contains("new_connections"), "{dump}");

        drop(open);

        // A new service that gets myapp's svc_id starts from zero.
        let id = svc_id(cluster.agent(), MYAPP)?;
        cluster.manifests.remove(SERVICE_FILE)?;
        cluster.manifests.remove(SLICE_FILE)?;
        cluster
            .agent()
            .wait_for_service_gone(MYAPP_NAMESPACE, MYAPP)?;
        let other = Service::cluster_ip(MYAPP_NAMESPACE, "other", OTHER_VIP)
            .port("http", "TCP", HTTP_PORT, HTTP_PORT);
        let b1 = cluster.backend("b1");
        let slice = EndpointSlice::for_service(MYAPP_NAMESPACE, "other", "a1b2c")
            .port("http", "TCP", HTTP_PORT)
            .ready(&b1.name, b1.ip);
        cluster.manifests.write("other.yaml", &other.to_yaml())?;
        cluster
            .manifests
            .write("other-slice.yaml", &slice.to_yaml())?;
        cluster
            .agent()
            .wait_for_backends(MYAPP_NAMESPACE, "other", HTTP_PORT, &[b1.ip])?;
        ensure!(
            svc_id(cluster.agent(), "other")? == id,
            "the test wants other to reuse myapp's svc_id {id}"
        );
        let page = metrics(cluster)?;
        let other = labels("other");
        ensure!(value(&page, "bpfproxy_service_new_connections_total", &other)? == 0.0);
        ensure!(sample(&page, "bpfproxy_service_new_connections_total", &myapp).is_none());
        http_get(&cluster.client().ns, OTHER_VIP, HTTP_PORT)?;
        let page = metrics(cluster)?;
        ensure!(value(&page, "bpfproxy_service_new_connections_total", &other)? == 1.0);
        Ok(())
    };
    if let Err(e) = run(&mut cluster) {
        panic!("{e:?}");
    }
}

#[test]
fn health_is_503_until_the_first_sync_and_api_errors_are_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    testbed::require_root().unwrap();
    let cluster = Cluster::new(1, 1).expect("building the testbed");
    let server = ApiServer::start_in(&cluster.topo.node).expect("starting the test API server");
    let run = || -> Result<()> {
        // The API server is lost from the start: no list completes, nothing is synced.
        server.set_available(false);
        let source: Vec<OsString> = vec![
            "--kubeconfig".into(),
            server.kubeconfig().into(),
            "--node-name".into(),
            "node-1".into(),
        ];
        let agent = Agent::start_with_source(
            &cluster.topo.node,
            &source,
            &cluster.topo.node_interfaces_glob(),
            &cluster.bpffs(),
            &[],
        )?;
        agent.wait_until_running()?;
        for path in ["/healthz", "/livez"] {
            let h = scrape::get(&cluster.topo.node, HEALTHZ_ADDR, path)?;
            ensure!(
                h.status == 503,
                "{path} before any sync: {} {}",
                h.status,
                h.body
            );
            let body: serde_json::Value = serde_json::from_str(&h.body)?;
            ensure!(body["lastUpdated"].is_null(), "{body}");
            ensure!(body["nodeName"] == "node-1", "{body}");
        }
        wait_until("an API error counted", WAIT, || {
            let page = metrics(&cluster)?;
            Ok(sample(
                &page,
                "bpfproxy_source_errors_total",
                &[("source", "kubernetes"), ("reason", "watch")],
            )
            .filter(|n| *n >= 1.0))
        })?;
        let page = metrics(&cluster)?;
        ensure!(sample(&page, "bpfproxy_sync_duration_seconds_count", &[]) == Some(0.0));

        // The server comes back: the lists complete, the maps are programmed, healthy.
        server.set_available(true);
        wait_until("/healthz to answer 200", WAIT, || {
            let h = scrape::get(&cluster.topo.node, HEALTHZ_ADDR, "/healthz")?;
            Ok((h.status == 200).then_some(h))
        })
        .with_context(|| format!("agent log:\n{}", agent.log()))?;
        let page = metrics(&cluster)?;
        ensure!(value(&page, "bpfproxy_sync_duration_seconds_count", &[])? >= 1.0);
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:?}");
    }
}
