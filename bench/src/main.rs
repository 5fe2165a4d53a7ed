//! `bpfproxy-bench`: the figures of issue 7, run by `cargo xtask bench` (`--quick` for about
//! two minutes, `--smoke` for the test that keeps this harness working).
//!
//! 1. datapath cost per packet with BPF_PROG_TEST_RUN against the `tc_floor` program;
//! 2. end to end through a ClusterIP with real TCP, bpfproxy against kube-proxy's iptables
//!    and nftables rule layouts and against direct access;
//! 3. control plane: programming N services and one endpoint change;
//! 4. memory of the agent;
//! 5. the Kubernetes API source: event to map, and the initial sync;
//! 6. the XDP external view (`xdp_nodeport`) per packet against the `xdp_floor` program.
//!
//! Everything runs inside network namespaces made here (see the `testbed` crate for the
//! rules it keeps): nothing is added to the root namespace and nothing is sent outside.
//! Results go to `<out>/<timestamp>.json` (raw figures and the machine), `<timestamp>.md`
//! (tables) and `<timestamp>/*.svg` (plots), the stem ending in the sections of `--only`;
//! a full run of every section also writes `<out>/latest.md`.

mod agent;
mod api;
mod cluster;
mod config;
mod control;
mod datapath;
mod e2e;
mod figures;
mod load;
mod machine;
mod memory;
mod netfilter;
mod report;
mod rules;
mod xdp;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use crate::{
    config::{Mode, Settings},
    machine::Machine,
    report::Results,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Datapath,
    E2e,
    Control,
    Memory,
    Api,
    Xdp,
}

#[derive(Parser)]
#[command(
    name = "bpfproxy-bench",
    about = "bpfproxy against iptables, nftables and direct access, in throw-away network namespaces (root)"
)]
struct Cli {
    /// About two minutes: fewer scales, runs and seconds.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny sizes, seconds in all: checks that the harness works.
    #[arg(long)]
    smoke: bool,
    /// Folder for the results.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only these sections (comma separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Measure nothing: write the iptables-restore and nft inputs of N services (and of one
    /// endpoint change) into --out, to look at or to load by hand.
    #[arg(long, value_name = "N")]
    write_rules: Option<usize>,
    /// Measure nothing but run one repeated datapath figure (e.g. `established`) over and
    /// over, for a profiler (`perf record -a -g`) to watch.
    #[arg(long, value_name = "FIGURE")]
    spin: Option<String>,
    /// With --spin: services programmed.
    #[arg(long, default_value_t = 1)]
    spin_services: usize,
    /// With --spin: how long.
    #[arg(long, default_value_t = 10.0)]
    spin_seconds: f64,
}

/// The rule files of `n` services, as section 3 loads them.
fn write_rules(out: &Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let services = cluster::fillers(n, 2);
    let target = n / 2;
    let after = cluster::with_changed_endpoint(&services[target], target);
    let mut changed = services.clone();
    changed[target] = after.clone();
    let files = [
        ("iptables-base.rules".to_string(), rules::iptables_base()),
        (
            format!("iptables-{n}.rules"),
            rules::iptables_full(&services),
        ),
        (
            format!("iptables-{n}-change.rules"),
            rules::iptables_endpoint_change(&changed, &services[target], &after),
        ),
        (format!("nft-{n}.nft"), rules::nft_full(&services)),
        (
            format!("nft-{n}-change.nft"),
            rules::nft_endpoint_change(&services[target], &after),
        ),
    ];
    for (name, text) in files {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

extern "C" fn on_signal(_: i32) {
    testbed::request_stop();
}

/// Ctrl-C and SIGTERM ask every loop to stop; the guards then remove what was made.
fn catch_interrupts() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent inherits this: its log then has no colour codes to read through.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("NO_COLOR", "1") };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bpfproxy-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn methods(s: &Settings, m: &Machine) -> Vec<String> {
    vec![
        format!(
            "Datapath: BPF_PROG_TEST_RUN of tc_ingress on frames built with etherparse, after \
             programming the services with the real planner and KernelMaps::apply on an \
             unpinned object (same map sizes at every scale). Repeated figures: repeat {} on \
             one skb, each checked against the stats counter of its path; the measured \
             service is its own backend (VIP:80 -> VIP:80), so every repeated run rewrites \
             and stays on the established (or reply) path. New connections: the median of \
             {} single runs (repeat 1) of SYNs from distinct source ports, with tc_floor single \
             runs interleaved as their floor. Each figure: median of {} runs, the runs \
             going round the scales (one loaded object each); ratios to tc_floor of the \
             same run. One flow per figure, so its map entries stay cache-hot.",
            s.datapath_repeat, s.new_conn_samples, s.datapath_runs
        ),
        format!(
            "End to end: for each contender fresh namespaces (node, 1 client pod, {} backend \
             pods, testbed topology), the same Rust HTTP servers and client; the measured \
             service last of the N (last rule of KUBE-SERVICES), {} endpoints per other \
             service. Every client and server thread runs on one CPU (CPU {}), so a round \
             trip is CPU work rather than an idle vCPU's wake-up and the rate is what one CPU \
             sustains. Connection rate: {} client threads, each connect / one request with \
             Connection: close / read to the end / close, for {} s after a 0.3 s warm-up. \
             Latency: one kept-alive connection, requests one after the other for {} s after \
             200 warm-up requests. {} rounds, the contenders taking turns; ratios pair each run \
             with direct access's run of the same round. bpfproxy: the real agent binary in \
             the node namespace on the node-side veths, reading the services from manifest \
             files of {} services each, its periodic resync off while measuring (no \
             contender runs a control plane then). iptables: kube-proxy's nat layout \
             loaded with iptables-restore ({}). nftables: kube-proxy's table loaded with nft -f \
             ({}). Direct: the client connects to the backend pod addresses in turn.",
            s.backends,
            s.endpoints_per_service,
            load::load_cpu(),
            s.client_threads,
            s.conn_rate_secs,
            s.latency_secs,
            s.e2e_rounds,
            agent::FILE_SERVICES,
            m.iptables,
            m.nft
        ),
        format!(
            "Control plane: services with {} endpoints each. bpfproxy: plan + map writes in \
             process on a fresh unpinned object sized for N (object load not timed); the \
             endpoint change is planned against the whole state, as the agent does. iptables: \
             the whole iptables-restore --noflush command of kube-proxy's full sync, in a \
             throw-away namespace; the endpoint change is kube-proxy's partial sync (KUBE-SERVICES \
             in full, the changed service chain, the new endpoint chain, the old one deleted). \
             nftables: the whole nft -f command of kube-proxy's ruleset; the change is the \
             transaction kube-proxy sends (new endpoint chain, service chain rewritten, old \
             endpoint chain flushed). Rule generation is not timed. A command still running \
             after {} s is killed and its figure marked as cut off (a lower bound). {} runs \
             per figure; ratios to bpfproxy of the same run. Agent start: the real agent from \
             spawn to its log saying every service is in the maps (manifest parsing \
             included; files of {} services), and its CPU time (utime + stime) from start \
             until it uses under 20 ms of CPU in a second.",
            s.endpoints_per_service,
            s.netfilter_timeout_secs,
            s.control_runs,
            agent::FILE_SERVICES
        ),
        format!(
            "Memory: the real agent with default map sizes in a throw-away node namespace; \
             VmRSS and VmHWM from /proc once every service is programmed, bytes_memlock of \
             each pinned map from bpftool. {} runs per figure.",
            s.memory_runs
        ),
        format!(
            "Kubernetes API source: the real agent (bpfproxy run --kubeconfig) in a throw-away \
             namespace watching the test API server (testbed::ApiServer) there, which holds \
             one Service and one EndpointSlice per service; the bench reads the pinned maps \
             with aya. Event to map: from just before the server stores the change (its watch \
             event goes out from there) until a poll of services4 every ~50 µs sees it (an \
             endpoint change: the service's live backend table flips; a new service: its \
             entry with every backend); {} events of each kind per scale, one at a time. \
             Initial sync: {} services x {} endpoints on empty pins, from spawning the agent \
             to its log saying all are programmed (polled every 5 ms), and from the agent's \
             log timestamps, from both initial lists done to the maps written; {} runs.",
            s.api_events, s.api_sync_services, s.api_sync_endpoints, s.api_sync_runs
        ),
        format!(
            "XDP external view: BPF_PROG_TEST_RUN of xdp_nodeport on an unpinned object \
             programmed with the harness's map writes (a NodePort to a local backend, one to \
             a backend on another node, SNAT port range of 10,000), NODE_F_FIB_FORWARD off. \
             Repeated figures: repeat {} on one frame, each checked against its stats \
             counter, on connections whose translation gives back the same tuple (the \
             SNAT-ed one's conntrack entries written directly). New connections: the median \
             of {} single runs of SYNs from distinct source ports, with xdp_floor single runs \
             interleaved as their floor; their entries removed after each run. {} runs; \
             ratios to xdp_floor of the same run.",
            s.datapath_repeat, s.new_conn_samples, s.datapath_runs
        ),
    ]
}

fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(n) = cli.write_rules {
        return write_rules(&cli.out, n.max(1));
    }
    testbed::require_root()?;
    catch_interrupts()?;
    let mode = if cli.smoke {
        Mode::Smoke
    } else if cli.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    let settings = Settings::new(mode);
    if let Some(metric) = &cli.spin {
        let ns = datapath::spin(&settings, metric, cli.spin_services, cli.spin_seconds)?;
        println!(
            "{metric} at {} services: {ns:.1} ns per packet",
            cli.spin_services
        );
        return Ok(());
    }
    let wanted = |s: Section| cli.only.is_empty() || cli.only.contains(&s);
    let started = jiff::Timestamp::now();
    let clock = Instant::now();
    let machine = Machine::describe();
    for (tool, version) in [
        ("iptables", &machine.iptables),
        ("nft", &machine.nft),
        ("bpftool", &machine.bpftool),
    ] {
        if version.contains("not found") {
            bail!("{tool} is missing: {version} (`cargo xtask bench` installs it)");
        }
    }
    testbed::agent::ensure_bpffs()?;
    eprintln!(
        "bpfproxy-bench: {mode:?} run on Linux {}, {} ({} cores); {}; {}",
        machine.kernel, machine.cpu_model, machine.cores, machine.iptables, machine.nft
    );
    if machine.rustc_processes_at_start > 0 {
        eprintln!(
            "warning: {} rustc processes are running: the figures will be noisier",
            machine.rustc_processes_at_start
        );
    }

    let mut notes = Vec::new();
    let mut figures = Vec::new();
    if wanted(Section::Datapath) {
        figures.extend(datapath::run(&settings, &mut notes).context("datapath")?);
    }
    if wanted(Section::E2e) {
        figures.extend(e2e::run(&settings, &mut notes).context("end to end")?);
    }
    if wanted(Section::Control) {
        figures.extend(control::run(&settings, &mut notes).context("control plane")?);
    }
    if wanted(Section::Memory) {
        figures.extend(memory::run(&settings, &mut notes).context("memory")?);
    }
    if wanted(Section::Api) {
        figures.extend(api::run(&settings, &mut notes).context("Kubernetes API source")?);
    }
    if wanted(Section::Xdp) {
        figures.extend(xdp::run(&settings, &mut notes).context("XDP external view")?);
    }
    let rustc_at_end = machine::processes_named("rustc");
    if rustc_at_end > 0 {
        notes.push(format!(
            "{rustc_at_end} rustc processes were running when the run ended"
        ));
    }

    let results = Results {
        schema: report::SCHEMA.into(),
        started: started.round(jiff::Unit::Second)?.to_string(),
        mode,
        duration_secs: clock.elapsed().as_secs_f64(),
        methods: methods(&settings, &machine),
        machine,
        settings,
        notes,
        figures,
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let mut stem = started
        .round(jiff::Unit::Second)?
        .strftime("%Y-%m-%dT%H-%M-%SZ")
        .to_string();
    match mode {
        Mode::Full => {}
        Mode::Quick => stem.push_str("-quick"),
        Mode::Smoke => stem.push_str("-smoke"),
    }
    // A run of some sections only is named after them, and is never `latest.md`.
    for section in &cli.only {
        if let Some(name) = section.to_possible_value() {
            stem.push('-');
            stem.push_str(name.get_name());
        }
    }
    let json = cli.out.join(format!("{stem}.json"));
    write_atomically(&json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    let plots: Vec<(String, String)> = report::plots(&results.figures, &cli.out.join(&stem))?
        .into_iter()
        .map(|(title, file)| (title, format!("{stem}/{}", file.display())))
        .collect();
    let md = report::markdown(&results, &plots);
    write_atomically(&cli.out.join(format!("{stem}.md")), md.as_bytes())?;
    if mode == Mode::Full && cli.only.is_empty() {
        write_atomically(&cli.out.join("latest.md"), md.as_bytes())?;
    }
    println!("{md}");
    eprintln!("bpfproxy-bench: results in {}", json.display());
    Ok(())
}
