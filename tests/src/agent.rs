//! The bpfproxy agent as a child process in the node namespace, and its CLI.
//!
//! The agent is started with `nsenter --net=/run/netns/<node>` (not `ip netns exec`, which
//! mounts a private /sys and so would hide the pins in bpffs). It is sent SIGTERM when the
//! guard drops, and everything it pinned is removed (`bpfproxy cleanup`: its tc links stay
//! attached after SIGTERM, so a restart drops nothing).

use std::{
    ffi::OsString,
    fs::OpenOptions,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
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
/// What the agent logs once it is fully up: maps programmed, interfaces attached, watching
/// for changes and for signals.
pub const RUNNING_LINE: &str = "bpfproxy running";
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

/// Runs `nsenter ARGS...` (the agent in its namespace) with its output going to `log`,
/// which is truncated first unless `append`.
fn spawn_agent(args: &[OsString], log: &Path, append: bool) -> Result<Child> {
    let log_file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new("nsenter");
    cmd.args(args)
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
        "testbed: starting agent: nsenter {} (log: {})",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        log.display()
    );
    cmd.spawn()
        .context("spawning nsenter (is util-linux installed?)")
}

/// Runs `bpfproxy ARGS... --bpffs <bpffs>` in this (the caller's) namespace, with or without
/// an agent, and returns its output whatever its exit status.
pub fn run_cli(args: &[&str], bpffs: &Path) -> Result<Output> {
    let bin = bpfproxy_bin()?;
    Command::new(&bin)
        .args(args)
        .arg("--bpffs")
        .arg(bpffs)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// `text` without ANSI colour sequences (`ESC [ ... letter`), as the agent's log has them.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `[`, parameters, and the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running agent; SIGTERM and pin clean-up on drop.
pub struct Agent {
    bin: PathBuf,
    bpffs: PathBuf,
    log: PathBuf,
    /// Arguments of `nsenter`, kept to start the agent again on the same pins.
    args: Vec<OsString>,
    /// How many times the agent was started (each start logs [`RUNNING_LINE`] once up).
    starts: AtomicUsize,
    child: Mutex<Child>,
}

impl Agent {
    /// Starts `bpfproxy run` in `node` for the interfaces matching `interfaces`, reading
    /// `manifests`, pinning under `bpffs` (which must be below /sys/fs/bpf). Its output goes
    /// to a log file (see [`Agent::log`]). Does not wait for it to be ready.
    pub fn start(node: &NetNs, manifests: &Path, interfaces: &str, bpffs: &Path) -> Result<Self> {
        Self::start_with_args(node, manifests, interfaces, bpffs, &[])
    }

    /// Like [`Agent::start`], with `extra` arguments after the usual ones (e.g.
    /// `["--max-services", "1"]`).
    pub fn start_with_args(
        node: &NetNs,
        manifests: &Path,
        interfaces: &str,
        bpffs: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let source = [OsString::from("--manifests"), manifests.into()];
        Self::start_with_source(node, &source, interfaces, bpffs, extra)
    }

    /// Like [`Agent::start_with_args`], reading the Kubernetes API through `kubeconfig`
    /// (e.g. [`crate::ApiServer::kubeconfig`]) as node `node_name` instead of manifests.
    pub fn start_kube(
        node: &NetNs,
        kubeconfig: &Path,
        node_name: &str,
        interfaces: &str,
        bpffs: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let source = [
            OsString::from("--kubeconfig"),
            kubeconfig.into(),
            "--node-name".into(),
            node_name.into(),
        ];
        Self::start_with_source(node, &source, interfaces, bpffs, extra)
    }

    /// Like [`Agent::start_with_args`] with the source given by `source` (e.g.
    /// `--kubeconfig FILE --node-name NAME`) in place of `--manifests`.
    pub fn start_with_source(
        node: &NetNs,
        source: &[OsString],
        interfaces: &str,
        bpffs: &Path,
        extra: &[&str],
    ) -> Result<Self> {
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
        let mut args: Vec<OsString> = vec![
            format!("--net={}", node.path().display()).into(),
            bin.clone().into(),
            "run".into(),
        ];
        args.extend(source.iter().cloned());
        args.extend([
            "--interfaces".into(),
            interfaces.into(),
            "--bpffs".into(),
            bpffs.into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        let child = spawn_agent(&args, &log, false)?;
        Ok(Agent {
            bin,
            bpffs: bpffs.to_owned(),
            log,
            args,
            starts: AtomicUsize::new(1),
            child: Mutex::new(child),
        })
    }

    /// Stops the agent with SIGTERM (SIGKILL after 5 s) and leaves its pins in place, as a
    /// node's service manager would on a restart. Returns how it exited.
    pub fn stop_keeping_pins(&self) -> Result<ExitStatus> {
        self.terminate()
            .context("the agent had already exited before SIGTERM")
    }

    /// Starts the agent again, with the same arguments and on the same pins, after
    /// [`Agent::stop_keeping_pins`]. Its output is appended to the same log.
    pub fn start_again(&self) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait()?.is_none() {
            bail!("the agent is still running; stop it first");
        }
        *child = spawn_agent(&self.args, &self.log, true)?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Like [`Agent::start_again`], with `extra` arguments after the usual ones for this
    /// start only (e.g. `["--object", path]` to upgrade to another eBPF object).
    pub fn start_again_with(&self, extra: &[&str]) -> Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait()?.is_none() {
            bail!("the agent is still running; stop it first");
        }
        let mut args = self.args.clone();
        args.extend(extra.iter().map(OsString::from));
        *child = spawn_agent(&args, &self.log, true)?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Waits (at most [`READY_TIMEOUT`]) for the agent to exit on its own (e.g. refusing
    /// to start) and returns how it exited.
    pub fn wait_for_exit(&self) -> Result<ExitStatus> {
        crate::wait_until("the agent to exit", READY_TIMEOUT, || {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            Ok(child.try_wait()?)
        })
        .with_context(|| format!("agent log:\n{}", self.log()))
    }

    /// The tc links pinned under `<bpffs>/links`, by pin name, as bpftool shows them.
    pub fn pinned_links(&self) -> Result<Vec<PinnedLinkInfo>> {
        pinned_links(&self.bpffs)
    }

    /// Waits (at most [`READY_TIMEOUT`]) until the agent, as last started, logged
    /// [`RUNNING_LINE`]: past its start-up, with its link, file and signal watchers in
    /// place. Fails early if it exits.
    pub fn wait_until_running(&self) -> Result<()> {
        let want = self.starts.load(Ordering::SeqCst);
        let res = crate::wait_until("the agent to be running", READY_TIMEOUT, || {
            if let Err(e) = self.check_running() {
                return Ok(Some(Err(e)));
            }
            let runs = strip_ansi(&self.log())
                .lines()
                .filter(|l| l.contains(RUNNING_LINE))
                .count();
            Ok((runs >= want).then_some(Ok(())))
        });
        res.and_then(|r| r)
            .with_context(|| format!("agent log:\n{}", self.log()))
    }

    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Process id of the agent (`nsenter --net` execs it, so it is the child's own).
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most [`READY_TIMEOUT`]) until a line of the log, colours removed,
    /// satisfies `pred`, and returns that line. Fails with the log if none does.
    pub fn wait_for_log_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
        crate::wait_until(what, READY_TIMEOUT, || {
            Ok(strip_ansi(&self.log())
                .lines()
                .find(|l| pred(l))
                .map(str::to_owned))
        })
        .with_context(|| format!("waiting for {what}; agent log:\n{}", self.log()))
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

    /// SIGTERM, then SIGKILL after 5 s. Returns how the agent exited, or `None` if it had
    /// exited already.
    fn terminate(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(child.try_wait(), Ok(Some(_))) {
            return None;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("testbed: agent ignored SIGTERM for 5 s, killing it");
        let _ = child.kill();
        child.wait().ok()
    }
}

/// A tc link pinned by the agent, as `bpftool link show pinned` reports it (bpftool 7.1
/// knows no tcx details such as the interface; query the interface for those).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    /// The pin's file name (the interface name, `.` written `%2e`).
    pub pin: String,
    pub link_id: u64,
    pub prog_id: u64,
}

/// The links pinned under `<bpffs>/links` (none if the folder is missing).
pub fn pinned_links(bpffs: &Path) -> Result<Vec<PinnedLinkInfo>> {
    let dir = bpffs.join("links");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        // `links/cgroup` holds the socket hooks' links, not tc links.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let show = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool (is it installed?)")?;
        if !show.status.success() {
            bail!(
                "`bpftool link show pinned {}`: {}",
                path.display(),
                String::from_utf8_lossy(&show.stderr).trim()
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&show.stdout)
            .with_context(|| format!("bpftool's JSON for {}", path.display()))?;
        // A missing field must not read as 0, which would compare equal to another 0.
        let field = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| {
                    format!(
                        "bpftool gave no {k:?} for the link pinned at {}: {v}",
                        path.display()
                    )
                })
        };
        out.push(PinnedLinkInfo {
            pin: entry.file_name().to_string_lossy().into_owned(),
            link_id: field("id")?,
            prog_id: field("prog_id")?,
        });
    }
    out.sort_by(|a, b| a.pin.cmp(&b.pin));
    Ok(out)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
        // The agent leaves its programs attached through pinned links, which would keep
        // them (and their maps) alive after the namespaces are gone: take everything off.
        if self.bpffs.starts_with(BPFFS_ROOT) && self.bpffs.exists() {
            match run_cli(&["cleanup"], &self.bpffs) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "testbed: `bpfproxy cleanup --bpffs {}` failed: {}",
                    self.bpffs.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("testbed: bpfproxy cleanup: {e:#}"),
            }
        }
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
