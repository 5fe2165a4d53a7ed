//! `bpfproxy monitor` end to end: the CLI runs as a child (reading the pins, no agent
//! involvement) while a client connects through a VIP and to a service without
//! endpoints; its lines must name the right service, client, backend and reason. Events
//! are off with no monitor running, off again after Ctrl-C, and off after a monitor is
//! killed outright (the agent notices at its next resync). Needs root and the agent binary.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use testbed::{
    ConnectOutcome,
    agent::bpfproxy_bin,
    client::{connect, http_get},
    cluster::{Cluster, HTTP_PORT, MYAPP_VIP},
    manifests::Service,
    wait_until,
};

const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// A running `bpfproxy monitor`, its stdout lines arriving on a channel; killed on drop.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(bpffs: &Path, args: &[&str]) -> Result<Monitor> {
        let mut child = Command::new(bpfproxy_bin()?)
            .arg("monitor")
            .arg("--bpffs")
            .arg(bpffs)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpfproxy monitor")?;
        let stdout = child.stdout.take().context("monitor stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Monitor { child, lines })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits (at most 10 s) for a JSON line satisfying `pred`.
    fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .with_context(|| format!("monitor line {line:?} is not JSON"))?;
                    if pred(&v) {
                        return Ok(v);
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        bail!("no monitor line for {what}; it printed {seen:#?}")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn events_on(bpffs: &Path) -> Result<bool> {
    Ok(bpfproxy::monitor::config(bpffs)?.enabled != 0)
}

fn wait_events(bpffs: &Path, on: bool) -> Result<()> {
    wait_until(
        &format!("monitor events {}", if on { "on" } else { "off" }),
        Duration::from_secs(10),
        || Ok((events_on(bpffs)? == on).then_some(())),
    )
}

#[test]
fn monitor_prints_decisions_and_leaves_events_off() {
    let mut cluster = Cluster::new(1, 2).expect("building the testbed");
    let body = |cluster: &mut Cluster| -> Result<()> {
        cluster.write_myapp_service(false)?;
        cluster.write_myapp_endpoints(&["b1", "b2"], false)?;
        let empty = Service::cluster_ip("default", "empty", EMPTY_VIP).port("http", "TCP", 80, 80);
        cluster.manifests.write("empty.yaml", &empty.to_yaml())?;
        let glob = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(&glob, &["--resync-seconds", "1"])?;
        cluster.wait_for_myapp_backends(&["b1", "b2"])?;
        cluster
            .agent()
            .wait_for_services("the empty service", |s| s.iter().any(|s| s.name == "empty"))?;
        let bpffs = cluster.bpffs();
        ensure!(
            !events_on(&bpffs)?,
            "events are off with no monitor running"
        );
        let dump = cluster.agent().bpftool_dump("monitor_cfg")?;
        ensure!(
            dump.contains("enabled") && dump.contains("pid"),
            "bpftool shows monitor_cfg by field: {dump}"
        );

        let client = cluster.client().ip;
        let client_arg = client.to_string();
        let monitor = Monitor::start(&bpffs, &["-o", "json", "--client", &client_arg])?;
        wait_events(&bpffs, true)?;

        let ns = &cluster.client().ns;
        let answered_by = http_get(ns, MYAPP_VIP, HTTP_PORT)?;
        let backend_ip = cluster.backend(answered_by.trim()).ip.to_string();
        match connect(ns, EMPTY_VIP, 80, Duration::from_secs(3))? {
            ConnectOutcome::Refused(_) => {}
            other => bail!("connecting to the empty service: want refused, got {other:?}"),
        }

        let new = monitor.wait_for("the new connection to myapp", |v| {
            v["event"] == "new" && v["name"] == "myapp"
        })?;
        ensure!(
            new["namespace"] == "default" && new["port_name"] == "http",
            "{new}"
        );
        ensure!(new["client"] == client_arg.as_str(), "client: {new}");
        ensure!(new["service_ip"] == MYAPP_VIP.to_string().as_str(), "{new}");
        ensure!(
            new["backend"] == backend_ip.as_str(),
            "backend that answered: {new}"
        );
        ensure!(
            new["scheduler"] == "random" && new["protocol"] == "TCP",
            "{new}"
        );
        let reply = monitor.wait_for("the first reply", |v| v["event"] == "reply")?;
        ensure!(
            reply["client_port"] == new["client_port"]
                && reply["backend"] == backend_ip.as_str()
                && reply["name"] == "myapp",
            "reply of the same connection: {reply}"
        );
        let drop = monitor.wait_for("the refusal", |v| v["event"] == "drop")?;
        ensure!(
            drop["name"] == "empty"
                && drop["reason"] == "no_backend"
                && drop["client"] == client_arg.as_str()
                && drop["service_ip"] == EMPTY_VIP.to_string().as_str(),
            "{drop}"
        );

        // Ctrl-C: the monitor turns the events off as it exits.
        kill(monitor.pid(), Signal::SIGINT)?;
        let mut monitor = monitor;
        let status = monitor.child.wait()?;
        ensure!(status.success(), "monitor exit after Ctrl-C: {status}");
        ensure!(!events_on(&bpffs)?, "events off after the monitor's Ctrl-C");

        // Killed outright: the agent turns them off at its next resync.
        let mut killed = Monitor::start(&bpffs, &["--service", "default/myapp"])?;
        wait_events(&bpffs, true)?;
        kill(killed.pid(), Signal::SIGKILL)?;
        // Reaped, so its /proc entry goes.
        killed.child.wait()?;
        wait_events(&bpffs, false)?;
        Ok(())
    };
    if let Err(e) = body(&mut cluster) {
        panic!("{e:?}");
    }
}
