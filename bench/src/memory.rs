//! Section 4: what the agent costs in memory, and how long it takes from start to every
//! service programmed.
//!
//! The real agent runs in a throw-away node namespace (no pods: its interface pattern
//! matches nothing) with the synthetic services in its manifests directory and its default
//! map sizes. Once its log says all services are in the maps, its VmRSS and VmHWM are read
//! from /proc and the `bytes_memlock` of each pinned map from `bpftool map show`.

use anyhow::{Context as _, Result};
use testbed::NetNs;

use proxy_common::maps;

use crate::{agent, cluster, config::Settings, figures::Figure, report};

const MIB: f64 = 1024.0 * 1024.0;

pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &n in &settings.memory_scales {
        let services = cluster::fillers(n, settings.endpoints_per_service);
        let (mut rss, mut peak, mut memlock, mut ready) = (vec![], vec![], vec![], vec![]);
        let mut cpu = vec![];
        for run in 0..settings.memory_runs {
            if testbed::stop_requested() {
                anyhow::bail!("interrupted");
            }
            let id = testbed::unique_run_id();
            let node = NetNs::create(&format!("bp{id}-node"))?;
            let running = agent::start(&node, &id, &format!("bpv{id}-*"), &services)
                .with_context(|| format!("agent with {n} services"))?;
            let m = running.memory()?;
            let Some(busy) = running.cpu_until_idle else {
                anyhow::bail!(
                    "the agent serving {n} services did not go idle within {:?}",
                    agent::IDLE_TIMEOUT
                );
            };
            cpu.push(busy.as_secs_f64());
            eprintln!(
                "memory: {n} services, run {run}: agent ready after {:.2} s, idle after {:.2} s of CPU, RSS {:.1} MiB (peak {:.1}), maps {:.1} MiB",
                running.ready_after.as_secs_f64(),
                busy.as_secs_f64(),
                m.rss_bytes / MIB,
                m.peak_rss_bytes / MIB,
                m.maps_memlock_bytes / MIB
            );
            rss.push(m.rss_bytes / MIB);
            peak.push(m.peak_rss_bytes / MIB);
            memlock.push(m.maps_memlock_bytes / MIB);
            ready.push(running.ready_after.as_secs_f64());
            drop(running);
            drop(node);
        }
        figures.push(Figure::new(
            "memory",
            "agent_rss",
            "bpfproxy",
            n,
            "MiB",
            rss,
        ));
        figures.push(Figure::new(
            "memory",
            "agent_peak_rss",
            "bpfproxy",
            n,
            "MiB",
            peak,
        ));
        figures.push(Figure::new(
            "memory",
            "maps_memlock",
            "bpfproxy",
            n,
            "MiB",
            memlock,
        ));
        figures.push(Figure::new(
            "control",
            "agent_start",
            "bpfproxy",
            n,
            "s",
            ready,
        ));
        figures.push(Figure::new(
            "control",
            "agent_start_cpu",
            "bpfproxy",
            n,
            "s",
            cpu,
        ));
    }
    notes.push(format!(
        "memory: the maps are preallocated at the agent's default sizes ({} services, {} \
         backend slots, {} connections, ...), so their memlock does not grow with the number \
         of services",
        report::count(maps::DEFAULT_SERVICES as usize),
        report::count(maps::DEFAULT_BACKEND_SLOTS as usize),
        report::count(maps::DEFAULT_CONNTRACK as usize)
    ));
    Ok(figures)
}
