//! The real agent (`target/release/bpfproxy run`, through the testbed's [`Agent`]) serving
//! the synthetic cluster, and what it costs in memory.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bpfproxy::datapath::loader::map_names;
use testbed::{
    Agent, ManifestDir, NetNs,
    agent::{BPFFS_ROOT, TEST_PIN_PREFIX, strip_ansi},
};

use crate::cluster::{self, SynthService};

/// The agent and its manifests directory; dropping it stops the agent and removes both
/// its pins and the manifests.
pub struct RunningAgent {
    pub agent: Agent,
    _manifests: ManifestDir,
    /// From spawning the agent to its log saying every service is in the maps.
    pub ready_after: Duration,
    /// CPU time the agent used from its start until it went idle, or `None` if it did not
    /// go idle within [`IDLE_TIMEOUT`].
    pub cpu_until_idle: Option<Duration>,
}

/// How long the agent gets to go idle after start-up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle: at most this much CPU time over [`IDLE_WINDOW`].
const IDLE_CPU: Duration = Duration::from_millis(20);
const IDLE_WINDOW: Duration = Duration::from_secs(1);

/// User plus system CPU time of a process.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold spaces) come the fields from
    // the third on: utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Waits until `pid` uses at most [`IDLE_CPU`] in an [`IDLE_WINDOW`]; returns its CPU time
/// then, or `None` after `timeout`.
pub fn wait_idle(pid: u32, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut last = cpu_time(pid)?;
    while start.elapsed() < timeout && !testbed::stop_requested() {
        std::thread::sleep(IDLE_WINDOW);
        let now = cpu_time(pid)?;
        if now.saturating_sub(last) <= IDLE_CPU {
            return Some(now);
        }
        last = now;
    }
    None
}

/// Services per manifest file. The agent's YAML reader costs time quadratic in the
/// documents of one file (each document is re-padded to its line number), so the services
/// are spread over files of this many (`BPFPROXY_BENCH_FILE_SERVICES` overrides it).
pub const FILE_SERVICES: usize = 100;

/// Waits until the agent logs that it programmed `services` services (it logs that once
/// all are in the maps); returns the time since `start`. Fails early if the agent exits.
pub fn wait_programmed(
    agent: &Agent,
    services: usize,
    start: Instant,
    timeout: Duration,
    poll: Duration,
) -> Result<Duration> {
    let want = format!("maps updated services={services} ");
    loop {
        if let Err(e) = agent.check_running() {
            bail!("{e}; agent log:\n{}", agent.log());
        }
        if strip_ansi(&agent.log()).contains(&want) {
            return Ok(start.elapsed());
        }
        if testbed::stop_requested() {
            bail!("interrupted");
        }
        if start.elapsed() > timeout {
            bail!(
                "the agent did not program {services} services within {timeout:?}; log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(poll);
    }
}

fn file_services() -> usize {
    std::env::var("BPFPROXY_BENCH_FILE_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(FILE_SERVICES)
}

/// Writes the manifests of `services`, starts the agent in `node` on the interfaces
/// matching `interfaces`, and waits until it has programmed all of them.
pub fn start(
    node: &NetNs,
    run: &str,
    interfaces: &str,
    services: &[SynthService],
) -> Result<RunningAgent> {
    let manifests = ManifestDir::create(run)?;
    for (i, chunk) in services.chunks(file_services()).enumerate() {
        manifests.write(
            &format!("services-{i:05}.yaml"),
            &cluster::manifests_yaml(chunk),
        )?;
    }
    let bpffs = PathBuf::from(BPFFS_ROOT).join(format!("{TEST_PIN_PREFIX}{run}"));
    let start = Instant::now();
    // No periodic resync while measuring (it reads every map back): no contender runs a
    // control plane during the measurements.
    let agent = Agent::start_with_args(
        node,
        manifests.path(),
        interfaces,
        &bpffs,
        &["--resync-seconds", "3600"],
    )?;
    // Generous: the agent parses every manifest before programming.
    let timeout = Duration::from_secs(60) + Duration::from_millis(services.len() as u64);
    let ready_after = wait_programmed(
        &agent,
        services.len(),
        start,
        timeout,
        Duration::from_millis(20),
    )?;
    // Past its start-up: interfaces attached, watchers in place; then nothing more to do.
    agent.wait_until_running()?;
    let cpu_until_idle = wait_idle(agent.pid(), IDLE_TIMEOUT);
    if cpu_until_idle.is_none() {
        eprintln!(
            "warning: the agent serving {} services is still busy {IDLE_TIMEOUT:?} after start-up",
            services.len()
        );
    }
    Ok(RunningAgent {
        agent,
        _manifests: manifests,
        ready_after,
        cpu_until_idle,
    })
}

/// Memory of a running agent.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss_bytes: f64,
    pub peak_rss_bytes: f64,
    /// Sum of `bytes_memlock` of the pinned maps, as bpftool shows them.
    pub maps_memlock_bytes: f64,
}

fn status_kb(status: &str, field: &str) -> Option<f64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse::<f64>().ok()
    })
}

impl RunningAgent {
    pub fn memory(&self) -> Result<Memory> {
        let pid = self.agent.pid();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "bpfproxy" {
            bail!("process {pid} is {:?}, not the agent", comm.trim());
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let rss = status_kb(&status, "VmRSS").context("no VmRSS")?;
        let peak = status_kb(&status, "VmHWM").context("no VmHWM")?;
        let mut memlock = 0.0;
        for name in map_names() {
            memlock += map_memlock(&self.agent.bpffs().join(name))?;
        }
        Ok(Memory {
            rss_bytes: rss * 1024.0,
            peak_rss_bytes: peak * 1024.0,
            maps_memlock_bytes: memlock,
        })
    }
}

/// `bytes_memlock` of a pinned map, from `bpftool -j map show pinned`.
fn map_memlock(pin: &std::path::Path) -> Result<f64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pin)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool map show pinned {}: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing bpftool's JSON for {}", pin.display()))?;
    v.get("bytes_memlock")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no bytes_memlock for {}", pin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let s = "Name:\tbpfproxy\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kb(s, "VmRSS"), Some(10240.0));
        assert_eq!(status_kb(s, "VmHWM"), Some(20480.0));
    }
}
