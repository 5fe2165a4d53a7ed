//! The bpfproxy agent as a child process in the node namespace, and its CLI.
//!
//! The agent is started with `nsenter --net=/run/netns/<node>` (not `ip netns exec`, which
//! mounts a private /sys and so would hide the pins in bpffs). It is sent SIGTERM when the
//! guard drops, and its pin directory is removed.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde::Deserialize;

use crate::netns::NetNs;

/// Where bpffs is mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Pin directories of agents started by the harness are `/sys/fs/bpf/bpfproxy-testbed-<run>`.
pub const TEST_PIN_PREFIX: &str = "bpfproxy-testbed-";
/// How long the agent gets to come up or to apply a change.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// `statfs` magic of bpffs (linux/magic.h).
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

/// One service port as `bpfproxy services -o json` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub port_name: String,
    pub ip: String,
    pub port: u16,
    pub protocol: String,
    pub backends: Vec<BackendInfo>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendInfo {
    pub ip: String,
    pub port: u16,
}

impl ServiceInfo {
    /// Backend addresses, sorted.
    pub fn backend_ips(&self) -> Vec<String> {
        let mut ips: Vec<String> = self.backends.iter().map(|b| b.ip.clone()).collect();
        ips.sort();
        ips
    }
}

/// The agent binary: `$BPFPROXY_BIN`, else `target/release/bpfproxy` of this workspace.
pub fn bpfproxy_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("BPFPROXY_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/bpfproxy"),
    };
    if !path.is_file() {
        bail!(
            "bpfproxy binary not found at {} (build it with `cargo xtask build`, or set \
             BPFPROXY_BIN; `cargo xtask test` does both)",
            path.display()
        );
    }
    Ok(path)
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted already.
pub fn ensure_bpffs() -> Result<()> {
    let is_bpffs = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(BPFFS_ROOT) {
        return Ok(());
    }
    eprintln!("testbed: mounting bpffs on {BPFFS_ROOT}");
    std::fs::create_dir_all(BPFFS_ROOT).ok();
    nix::mount::mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs on {BPFFS_ROOT}"))?;
    Ok(())
}

/// A running agent; SIGTERM and pin clean-up on drop.
pub struct Agent {
    bin: PathBuf,
    bpffs: PathBuf,
    log: PathBuf,
    child: Mutex<Child>,
}

impl Agent {
    /// Starts `bpfproxy run` in `node` for the interfaces matching `interfaces`, reading
    /// `manifests`, pinning under `bpffs` (which must be below /sys/fs/bpf). Its output goes
    /// to a log file (see [`Agent::log`]). Does not wait for it to be ready.
    pub fn start(node: &NetNs, manifests: &Path, interfaces: &str, bpffs: &Path) -> Result<Self> {
        let bin = bpfproxy_bin()?;
        ensure_bpffs()?;
        if bpffs.exists() {
            std::fs::remove_dir_all(bpffs)
                .with_context(|| format!("removing old pins {}", bpffs.display()))?;
        }
        let log = std::env::temp_dir().join(format!(
            "bpfproxy-agent-{}.log",
            bpffs.file_name().unwrap_or_default().to_string_lossy()
        ));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.path().display()))
            .arg(&bin)
            .arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--interfaces")
            .arg(interfaces)
            .arg("--bpffs")
            .arg(bpffs)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            // Own process group: a Ctrl-C meant for the caller is handled by the caller,
            // which then stops the agent in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The agent dies with the thread that started it, even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        eprintln!(
            "testbed: starting agent: nsenter --net={} {} run --manifests {} --interfaces {} \
             --bpffs {} (log: {})",
            node.path().display(),
            bin.display(),
            manifests.display(),
            interfaces,
            bpffs.display(),
            log.display()
        );
        let child = cmd
            .spawn()
            .context("spawning nsenter (is util-linux installed?)")?;
        Ok(Agent {
            bin,
            bpffs: bpffs.to_owned(),
            log,
            child: Mutex::new(child),
        })
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the agent has exited.
    pub fn check_running(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited ({status})");
        }
        Ok(())
    }

    /// Runs `bpfproxy ARGS... --bpffs <dir>` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "`bpfproxy {} --bpffs {}` failed ({}): {}",
                args.join(" "),
                self.bpffs.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `bpfproxy services -o json`, parsed.
    pub fn services(&self) -> Result<Vec<ServiceInfo>> {
        let json = self.cli(&["services", "-o", "json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing services JSON {json:?}"))
    }

    /// The entry of `namespace/name` port `port`, if listed.
    pub fn service(&self, namespace: &str, name: &str, port: u16) -> Result<Option<ServiceInfo>> {
        Ok(self
            .services()?
            .into_iter()
            .find(|s| s.namespace == namespace && s.name == name && s.port == port))
    }

    /// `bpftool map dump pinned <bpffs>/<map>`.
    pub fn bpftool_dump(&self, map: &str) -> Result<String> {
        let path = self.bpffs.join(map);
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "`bpftool map dump pinned {}` failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (at most [`READY_TIMEOUT`]) until `bpfproxy services` satisfies `pred`;
    /// fails early if the agent exits.
    pub fn wait_for_services(
        &self,
        what: &str,
        pred: impl Fn(&[ServiceInfo]) -> bool,
    ) -> Result<Vec<ServiceInfo>> {
        let res = crate::wait_until(what, READY_TIMEOUT, || {
            // An agent that exited will not come back: stop waiting at once.
            if let Err(e) = self.check_running() {
                return Ok(Some(Err(e)));
            }
            let services = self.services()?;
            Ok(pred(&services).then_some(Ok(services)))
        });
        res.and_then(|r| r)
            .with_context(|| format!("waiting for {what}; agent log:\n{}", self.log()))
    }

    /// Waits until `namespace/name` port `port` is served by exactly the backends `ips`.
    pub fn wait_for_backends(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        ips: &[std::net::Ipv4Addr],
    ) -> Result<ServiceInfo> {
        let mut want: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        want.sort();
        let what = format!("{namespace}/{name}:{port} with backends {want:?}");
        let services = self.wait_for_services(&what, |all| {
            all.iter().any(|s| {
                s.namespace == namespace
                    && s.name == name
                    && s.port == port
                    && s.backend_ips() == want
            })
        })?;
        Ok(services
            .into_iter()
            .find(|s| s.namespace == namespace && s.name == name && s.port == port)
            .expect("checked by the predicate"))
    }

    /// Waits until no port of `namespace/name` is listed any more.
    pub fn wait_for_service_gone(&self, namespace: &str, name: &str) -> Result<()> {
        self.wait_for_services(&format!("{namespace}/{name} to be gone"), |all| {
            !all.iter()
                .any(|s| s.namespace == namespace && s.name == name)
        })
        .map(|_| ())
    }

    fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("testbed: agent ignored SIGTERM for 5 s, killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}---- end of agent log ----",
                self.log.display(),
                self.log()
            );
        }
        if self.bpffs.starts_with(BPFFS_ROOT)
            && self.bpffs.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.bpffs)
        {
            eprintln!("testbed: removing {}: {e}", self.bpffs.display());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
