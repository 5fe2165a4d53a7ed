//! `cargo xtask setup`: installs what building and testing need, skipping what is there.
//!
//! - Debian packages `bpftool`, `iproute2` (`ip`) and `util-linux` (`nsenter`), and
//!   `iptables` and `nftables` for the benchmark's contenders, when missing and running as
//!   root;
//! - the nightly toolchain's `rust-src` (for `-Z build-std=core`), and clippy/rustfmt of the
//!   default toolchain;
//! - `bpf-linker` 0.13, built against the nightly's own libLLVM, so the linker and rustc
//!   agree on the LLVM bitcode version.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::{Cmd, cargo_home};

/// The toolchain that builds the kernel programs.
pub const NIGHTLY: &str = "nightly";

#[derive(Clone, Copy, Debug, Default)]
pub struct SetupOptions {
    /// Rebuild bpf-linker even if one works (e.g. after the nightly moved to a new LLVM).
    pub reinstall_bpf_linker: bool,
}

pub fn setup(opts: SetupOptions) -> Result<()> {
    println!("==> setup: system tools");
    system_packages()?;
    println!("==> setup: rust toolchains");
    rust_components()?;
    println!("==> setup: bpf-linker");
    bpf_linker(opts.reinstall_bpf_linker)?;
    println!("==> setup: done");
    Ok(())
}

/// A program the tests and the demo run, the probe that shows it works and its package.
struct SystemTool {
    probe: &'static [&'static str],
    package: &'static str,
}

const SYSTEM_TOOLS: &[SystemTool] = &[
    SystemTool {
        probe: &["bpftool", "version"],
        package: "bpftool",
    },
    SystemTool {
        probe: &["ip", "-V"],
        package: "iproute2",
    },
    SystemTool {
        probe: &["nsenter", "--version"],
        package: "util-linux",
    },
    // The contenders of `cargo xtask bench` (and of its smoke test).
    SystemTool {
        probe: &["iptables", "--version"],
        package: "iptables",
    },
    SystemTool {
        probe: &["nft", "--version"],
        package: "nftables",
    },
];

fn system_packages() -> Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|t| !Cmd::new(t.probe[0]).args(&t.probe[1..]).probe())
        .map(|t| t.package)
        .collect();
    if missing.is_empty() {
        println!("system tools present");
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        println!(
            "warning: missing {} and not root, so not installing them; the e2e tests and \
             the demo need them (and root)",
            missing.join(", ")
        );
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing {} and no apt-get here: install them with your package manager",
            missing.join(", ")
        );
    }
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("update")
        .run()?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .run()?;
    for t in SYSTEM_TOOLS {
        if !Cmd::new(t.probe[0]).args(&t.probe[1..]).probe() {
            bail!(
                "`{}` still does not work after installing {}",
                t.probe.join(" "),
                t.package
            );
        }
    }
    Ok(())
}

fn rust_components() -> Result<()> {
    let toolchains = Cmd::rust_tool("rustup")
        .args(["toolchain", "list"])
        .read()?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        Cmd::rust_tool("rustup")
            .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
            .run()
            .context("the kernel programs need a nightly toolchain")?;
    }
    let installed = Cmd::rust_tool("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .read()?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        println!("rust-src of {NIGHTLY} present");
    } else {
        Cmd::rust_tool("rustup")
            .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
            .run()?;
    }
    // `cargo xtask test` runs clippy and rustfmt with the default toolchain.
    let has_clippy = Cmd::cargo(None).args(["clippy", "--version"]).probe();
    let has_fmt = Cmd::cargo(None).args(["fmt", "--version"]).probe();
    if !(has_clippy && has_fmt) {
        Cmd::rust_tool("rustup")
            .args(["component", "add", "clippy", "rustfmt"])
            .run()?;
    }
    Ok(())
}

/// Major and minor version of the nightly's LLVM, from `rustc -vV`.
fn nightly_llvm_version() -> Result<(u32, u32)> {
    let vv = Cmd::rust_tool("rustc")
        .arg(format!("+{NIGHTLY}"))
        .arg("-vV")
        .read()?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim)
        .context("`rustc -vV` shows no LLVM version")?;
    let mut parts = version.split('.');
    let major = parts.next().and_then(|p| p.parse().ok());
    let minor = parts.next().and_then(|p| p.parse().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => Ok((major, minor)),
        _ => bail!("cannot read LLVM version {version:?}"),
    }
}

fn bpf_linker(reinstall: bool) -> Result<()> {
    if !reinstall
        && Cmd::new(crate::cmd::tool("bpf-linker"))
            .arg("--version")
            .probe()
    {
        println!("bpf-linker works");
        return Ok(());
    }
    let (major, minor) = nightly_llvm_version()?;
    let sysroot = PathBuf::from(
        Cmd::rust_tool("rustc")
            .arg(format!("+{NIGHTLY}"))
            .args(["--print", "sysroot"])
            .read()?
            .trim(),
    );
    // bpf-linker finds libLLVM through this prefix at build time and, by its run path,
    // at run time: it lives in the cargo home, next to the installed binary, so a
    // `cargo clean` does not break the linker.
    let prefix = cargo_home().join(format!("bpf-linker-llvm-{major}"));
    llvm_prefix(&sysroot.join("lib"), &prefix.join("lib"), major, minor)?;
    let mut install = Cmd::cargo(None)
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")]);
    if reinstall {
        install = install.arg("--force");
    }
    install.run()?;
    if !Cmd::new(crate::cmd::tool("bpf-linker"))
        .arg("--version")
        .probe()
    {
        bail!("bpf-linker was installed but `bpf-linker --version` fails");
    }
    Ok(())
}

/// Makes `lib` a folder of symlinks to the toolchain's libLLVM: every `libLLVM*` name there,
/// plus `libLLVM.so` (the name a linker looks for).
fn llvm_prefix(toolchain_lib: &Path, lib: &Path, major: u32, minor: u32) -> Result<()> {
    if lib.exists() {
        std::fs::remove_dir_all(lib).with_context(|| format!("emptying {}", lib.display()))?;
    }
    std::fs::create_dir_all(lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut versioned = None;
    let mut any = None;
    for entry in std::fs::read_dir(toolchain_lib)
        .with_context(|| format!("reading {}", toolchain_lib.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("libLLVM") || name == "libLLVM.so" {
            continue;
        }
        if name.starts_with(&format!("libLLVM.so.{major}.{minor}-rust-")) {
            versioned = Some(entry.path());
        } else if name.starts_with(&format!("libLLVM-{major}-rust-")) && name.ends_with(".so") {
            any = Some(entry.path());
        }
        link(&entry.path(), &lib.join(&name))?;
    }
    let target = versioned.or(any).with_context(|| {
        format!(
            "no libLLVM {major}.{minor} in {} (is the nightly toolchain complete?)",
            toolchain_lib.display()
        )
    })?;
    link(&target, &lib.join("libLLVM.so"))
}

fn link(target: &Path, link: &Path) -> Result<()> {
    println!("$ ln -s {} {}", target.display(), link.display());
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}
