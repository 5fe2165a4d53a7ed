//! What the figures were measured on.

use std::fs;

use serde::{Deserialize, Serialize};

use crate::netfilter::version;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    pub memory_bytes: u64,
    /// `iptables --version`: the backend (nf_tables or legacy) is in parentheses.
    pub iptables: String,
    pub nft: String,
    pub bpftool: String,
    /// 1-minute load average when the run started.
    pub loadavg_at_start: f64,
    /// Other `rustc` processes when the run started (builds skew the figures).
    pub rustc_processes_at_start: usize,
    /// `BPFPROXY_BENCH_COMMIT`, set by `cargo xtask bench`.
    #[serde(default)]
    pub commit: String,
}

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Processes whose command name is `name`.
pub fn processes_named(name: &str) -> usize {
    let Ok(entries) = fs::read_dir("/proc") else {
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
        .filter(|e| fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .count()
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_bytes,
            iptables: version("iptables"),
            nft: version("nft"),
            bpftool: version("bpftool"),
            loadavg_at_start: read("/proc/loadavg")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
            rustc_processes_at_start: processes_named("rustc"),
            commit: std::env::var("BPFPROXY_BENCH_COMMIT").unwrap_or_default(),
        }
    }
}
