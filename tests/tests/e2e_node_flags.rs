//! The agent's node flags on one node: `--node-name` with `--manifests`,
//! `--node-interfaces` (xdp_nodeport attached natively and pinned under `links/xdp`, kept
//! and taken over across a restart, removed by `bpfproxy cleanup`), the NodePort frontends
//! on the node interface's addresses, `node_cfg4`, and start-up errors naming the thing.
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
