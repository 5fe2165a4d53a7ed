//! `cargo xtask`: bpfproxy's build, test and demo tasks. Each installs what it needs.

mod bench;
mod build;
mod cmd;
mod demo;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and demo bpfproxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain parts and tools the build needs (idempotent).
    Setup {
        /// Rebuild bpf-linker even if one works (e.g. after a nightly update).
        #[arg(long)]
        reinstall_bpf_linker: bool,
    },
    /// Setup, then build the kernel programs (target/bpfel-unknown-none/release/proxy-ebpf).
    BuildEbpf,
    /// Build-ebpf, then the agent with the kernel object embedded (target/release/bpfproxy).
    Build,
    /// Build, run all tests (end-to-end ones need root), clippy and rustfmt.
    Test,
    /// Build, then show bpfproxy balancing a service in throw-away namespaces (root).
    Demo,
    /// Build, then benchmark bpfproxy against iptables, nftables and direct access in
    /// throw-away namespaces (root); results under bench/results.
    Bench {
        /// About two minutes: fewer scales, runs and seconds.
        #[arg(long)]
        quick: bool,
        /// Tiny sizes: only checks that the harness works.
        #[arg(long, conflicts_with = "quick")]
        smoke: bool,
        /// Only these sections: datapath,e2e,control,memory.
        #[arg(long)]
        only: Option<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Puts the cargo home's bin first on PATH, so the rustup proxies (which understand
/// `+nightly`) and `cargo install`ed tools like bpf-linker are found by nested builds.
fn cargo_bin_first_on_path() {
    let bin = cmd::cargo_home().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).filter(|p| *p != bin).collect();
    dirs.insert(0, bin);
    if let Ok(joined) = std::env::join_paths(dirs) {
        // SAFETY: called first thing in main, before any thread exists.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn main() -> ExitCode {
    cargo_bin_first_on_path();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    let ws = workspace_root();
    match command {
        Command::Setup {
            reinstall_bpf_linker,
        } => setup::setup(setup::SetupOptions {
            reinstall_bpf_linker,
        }),
        Command::BuildEbpf => build::build_ebpf(&ws).map(|_| ()),
        Command::Build => build::build(&ws).map(|_| ()),
        Command::Test => test::test(&ws),
        Command::Demo => demo::demo(&ws),
        Command::Bench { quick, smoke, only } => {
            bench::bench(&ws, &bench::BenchOptions { quick, smoke, only })
        }
    }
}
