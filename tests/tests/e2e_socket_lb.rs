//! Socket-level load balancing end to end: the agent with `--socket-lb-cgroup` on a cgroup
//! the test makes (never the machine's root cgroup), and client processes in the node
//! namespace (a process on the node: no pod veth, so tc never sees its packets) that join
//! that cgroup before they connect (`testbed-sock-client`).
//!
//! Checked as a user would: bytes from a backend through the ClusterIP over TCP and UDP,
//! getpeername() and the source of UDP replies showing the ClusterIP, a service without
//! endpoints refusing at once, a process outside the cgroup untouched, the `sock_lb`
//! counter, the hooks kept across an agent restart and removed by `bpfproxy cleanup`.

use std::{path::Path, process::Command, sync::Mutex};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    cgroup::{TestCgroup, sock_client},
    cluster::{Cluster, DNS_PORT, HTTP_PORT, MYAPP_VIP},
};

/// One agent at a time: the stats and hook counts read here are this test's alone anyway,
/// but two agents starting at once on 2 CPUs only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENT: &str = env!("CARGO_BIN_EXE_testbed-sock-client");
const ECONNREFUSED: i64 = 111;
const ENETUNREACH: i64 = 101;
const EPERM: i64 = 1;

fn stat(cluster: &Cluster, name: &str) -> Result<u64> {
    let json = cluster.agent().cli(&["stats", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    v[name]
        .as_u64()
        .with_context(|| format!("{name} in {json}"))
}

/// A cluster (backends `b1`, `b2` serving `myapp` over TCP and UDP), a test cgroup, and
/// the agent with socket-level load balancing on it.
fn with_socket_lb(body: impl FnOnce(&mut Cluster, &TestCgroup) -> Result<()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, 2).expect("building the testbed");
    let cgroup = TestCgroup::create(&cluster.topo.run).expect("creating the test cgroup");
    let setup = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(true)?;
        cluster.write_myapp_endpoints(&["b1", "b2"], true)?;
        let glob = cluster.topo.node_interfaces_glob();
        let path = cgroup.path().display().to_string();
        cluster.start_agent_with(&glob, &["--socket-lb-cgroup", &path])?;
        cluster.wait_for_myapp_backends(&["b1", "b2"])?;
        Ok(())
    };
    if let Err(e) = setup(&mut cluster).and_then(|()| body(&mut cluster, &cgroup)) {
        panic!("{e:?}");
    }
}

/// A call from a process on the node (node namespace), in `cgroup` or not.
fn from_node(
    cluster: &Cluster,
    cgroup: Option<&TestCgroup>,
    mode: &str,
    port: u16,
) -> Result<serde_json::Value> {
    sock_client(
        Path::new(CLIENT),
        cgroup,
        &cluster.topo.node.path(),
        mode,
        MYAPP_VIP,
        port,
    )
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> Result<&'a str> {
    v[k].as_str()
        .with_context(|| format!("no {k:?} in the client's answer {v}"))
}

fn errno(v: &serde_json::Value) -> Result<i64> {
    v["errno"]
        .as_i64()
        .with_context(|| format!("expected a failed call, got {v}"))
}

#[test]
fn node_processes_reach_a_cluster_ip_over_tcp_and_udp() {
    with_socket_lb(|cluster, cgroup| {
        let backends = ["b1", "b2"];
        let tcp_frontend = format!("{MYAPP_VIP}:{HTTP_PORT}");
        let udp_frontend = format!("{MYAPP_VIP}:{DNS_PORT}");
        let mut seen = std::collections::BTreeSet::new();
        let tcp_calls = 20;
        for _ in 0..tcp_calls {
            let v = from_node(cluster, Some(cgroup), "tcp", HTTP_PORT)?;
            let body = field(&v, "body")?;
            ensure!(backends.contains(&body), "answer {v} is from no backend");
            // getpeername() shows the frontend the process asked for, not the backend.
            ensure!(field(&v, "peer")? == tcp_frontend, "{v}");
            seen.insert(body.to_string());
        }
        ensure!(
            seen.len() == 2,
            "{tcp_calls} connections all went to {seen:?} (random over two backends)"
        );

        // Unconnected UDP (sendmsg4): the reply comes from the ClusterIP (recvmsg4).
        let v = from_node(cluster, Some(cgroup), "udp", DNS_PORT)?;
        ensure!(backends.contains(&field(&v, "body")?), "{v}");
        ensure!(field(&v, "from")? == udp_frontend, "{v}");
        // Connected UDP (connect4): peer and reply source are the ClusterIP.
        let v = from_node(cluster, Some(cgroup), "udp-connect", DNS_PORT)?;
        ensure!(backends.contains(&field(&v, "body")?), "{v}");
        ensure!(field(&v, "peer")? == udp_frontend, "{v}");
        ensure!(field(&v, "from")? == udp_frontend, "{v}");

        // One count per rewritten connect()/sendmsg(): 20 TCP, one sendto, one UDP connect.
        ensure!(stat(cluster, "sock_lb")? == tcp_calls + 2, "sock_lb");

        // A process outside the cgroup is not rewritten: the node has no route to the
        // ClusterIP, so its connect fails.
        let v = from_node(cluster, None, "tcp", HTTP_PORT)?;
        ensure!(errno(&v)? == ENETUNREACH, "outside the cgroup: {v}");
        ensure!(
            stat(cluster, "sock_lb")? == tcp_calls + 2,
            "sock_lb after outside call"
        );

        // No endpoints: connect() and sendto() fail at once with ECONNREFUSED (a timeout
        // would give ETIMEDOUT after the client's 2 s).
        cluster.write_myapp_endpoints(&[], true)?;
        cluster.wait_for_myapp_backends(&[])?;
        let before = stat(cluster, "reject_no_backend")?;
        let v = from_node(cluster, Some(cgroup), "tcp", HTTP_PORT)?;
        ensure!(errno(&v)? == ECONNREFUSED, "no endpoints, TCP: {v}");
        let v = from_node(cluster, Some(cgroup), "udp", DNS_PORT)?;
        ensure!(errno(&v)? == ECONNREFUSED, "no endpoints, UDP: {v}");
        ensure!(
            stat(cluster, "reject_no_backend")? == before + 2,
            "reject_no_backend"
        );
        Ok(())
    });
}

/// The ids bpftool reports for the link pinned at `pin`: (link id, program id).
fn pinned_link(pin: &Path) -> Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool link show pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let id = |k: &str| v[k].as_u64().with_context(|| format!("{k} in {v}"));
    Ok((id("id")?, id("prog_id")?))
}

/// The programs attached to a cgroup, by attach type, as bpftool lists them.
fn cgroup_programs(cgroup: &TestCgroup) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut types: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["attach_type"].as_str().map(str::to_string))
        .collect();
    types.sort();
    Ok(types)
}

#[test]
fn the_hooks_survive_a_restart_and_cleanup_removes_them() {
    with_socket_lb(|cluster, cgroup| {
        let hooks = ["connect4", "getpeername4", "recvmsg4", "sendmsg4"];
        let attached = cgroup_programs(cgroup)?;
        ensure!(
            attached.len() == 4,
            "expected the four socket hooks on the test cgroup, bpftool shows {attached:?}"
        );
        let pins = cluster.agent().bpffs().join("links/cgroup");
        let before: Vec<(u64, u64)> = hooks
            .iter()
            .map(|h| pinned_link(&pins.join(h)))
            .collect::<Result<_>>()?;

        // The agent is gone: the pinned hooks keep balancing.
        cluster.agent().stop_keeping_pins()?;
        let v = from_node(cluster, Some(cgroup), "tcp", HTTP_PORT)?;
        ensure!(
            field(&v, "peer")? == format!("{MYAPP_VIP}:{HTTP_PORT}"),
            "no agent: {v}"
        );

        // A new agent swaps its programs into the same links.
        cluster.agent().start_again()?;
        cluster.agent().wait_until_running()?;
        for (hook, (link, prog)) in hooks.iter().zip(&before) {
            let (link2, prog2) = pinned_link(&pins.join(hook))?;
            ensure!(link2 == *link, "{hook}: link {link} replaced by {link2}");
            ensure!(prog2 != *prog, "{hook}: program {prog} not replaced");
        }
        ensure!(
            cgroup_programs(cgroup)?.len() == 4,
            "hooks after the restart"
        );
        let v = from_node(cluster, Some(cgroup), "udp", DNS_PORT)?;
        ensure!(
            field(&v, "from")? == format!("{MYAPP_VIP}:{DNS_PORT}"),
            "{v}"
        );

        // Cleanup takes them off: the same call is no longer rewritten.
        cluster.agent().stop_keeping_pins()?;
        let out = cluster.agent().cli(&["cleanup"])?;
        for hook in hooks {
            ensure!(
                out.contains(&format!("cgroup {hook}")),
                "cleanup did not report {hook}: {out}"
            );
        }
        ensure!(
            cgroup_programs(cgroup)?.is_empty(),
            "hooks left after cleanup"
        );
        let v = from_node(cluster, Some(cgroup), "tcp", HTTP_PORT)?;
        ensure!(errno(&v)? == ENETUNREACH, "after cleanup: {v}");
        Ok(())
    });
}

#[test]
fn a_path_that_is_not_a_cgroup2_folder_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("bpfproxy-not-a-cgroup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(testbed::agent::bpfproxy_bin().unwrap())
        .args(["run", "--manifests"])
        .arg(&dir)
        .args([
            "--interfaces",
            "lo",
            "--healthz-addr",
            "",
            "--metrics-addr",
            "",
        ])
        .args(["--bpffs", "/sys/fs/bpf/bpfproxy-not-a-cgroup-test"])
        .arg("--socket-lb-cgroup")
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&dir.display().to_string()) && stderr.contains("cgroup2"),
        "{stderr}"
    );
    assert!(
        !Path::new("/sys/fs/bpf/bpfproxy-not-a-cgroup-test").exists(),
        "refused after creating pins"
    );
}

#[test]
fn detach_on_exit_takes_the_hooks_off() {
    with_socket_lb(|cluster, cgroup| {
        cluster.agent().stop_keeping_pins()?;
        cluster.agent().start_again_with(&["--detach-on-exit"])?;
        cluster.agent().wait_until_running()?;
        ensure!(
            cgroup_programs(cgroup)?.len() == 4,
            "hooks taken over by the second agent"
        );
        cluster.agent().stop_keeping_pins()?;
        ensure!(
            cgroup_programs(cgroup)?.is_empty(),
            "hooks left after an agent with --detach-on-exit stopped"
        );
        let pins = cluster.agent().bpffs().join("links/cgroup");
        let left: Vec<_> = std::fs::read_dir(&pins)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(left.is_empty(), "pins left: {left:?}");
        let v = from_node(cluster, Some(cgroup), "tcp", HTTP_PORT)?;
        ensure!(errno(&v)? == ENETUNREACH, "after detach-on-exit: {v}");
        Ok(())
    });
}

/// `bpftool map update` of the pinned `map` with raw bytes.
fn bpftool_update(bpffs: &Path, map: &str, key: &[u8], value: &[u8]) -> Result<()> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
    let out = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(bpffs.join(map))
        .arg("key")
        .arg("hex")
        .args(hex(key))
        .arg("value")
        .arg("hex")
        .args(hex(value))
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool map update {map}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The kernel side of loadBalancerSourceRanges on the socket path, from map contents
/// written with bpftool (the agent's resync is pushed past the test): `myapp:80` marked as
/// having source ranges admits a node process only once a range holds its source (here
/// 0.0.0.0/0: this testbed configures no node address, so the source is unknown).
#[test]
fn source_ranges_refuse_node_processes_outside_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, 1).expect("building the testbed");
    let cgroup = TestCgroup::create(&cluster.topo.run).expect("creating the test cgroup");
    let body = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(false)?;
        cluster.write_myapp_endpoints(&["b1"], false)?;
        let glob = cluster.topo.node_interfaces_glob();
        let path = cgroup.path().display().to_string();
        cluster.start_agent_with(
            &glob,
            &["--socket-lb-cgroup", &path, "--resync-seconds", "3600"],
        )?;
        cluster.wait_for_myapp_backends(&["b1"])?;
        let bpffs = cluster.agent().bpffs().to_path_buf();
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(bpffs.join("services4"))
            .output()
            .context("running bpftool")?;
        let dump = String::from_utf8_lossy(&out.stdout).into_owned();
        let entries: serde_json::Value = serde_json::from_str(&dump)?;
        let bytes = |v: &serde_json::Value| -> Result<Vec<u8>> {
            v.as_array()
                .context("hex bytes")?
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap_or("").trim_start_matches("0x"), 16)
                        .context("a hex byte")
                })
                .collect()
        };
        let entry = entries
            .as_array()
            .and_then(|a| a.first())
            .with_context(|| format!("no services4 entry: {dump}"))?;
        let key = bytes(&entry["key"])?;
        let mut value = bytes(&entry["value"])?;
        // SvcValue: svc_id, table, backend_count (u32 each), scheduler, flags.
        let svc_id = u32::from_ne_bytes(value[0..4].try_into()?);
        value[13] |= proxy_common::service::SVC_F_SOURCE_RANGES;
        bpftool_update(&bpffs, "services4", &key, &value)?;

        let v = from_node(cluster, Some(&cgroup), "tcp", HTTP_PORT)?;
        ensure!(errno(&v)? == EPERM, "outside the ranges: {v}");
        ensure!(
            stat(cluster, "drop_source_range")? == 1,
            "drop_source_range"
        );

        // 0.0.0.0/0 for this svc_id: the trie key is the prefix length (32 bits of svc_id
        // plus the range's 0), svc_id big-endian, then the address.
        let mut range = 32u32.to_ne_bytes().to_vec();
        range.extend_from_slice(&svc_id.to_be_bytes());
        range.extend_from_slice(&[0, 0, 0, 0]);
        bpftool_update(&bpffs, "src_ranges4", &range, &[1])?;
        let v = from_node(cluster, Some(&cgroup), "tcp", HTTP_PORT)?;
        ensure!(field(&v, "body")? == "b1", "inside the ranges: {v}");
        Ok(())
    };
    if let Err(e) = body(&mut cluster) {
        panic!("{e:?}");
    }
}

/// LoadBalancer ingress IPs and external IPs are in the in-cluster view too: a node process
/// reaches them through the socket hooks, with all endpoints (kube-proxy short-circuits
/// such traffic from inside the cluster).
#[test]
fn node_processes_reach_load_balancer_and_external_ips() {
    const LB_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 10);
    const EXTERNAL_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 7);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(1, 2).expect("building the testbed");
    let cgroup = TestCgroup::create(&cluster.topo.run).expect("creating the test cgroup");
    let body = |cluster: &mut Cluster| -> Result<()> {
        let service = testbed::cluster::myapp_service(true)
            .kind("LoadBalancer")
            .lb_ingress(LB_IP)
            .external_ip(EXTERNAL_IP);
        cluster
            .manifests
            .write(testbed::cluster::SERVICE_FILE, &service.to_yaml())?;
        cluster.write_myapp_endpoints(&["b1", "b2"], true)?;
        let glob = cluster.topo.node_interfaces_glob();
        let path = cgroup.path().display().to_string();
        cluster.start_agent_with(&glob, &["--socket-lb-cgroup", &path])?;
        cluster.wait_for_myapp_backends(&["b1", "b2"])?;
        for addr in [LB_IP, EXTERNAL_IP] {
            testbed::wait_until(
                &format!("{addr}:{HTTP_PORT} in the services map"),
                std::time::Duration::from_secs(20),
                || {
                    Ok(cluster
                        .agent()
                        .services()?
                        .iter()
                        .any(|s| s.ip == addr.to_string() && s.port == HTTP_PORT)
                        .then_some(()))
                },
            )?;
            let call = |mode: &str, port: u16| {
                sock_client(
                    Path::new(CLIENT),
                    Some(&cgroup),
                    &cluster.topo.node.path(),
                    mode,
                    addr,
                    port,
                )
            };
            let v = call("tcp", HTTP_PORT)?;
            ensure!(["b1", "b2"].contains(&field(&v, "body")?), "{addr}: {v}");
            ensure!(field(&v, "peer")? == format!("{addr}:{HTTP_PORT}"), "{v}");
            let v = call("udp", DNS_PORT)?;
            ensure!(["b1", "b2"].contains(&field(&v, "body")?), "{addr}: {v}");
            ensure!(field(&v, "from")? == format!("{addr}:{DNS_PORT}"), "{v}");
        }
        Ok(())
    };
    if let Err(e) = body(&mut cluster) {
        panic!("{e:?}");
    }
}
