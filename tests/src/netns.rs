//! Named network namespaces (`ip netns`), deleted when their guard drops, and a way to run
//! code inside one from a thread of this process.

use std::{
    fs::File,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns` keeps the namespace handles.
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace made by the harness; `ip netns del` on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `name` with loopback up. Fails if it exists already.
    pub fn create(name: &str) -> Result<Self> {
        run_ip(&["netns", "add", name])?;
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> ARGS...`, failing with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Writes a sysctl under /proc/sys/net of this namespace, e.g.
    /// `sysctl("ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/net/{key}");
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("setting {path}={value} in netns {}", self.name))
    }

    /// Runs `f` on a new thread that first entered this namespace, and returns its result.
    /// Sockets made inside `f` stay in the namespace when handed back to the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Names of all namespaces under /run/netns.
pub fn list() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// `ip netns del NAME`, reporting (not failing on) errors: used from destructors.
pub fn delete(name: &str) {
    if let Err(e) = run_ip(&["netns", "del", name]) {
        eprintln!("testbed: deleting netns {name}: {e:#}");
    }
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out: Output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
