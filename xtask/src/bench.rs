//! `cargo xtask bench [--quick | --smoke]`: builds the agent and `bpfproxy-bench`, installs
//! what the contenders need (`iptables`, `nftables`: part of setup), waits for other builds
//! to finish so they do not skew the figures, and runs the benchmark, which writes
//! `bench/results/<timestamp>.json`, `.md` and plots, and prints the tables.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{build::build, cmd::Cmd};

#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    pub quick: bool,
    pub smoke: bool,
    /// Sections to run, comma separated (all when `None`).
    pub only: Option<String>,
}

/// How long to wait for other `rustc` processes to end before measuring anyway.
const BUILD_WAIT: Duration = Duration::from_secs(300);

fn rustc_processes() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "rustc")
        })
        .count()
}

/// The machine has 2 cores: a build running next to the benchmark skews every figure.
fn wait_for_other_builds() {
    let start = Instant::now();
    let mut told = false;
    loop {
        let n = rustc_processes();
        if n == 0 {
            return;
        }
        if start.elapsed() >= BUILD_WAIT {
            println!(
                "warning: {n} rustc processes still running after {BUILD_WAIT:?}; measuring anyway (the results say so)"
            );
            return;
        }
        if !told {
            println!("{n} rustc processes are running (another build); waiting for them to end");
            told = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

extern "C" fn ignore_signal(_: i32) {}

/// Ctrl-C reaches the benchmark too, which stops and cleans up; this process then waits
/// for it instead of dying first.
fn outlive_interrupts() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler does nothing.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

pub fn bench(workspace: &Path, opts: &BenchOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark creates network namespaces and loads BPF programs: run it as root");
    }
    let out = build(workspace)?;
    println!("==> bench: build bpfproxy-bench");
    Cmd::cargo(None)
        .current_dir(workspace)
        .env("BPFPROXY_EBPF_OBJ", &out.ebpf_obj)
        .args(["build", "--release", "-p", "bpfproxy-bench"])
        .run()?;
    let bin = out.bpfproxy.with_file_name("bpfproxy-bench");
    if !bin.is_file() {
        bail!("the build did not produce {}", bin.display());
    }
    let commit = Cmd::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["rev-parse", "--short", "HEAD"])
        .read()
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    wait_for_other_builds();
    println!("==> bench: run");
    outlive_interrupts()?;
    let mut cmd = Cmd::new(&bin)
        .env("BPFPROXY_BIN", &out.bpfproxy)
        .env("BPFPROXY_EBPF_OBJ", &out.ebpf_obj)
        .env("BPFPROXY_BENCH_COMMIT", &commit)
        .arg("--out")
        .arg(workspace.join("bench").join("results"));
    if opts.quick {
        cmd = cmd.arg("--quick");
    }
    if opts.smoke {
        cmd = cmd.arg("--smoke");
    }
    if let Some(only) = &opts.only {
        cmd = cmd.arg("--only").arg(only);
    }
    cmd.run()
}
