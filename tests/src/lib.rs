//! `testbed`: throw-away network namespaces for running bpfproxy end to end.
//!
//! A [`Topology`] is one "node" namespace and a few pod namespaces, each pod joined to the
//! node by a veth pair. Backends serve HTTP and UDP from threads that entered their pod's
//! namespace ([`servers`]); clients connect from other threads the same way ([`client`]).
//! The agent runs in the node namespace with its tc programs on the node-side veths
//! ([`agent`]) and reads Service/EndpointSlice YAML from a directory ([`manifests`]).
//! [`cluster`] puts these together for the `myapp` service used by the e2e tests and by
//! `cargo xtask demo`.
//!
//! Network safety: every address, route and program lives inside namespaces made here;
//! nothing is added to the root namespace and no packet is sent outside. Names carry the
//! process id and a counter, so parallel runs never collide, and guards delete what they
//! made on drop, also when a test panics. Every socket has timeouts and every loop a bound.

pub mod agent;
pub mod apiserver;
pub mod cgroup;
pub mod client;
pub mod cluster;
#[cfg(feature = "datapath")]
pub mod datapath;
pub mod manifests;
pub mod netns;
pub mod scrape;
pub mod servers;
pub mod topology;
#[cfg(feature = "datapath")]
pub mod two_node;

use std::{
    sync::{
        Once,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

pub use crate::{
    agent::{Agent, BackendInfo, ServiceInfo},
    apiserver::ApiServer,
    client::{ConnectOutcome, HttpConnection, UdpOutcome, connect, http_get, udp_request},
    cluster::Cluster,
    manifests::{EndpointSlice, ManifestDir, Service},
    netns::NetNs,
    servers::{EchoServer, HttpServer, LineServer, LineServerProcess, PeerServer, UdpServer},
    topology::{Pod, Topology},
};

/// Set by [`request_stop`] (e.g. from a Ctrl-C handler): long waits give up early.
static STOP: AtomicBool = AtomicBool::new(false);

/// Ask every bounded wait in the harness to give up (safe to call from a signal handler).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails unless the process runs as root (namespaces, veths and BPF all need it).
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the testbed creates network namespaces and loads BPF programs: run as root");
    }
    Ok(())
}

/// A name for one topology of this process: hex pid, `x`, hex counter (at most 9 chars,
/// so `bpv<run>-<i>` fits the 15-byte interface-name limit; no `.`, which bpffs refuses in
/// names).
pub fn unique_run_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    static REAP: Once = Once::new();
    REAP.call_once(reap_stale);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    assert!(n < 0x100, "more than 256 topologies in one process");
    format!("{:x}x{:x}", std::process::id(), n)
}

/// Removes namespaces and pin directories left by earlier runs whose process is gone
/// (a test binary killed by a timeout cannot run its guards). Only touches names made by
/// [`unique_run_id`].
fn reap_stale() {
    let dead = |run: &str| -> bool {
        let Some((pid, _)) = run.split_once('x') else {
            return false;
        };
        match u32::from_str_radix(pid, 16) {
            Ok(pid) => {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            }
            Err(_) => false,
        }
    };
    if let Ok(names) = netns::list() {
        for name in names {
            if let Some(run) = name
                .strip_prefix("bp")
                .and_then(|rest| rest.rsplit_once('-'))
                .map(|(run, _)| run)
                && dead(run)
            {
                netns::delete(&name);
            }
        }
    }
    if let Ok(root) = cgroup::cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(root)
    {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(run) = name.strip_prefix(cgroup::TEST_CGROUP_PREFIX)
                && dead(run)
            {
                cgroup::remove(&entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(agent::BPFFS_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(run) = name.strip_prefix(agent::TEST_PIN_PREFIX)
                && dead(run)
            {
                // The agent is gone, so the pins are the last holders of its tc links:
                // removing them detaches the links and frees the programs and maps.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Raises this process's soft open-file limit to its hard one (tests holding thousands of
/// sockets); returns the new limit.
pub fn raise_nofile_to_hard() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
/// The error names `what` and carries the last failure reason `check` reported.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("condition not met");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if stop_requested() {
            bail!("stopped while waiting for {what}");
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what} ({last})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
