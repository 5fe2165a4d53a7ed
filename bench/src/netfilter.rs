//! Running `iptables-restore` and `nft` inside a namespace of the harness: the child enters
//! the namespace between fork and exec (no `nsenter` in between, so the time measured is
//! the tool's own), reads its input from a pipe as kube-proxy feeds it, and is timed from
//! spawn to exit.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use testbed::NetNs;

/// How a timed command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// It succeeded after this long.
    Took(Duration),
    /// It was still running at the deadline and was killed.
    TimedOut(Duration),
}

impl Ran {
    /// The time, failing if the command was cut short.
    pub fn finished(self) -> Result<Duration> {
        match self {
            Ran::Took(d) => Ok(d),
            Ran::TimedOut(d) => bail!("still running after {d:?}; killed"),
        }
    }
}

/// Runs `program args...` in `ns` with `input` on stdin, for at most `timeout`.
pub fn run_in(
    ns: &NetNs,
    program: &str,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<Ran> {
    let netns = File::open(ns.path()).with_context(|| format!("opening {}", ns.name()))?;
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is a plain system call, safe between fork and exec; `netns` outlives
    // the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {program} (is it installed?)"))?;
    drop(netns);
    let pid = Pid::from_raw(child.id() as i32);
    let mut stdin = child.stdin.take().expect("piped stdin");
    let (tx, rx) = mpsc::channel();
    let (ended, written) = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        s.spawn(move || {
            let output = child.wait_with_output();
            let _ = tx.send((output, Instant::now()));
        });
        let ended = match rx.recv_timeout(timeout) {
            Ok((output, at)) => Some((output, at - start)),
            Err(_) => {
                // Not reaped yet (the waiter holds the child until it exits), so the pid is
                // still this child's.
                let _ = kill(pid, Signal::SIGKILL);
                let _ = rx.recv();
                None
            }
        };
        (ended, writer.join())
    });
    let Some((output, took)) = ended else {
        return Ok(Ran::TimedOut(start.elapsed()));
    };
    let output = output.with_context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let err: String = err.lines().take(10).collect::<Vec<_>>().join("\n");
        bail!(
            "`{program} {}` in {} failed ({}): {err}",
            args.join(" "),
            ns.name(),
            output.status
        );
    }
    match written {
        Ok(Ok(())) => Ok(Ran::Took(took)),
        Ok(Err(e)) => bail!("feeding {program}: {e}"),
        Err(_) => bail!("the thread feeding {program} panicked"),
    }
}

/// `iptables-restore --noflush` of `rules` in `ns`.
pub fn iptables_restore(ns: &NetNs, rules: &str, timeout: Duration) -> Result<Ran> {
    run_in(
        ns,
        "iptables-restore",
        &["--noflush"],
        rules.as_bytes(),
        timeout,
    )
}

/// `nft -f -` of `rules` in `ns`.
pub fn nft_apply(ns: &NetNs, rules: &str, timeout: Duration) -> Result<Ran> {
    run_in(ns, "nft", &["-f", "-"], rules.as_bytes(), timeout)
}

/// Counts the lines of `program args...` output in `ns` that contain `needle`, e.g. the
/// DNAT rules `iptables-save` lists (to check that a load took effect).
pub fn count_lines_in(ns: &NetNs, program: &str, args: &[&str], needle: &str) -> Result<usize> {
    let netns = File::open(ns.path()).with_context(|| format!("opening {}", ns.name()))?;
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    // SAFETY: as in `run_in`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle))
        .count())
}

/// The first line of `program --version`, or why not.
pub fn version(program: &str) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Ok(out) => format!("`{program} --version` failed ({})", out.status),
        Err(e) => format!("{program} not found: {e}"),
    }
}
