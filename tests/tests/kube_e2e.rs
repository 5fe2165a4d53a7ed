//! bpfproxy end to end against the Kubernetes API: the real agent, started without
//! `--manifests`, reaches the test API server through a kubeconfig file; the Service and
//! EndpointSlice are created, changed and deleted through that server; a client pod checks
//! what a user would: traffic flows, follows scaling, the VIP refuses without endpoints.
//!
//! The API server listens on 127.0.0.1 of the test's node namespace (where the agent
//! runs); everything else stays inside the namespaces the testbed creates. Needs root and
//! the agent binary (`cargo xtask test` provides both).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs::File,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use testbed::{
    ApiServer, ServiceInfo,
    agent::{BPFFS_ROOT, TEST_PIN_PREFIX, bpfproxy_bin, ensure_bpffs},
    client::{ConnectOutcome, connect, http_get},
    cluster::{
        Cluster, HTTP_PORT, MYAPP, MYAPP_NAMESPACE, MYAPP_VIP, myapp_endpoint_slice, myapp_service,
    },
    wait_until,
};

static SERIAL: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(20);

/// `bpfproxy run --kubeconfig ...` in the node namespace; SIGTERM and pin clean-up on drop.
struct KubeAgent {
    bin: PathBuf,
    args: Vec<OsString>,
    bpffs: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl KubeAgent {
    fn start(cluster: &Cluster, server: &ApiServer) -> Result<Self> {
        ensure_bpffs()?;
        let bin = bpfproxy_bin()?;
        let bpffs =
            PathBuf::from(BPFFS_ROOT).join(format!("{TEST_PIN_PREFIX}{}", cluster.topo.run));
        if bpffs.exists() {
            std::fs::remove_dir_all(&bpffs)?;
        }
        let log =
            std::env::temp_dir().join(format!("bpfproxy-kube-agent-{}.log", cluster.topo.run));
        let args: Vec<OsString> = vec![
            format!("--net={}", cluster.topo.node.path().display()).into(),
            bin.clone().into(),
            "run".into(),
            "--kubeconfig".into(),
            server.kubeconfig().into(),
            "--node-name".into(),
            "node-1".into(),
            "--interfaces".into(),
            cluster.topo.node_interfaces_glob().into(),
            "--bpffs".into(),
            bpffs.clone().into(),
            // Short, so the drift test needs no long wait.
            "--resync-seconds".into(),
            "2".into(),
        ];
        let mut agent = KubeAgent {
            bin,
            args,
            bpffs,
            log,
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new("nsenter");
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().context("spawning nsenter")?);
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s; the pins stay.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .output()?;
        ensure!(
            out.status.success(),
            "bpfproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn services(&self) -> Result<Vec<ServiceInfo>> {
        Ok(serde_json::from_str(
            &self.cli(&["services", "-o", "json"])?,
        )?)
    }

    /// Waits until `myapp:80` is served by exactly the backends `pods` (empty: listed
    /// without backends; `None`: not listed at all).
    fn wait_for_myapp(&self, cluster: &Cluster, pods: Option<&[&str]>) -> Result<()> {
        let want: Option<Vec<String>> = pods.map(|p| {
            let mut ips: Vec<String> = p
                .iter()
                .map(|n| cluster.backend(n).ip.to_string())
                .collect();
            ips.sort();
            ips
        });
        wait_until(&format!("myapp with backends {want:?}"), WAIT, || {
            let services = self.services()?;
            let found = services
                .iter()
                .find(|s| s.namespace == MYAPP_NAMESPACE && s.name == MYAPP && s.port == HTTP_PORT);
            Ok((found.map(ServiceInfo::backend_ips) == want).then_some(()))
        })
        .with_context(|| format!("agent log:\n{}", self.log()))
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ----\n{}---- end of agent log ----",
                self.log()
            );
        }
        if self.bpffs.starts_with(BPFFS_ROOT) && self.bpffs.exists() {
            let _ = std::fs::remove_dir_all(&self.bpffs);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn slice_yaml(cluster: &Cluster, pods: &[&str]) -> String {
    myapp_endpoint_slice(pods.iter().map(|p| cluster.backend(p)), false).to_yaml()
}

/// Backends that answered `n` requests to the VIP.
fn answers(cluster: &Cluster, n: usize) -> Result<BTreeSet<String>> {
    (0..n)
        .map(|_| http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT))
        .collect()
}

/// Sends requests until every one of `pods` answered (at most 100), and checks no other did.
fn all_answer(cluster: &Cluster, pods: &[&str]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for _ in 0..100 {
        let name = http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        ensure!(
            pods.contains(&name.as_str()),
            "{name} answered; expected only {pods:?}"
        );
        seen.insert(name);
        if seen.len() == pods.len() {
            return Ok(());
        }
    }
    bail!("only {seen:?} of {pods:?} answered 100 requests")
}

fn with_cluster(backends: usize, body: impl FnOnce(&Cluster, &ApiServer) -> Result<()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    testbed::require_root().unwrap();
    let cluster = Cluster::new(1, backends).expect("building the testbed");
    let server = ApiServer::start_in(&cluster.topo.node).expect("starting the test API server");
    if let Err(e) = body(&cluster, &server) {
        panic!("{e:?}");
    }
}

#[test]
fn service_created_scaled_and_deleted_through_the_api() {
    with_cluster(3, |cluster, server| {
        server.apply_yaml(&myapp_service(false).to_yaml())?;
        server.apply_yaml(&slice_yaml(cluster, &["b1", "b2"]))?;
        let agent = KubeAgent::start(cluster, server)?;
        agent.wait_for_myapp(cluster, Some(&["b1", "b2"]))?;
        all_answer(cluster, &["b1", "b2"])?;
        // kube-proxy's selector reached the server.
        ensure!(
            server.label_selector("services").as_deref()
                == Some(
                    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
                ),
            "selector {:?}",
            server.label_selector("services")
        );

        // Scale up, then down: traffic follows.
        server.apply_yaml(&slice_yaml(cluster, &["b1", "b2", "b3"]))?;
        agent.wait_for_myapp(cluster, Some(&["b1", "b2", "b3"]))?;
        all_answer(cluster, &["b1", "b2", "b3"])?;
        server.apply_yaml(&slice_yaml(cluster, &["b3"]))?;
        agent.wait_for_myapp(cluster, Some(&["b3"]))?;
        ensure!(answers(cluster, 10)? == BTreeSet::from(["b3".to_string()]));

        // No endpoint left: the VIP refuses at once; back as soon as one is ready.
        server.apply_yaml(&slice_yaml(cluster, &[]))?;
        agent.wait_for_myapp(cluster, Some(&[]))?;
        let outcome = connect(
            &cluster.client().ns,
            MYAPP_VIP,
            HTTP_PORT,
            Duration::from_secs(3),
        )?;
        ensure!(matches!(outcome, ConnectOutcome::Refused(_)), "{outcome:?}");
        server.apply_yaml(&slice_yaml(cluster, &["b2"]))?;
        agent.wait_for_myapp(cluster, Some(&["b2"]))?;
        all_answer(cluster, &["b2"])?;

        // Deleted: no longer served, no backend reached.
        server.delete("Service", MYAPP_NAMESPACE, MYAPP)?;
        agent.wait_for_myapp(cluster, None)?;
        let outcome = connect(
            &cluster.client().ns,
            MYAPP_VIP,
            HTTP_PORT,
            Duration::from_secs(2),
        )?;
        ensure!(!outcome.is_connected(), "{outcome:?}");
        Ok(())
    });
}

#[test]
fn losing_the_api_server_keeps_serving_and_a_restart_adopts_the_maps() {
    with_cluster(2, |cluster, server| {
        server.apply_yaml(&myapp_service(false).to_yaml())?;
        server.apply_yaml(&slice_yaml(cluster, &["b1", "b2"]))?;
        let mut agent = KubeAgent::start(cluster, server)?;
        agent.wait_for_myapp(cluster, Some(&["b1", "b2"]))?;

        // The API server is lost: the datapath keeps serving, the agent says so.
        server.set_available(false);
        wait_until("the agent to report the API unreachable", WAIT, || {
            Ok(agent
                .log()
                .contains("Kubernetes API unreachable")
                .then_some(()))
        })
        .with_context(|| agent.log())?;
        all_answer(cluster, &["b1", "b2"])?;

        // Restarted while the API is still away: the pinned maps are adopted, not flushed.
        agent.stop();
        agent.spawn()?;
        wait_until("the restarted agent to wait for the API", WAIT, || {
            Ok((agent.log().matches("bpfproxy running").count() >= 2).then_some(()))
        })
        .with_context(|| agent.log())?;
        all_answer(cluster, &["b1", "b2"])?;

        // Back: changes made meanwhile apply.
        server.apply_yaml(&slice_yaml(cluster, &["b2"]))?;
        server.set_available(true);
        agent.wait_for_myapp(cluster, Some(&["b2"]))?;
        all_answer(cluster, &["b2"])?;
        Ok(())
    });
}

#[test]
fn an_entry_deleted_by_hand_is_repaired_by_the_periodic_resync() {
    with_cluster(1, |cluster, server| {
        server.apply_yaml(&myapp_service(false).to_yaml())?;
        server.apply_yaml(&slice_yaml(cluster, &["b1"]))?;
        let agent = KubeAgent::start(cluster, server)?;
        agent.wait_for_myapp(cluster, Some(&["b1"]))?;

        // Delete the services4 entry with bpftool, as an operator might.
        let map = agent.bpffs.join("services4");
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()?;
        let entries: serde_json::Value = serde_json::from_slice(&dump.stdout)
            .with_context(|| String::from_utf8_lossy(&dump.stderr).into_owned())?;
        let key: Vec<String> = entries[0]["key"]
            .as_array()
            .context("no key in the bpftool dump")?
            .iter()
            .map(|b| {
                b.as_str()
                    .unwrap_or_default()
                    .trim_start_matches("0x")
                    .to_string()
            })
            .collect();
        let out = Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&map)
            .args(["key", "hex"])
            .args(&key)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Back within the resync interval (2 s here), and traffic flows again.
        agent.wait_for_myapp(cluster, Some(&["b1"]))?;
        all_answer(cluster, &["b1"])?;
        Ok(())
    });
}
