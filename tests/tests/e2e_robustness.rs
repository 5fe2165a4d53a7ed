//! bpfproxy end to end when things go wrong: bad manifests, a full map, a claimed address,
//! interfaces that come late or never, the CLI without an agent, an agent restart.
//!
//! The rule each test checks, the way an operator would: bad input gets a clear error in
//! the agent's log naming the file, object or field, and nothing that was already serving
//! traffic is lost. Every test starts from `myapp` (ClusterIP 10.96.0.10:80) served by its
//! backends to client `c1`. Needs root and the agent binary, like `e2e_clusterip.rs`; the
//! tests run one at a time.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    Cluster, EndpointSlice, HttpConnection, NetNs, Service, ServiceInfo,
    agent::{BPFFS_ROOT, run_cli},
    client::{connect, http_get},
    cluster::{HTTP_PORT, MYAPP, MYAPP_NAMESPACE, MYAPP_VIP, SERVICE_FILE, myapp_service},
};

static SERIAL: Mutex<()> = Mutex::new(());

const ALL: [&str; 3] = ["b1", "b2", "b3"];
/// A second service's ClusterIP, and its files.
const OTHER: &str = "other";
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const OTHER_SERVICE_FILE: &str = "other-service.yaml";
const OTHER_SLICE_FILE: &str = "other-endpointslice.yaml";

/// Builds a cluster with three backends, writes `myapp` with all three, starts the agent
/// with `start`, waits until it serves them, then runs `body`. On failure the agent's log
/// is printed as the guards clean up.
fn with_myapp(
    start: impl FnOnce(&mut Cluster) -> Result<()>,
    body: impl FnOnce(&mut Cluster) -> Result<()>,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, 3).expect("building the testbed");
    let setup = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(false)?;
        cluster.write_myapp_endpoints(&ALL, false)?;
        start(cluster)?;
        cluster.wait_for_myapp_backends(&ALL)?;
        // Past its start-up: watching files and links, and handling SIGTERM.
        cluster.agent().wait_until_running()?;
        Ok(())
    };
    if let Err(e) = setup(&mut cluster).and_then(|()| body(&mut cluster)) {
        // The agent's guard prints its log while this panic unwinds.
        panic!("{e:?}");
    }
}

/// The agent as `cargo xtask demo` starts it.
fn default_agent(cluster: &mut Cluster) -> Result<()> {
    cluster.start_agent().map(drop)
}

/// `n` GETs to myapp from `ns`, each on a new connection; all must be answered by one of
/// `allowed`. Returns the answers per backend.
fn gets_answered_by(ns: &NetNs, n: usize, allowed: &[&str]) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::<String, usize>::new();
    for i in 0..n {
        let name = http_get(ns, MYAPP_VIP, HTTP_PORT)
            .with_context(|| format!("GET {} of {n} to {MYAPP_VIP}:{HTTP_PORT}", i + 1))?;
        ensure!(
            allowed.contains(&name.as_str()),
            "GET {} was answered by {name:?}, not by one of {allowed:?}",
            i + 1
        );
        *counts.entry(name).or_default() += 1;
    }
    Ok(counts)
}

/// `bpfproxy services -o json` lists myapp:80 with exactly the backends `pods` (now, no
/// waiting).
fn check_myapp_backends(cluster: &Cluster, pods: &[&str]) -> Result<ServiceInfo> {
    let svc = cluster
        .agent()
        .service(MYAPP_NAMESPACE, MYAPP, HTTP_PORT)?
        .context("myapp:80 is missing from `bpfproxy services -o json`")?;
    ensure!(
        svc.backend_ips() == backend_ips(cluster, pods),
        "myapp:80 should have the backends {pods:?}: {svc:?}"
    );
    Ok(svc)
}

fn backend_ips(cluster: &Cluster, pods: &[&str]) -> Vec<String> {
    let mut ips: Vec<String> = pods
        .iter()
        .map(|p| cluster.backend(p).ip.to_string())
        .collect();
    ips.sort();
    ips
}

/// The services as `bpfproxy services -o json --bpffs <bpffs>` prints them, with no agent
/// needed.
fn cli_services(bpffs: &Path) -> Result<Vec<ServiceInfo>> {
    let out = run_cli(&["services", "-o", "json"], bpffs)?;
    ensure!(
        out.status.success(),
        "`bpfproxy services -o json --bpffs {}` failed ({}): {}",
        bpffs.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let json = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&json).with_context(|| format!("parsing services JSON {json:?}"))
}

/// `bpfproxy conntrack -o json --bpffs <bpffs>`: each connection's (client, service, backend)
/// as `ip:port` strings.
fn cli_connections(bpffs: &Path) -> Result<Vec<(String, String, String)>> {
    let out = run_cli(&["conntrack", "-o", "json"], bpffs)?;
    ensure!(
        out.status.success(),
        "`bpfproxy conntrack -o json --bpffs {}` failed ({}): {}",
        bpffs.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&json).with_context(|| format!("parsing conntrack JSON {json:?}"))?;
    rows.iter()
        .map(|r| {
            let end = |ip: &str, port: &str| -> Result<String> {
                Ok(format!(
                    "{}:{}",
                    r[ip].as_str().context("no address")?,
                    r[port].as_u64().context("no port")?
                ))
            };
            Ok((
                end("client_ip", "client_port")?,
                end("service_ip", "service_port")?,
                end("backend_ip", "backend_port")?,
            ))
        })
        .collect::<Result<_>>()
        .with_context(|| format!("reading conntrack JSON {json:?}"))
}

/// The one tracked connection from `client` (`ip:port`), as (service, backend).
fn tracked(bpffs: &Path, client: &str) -> Result<(String, String)> {
    let rows = cli_connections(bpffs)?;
    let mine: Vec<_> = rows.iter().filter(|(c, ..)| c == client).collect();
    match mine.as_slice() {
        [(_, service, backend)] => Ok((service.clone(), backend.clone())),
        _ => bail!("want one tracked connection from {client}, `bpfproxy conntrack` has {rows:?}"),
    }
}

/// Where a log line names `file` with a line number (`<file>:<line>:`), that number.
fn line_number_after(line: &str, file: &Path) -> Option<usize> {
    let rest = &line[line.find(&format!("{}:", file.display()))?..];
    let rest = &rest[file.as_os_str().len() + 1..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Connection attempts to `addr:80` from `ns` never reach a backend.
fn not_answered(ns: &NetNs, addr: Ipv4Addr, attempts: usize) -> Result<()> {
    for i in 0..attempts {
        let out = connect(ns, addr, HTTP_PORT, Duration::from_secs(1))?;
        ensure!(
            !out.is_connected(),
            "attempt {} to {addr}:{HTTP_PORT} connected: {out:?}",
            i + 1
        );
    }
    Ok(())
}

/// An EndpointSlice of `other` with the backend pods `pods`.
fn other_slice(cluster: &Cluster, pods: &[&str]) -> EndpointSlice {
    let mut slice =
        EndpointSlice::for_service(MYAPP_NAMESPACE, OTHER, "q9w8e").port("http", "TCP", HTTP_PORT);
    for pod in pods {
        slice = slice.ready(pod, cluster.backend(pod).ip);
    }
    slice
}

#[test]
fn malformed_yaml_is_reported_with_file_and_line_and_the_last_good_version_keeps_serving() {
    with_myapp(default_agent, |cluster| {
        let agent = cluster.agent();
        let file = cluster.manifests.path().join(SERVICE_FILE);
        // An edit gone wrong: `ports:` indented one space too far, so the list under it
        // no longer fits the mapping it is in.
        let good = myapp_service(false).to_yaml();
        let broken_at = good
            .lines()
            .position(|l| l == "  ports:")
            .context("the Service YAML has no `  ports:` line")?
            + 1;
        let broken = good.replace("\n  ports:\n", "\n   ports:\n");
        ensure!(broken != good);
        cluster.manifests.write(SERVICE_FILE, &broken)?;

        let line = agent.wait_for_log_line("an error naming the broken file", |l| {
            line_number_after(l, &file).is_some()
        })?;
        let reported = line_number_after(&line, &file).expect("matched above");
        ensure!(
            reported == broken_at,
            "the error should point at line {broken_at} of {}, which broke it: {line:?}\n\
             the file:\n{broken}",
            file.display()
        );

        // The last good version stays in effect.
        check_myapp_backends(cluster, &ALL)?;
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;
        agent.check_running()?;

        // A good file again, with a change: the UDP port added, and b3 gone from the slice.
        cluster
            .manifests
            .write(SERVICE_FILE, &myapp_service(true).to_yaml())?;
        cluster.write_myapp_endpoints(&["b1", "b2"], true)?;
        cluster.wait_for_myapp_backends(&["b1", "b2"])?;
        agent.wait_for_services("myapp's new UDP port 53", |all| {
            all.iter()
                .any(|s| s.name == MYAPP && s.port == 53 && s.protocol == "UDP")
        })?;
        agent.wait_for_log_line("the error on the file reported resolved", |l| {
            l.contains("resolved:") && l.contains(&file.display().to_string())
        })?;
        let counts = gets_answered_by(&cluster.client().ns, 10, &["b1", "b2"])?;
        ensure!(counts.values().sum::<usize>() == 10, "{counts:?}");
        Ok(())
    });
}

#[test]
fn invalid_field_is_reported_by_object_and_field_and_serving_goes_on() {
    with_myapp(default_agent, |cluster| {
        let agent = cluster.agent();
        let file = cluster.manifests.path().join(SERVICE_FILE);
        let good = myapp_service(false).to_yaml();

        let bad_port = good.replace("    port: 80\n", "    port: 70000\n");
        ensure!(bad_port != good);
        cluster.manifests.write(SERVICE_FILE, &bad_port)?;
        let line = agent.wait_for_log_line("an error on spec.ports[0].port", |l| {
            l.contains("spec.ports[0].port")
        })?;
        for want in [
            file.display().to_string().as_str(),
            "Service default/myapp",
            "70000",
        ] {
            ensure!(
                line.contains(want),
                "the error should name {want:?}: {line:?}"
            );
        }
        check_myapp_backends(cluster, &ALL)?;
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;

        let icmp = Service::cluster_ip(MYAPP_NAMESPACE, MYAPP, MYAPP_VIP)
            .port("http", "ICMP", HTTP_PORT, HTTP_PORT);
        cluster.manifests.write(SERVICE_FILE, &icmp.to_yaml())?;
        let line = agent.wait_for_log_line("an error on spec.ports[0].protocol", |l| {
            l.contains("spec.ports[0].protocol")
        })?;
        for want in ["Service default/myapp", "ICMP"] {
            ensure!(
                line.contains(want),
                "the error should name {want:?}: {line:?}"
            );
        }
        check_myapp_backends(cluster, &ALL)?;
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;
        agent.check_running()?;
        Ok(())
    });
}

#[test]
fn a_service_that_does_not_fit_is_refused_by_name_and_the_others_keep_serving() {
    let start = |cluster: &mut Cluster| -> Result<()> {
        let interfaces = cluster.topo.node_interfaces_glob();
        cluster
            .start_agent_with(&interfaces, &["--max-services", "1"])
            .map(drop)
    };
    with_myapp(start, |cluster| {
        let other = Service::cluster_ip(MYAPP_NAMESPACE, OTHER, OTHER_VIP)
            .port("http", "TCP", HTTP_PORT, HTTP_PORT);
        cluster
            .manifests
            .write(OTHER_SLICE_FILE, &other_slice(cluster, &["b3"]).to_yaml())?;
        cluster
            .manifests
            .write(OTHER_SERVICE_FILE, &other.to_yaml())?;

        let agent = cluster.agent();
        let line = agent.wait_for_log_line("services4 reported full", |l| {
            l.contains("services4 is full")
        })?;
        ensure!(
            line.contains("default/other"),
            "the error should name the refused service default/other: {line:?}"
        );

        let services = agent.services()?;
        ensure!(
            !services.iter().any(|s| s.name == OTHER),
            "the refused service is listed: {services:?}"
        );
        check_myapp_backends(cluster, &ALL)?;
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;
        not_answered(&cluster.client().ns, OTHER_VIP, 3)?;
        agent.check_running()?;
        Ok(())
    });
}

#[test]
fn a_cluster_ip_claimed_twice_stays_with_the_service_that_sorts_first() {
    with_myapp(default_agent, |cluster| {
        // `default/other` claims myapp's 10.96.0.10:80/TCP, with b3 only. `default/myapp`
        // sorts first, so it keeps the address (model::build::desired_state).
        let thief = Service::cluster_ip(MYAPP_NAMESPACE, OTHER, MYAPP_VIP)
            .port("http", "TCP", HTTP_PORT, HTTP_PORT);
        cluster
            .manifests
            .write(OTHER_SLICE_FILE, &other_slice(cluster, &["b3"]).to_yaml())?;
        cluster
            .manifests
            .write(OTHER_SERVICE_FILE, &thief.to_yaml())?;

        let agent = cluster.agent();
        let line = agent.wait_for_log_line("the conflict on 10.96.0.10:80", |l| {
            l.contains("10.96.0.10:80/TCP") && l.contains("claimed")
        })?;
        for want in ["Service default/other", "Service default/myapp"] {
            ensure!(
                line.contains(want),
                "the conflict should name {want:?}: {line:?}"
            );
        }

        let services = agent.services()?;
        ensure!(
            !services.iter().any(|s| s.name == OTHER),
            "the service that lost the address is listed: {services:?}"
        );
        check_myapp_backends(cluster, &ALL)?;
        let counts = gets_answered_by(&cluster.client().ns, 20, &ALL)?;
        ensure!(
            counts.keys().any(|b| b != "b3"),
            "20 GETs all went to b3, the other service's only backend: {counts:?}"
        );
        agent.check_running()?;
        Ok(())
    });
}

#[test]
fn a_pod_that_appears_later_is_served() {
    with_myapp(default_agent, |cluster| {
        let before = cluster.agent().services()?;
        let pod = cluster.topo.add_client()?;
        let (node_if, pod_name) = (pod.node_if.clone(), pod.name.clone());

        cluster
            .agent()
            .wait_for_log_line(&format!("the agent attaching to {node_if}"), |l| {
                l.contains("attached") && l.contains(&node_if)
            })?;
        let pod = cluster
            .topo
            .clients
            .iter()
            .find(|p| p.name == pod_name)
            .expect("added above");
        gets_answered_by(&pod.ns, 10, &ALL)
            .with_context(|| format!("GETs from the new pod {pod_name}"))?;
        gets_answered_by(&cluster.client().ns, 5, &ALL).context("GETs from c1")?;

        let after = cluster.agent().services()?;
        ensure!(
            after == before,
            "`bpfproxy services` changed when a pod appeared:\nbefore {before:?}\nafter {after:?}"
        );
        Ok(())
    });
}

#[test]
fn a_missing_interface_is_named_and_the_others_serve() {
    let start = |cluster: &mut Cluster| -> Result<()> {
        let interfaces = format!("nosuch0,{}", cluster.topo.node_interfaces_glob());
        cluster.start_agent_with(&interfaces, &[]).map(drop)
    };
    with_myapp(start, |cluster| {
        let agent = cluster.agent();
        agent.wait_for_log_line("an error naming nosuch0", |l| {
            l.contains("nosuch0") && l.contains("does not exist")
        })?;
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;
        agent.check_running()?;
        Ok(())
    });
}

#[test]
fn the_cli_reads_the_pins_without_the_agent() {
    with_myapp(default_agent, |cluster| {
        let agent = cluster.agent();
        let bpffs = agent.bpffs().to_path_buf();
        let mut conn = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        let mine = conn.get()?;
        let client = conn.local_addr()?.to_string();

        let status = agent.stop_keeping_pins()?;
        ensure!(
            status.success(),
            "the agent exited with {status} on SIGTERM"
        );

        let services = cli_services(&bpffs)?;
        let svc = services
            .iter()
            .find(|s| s.name == MYAPP && s.port == HTTP_PORT)
            .with_context(|| format!("myapp:80 missing without the agent: {services:?}"))?;
        ensure!(
            svc.backend_ips() == backend_ips(cluster, &ALL),
            "without the agent, myapp:80 should still list its 3 backends: {svc:?}"
        );
        let (service, backend) = tracked(&bpffs, &client)?;
        ensure!(service == format!("{MYAPP_VIP}:{HTTP_PORT}"), "{service}");
        ensure!(
            backend == format!("{}:{HTTP_PORT}", cluster.backend(&mine).ip),
            "the connection answered by {mine} is tracked to {backend}"
        );
        let table = run_cli(&["conntrack"], &bpffs)?;
        ensure!(table.status.success(), "`bpfproxy conntrack`: {table:?}");

        // The operator cleans up; the CLI then says there is nothing there.
        std::fs::remove_dir_all(&bpffs)
            .with_context(|| format!("removing the pins {}", bpffs.display()))?;
        expect_not_pinned(&bpffs)?;
        let nowhere =
            PathBuf::from(BPFFS_ROOT).join(format!("does-not-exist-{}", cluster.topo.run));
        expect_not_pinned(&nowhere)?;
        ensure!(
            !nowhere.exists(),
            "`bpfproxy services` created {}",
            nowhere.display()
        );
        Ok(())
    });
}

/// `bpfproxy services --bpffs <dir>` fails with an error naming `dir`.
fn expect_not_pinned(dir: &Path) -> Result<()> {
    let out = run_cli(&["services", "-o", "json"], dir)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "`bpfproxy services --bpffs {}` succeeded with nothing pinned: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        stderr.contains(&dir.display().to_string()),
        "the error should name {}: {stderr:?}",
        dir.display()
    );
    Ok(())
}

#[test]
fn a_restarted_agent_keeps_established_connections_on_their_backend() {
    with_myapp(default_agent, |cluster| {
        let agent = cluster.agent();
        let mut conn = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        let mine = conn.get()?;
        ensure!(ALL.contains(&mine.as_str()), "first answer {mine:?}");
        let client = conn.local_addr()?.to_string();

        // The programs stay attached while no agent runs (e2e_restart.rs streams across
        // that window); here the point is the connection's backend after the restart.
        let status = agent.stop_keeping_pins()?;
        ensure!(
            status.success(),
            "the agent exited with {status} on SIGTERM"
        );
        agent.start_again()?;
        let line = agent.wait_for_log_line("the agent finding myapp in the pinned maps", |l| {
            l.contains("found services in the pinned maps")
        })?;
        ensure!(
            line.contains("services=1"),
            "the restarted agent should find myapp's one service port: {line:?}"
        );
        agent.wait_until_running()?;

        check_myapp_backends(cluster, &ALL)?;
        for i in 0..10 {
            let name = conn.get().with_context(|| {
                format!("request {} on the connection after the restart", i + 1)
            })?;
            ensure!(
                name == mine,
                "request {} after the restart went to {name}, not {mine}",
                i + 1
            );
        }
        let (_, backend) = tracked(agent.bpffs(), &client)?;
        ensure!(
            backend == format!("{}:{HTTP_PORT}", cluster.backend(&mine).ip),
            "the connection answered by {mine} is tracked to {backend}"
        );
        gets_answered_by(&cluster.client().ns, 10, &ALL)?;
        Ok(())
    });
}
