//! The agent's node flags on one node: `--node-name` with `--manifests`,
//! `--node-interfaces` (xdp_nodeport attached natively and pinned under `links/xdp`, kept
//! and taken over across a restart, removed by `bpfproxy cleanup`), the NodePort frontends
//! on the node interface's addresses (IPv4 and global IPv6, never link-local), `node_cfg4`
//! and `node_cfg6`, and start-up errors naming the thing.
//! Traffic through the external view is the two-node tests' (e2e_two_node_*).

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result, ensure};
use testbed::{
    Cluster,
    manifests::{EndpointSlice, Service, documents},
};

/// An address added to the node side of the client's veth, which plays the uplink.
const NODE_ADDR: &str = "192.168.77.1";

fn ip_link(cluster: &Cluster, dev: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", cluster.topo.node.name(), "link", "show", "dev", dev])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `bpftool link show pinned PATH`'s link id.
fn link_id(path: &std::path::Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(path)
        .output()
        .context("running bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool on {}: {:?}", path.display(), out))?;
    v["id"].as_u64().context("no link id")
}

#[test]
fn node_flags_program_node_ports_and_pin_the_xdp_link() {
    testbed::require_root().unwrap();
    let run = || -> Result<()> {
        let mut cluster = Cluster::new(1, 2)?;
        let uplink = cluster.client().node_if.clone();
        cluster
            .topo
            .node
            .ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", &uplink])?;
        let (b1, b2) = (cluster.backend("b1").ip, cluster.backend("b2").ip);
        let svc = Service::cluster_ip("default", "web", Ipv4Addr::new(10, 96, 0, 40))
            .node_port("http", "TCP", 80, 80, 30080)
            .kind("NodePort")
            .external_policy("Local");
        let slice = EndpointSlice::for_service("default", "web", "a")
            .port("http", "TCP", 80)
            .ready_on("b1", b1, "node-a")
            .ready_on("b2", b2, "node-b");
        cluster
            .manifests
            .write("web.yaml", &documents(&[svc.to_yaml(), slice.to_yaml()]))?;
        let pods = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(
            &pods,
            &[
                "--node-name",
                "node-a",
                "--node-interfaces",
                &uplink,
                "--snat-ports",
                "62000-62999",
            ],
        )?;
        let agent = cluster.agent();

        // The NodePort on the uplink's address, in both views; eTP Local outside.
        let rows: serde_json::Value =
            serde_json::from_str(&agent.cli(&["services", "-o", "json"])?)?;
        let row = |scope: &str| {
            rows.as_array()
                .into_iter()
                .flatten()
                .find(|r| {
                    r["ip"] == NODE_ADDR
                        && r["port"] == 30080
                        && r["scope"] == scope
                        && r["kind"] == "NodePort"
                })
                .cloned()
        };
        let outside =
            row("external").with_context(|| format!("no external NodePort row: {rows:#}"))?;
        let inside =
            row("cluster").with_context(|| format!("no in-cluster NodePort row: {rows:#}"))?;
        let ips = |r: &serde_json::Value| -> Vec<String> {
            r["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{}{}",
                        b["ip"].as_str().unwrap_or(""),
                        if b["local"] == true { " local" } else { "" }
                    )
                })
                .collect()
        };
        ensure!(ips(&outside) == [format!("{b1} local")], "{outside:#}");
        ensure!(
            outside["flags"].as_array().is_some_and(|f| f.is_empty()),
            "{outside:#}"
        );
        ensure!(ips(&inside).len() == 2, "{inside:#}");

        // node_cfg4: SNAT from the uplink's first address, the given ports, fib forwarding.
        let cfg = agent.bpftool_dump("node_cfg4")?;
        ensure!(
            cfg.contains("\"snat_port_min\": 62000") && cfg.contains("\"snat_port_max\": 62999"),
            "{cfg}"
        );
        ensure!(cfg.contains("\"flags\": 1"), "{cfg}");

        // xdp_nodeport on the uplink, its link pinned.
        let pin = cluster.bpffs().join("links/xdp").join(&uplink);
        ensure!(pin.exists(), "no pin at {}", pin.display());
        ensure!(
            ip_link(&cluster, &uplink)?.contains("xdp"),
            "{}",
            ip_link(&cluster, &uplink)?
        );
        let before = link_id(&pin)?;

        // A restart keeps the link (same id), with the new agent's program in it.
        agent.stop_keeping_pins()?;
        ensure!(
            ip_link(&cluster, &uplink)?.contains("xdp"),
            "detached while no agent ran"
        );
        agent.start_again()?;
        agent.wait_until_running()?;
        ensure!(
            link_id(&pin)? == before,
            "the XDP link was replaced, not taken over"
        );
        agent.wait_for_log_line("the XDP take-over", |l| {
            l.contains("took over the pinned XDP link")
        })?;

        // cleanup takes it off.
        agent.stop_keeping_pins()?;
        let out = Command::new(testbed::agent::bpfproxy_bin()?)
            .args(["cleanup", "--bpffs"])
            .arg(cluster.bpffs())
            .output()?;
        ensure!(out.status.success(), "cleanup: {out:?}");
        ensure!(!pin.exists(), "cleanup left {}", pin.display());
        ensure!(
            !ip_link(&cluster, &uplink)?.contains("xdp"),
            "cleanup left XDP on {uplink}"
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:?}");
    }
}

#[test]
fn bad_node_flags_are_refused_naming_the_value() {
    testbed::require_root().unwrap();
    let run = || -> Result<()> {
        let cluster = Cluster::new(1, 1)?;
        let uplink = cluster.client().node_if.clone();
        let pods = cluster.topo.node_interfaces_glob();
        let bpffs = cluster.bpffs();
        let manifests = cluster.manifests.path().to_string_lossy().into_owned();
        let bin = testbed::agent::bpfproxy_bin()?;
        for (extra, want) in [
            (
                vec!["--node-interfaces", "nosuch0"],
                "--node-interfaces nosuch0: no such interface",
            ),
            (
                vec![
                    "--node-interfaces",
                    uplink.as_str(),
                    "--snat-address",
                    "10.9.9.9",
                ],
                "--snat-address 10.9.9.9: node address not found",
            ),
            (vec!["--snat-ports", "65000-61000"], "65000 is above 61000"),
            (vec!["--snat-ports", "80-90"], "below 1024"),
            (vec!["--nodeport-addresses", "10.0.0.0/40"], "10.0.0.0/40"),
            (vec!["--nodeport-addresses", "fd00::/129"], "fd00::/129"),
            (
                vec!["--snat-address", "10.0.0.1,10.0.0.2"],
                "two IPv4 addresses (10.0.0.1, 10.0.0.2)",
            ),
            (
                vec![
                    "--node-interfaces",
                    uplink.as_str(),
                    "--snat-address",
                    "fd00:99::9",
                ],
                "--snat-address fd00:99::9: node address not found",
            ),
        ] {
            // Bounded: an agent that wrongly starts is killed after 20 s.
            let out = Command::new("timeout")
                .args(["20", "ip", "netns", "exec", cluster.topo.node.name()])
                .arg(&bin)
                .args(["run", "--manifests", &manifests, "--interfaces", &pods])
                .args(["--healthz-addr", "", "--metrics-addr", "", "--bpffs"])
                .arg(&bpffs)
                .args(&extra)
                .output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            ensure!(!out.status.success(), "{extra:?} was accepted: {stderr}");
            ensure!(
                stderr.contains(want),
                "{extra:?}: {want:?} not in\n{stderr}"
            );
        }
        let _ = Command::new(&bin)
            .args(["cleanup", "--bpffs"])
            .arg(&bpffs)
            .output();
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:?}");
    }
}

/// `bpftool map dump` text without its whitespace, to find a field however it is laid out.
fn compact(dump: &str) -> String {
    dump.chars().filter(|c| !c.is_whitespace()).collect()
}

#[test]
fn ipv6_node_addresses_carry_node_ports_and_the_ipv6_snat_address() {
    testbed::require_root().unwrap();
    let run = || -> Result<()> {
        let mut cluster = Cluster::new(1, 1)?;
        let uplink = cluster.client().node_if.clone();
        let node = &cluster.topo.node;
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", &uplink])?;
        node.ip(&["addr", "add", "fd00:77::1/64", "dev", &uplink, "nodad"])?;
        // The kernel gives the uplink a link-local address too: never a node address.
        let mut link_local = String::new();
        for _ in 0..50 {
            let out = Command::new("ip")
                .args(["-n", node.name(), "-6", "addr", "show", "dev", &uplink])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(a) = text.split_whitespace().find(|w| w.starts_with("fe80:")) {
                link_local = a.split('/').next().unwrap_or("").to_string();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let b1 = cluster.backend("b1").ip;
        let svc = Service::cluster_ip("default", "web", Ipv4Addr::new(10, 96, 0, 41))
            .dual_stack(
                "fd00:96::41".parse::<std::net::Ipv6Addr>()?,
                "RequireDualStack",
            )
            .node_port("http", "TCP", 80, 80, 30081)
            .kind("NodePort");
        let slice4 = EndpointSlice::for_service("default", "web", "v4")
            .port("http", "TCP", 80)
            .ready_on("b1", b1, "node-a");
        let slice6 = EndpointSlice::for_service("default", "web", "v6")
            .address_type("IPv6")
            .port("http", "TCP", 80)
            .ready_on(
                "b1",
                "fd00:244::b1".parse::<std::net::Ipv6Addr>()?,
                "node-a",
            );
        cluster.manifests.write(
            "web.yaml",
            &documents(&[svc.to_yaml(), slice4.to_yaml(), slice6.to_yaml()]),
        )?;
        let pods = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(
            &pods,
            &["--node-name", "node-a", "--node-interfaces", &uplink],
        )?;
        let agent = cluster.agent();

        let rows: serde_json::Value =
            serde_json::from_str(&agent.cli(&["services", "-o", "json"])?)?;
        let node_ports: Vec<(String, String, Vec<String>)> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["kind"] == "NodePort")
            .map(|r| {
                (
                    r["ip"].as_str().unwrap_or("").to_string(),
                    r["scope"].as_str().unwrap_or("").to_string(),
                    r["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| b["ip"].as_str().unwrap_or("").to_string())
                        .collect(),
                )
            })
            .collect();
        // Each family's NodePort on that family's address, with that family's endpoint.
        for scope in ["cluster", "external"] {
            for (ip, backend) in [
                (NODE_ADDR, b1.to_string()),
                ("fd00:77::1", "fd00:244::b1".into()),
            ] {
                ensure!(
                    node_ports.contains(&(
                        ip.to_string(),
                        scope.to_string(),
                        vec![backend.clone()]
                    )),
                    "no {scope} NodePort on {ip} to {backend}: {node_ports:?}"
                );
            }
        }
        // The only IPv6 ones: fd00:77::1 in each view.
        ensure!(
            node_ports
                .iter()
                .filter(|(ip, ..)| ip.contains(':'))
                .count()
                == 2,
            "{node_ports:?}"
        );
        ensure!(!link_local.is_empty(), "no link-local address on {uplink}");
        ensure!(
            !node_ports.iter().any(|(ip, ..)| ip.starts_with("fe80")),
            "a NodePort on the link-local {link_local}: {node_ports:?}"
        );

        // node_cfg6: SNAT from the uplink's global IPv6 address; node_cfg4 keeps its own.
        let cfg6 = compact(&agent.bpftool_dump("node_cfg6")?);
        ensure!(
            cfg6.contains("\"snat_addr\":[253,0,0,119,0,0,0,0,0,0,0,0,0,0,0,1]"),
            "{cfg6}"
        );
        let cfg4 = compact(&agent.bpftool_dump("node_cfg4")?);
        ensure!(
            cfg4.contains("\"snat_addr\":[") && !cfg4.contains("\"snat_addr\":[0,0,0,0]"),
            "{cfg4}"
        );
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{e:?}");
    }
}
