//! Restarting and upgrading the agent without dropping anything, the layout version of the
//! pins, and `bpfproxy cleanup`.
//!
//! What an operator checks: a TCP stream crossing `SIGTERM` (or a crash, SIGKILL) and a new
//! start (same binary, or the programs loaded from an object file with `--object`) gets
//! every byte back, in order, once; new
//! connections made all along succeed; the tc links are the same links before and after
//! (never detached) and run the new program afterwards. Pins of another layout version are
//! refused with a message saying what to do, and left as they were. `bpfproxy cleanup`
//! leaves no link, program or pin, and packets then pass untranslated. Needs root, the
//! agent binary and bpftool, like the other e2e tests; the tests run one at a time.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use testbed::{
    Cluster, EchoServer, EndpointSlice, NetNs, Service,
    agent::{Agent, PinnedLinkInfo, pinned_links, run_cli, strip_ansi},
    client::{ConnectOutcome, HttpConnection, connect, http_get},
    cluster::{HTTP_PORT, MYAPP_VIP},
    wait_until,
};

static SERIAL: Mutex<()> = Mutex::new(());

const ALL: [&str; 3] = ["b1", "b2", "b3"];
/// The `stream` service: every backend echoes on [`ECHO_PORT`].
const STREAM: &str = "stream";
const STREAM_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const STREAM_PORT: u16 = 7;
const ECHO_PORT: u16 = 7007;
/// Bounds of the traffic loops: nothing runs longer or sends more than this.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(90);
const STREAM_MAX_BYTES: u64 = 512 * 1024 * 1024;
const MAX_NEW_CONNECTIONS: usize = 5_000;
/// How long the agent stays stopped in the restart tests: traffic must flow meanwhile.
const DOWNTIME: Duration = Duration::from_millis(1500);

/// A cluster with `clients` client pods and three backends serving `myapp` (HTTP) and
/// `stream` (echo), with the agent running; `extra` are extra agent arguments.
fn with_cluster(clients: usize, extra: &[&str], body: impl FnOnce(&mut Cluster) -> Result<()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cluster = Cluster::new(clients, 3).expect("building the testbed");
    let mut echo = Vec::new();
    let mut setup = |cluster: &mut Cluster| -> Result<()> {
        for name in ALL {
            echo.push(EchoServer::start(&cluster.backend(name).ns, ECHO_PORT)?);
        }
        cluster.write_myapp_service(false)?;
        cluster.write_myapp_endpoints(&ALL, false)?;
        let service = Service::cluster_ip("default", STREAM, STREAM_VIP).port(
            "echo",
            "TCP",
            STREAM_PORT,
            ECHO_PORT,
        );
        let mut slice =
            EndpointSlice::for_service("default", STREAM, "a").port("echo", "TCP", ECHO_PORT);
        for name in ALL {
            slice = slice.ready(name, cluster.backend(name).ip);
        }
        cluster
            .manifests
            .write("stream-service.yaml", &service.to_yaml())?;
        cluster
            .manifests
            .write("stream-endpointslice.yaml", &slice.to_yaml())?;
        let interfaces = cluster.topo.node_interfaces_glob();
        cluster.start_agent_with(&interfaces, extra)?;
        cluster.wait_for_myapp_backends(&ALL)?;
        let ips: Vec<Ipv4Addr> = ALL.iter().map(|n| cluster.backend(n).ip).collect();
        cluster
            .agent()
            .wait_for_backends("default", STREAM, STREAM_PORT, &ips)?;
        Ok(())
    };
    if let Err(e) = setup(&mut cluster).and_then(|()| body(&mut cluster)) {
        // The agent's guard prints its log while this panic unwinds.
        panic!("{e:?}");
    }
    drop(echo);
}

/// Byte `i` of the stream the client sends: the big-endian bytes of the u32 counter
/// `i / 4`, so a lost, repeated or reordered byte shows as a wrong value at its offset.
fn pattern(i: u64) -> u8 {
    ((i / 4) as u32).to_be_bytes()[(i % 4) as usize]
}

/// What a stream through `stream` saw.
#[derive(Debug)]
struct StreamReport {
    sent: u64,
    received: u64,
    /// Longest wait for the next echoed bytes (a figure, not asserted).
    longest_stall: Duration,
}

/// Streams the pattern to `stream`'s VIP from `ns` until `stop` (bounded by
/// [`TRAFFIC_LIMIT`] and [`STREAM_MAX_BYTES`]), then closes its side and reads the echo to
/// its end, checking every byte. `started` is set once the first bytes came back.
fn stream_until(ns: &NetNs, stop: &AtomicBool, started: &AtomicBool) -> Result<StreamReport> {
    let stream = match connect(ns, STREAM_VIP, STREAM_PORT, Duration::from_secs(2))? {
        ConnectOutcome::Connected(s, _) => s,
        other => bail!("connecting to {STREAM_VIP}:{STREAM_PORT}: {other:?}"),
    };
    // Generous: across a restart the stream must never break, only perhaps slow down.
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let reader_stream = stream.try_clone()?;
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> Result<u64> {
            let mut stream: &TcpStream = &stream;
            let begin = Instant::now();
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 4096];
            while !stop.load(Ordering::SeqCst)
                && begin.elapsed() < TRAFFIC_LIMIT
                && sent < STREAM_MAX_BYTES
            {
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(sent + k as u64);
                }
                stream
                    .write_all(&chunk)
                    .with_context(|| format!("writing at byte {sent}"))?;
                sent += chunk.len() as u64;
                // About 2 MB/s: steady traffic through the restart without filling a core.
                std::thread::sleep(Duration::from_millis(2));
            }
            stream.shutdown(Shutdown::Write)?;
            Ok(sent)
        });
        let reader = s.spawn(|| -> Result<(u64, Duration)> {
            let mut stream = reader_stream;
            let mut received = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            let begin = Instant::now();
            loop {
                ensure!(
                    begin.elapsed() < TRAFFIC_LIMIT + Duration::from_secs(20),
                    "the echo did not end"
                );
                let n = match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("reading the echo after {received} bytes")
                        });
                    }
                };
                longest = longest.max(last.elapsed());
                last = Instant::now();
                for (k, b) in buf[..n].iter().enumerate() {
                    let at = received + k as u64;
                    ensure!(
                        *b == pattern(at),
                        "byte {at} of the echo is {b:#04x}, expected {:#04x}: bytes were lost, repeated or reordered",
                        pattern(at)
                    );
                }
                received += n as u64;
                started.store(true, Ordering::SeqCst);
            }
            Ok((received, longest))
        });
        let sent = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let sent = sent?;
        let (received, longest_stall) = read?;
        Ok(StreamReport {
            sent,
            received,
            longest_stall,
        })
    })
}

/// What the loop of new connections saw.
#[derive(Debug, Default)]
struct ConnectReport {
    ok: usize,
    /// Answered while no agent was running.
    ok_without_agent: usize,
    failures: Vec<String>,
}

/// GETs to myapp from `ns`, each on a new connection, every 20 ms until `stop` (bounded);
/// `agent_down` tells which were made while no agent ran.
fn connect_until(ns: &NetNs, stop: &AtomicBool, agent_down: &AtomicBool) -> ConnectReport {
    let mut report = ConnectReport::default();
    let begin = Instant::now();
    for i in 0..MAX_NEW_CONNECTIONS {
        if stop.load(Ordering::SeqCst) || begin.elapsed() > TRAFFIC_LIMIT {
            break;
        }
        let down = agent_down.load(Ordering::SeqCst);
        match http_get(ns, MYAPP_VIP, HTTP_PORT) {
            Ok(name) if ALL.contains(&name.as_str()) => {
                report.ok += 1;
                if down && agent_down.load(Ordering::SeqCst) {
                    report.ok_without_agent += 1;
                }
            }
            Ok(name) => report
                .failures
                .push(format!("GET {i}: answered by {name:?}")),
            Err(e) => report.failures.push(format!("GET {i}: {e:#}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report
}

/// The eBPF object the agent embeds, as a file: `$BPFPROXY_EBPF_OBJ`, else the workspace's
/// build output.
fn ebpf_object() -> Result<PathBuf> {
    let path = std::env::var_os("BPFPROXY_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/proxy-ebpf")
        });
    ensure!(
        path.is_file(),
        "eBPF object not found at {} (run `cargo xtask build-ebpf`)",
        path.display()
    );
    Ok(path)
}

/// Stops the agent with SIGTERM, leaving its links and maps pinned, and checks it exited
/// successfully.
fn stop_agent(agent: &Agent) -> Result<()> {
    let status = agent.stop_keeping_pins()?;
    ensure!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    Ok(())
}

/// How [`restart`] stops the agent.
#[derive(Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

/// Stops the agent, keeps it down for [`DOWNTIME`] (with `agent_down` set), starts it
/// again with `extra` and waits until it runs. Checks that the links are the same links
/// as before (never detached), now running a new program.
fn restart(cluster: &Cluster, agent_down: &AtomicBool, stop: Stop, extra: &[&str]) -> Result<()> {
    let agent = cluster.agent();
    let before = agent.pinned_links()?;
    ensure!(
        before.len() == cluster.topo.clients.len() + ALL.len(),
        "one pinned link per pod veth expected: {before:?}"
    );
    match stop {
        Stop::Term => {
            stop_agent(agent)?;
        }
        Stop::Kill => {
            // A crash: the agent runs no exit path at all.
            kill(Pid::from_raw(agent.pid() as i32), Signal::SIGKILL)?;
            agent.wait_for_exit()?;
        }
    }
    agent_down.store(true, Ordering::SeqCst);
    let kept = agent.pinned_links()?;
    ensure!(
        kept == before,
        "after SIGTERM the links should stay as they were: {before:?} then {kept:?}"
    );
    std::thread::sleep(DOWNTIME);
    // The log is appended to across starts: only what this start writes counts.
    let log_start = agent.log().len();
    agent.start_again_with(extra)?;
    agent.wait_until_running()?;
    agent_down.store(false, Ordering::SeqCst);
    let after = agent.pinned_links()?;
    ensure!(
        after.len() == before.len(),
        "links before {before:?}, after {after:?}"
    );
    for (b, a) in before.iter().zip(&after) {
        ensure!(
            a.pin == b.pin && a.link_id == b.link_id,
            "the link of {} should be the same link across the restart (never detached): before {b:?}, after {a:?}",
            b.pin
        );
        ensure!(
            a.prog_id != b.prog_id,
            "the link of {} should run the new agent's program: before {b:?}, after {a:?}",
            b.pin
        );
    }
    // Each interface runs exactly its link's new program: nothing doubled, nothing missing.
    for (l, attached) in after.iter().zip(tcx_ingress_all(cluster)?) {
        ensure!(
            attached == [l.prog_id],
            "{} should run only program {} after the restart: {attached:?}",
            l.pin,
            l.prog_id
        );
    }
    let log = strip_ansi(agent.log().get(log_start..).unwrap_or_default());
    let took_over = log
        .lines()
        .filter(|l| l.contains("took over the pinned tc link"))
        .count();
    ensure!(
        took_over == before.len(),
        "this start should log taking over each of the {} links once, logged {took_over}:\n{log}",
        before.len()
    );
    Ok(())
}

#[test]
fn a_stream_and_new_connections_cross_restarts_an_object_from_a_file_and_a_crash_without_loss() {
    with_cluster(1, &[], |cluster| {
        let object = ebpf_object()?;
        let object = object.to_string_lossy().into_owned();
        let stop = AtomicBool::new(false);
        let started = AtomicBool::new(false);
        let agent_down = AtomicBool::new(false);
        let ns = &cluster.client().ns;
        let (stream, connects, restarts) = std::thread::scope(|s| {
            let stream = s.spawn(|| stream_until(ns, &stop, &started));
            let connects = s.spawn(|| connect_until(ns, &stop, &agent_down));
            let restarts = (|| -> Result<()> {
                wait_until("the stream to flow", Duration::from_secs(10), || {
                    Ok(started.load(Ordering::SeqCst).then_some(()))
                })?;
                // The same binary again, then with its programs loaded from an object
                // file (`--object`; the same bytes as the embedded object, so this checks
                // the path an upgrade takes, not a change of program).
                restart(cluster, &agent_down, Stop::Term, &[])?;
                std::thread::sleep(Duration::from_millis(500));
                restart(cluster, &agent_down, Stop::Term, &["--object", &object])?;
                std::thread::sleep(Duration::from_millis(500));
                // And after a crash (SIGKILL) the same holds.
                restart(cluster, &agent_down, Stop::Kill, &[])?;
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            })();
            stop.store(true, Ordering::SeqCst);
            (stream.join(), connects.join(), restarts)
        });
        restarts?;
        let stream = stream.map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        let connects = connects.map_err(|_| anyhow::anyhow!("connect thread panicked"))?;
        eprintln!(
            "stream: {} bytes sent, {} echoed, longest wait for the echo {:?}; new connections: {} answered ({} while no agent ran), {} failed",
            stream.sent,
            stream.received,
            stream.longest_stall,
            connects.ok,
            connects.ok_without_agent,
            connects.failures.len()
        );
        ensure!(
            stream.received == stream.sent && stream.sent > 0,
            "sent {} bytes, got {} back",
            stream.sent,
            stream.received
        );
        ensure!(
            connects.failures.is_empty(),
            "{} of {} new connections failed across the restarts: {:?}",
            connects.failures.len(),
            connects.ok + connects.failures.len(),
            connects.failures
        );
        ensure!(
            connects.ok_without_agent > 0,
            "no new connection was made while the agent was stopped: {connects:?}"
        );
        Ok(())
    });
}

#[test]
fn a_restart_unpins_links_of_gone_interfaces_and_pins_new_ones() {
    with_cluster(2, &[], |cluster| {
        let agent = cluster.agent();
        let gone_if = cluster.topo.clients[1].node_if.clone();
        stop_agent(agent)?;
        // While the agent is down: one pod goes, another comes.
        cluster.topo.node.ip(&["link", "del", &gone_if])?;
        let new_if = cluster.topo.add_client()?.node_if.clone();
        let agent = cluster.agent();
        agent.start_again()?;
        agent.wait_until_running()?;
        let links = agent.pinned_links()?;
        let pins: Vec<&str> = links.iter().map(|l| l.pin.as_str()).collect();
        ensure!(
            !pins.contains(&gone_if.as_str()),
            "the link of the deleted {gone_if} should be unpinned: {links:?}"
        );
        ensure!(
            pins.contains(&new_if.as_str()),
            "the new {new_if} should have a pinned link: {links:?}"
        );
        let live: Vec<String> = node_interfaces(cluster);
        ensure!(
            pins == live,
            "exactly the live veths {live:?} should have pinned links: {links:?}"
        );
        for (l, attached) in links.iter().zip(tcx_ingress_all(cluster)?) {
            ensure!(
                attached == [l.prog_id],
                "{} should run its link's program {}: {attached:?}",
                l.pin,
                l.prog_id
            );
        }
        let new_client = &cluster.topo.clients[2].ns;
        for i in 0..5 {
            let name = http_get(new_client, MYAPP_VIP, HTTP_PORT)
                .with_context(|| format!("GET {} from the new pod", i + 1))?;
            ensure!(ALL.contains(&name.as_str()), "answered by {name:?}");
        }
        Ok(())
    });
}

/// `bpftool map dump pinned <dir>/<map>`.
fn dump(dir: &Path, map: &str) -> Result<String> {
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(dir.join(map))
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool map dump {map}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `version` into the pinned `layout` map, as a bpfproxy of that version would have.
fn set_layout_version(dir: &Path, version: u32) -> Result<()> {
    let mut args: Vec<String> = ["map", "update", "pinned"].map(String::from).to_vec();
    args.push(dir.join("layout").display().to_string());
    args.extend(["key", "0", "0", "0", "0", "value"].map(String::from));
    args.extend(version.to_le_bytes().iter().map(u8::to_string));
    let out = Command::new("bpftool").args(&args).output()?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn pins_of_another_layout_version_are_refused_and_left_as_they_are() {
    with_cluster(1, &[], |cluster| {
        let agent = cluster.agent();
        let dir = agent.bpffs().to_path_buf();
        // A connection tracked in the maps, so conntrack has something to keep.
        http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        stop_agent(agent)?;

        let current = proxy_common::maps::LAYOUT_VERSION;
        let other = current + 100;
        set_layout_version(&dir, other)?;
        let maps = ["services4", "backend_slots4", "conntrack4", "svc_meta"];
        let before: Vec<String> = maps.iter().map(|m| dump(&dir, m)).collect::<Result<_>>()?;
        let links_before = agent.pinned_links()?;

        agent.start_again()?;
        let status = agent.wait_for_exit()?;
        ensure!(
            !status.success(),
            "the agent should refuse other pins, exited {status}"
        );
        let log = strip_ansi(&agent.log());
        let line = log
            .lines()
            .find(|l| l.contains("layout version"))
            .with_context(|| format!("no layout error in the log:\n{log}"))?;
        for want in [
            dir.display().to_string(),
            format!("version {other}"),
            format!("version {current}"),
            format!("bpfproxy cleanup --bpffs {}", dir.display()),
        ] {
            ensure!(
                line.contains(&want),
                "the error should say {want:?}: {line}"
            );
        }
        let after: Vec<String> = maps.iter().map(|m| dump(&dir, m)).collect::<Result<_>>()?;
        for ((map, b), a) in maps.iter().zip(&before).zip(&after) {
            ensure!(
                b == a,
                "{map} changed although refused:\nbefore {b}\nafter {a}"
            );
        }
        ensure!(
            agent.pinned_links()? == links_before,
            "the links changed although refused"
        );
        // The old programs still serve, on the maps they understand.
        for _ in 0..5 {
            let name = http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
            ensure!(ALL.contains(&name.as_str()), "answered by {name:?}");
        }
        // The CLI will not read them either.
        let out = run_cli(&["services"], &dir)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(&format!("version {other}")),
            "`bpfproxy services` should refuse: {stderr}"
        );

        // Pins without any version (made before versions existed) are refused too.
        std::fs::remove_file(dir.join("layout"))?;
        agent.start_again()?;
        let status = agent.wait_for_exit()?;
        ensure!(
            !status.success(),
            "the agent should refuse unversioned pins"
        );
        let log = strip_ansi(&agent.log());
        ensure!(
            log.contains("carry no map layout version") && log.contains("bpfproxy cleanup"),
            "the error should say the pins have no version, and what to do:\n{log}"
        );
        Ok(())
    });
}

/// The programs attached at tcx ingress of the node-side veth `interface`, by id (asked
/// of the kernel with BPF_PROG_QUERY, from inside the node namespace).
fn tcx_ingress(node: &NetNs, interface: &str) -> Result<Vec<u64>> {
    let interface = interface.to_owned();
    let (_, programs) = node
        .run(move || SchedClassifier::query_tcx(&interface, TcAttachType::Ingress))?
        .context("querying tcx ingress")?;
    Ok(programs.iter().map(|p| u64::from(p.id())).collect())
}

/// The node-side veths of the topology that exist, sorted (as the pins are).
fn node_interfaces(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = cluster
        .topo
        .clients
        .iter()
        .chain(&cluster.topo.backends)
        .map(|p| p.node_if.clone())
        .filter(|n| {
            let name = std::ffi::CString::new(n.as_str()).expect("no NUL in names");
            // SAFETY: a valid C string; if_nametoindex only reads it.
            let index = cluster
                .topo
                .node
                .run(move || unsafe { libc::if_nametoindex(name.as_ptr()) });
            index.is_ok_and(|i| i != 0)
        })
        .collect();
    names.sort();
    names
}

/// [`tcx_ingress`] of every node-side veth, in [`node_interfaces`] order.
fn tcx_ingress_all(cluster: &Cluster) -> Result<Vec<Vec<u64>>> {
    node_interfaces(cluster)
        .iter()
        .map(|n| tcx_ingress(&cluster.topo.node, n))
        .collect()
}

/// Whether any program is attached at tcx ingress of the node's veths.
fn any_tcx_program(cluster: &Cluster) -> Result<bool> {
    Ok(tcx_ingress_all(cluster)?.iter().any(|p| !p.is_empty()))
}

/// Whether the kernel still has a link or program of this id.
fn bpf_object_exists(kind: &str, id: u64) -> Result<bool> {
    let out = Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()?;
    Ok(out.status.success())
}

#[test]
fn cleanup_removes_every_link_program_and_pin_and_traffic_passes_untranslated() {
    with_cluster(1, &[], |cluster| {
        let agent = cluster.agent();
        let dir = agent.bpffs().to_path_buf();
        let links: Vec<PinnedLinkInfo> = agent.pinned_links()?;
        ensure!(!links.is_empty(), "no pinned links");
        // Refused while the agent runs on the folder (it would serve nothing after).
        let refused = run_cli(&["cleanup"], &dir)?;
        ensure!(
            !refused.status.success()
                && String::from_utf8_lossy(&refused.stderr).contains("an agent is running")
                && agent.pinned_links()? == links,
            "cleanup should refuse while the agent runs and change nothing: {refused:?}"
        );
        stop_agent(agent)?;
        ensure!(
            tcx_ingress_all(cluster)?.iter().all(|p| p.len() == 1),
            "the programs should stay attached after SIGTERM: {:?}",
            tcx_ingress_all(cluster)?
        );

        let out = run_cli(&["cleanup"], &dir)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "bpfproxy cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for l in &links {
            ensure!(
                stdout.contains(&format!("detached from {}", l.pin)),
                "cleanup should say it detached {}: {stdout}",
                l.pin
            );
        }
        ensure!(!dir.exists(), "{} is still there", dir.display());
        ensure!(
            !any_tcx_program(cluster)?,
            "no program should be attached in the node after cleanup: {:?}",
            tcx_ingress_all(cluster)?
        );
        wait_until(
            "the links and programs to be freed",
            Duration::from_secs(10),
            || {
                for l in &links {
                    if bpf_object_exists("link", l.link_id)? {
                        bail!("link {} still exists", l.link_id);
                    }
                    if bpf_object_exists("prog", l.prog_id)? {
                        bail!("program {} still exists", l.prog_id);
                    }
                }
                Ok(Some(()))
            },
        )?;
        // Untranslated: the ClusterIP is nobody's address, while pods still reach each
        // other directly.
        let vip = connect(
            &cluster.client().ns,
            MYAPP_VIP,
            HTTP_PORT,
            Duration::from_secs(1),
        )?;
        ensure!(!vip.is_connected(), "the ClusterIP still answers: {vip:?}");
        let direct = http_get(&cluster.client().ns, cluster.backend("b1").ip, HTTP_PORT)?;
        ensure!(
            direct == "b1",
            "a direct GET to b1 was answered by {direct:?}"
        );

        let again = run_cli(&["cleanup"], &dir)?;
        let again_out = String::from_utf8_lossy(&again.stdout);
        ensure!(
            again.status.success() && again_out.contains("nothing to clean up"),
            "a second cleanup should succeed and say there is nothing: {again:?}"
        );
        // A folder that is not bpfproxy's is refused.
        let foreign = std::env::temp_dir().join(format!("not-bpfproxy-{}", cluster.topo.run));
        std::fs::create_dir_all(&foreign)?;
        std::fs::write(foreign.join("keep"), "x")?;
        let refused = run_cli(&["cleanup"], &foreign)?;
        let kept = foreign.join("keep").exists();
        let _ = std::fs::remove_dir_all(&foreign);
        ensure!(
            !refused.status.success() && kept,
            "cleanup should refuse a folder that is not bpfproxy's: {refused:?}"
        );
        Ok(())
    });
}

#[test]
fn detach_on_exit_takes_the_programs_off_and_keeps_the_maps() {
    with_cluster(1, &["--detach-on-exit"], |cluster| {
        let agent = cluster.agent();
        stop_agent(agent)?;
        ensure!(
            !any_tcx_program(cluster)?,
            "no program should stay attached with --detach-on-exit: {:?}",
            tcx_ingress_all(cluster)?
        );
        ensure!(
            pinned_links(agent.bpffs())?.is_empty(),
            "no link pin should stay"
        );
        let vip = connect(
            &cluster.client().ns,
            MYAPP_VIP,
            HTTP_PORT,
            Duration::from_secs(1),
        )?;
        ensure!(!vip.is_connected(), "the ClusterIP still answers: {vip:?}");
        // The maps stay pinned for the CLI and the next start.
        let services = agent.services()?;
        ensure!(
            services.iter().any(|s| s.name == "myapp"),
            "myapp should still be in the pinned maps: {services:?}"
        );
        agent.start_again()?;
        agent.wait_until_running()?;
        let name = http_get(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        ensure!(ALL.contains(&name.as_str()), "answered by {name:?}");
        Ok(())
    });
}

/// Layout 5 (IPv6) only added maps to layout 4, so an agent of 5 takes pins of 4 over in
/// place: an upgrade from the agent before IPv6 keeps services and open connections.
#[test]
fn pins_of_layout_4_are_taken_over_with_their_services_and_connections() {
    with_cluster(1, &[], |cluster| {
        let agent = cluster.agent();
        let dir = agent.bpffs().to_path_buf();
        let mut conn = HttpConnection::open(&cluster.client().ns, MYAPP_VIP, HTTP_PORT)?;
        let backend = conn.get()?;
        stop_agent(agent)?;

        // What a layout-4 agent leaves: every map but the IPv6 ones (all named `*6`, and
        // no map of layout 4 is), and the version 4.
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with('6') {
                std::fs::remove_file(dir.join(&name))?;
                removed.push(name);
            }
        }
        ensure!(
            removed.iter().any(|n| n == proxy_common::maps::SERVICES6),
            "no IPv6 map was pinned: {removed:?}"
        );
        set_layout_version(&dir, 4)?;
        let services_before = dump(&dir, "services4")?;

        agent.start_again()?;
        agent.wait_until_running()?;
        let log = strip_ansi(&agent.log());
        ensure!(
            log.contains("taking over pins of an older, compatible map layout"),
            "the agent should say it takes the pins over:\n{log}"
        );
        for name in &removed {
            ensure!(dir.join(name).exists(), "{name} was not pinned again");
        }
        // The layout array has no BTF: bpftool prints its value as bytes.
        let layout = dump(&dir, "layout")?;
        let version = proxy_common::maps::LAYOUT_VERSION;
        let bytes: Vec<String> = version
            .to_ne_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ensure!(
            layout.contains(&format!("value: {}", bytes.join(" "))),
            "the folder should now be of version {version}: {layout}"
        );
        ensure!(
            dump(&dir, "services4")? == services_before,
            "services4 changed across the take-over"
        );
        // The connection opened under the old layout goes on, to the same backend.
        for _ in 0..3 {
            let name = conn.get()?;
            ensure!(
                name == backend,
                "the kept connection went to {name}, it was at {backend}"
            );
        }
        Ok(())
    });
}
