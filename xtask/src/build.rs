//! `cargo xtask build-ebpf` and `cargo xtask build`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::{
    cmd::Cmd,
    setup::{NIGHTLY, SetupOptions, setup},
};

/// Target of the kernel programs.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Where the build puts things.
pub struct Outputs {
    /// The kernel object (ELF with BTF).
    pub ebpf_obj: PathBuf,
    /// The agent binary with the kernel object embedded.
    pub bpfproxy: PathBuf,
}

impl Outputs {
    pub fn new(workspace: &Path) -> Self {
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => workspace.join(t),
            None => workspace.join("target"),
        };
        Outputs {
            ebpf_obj: target.join(BPF_TARGET).join("release").join("proxy-ebpf"),
            bpfproxy: target.join("release").join("bpfproxy"),
        }
    }
}

/// Setup, then the kernel programs with the nightly toolchain.
pub fn build_ebpf(workspace: &Path) -> Result<PathBuf> {
    setup(SetupOptions::default())?;
    println!("==> build-ebpf");
    Cmd::cargo(Some(NIGHTLY))
        .current_dir(workspace)
        // Flags of the outer build must not reach the BPF target.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .args(["build", "-p", "proxy-ebpf", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--release"])
        // aya-ebpf's build helper declares rust-version 1.98, which this nightly (1.97)
        // builds fine; without this cargo refuses before trying.
        .arg("--ignore-rust-version")
        .run()?;
    let obj = Outputs::new(workspace).ebpf_obj;
    if !obj.is_file() {
        bail!("the build did not produce {}", obj.display());
    }
    println!("kernel object: {}", obj.display());
    Ok(obj)
}

/// `build_ebpf`, then the agent (which embeds the kernel object).
pub fn build(workspace: &Path) -> Result<Outputs> {
    let obj = build_ebpf(workspace)?;
    println!("==> build: agent");
    Cmd::cargo(None)
        .current_dir(workspace)
        .env("BPFPROXY_EBPF_OBJ", &obj)
        .args(["build", "--release", "-p", "proxy-userspace"])
        .run()?;
    let out = Outputs::new(workspace);
    if !out.bpfproxy.is_file() {
        bail!("the build did not produce {}", out.bpfproxy.display());
    }
    println!("agent: {}", out.bpfproxy.display());
    Ok(out)
}
