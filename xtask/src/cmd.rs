//! Running external commands: each one is printed before it runs, and a failure names it.

use std::{
    ffi::{OsStr, OsString},
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Variables the outer `cargo run` (or a user's shell) sets that must not leak into the
/// nested cargo invocations: they would pin the toolchain, the compiler or its flags.
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTUP_TOOLCHAIN",
];

/// A command and how to show it.
pub struct Cmd {
    command: Command,
    shown: String,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let program = program.as_ref();
        let name = Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy()
            .into_owned();
        Cmd {
            command: Command::new(program),
            shown: name,
        }
    }

    /// `cargo` through the rustup proxy (so `+nightly` works), with the outer cargo's
    /// toolchain variables removed; `toolchain` adds `+<toolchain>`.
    pub fn cargo(toolchain: Option<&str>) -> Self {
        let mut cmd = Cmd::new(tool("cargo"));
        for var in CARGO_RUN_VARS {
            cmd.command.env_remove(var);
        }
        if let Some(t) = toolchain {
            cmd = cmd.arg(format!("+{t}"));
        }
        cmd
    }

    /// `rustup`/`rustc` through the proxies in the cargo home.
    pub fn rust_tool(name: &str) -> Self {
        let mut cmd = Cmd::new(tool(name));
        for var in CARGO_RUN_VARS {
            cmd.command.env_remove(var);
        }
        cmd
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        self.shown.push(' ');
        self.shown.push_str(&shell_quote(&arg.to_string_lossy()));
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// Sets a variable (shown in front of the command).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        let value = value.as_ref();
        self.shown = format!(
            "{key}={} {}",
            shell_quote(&value.to_string_lossy()),
            self.shown
        );
        self.command.env(key, value);
        self
    }

    /// Removes a variable (shown as `env -u`).
    pub fn env_remove(mut self, key: &str) -> Self {
        if std::env::var_os(key).is_some() {
            self.shown = format!("env -u {key} {}", self.shown);
        }
        self.command.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// Runs with inherited stdio; fails unless it exits 0.
    pub fn run(mut self) -> Result<()> {
        println!("$ {}", self.shown);
        let status = self
            .command
            .status()
            .with_context(|| format!("starting `{}`", self.shown))?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.shown);
        }
        Ok(())
    }

    /// Runs with stdout both shown and appended to `sink` (stderr passes through); fails
    /// unless it exits 0. `sink` has the output either way.
    pub fn run_tee(mut self, sink: &mut String) -> Result<()> {
        println!("$ {}", self.shown);
        let mut child = self
            .command
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", self.shown))?;
        if let Some(out) = child.stdout.take() {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                print!("{line}");
                sink.push_str(&line);
                line.clear();
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.shown);
        }
        Ok(())
    }

    /// Runs and returns stdout (stderr passes through); fails unless it exits 0.
    pub fn read(mut self) -> Result<String> {
        println!("$ {}", self.shown);
        let out = self
            .command
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("starting `{}`", self.shown))?;
        if !out.status.success() {
            bail!("`{}` failed ({})", self.shown, out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs with output hidden and tells whether it exited 0 (for "is X installed?").
    pub fn probe(mut self) -> bool {
        println!("$ {}", self.shown);
        self.command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The cargo home (`$CARGO_HOME`, else `~/.cargo`).
pub fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| OsString::from("/root")))
            .join(".cargo"),
    }
}

/// `<cargo home>/bin/<name>` if it exists (the rustup proxies and `cargo install`ed tools),
/// else `name` as found on PATH.
pub fn tool(name: &str) -> PathBuf {
    let p = cargo_home().join("bin").join(name);
    if p.is_file() { p } else { PathBuf::from(name) }
}

fn shell_quote(s: &str) -> String {
    let shown = s.replace('\x1f', "\\x1f");
    if !shown.is_empty()
        && shown
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+^@%".contains(c))
    {
        shown
    } else {
        format!("'{}'", shown.replace('\'', "'\\''"))
    }
}
