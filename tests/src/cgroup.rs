//! A throw-away cgroup2 folder for socket-level load-balancing tests: the agent attaches its
//! socket programs there (never to the machine's root cgroup), and only client processes
//! moved into it are load-balanced. Removed on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// Names of test cgroups: `bpfproxy-test-<run>` under the cgroup2 mount.
pub const TEST_CGROUP_PREFIX: &str = "bpfproxy-test-";

/// Where cgroup2 is mounted: `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup`
/// on unified ones.
pub fn cgroup2_root() -> Result<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| {
            nix::sys::statfs::statfs(*p)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        })
        .map(PathBuf::from)
        .context("no cgroup2 mount at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

/// A child cgroup made for one run; `rmdir` on drop (its processes have exited by then).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn create(run: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(format!("{TEST_CGROUP_PREFIX}{run}"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in it now.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let procs = std::fs::read_to_string(self.path.join("cgroup.procs"))?;
        Ok(procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// Removes a test cgroup, waiting briefly for exiting processes to leave it.
pub(crate) fn remove(path: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("testbed: could not remove cgroup {}", path.display());
}

/// The outcome of one `testbed-sock-client` call: its JSON line.
pub fn sock_client(
    bin: &Path,
    cgroup: Option<&TestCgroup>,
    netns: &Path,
    mode: &str,
    addr: std::net::Ipv4Addr,
    port: u16,
) -> Result<serde_json::Value> {
    let cgroup_arg = cgroup.map_or_else(|| "-".to_string(), |c| c.path().display().to_string());
    let out = Command::new(bin)
        .arg(cgroup_arg)
        .arg(netns)
        .arg(mode)
        .arg(addr.to_string())
        .arg(port.to_string())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {mode} {addr}:{port}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("its output {:?}", String::from_utf8_lossy(&out.stdout)))
}
