//! Section 3: the time to program N services, and to apply one endpoint change at that
//! scale.
//!
//! - bpfproxy: in process, on a freshly loaded unpinned object (map sizes fit N): the
//!   planner's `plan` against the mirror of the maps plus `KernelMaps::apply`, timed
//!   together; the change is planned against the full state, as the agent does.
//! - iptables: in a throw-away namespace with kube-proxy's jumps from the built-in chains,
//!   the whole `iptables-restore --noflush` command of kube-proxy's full sync; the change is
//!   what kube-proxy's partial sync writes (KUBE-SERVICES in full, the changed service's
//!   chain, the new endpoint chain, the old one deleted), again one whole command.
//! - nftables: in a throw-away namespace, the whole `nft -f -` command of kube-proxy's
//!   ruleset; the change is the small transaction kube-proxy sends (new endpoint chain, the
//!   service chain rewritten, the old endpoint chain flushed).
//!
//! Rule generation is not timed (kube-proxy's own generation time is not counted either),
//! nor is loading the eBPF object. A command still running after the settings' timeout is
//! killed: its figure is a lower bound, the scale gets no further runs of it, and its
//! endpoint change cannot be measured there.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use testbed::NetNs;

use crate::{
    cluster,
    config::Settings,
    datapath::{Loaded, sizes_for},
    figures::Figure,
    netfilter::{self, Ran},
    rules,
};

fn throwaway_ns() -> Result<NetNs> {
    NetNs::create(&format!("bp{}-cp", testbed::unique_run_id()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Netfilter {
    Iptables,
    Nftables,
}

impl Netfilter {
    fn name(self) -> &'static str {
        match self {
            Netfilter::Iptables => "iptables",
            Netfilter::Nftables => "nftables",
        }
    }

    fn load(self, ns: &NetNs, rules: &str, timeout: Duration) -> Result<Ran> {
        match self {
            Netfilter::Iptables => netfilter::iptables_restore(ns, rules, timeout),
            Netfilter::Nftables => netfilter::nft_apply(ns, rules, timeout),
        }
    }

    /// DNAT rules in the namespace's ruleset.
    fn dnat_rules(self, ns: &NetNs) -> Result<usize> {
        match self {
            Netfilter::Iptables => {
                netfilter::count_lines_in(ns, "iptables-save", &["-t", "nat"], "-j DNAT")
            }
            Netfilter::Nftables => netfilter::count_lines_in(
                ns,
                "nft",
                &["list", "table", "ip", "kube-proxy"],
                "dnat to",
            ),
        }
    }
}

/// Runs of one netfilter contender at one scale.
#[derive(Default)]
struct NetfilterRuns {
    program: Vec<f64>,
    change: Vec<f64>,
    cut_off: bool,
}

/// One run in a fresh namespace: the full load, then (if it finished) the change.
/// `check` counts the DNAT rules after each, expecting `dnat`.
fn netfilter_run(
    nf: Netfilter,
    full: &str,
    change: &str,
    dnat: usize,
    check: bool,
    timeout: Duration,
) -> Result<(Ran, Option<Duration>)> {
    let ns = throwaway_ns()?;
    if nf == Netfilter::Iptables {
        nf.load(&ns, &rules::iptables_base(), timeout)?
            .finished()
            .context("kube-proxy's jumps")?;
    }
    let ran = nf.load(&ns, full, timeout).context("full load")?;
    if let Ran::TimedOut(_) = ran {
        return Ok((ran, None));
    }
    if check {
        ensure!(nf.dnat_rules(&ns)? == dnat, "not every DNAT rule is loaded");
    }
    let changed = nf
        .load(&ns, change, timeout)?
        .finished()
        .context("endpoint change")?;
    if check {
        ensure!(nf.dnat_rules(&ns)? == dnat, "the change lost DNAT rules");
    }
    Ok((ran, Some(changed)))
}

pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let e = settings.endpoints_per_service;
    let timeout = settings.netfilter_timeout();
    for &n in &settings.control_scales {
        let services = cluster::fillers(n, e);
        let target = n / 2;
        let after = cluster::with_changed_endpoint(&services[target], target);
        let mut changed = services.clone();
        changed[target] = after.clone();
        let desired = cluster::desired_state(&services);
        let desired_changed = cluster::desired_state(&changed);
        let inputs = [
            (
                Netfilter::Iptables,
                rules::iptables_full(&services),
                rules::iptables_endpoint_change(&changed, &services[target], &after),
            ),
            (
                Netfilter::Nftables,
                rules::nft_full(&services),
                rules::nft_endpoint_change(&services[target], &after),
            ),
        ];

        let (mut bp_program, mut bp_change) = (Vec::new(), Vec::new());
        let mut nf_runs: [NetfilterRuns; 2] = Default::default();
        for run in 0..settings.control_runs {
            if testbed::stop_requested() {
                anyhow::bail!("interrupted");
            }
            let mut l = Loaded::load(sizes_for(n, e))?;
            let program = l.program(&desired)?;
            let change = l.program(&desired_changed)?;
            drop(l);
            bp_program.push(ms(program.total()));
            bp_change.push(ms(change.total()));
            if run == 0 {
                notes.push(format!(
                    "control, {n} services, bpfproxy (first run): programming = plan {:.1} ms + {} map writes {:.1} ms; endpoint change = plan {:.2} ms + {} map writes {:.2} ms",
                    ms(program.plan),
                    program.ops,
                    ms(program.apply),
                    ms(change.plan),
                    change.ops,
                    ms(change.apply)
                ));
            }
            let mut line = format!(
                "control: {n} services, run {run}: bpfproxy {:.1} ms, change {:.2} ms",
                ms(program.total()),
                ms(change.total())
            );
            for ((nf, full, change), runs) in inputs.iter().zip(&mut nf_runs) {
                if runs.cut_off {
                    continue;
                }
                let (ran, changed) = netfilter_run(*nf, full, change, n * e, run == 0, timeout)
                    .with_context(|| format!("{} with {n} services", nf.name()))?;
                match ran {
                    Ran::Took(d) => {
                        runs.program.push(ms(d));
                        line.push_str(&format!("; {} {:.1} ms", nf.name(), ms(d)));
                    }
                    Ran::TimedOut(d) => {
                        runs.program.push(ms(d));
                        runs.cut_off = true;
                        line.push_str(&format!(
                            "; {} cut off after {:.0} s",
                            nf.name(),
                            d.as_secs_f64()
                        ));
                        notes.push(format!(
                            "control, {n} services: {} was still loading after {:.0} s and was killed; the figure is a lower bound and its endpoint change was not measured at this scale",
                            nf.name(),
                            d.as_secs_f64()
                        ));
                    }
                }
                if let Some(c) = changed {
                    runs.change.push(ms(c));
                    line.push_str(&format!(", change {:.2} ms", ms(c)));
                }
            }
            eprintln!("{line}");
        }
        for ((nf, ..), runs) in inputs.iter().zip(nf_runs) {
            figures.push(
                Figure::new("control", "program", nf.name(), n, "ms", runs.program)
                    .with_ratio("bpfproxy", &bp_program)
                    .lower_bound(runs.cut_off),
            );
            if !runs.change.is_empty() {
                figures.push(
                    Figure::new(
                        "control",
                        "endpoint_change",
                        nf.name(),
                        n,
                        "ms",
                        runs.change,
                    )
                    .with_ratio("bpfproxy", &bp_change),
                );
            }
        }
        figures.push(Figure::new(
            "control", "program", "bpfproxy", n, "ms", bp_program,
        ));
        figures.push(Figure::new(
            "control",
            "endpoint_change",
            "bpfproxy",
            n,
            "ms",
            bp_change,
        ));
    }
    Ok(figures)
}
