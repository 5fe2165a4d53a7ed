//! `cargo xtask demo`: bpfproxy serving `myapp` to a client pod, in throw-away namespaces.
//!
//! Builds everything, makes a node namespace with one client pod and three backend pods
//! (each answering HTTP with its name), writes the `myapp` manifests, starts the agent in
//! the node namespace, sends requests to the ClusterIP and shows where they went and what
//! the maps hold. Then external traffic: two nodes on a LAN, each with its agent and a pod,
//! a dual-stack NodePort Service, and a client outside the cluster asking node A over IPv4
//! and IPv6. Everything it made is removed at the end, also on failure or Ctrl-C, and
//! leftovers of an earlier interrupted demo are removed first (the two-node part's names
//! come from `testbed::unique_run_id`, which reaps those of dead runs). That part is the
//! example `tests/examples/demo_external.rs`.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use testbed::{
    cluster::{self, Cluster, HTTP_PORT, MYAPP_VIP},
    http_get, manifests, netns,
};

use crate::{build::build, cmd::Cmd};

/// Run id of the demo: namespaces `bpdemo-node`, `bpdemo-c1`, `bpdemo-b1..3`.
const RUN: &str = "demo";
const REQUESTS: usize = 30;
const MANIFEST_FILE: &str = "myapp.yaml";

/// A Deployment, which the agent ignores: it only reads Services and EndpointSlices.
const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels:
      app: myapp
  template:
    metadata:
      labels:
        app: myapp
    spec:
      containers:
      - name: web
        image: registry.example/myapp:1.0
        ports:
        - containerPort: 80
";

extern "C" fn on_signal(_: i32) {
    testbed::request_stop();
}

/// Ctrl-C and SIGTERM ask the demo to stop; the guards then remove what it made.
fn catch_interrupts() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if testbed::stop_requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// Removes namespaces an earlier demo left behind (e.g. after SIGKILL).
fn remove_leftovers() -> Result<()> {
    for name in netns::list()? {
        if name.starts_with(&format!("bp{RUN}-")) {
            println!("removing leftover namespace {name}");
            netns::delete(&name);
        }
    }
    Ok(())
}

pub fn demo(workspace: &Path) -> Result<()> {
    testbed::require_root()?;
    let out = build(workspace)?;
    // SAFETY: still single-threaded; the harness reads the agent's path from here.
    unsafe { std::env::set_var("BPFPROXY_BIN", &out.bpfproxy) };
    catch_interrupts()?;
    remove_leftovers()?;

    println!("==> demo: namespaces: node, client pod c1, backend pods b1 b2 b3");
    let mut cluster = Cluster::with_run_id(RUN, 1, 3)?;
    for pod in cluster.topo.clients.iter().chain(&cluster.topo.backends) {
        println!(
            "  pod {:<3} {:<12} netns {:<14} node side {}",
            pod.name,
            pod.ip,
            pod.ns.name(),
            pod.node_if
        );
    }
    println!("  node     netns {}", cluster.topo.node.name());
    check_interrupted()?;

    println!(
        "==> demo: manifests ({})",
        cluster.manifests.path().display()
    );
    let yaml = manifests::documents(&[
        DEPLOYMENT.to_owned(),
        cluster::myapp_service(false).to_yaml(),
        cluster::myapp_endpoint_slice(&cluster.topo.backends, false).to_yaml(),
    ]);
    cluster.manifests.write(MANIFEST_FILE, &yaml)?;
    println!("{yaml}");

    println!("==> demo: agent");
    cluster.start_agent()?;
    cluster.wait_for_myapp_backends(&["b1", "b2", "b3"])?;
    println!("agent is serving myapp");
    check_interrupted()?;

    let client = cluster.client();
    println!(
        "==> demo: {REQUESTS} HTTP requests from {} ({}) to myapp {MYAPP_VIP}:{HTTP_PORT}",
        client.name, client.ip
    );
    let mut counts: BTreeMap<String, usize> = cluster
        .backend_names()
        .into_iter()
        .map(|n| (n, 0))
        .collect();
    let mut failures = 0;
    for _ in 0..REQUESTS {
        check_interrupted()?;
        match http_get(&client.ns, MYAPP_VIP, HTTP_PORT) {
            Ok(name) => *counts.entry(name).or_default() += 1,
            Err(e) => {
                failures += 1;
                println!("  request failed: {e:#}");
            }
        }
    }
    for (name, n) in &counts {
        let ip = cluster
            .topo
            .backends
            .iter()
            .find(|p| &p.name == name)
            .map(|p| p.ip.to_string())
            .unwrap_or_default();
        println!("  {name:<3} {ip:<12} {n:>3} {}", "#".repeat(*n));
    }

    let agent = cluster.agent();
    println!(
        "==> demo: $ bpfproxy services --bpffs {}",
        agent.bpffs().display()
    );
    print!("{}", agent.cli(&["services"])?);
    println!(
        "==> demo: $ bpfproxy conntrack --bpffs {}",
        agent.bpffs().display()
    );
    print!("{}", agent.cli(&["conntrack"])?);
    println!(
        "==> demo: $ bpfproxy stats --bpffs {}",
        agent.bpffs().display()
    );
    print!("{}", agent.cli(&["stats"])?);
    println!(
        "==> demo: $ bpftool map dump pinned {}",
        agent.bpffs().join("services4").display()
    );
    print!("{}", agent.bpftool_dump("services4")?);

    println!("==> demo: removing the namespaces, pins and manifests");
    drop(cluster);
    if failures > 0 {
        bail!("{failures} of {REQUESTS} requests failed");
    }
    check_interrupted()?;
    // The second part needs the agent's crates (XDP on the LAN peers), which xtask does not
    // link: it runs as an example of the tests crate, on the binary and object just built.
    Cmd::cargo(None)
        .current_dir(workspace)
        .env("BPFPROXY_BIN", &out.bpfproxy)
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "bpfproxy-tests",
            "--example",
            "demo_external",
        ])
        .run()?;
    println!("==> demo: done");
    Ok(())
}
