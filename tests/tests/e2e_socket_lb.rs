//! Socket-level load balancing end to end: the agent with `--socket-lb-cgroup` on a cgroup
//! the test makes (never the machine's root cgroup), and client processes in the node
//! namespace (a process on the node: no pod veth, so tc never sees its packets) that join
//! that cgroup before they connect (`testbed-sock-client`).
//!
//! Checked as a user would: bytes from a backend through the ClusterIP over TCP and UDP,
//! getpeername() and the source of UDP replies showing the ClusterIP, a service without
//! endpoints refusing at once, a process outside the cgroup untouched, the `sock_lb`
//! counter, the hooks kept across an agent restart and removed by `bpfproxy cleanup`.
//!
//! IPv6 (the connect6/sendmsg6/recvmsg6/getpeername6 hooks) on the two-node testbed
//! (`testbed::two_node`, which has IPv6): a process in a test cgroup on node A runs
//! `testbed-probe` against an IPv6 ClusterIP whose backends are on node B, and against the
//! IPv4-mapped form of a dual-stack Service's IPv4 ClusterIP.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::Command,
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    cgroup::{TestCgroup, sock_client},
    client::{Asked, ask_tcp},
    cluster::{Cluster, DNS_PORT, HTTP_PORT, MYAPP_VIP},
    two_node::{
        NODE_A_IP, NODE_A_IP6, NodeProbe, SERVICE_PORT, TwoNode, Which, peer_service, peer_service6,
    },
};

/// One agent at a time: the stats and hook counts read here are this test's alone anyway,
/// but two agents starting at once on 2 CPUs only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENT: &str = env!("CARGO_BIN_EXE_testbed-sock-client");
const PROBE: &str = env!("CARGO_BIN_EXE_testbed-probe");
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

/// The socket hooks, by their pin (and bpftool attach type) names.
const ALL_HOOKS: [&str; 8] = [
    "connect4",
    "getpeername4",
    "recvmsg4",
    "sendmsg4",
    "connect6",
    "getpeername6",
    "recvmsg6",
    "sendmsg6",
];

/// The same hooks as bpftool names their attach types (libbpf's names), sorted.
const ATTACH_TYPES: [&str; 8] = [
    "cgroup_inet4_connect",
    "cgroup_inet4_getpeername",
    "cgroup_inet6_connect",
    "cgroup_inet6_getpeername",
    "cgroup_udp4_recvmsg",
    "cgroup_udp4_sendmsg",
    "cgroup_udp6_recvmsg",
    "cgroup_udp6_sendmsg",
];

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
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
    cgroup_programs_at(cgroup.path())
}

fn cgroup_programs_at(cgroup: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
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
        let hooks = ALL_HOOKS;
        let attached = cgroup_programs(cgroup)?;
        ensure!(
            attached == sorted(&ATTACH_TYPES),
            "expected the eight socket hooks on the test cgroup, bpftool shows {attached:?}"
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
            cgroup_programs(cgroup)?.len() == hooks.len(),
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
            cgroup_programs(cgroup)?.len() == ALL_HOOKS.len(),
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

/// A dual-stack Service's IPv6 ClusterIP and its IPv4 one (in the testbed's ranges).
const CIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);
const CIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
/// An IPv6-only Service without endpoints.
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x71);
/// How long one probe waits for an answer.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// The two-node testbed with the services of the IPv6 tests, the agent of node A with
/// socket-level load balancing on a test cgroup, and a probe running in that cgroup.
fn with_socket_lb6(
    pods_per_node: usize,
    backends: &[&str],
    body: impl FnOnce(&TwoNode, &dyn Fn(&str, IpAddr) -> Result<Asked>, &Path) -> Result<()>,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut tb = TwoNode::new(pods_per_node).expect("building the two-node testbed");
    tb.write_services_slices(
        "services.yaml",
        &[
            (
                peer_service("ds", "ClusterIP", CIP4, None).dual_stack(CIP6, "RequireDualStack"),
                vec![
                    tb.peer_slice("ds", backends),
                    tb.peer_slice6("ds", backends),
                ],
            ),
            (
                peer_service6("empty6", "ClusterIP", EMPTY6, None),
                vec![tb.peer_slice6("empty6", &[])],
            ),
        ],
    )
    .expect("writing the services");
    let cgroup = tb.make_cgroup(Which::A).expect("creating the test cgroup");
    let cgroup_arg = cgroup.to_string_lossy().into_owned();
    tb.start_pod_agent(Which::A, &["--socket-lb-cgroup", &cgroup_arg])
        .expect("agent on node A");
    let probe = NodeProbe {
        bin: Path::new(PROBE),
        cgroup: &cgroup,
    };
    let ask = |proto: &str, addr: IpAddr| {
        tb.ask_from_node(Which::A, &probe, proto, addr, SERVICE_PORT, PROBE_WAIT)
    };
    let run = || -> Result<()> {
        // The first answer: the agent has written the IPv6 frontend.
        testbed::wait_until(
            "a node A process to reach the IPv6 ClusterIP",
            Duration::from_secs(20),
            || match ask("tcp", CIP6.into())? {
                a @ Asked::Answer { .. } => Ok(Some(a)),
                other => bail!("last outcome: {other:?}"),
            },
        )?;
        body(&tb, &ask, &cgroup)
    };
    if let Err(e) = run() {
        panic!("{e:?}\n{}", tb.agent_logs());
    }
}

/// The backend's name and the address it saw, of an answer.
fn reply(asked: &Asked) -> Result<(String, SocketAddr)> {
    asked
        .reply()
        .with_context(|| format!("expected an answer, got {asked:?}"))
}

#[test]
fn node_processes_reach_an_ipv6_cluster_ip_over_tcp_and_udp() {
    let backends = ["b1", "b2"];
    with_socket_lb6(2, &backends, |tb, ask, _cgroup| {
        let frontend = SocketAddr::from((CIP6, SERVICE_PORT));
        let sock_lb = tb.a.stat("sock_lb")?;
        // Random over two backends: ask until both answered, at most 40 times (all 40 to
        // one backend by chance: 2^-39).
        let mut tcp_calls = 0;
        let mut seen = BTreeSet::new();
        while seen.len() < 2 && tcp_calls < 40 {
            tcp_calls += 1;
            let asked = ask("tcp", CIP6.into())?;
            let (name, peer) = reply(&asked)?;
            ensure!(backends.contains(&name.as_str()), "{asked:?}");
            // The backend on node B saw node A's IPv6 address: nothing translated it.
            ensure!(peer.ip() == IpAddr::from(NODE_A_IP6), "{asked:?}");
            // getpeername() shows the ClusterIP the process asked for, not the backend.
            ensure!(asked.from() == Some(frontend), "{asked:?}");
            seen.insert(name);
        }
        ensure!(
            seen.len() == 2,
            "{tcp_calls} connections all went to {seen:?} (random over two backends)"
        );

        // Unconnected UDP (sendmsg6): the reply comes from the ClusterIP (recvmsg6).
        let asked = ask("udp", CIP6.into())?;
        let (name, peer) = reply(&asked)?;
        ensure!(backends.contains(&name.as_str()), "{asked:?}");
        ensure!(peer.ip() == IpAddr::from(NODE_A_IP6), "{asked:?}");
        ensure!(
            asked.from() == Some(frontend),
            "UDP reply source: {asked:?}"
        );

        // A dual-stack socket naming the IPv4 ClusterIP as ::ffff:a.b.c.d is served from
        // the IPv4 maps: the backend sees node A's IPv4 address, and the socket sees the
        // mapped ClusterIP (getpeername6 and recvmsg6 of a mapped address).
        let mapped = CIP4.to_ipv6_mapped();
        let mapped_frontend = SocketAddr::from((mapped, SERVICE_PORT));
        for proto in ["tcp", "udp"] {
            let asked = ask(proto, mapped.into())?;
            let (name, peer) = reply(&asked)?;
            ensure!(backends.contains(&name.as_str()), "{proto}: {asked:?}");
            ensure!(peer.ip() == IpAddr::from(NODE_A_IP), "{proto}: {asked:?}");
            ensure!(asked.from() == Some(mapped_frontend), "{proto}: {asked:?}");
        }

        // One count per rewritten connect()/sendmsg().
        let rewritten = tcp_calls + 3;
        ensure!(
            tb.a.stat("sock_lb")? == sock_lb + rewritten,
            "sock_lb: {} then {}",
            sock_lb,
            tb.a.stat("sock_lb")?
        );

        // A process outside the cgroup (a thread of this test in node A's namespace) is not
        // rewritten: nothing on the node answers the ClusterIP.
        let asked = ask_tcp(&tb.a.ns, CIP6, SERVICE_PORT, Duration::from_millis(500))?;
        ensure!(asked.reply().is_none(), "outside the cgroup: {asked:?}");
        ensure!(
            tb.a.stat("sock_lb")? == sock_lb + rewritten,
            "sock_lb after the call from outside the cgroup"
        );
        Ok(())
    });
}

#[test]
fn an_ipv6_service_without_endpoints_refuses_node_processes_at_once() {
    with_socket_lb6(1, &["b1"], |tb, ask, _cgroup| {
        let before = tb.a.stat("reject_no_backend")?;
        for proto in ["tcp", "udp"] {
            let asked = ask(proto, EMPTY6.into())?;
            // Refused by connect()/sendto() itself: a dropped call would time out instead.
            ensure!(
                matches!(asked, Asked::Refused),
                "{proto} to the IPv6 service without endpoints: {asked:?}"
            );
        }
        ensure!(
            tb.a.stat("reject_no_backend")? == before + 2,
            "reject_no_backend"
        );
        Ok(())
    });
}

#[test]
fn the_ipv6_hooks_are_pinned_and_cleanup_removes_them() {
    with_socket_lb6(1, &["b1"], |tb, ask, cgroup| {
        let agent = tb.a.agent();
        let pins = agent.bpffs().join("links/cgroup");
        let mut listed: Vec<String> = std::fs::read_dir(&pins)
            .with_context(|| format!("listing {}", pins.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        listed.sort();
        ensure!(listed == sorted(&ALL_HOOKS), "pins: {listed:?}");
        for hook in ["connect6", "sendmsg6", "recvmsg6", "getpeername6"] {
            pinned_link(&pins.join(hook))?;
        }
        ensure!(
            cgroup_programs_at(cgroup)? == sorted(&ATTACH_TYPES),
            "bpftool cgroup show: {:?}",
            cgroup_programs_at(cgroup)?
        );

        // The agent is gone: the pinned hooks keep serving the IPv6 ClusterIP.
        agent.stop_keeping_pins()?;
        let asked = ask("tcp", CIP6.into())?;
        ensure!(reply(&asked)?.0 == "b1", "no agent: {asked:?}");
        ensure!(
            asked.from() == Some(SocketAddr::from((CIP6, SERVICE_PORT))),
            "no agent: {asked:?}"
        );

        let out = agent.cli(&["cleanup"])?;
        for hook in ALL_HOOKS {
            ensure!(
                out.contains(&format!("cgroup {hook}")),
                "cleanup did not report {hook}: {out}"
            );
        }
        ensure!(
            cgroup_programs_at(cgroup)?.is_empty(),
            "hooks left after cleanup"
        );
        ensure!(!pins.exists(), "{} left after cleanup", pins.display());
        // Not rewritten any more: nothing answers the ClusterIP.
        let asked = ask("tcp", CIP6.into())?;
        ensure!(asked.reply().is_none(), "after cleanup: {asked:?}");
        Ok(())
    });
}

/// loadBalancerSourceRanges on the IPv6 socket path, as configured by a user: a node
/// process's source is the node's IPv6 address (the agent's `node_cfg6`, from
/// `--node-interfaces`), so an IPv6 LoadBalancer IP whose ranges hold the node's LAN
/// admits it, and one whose ranges do not fails connect() at once with EPERM.
#[test]
fn ipv6_source_ranges_refuse_node_processes_outside_them() {
    const LB_IN: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x10);
    const LB_OUT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x11);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut tb = TwoNode::new(1).expect("building the two-node testbed");
    let cip = |last: u16| Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last);
    tb.write_services_slices(
        "services.yaml",
        &[
            (
                peer_service6("inrange6", "LoadBalancer", cip(0x72), Some(30091))
                    .lb_ingress(LB_IN)
                    .source_range("fd00:251::/64"),
                vec![tb.peer_slice6("inrange6", &["b1"])],
            ),
            (
                peer_service6("outrange6", "LoadBalancer", cip(0x73), Some(30092))
                    .lb_ingress(LB_OUT)
                    .source_range("fd00:999::/64"),
                vec![tb.peer_slice6("outrange6", &["b1"])],
            ),
        ],
    )
    .expect("writing the services");
    let cgroup = tb.make_cgroup(Which::A).expect("creating the test cgroup");
    let cgroup_arg = cgroup.to_string_lossy().into_owned();
    tb.start_agent(Which::A, &["--socket-lb-cgroup", &cgroup_arg])
        .expect("agent on node A");
    let probe = NodeProbe {
        bin: Path::new(PROBE),
        cgroup: &cgroup,
    };
    let ask =
        |addr: Ipv6Addr| tb.ask_from_node(Which::A, &probe, "tcp", addr, SERVICE_PORT, PROBE_WAIT);
    let run = || -> Result<()> {
        let asked = testbed::wait_until(
            "a node A process to reach the IPv6 LB IP inside its source ranges",
            Duration::from_secs(20),
            || match ask(LB_IN)? {
                a @ Asked::Answer { .. } => Ok(Some(a)),
                other => bail!("last outcome: {other:?}"),
            },
        )?;
        ensure!(reply(&asked)?.0 == "b1", "{asked:?}");
        ensure!(
            asked.from() == Some(SocketAddr::from((LB_IN, SERVICE_PORT))),
            "{asked:?}"
        );
        let before = tb.a.stat("drop_source_range")?;
        let asked = ask(LB_OUT)?;
        ensure!(
            matches!(&asked, Asked::Failed(e) if e.contains("Operation not permitted")),
            "outside the source ranges: expected EPERM, got {asked:?}"
        );
        ensure!(
            tb.a.stat("drop_source_range")? == before + 1,
            "drop_source_range"
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:?}\n{}", tb.agent_logs());
    }
}
