//! Section 2: real TCP through the ClusterIP, one contender at a time.
//!
//! Every contender gets fresh namespaces (a node, one client pod, the backend pods, wired by
//! the testbed), the same backend servers and the same client, and the same services
//! (fillers first, the measured service last, so it is the last rule iptables scans). When
//! it is done everything is torn down: the agent stopped, the namespaces (and with them
//! every rule and attachment) deleted. The contenders take turns within a round, starting
//! one further along each round, and each figure pairs a contender's run with direct
//! access's run of the same round.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result};
use testbed::Topology;

use crate::{
    agent,
    cluster::{self, MEASURED_PORT, MEASURED_VIP},
    config::Settings,
    figures::Figure,
    load::{self, Server},
    netfilter, rules,
};

/// Server threads per backend pod.
const SERVER_WORKERS: usize = 6;
/// Load before the measured one, not counted.
const WARM_UP: Duration = Duration::from_millis(300);
/// Bound on loading a contender's rules (about a minute each at 10,000 services here).
const LOAD_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Bpfproxy,
    Iptables,
    Nftables,
}

pub const CONTENDERS: [Contender; 4] = [
    Contender::Direct,
    Contender::Bpfproxy,
    Contender::Iptables,
    Contender::Nftables,
];

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Bpfproxy => "bpfproxy",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
        }
    }
}

/// A figure of a sample: metric name, unit, value.
type Metric = (&'static str, &'static str, fn(&Sample) -> f64);

#[derive(Clone, Copy, Debug)]
struct Sample {
    conn_rate: f64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    requests: usize,
}

fn run_contender(settings: &Settings, contender: Contender, n: usize) -> Result<Sample> {
    let topo = Topology::new(1, settings.backends)?;
    let _servers: Vec<Server> = topo
        .backends
        .iter()
        .map(|p| Server::start(&p.ns, MEASURED_PORT, SERVER_WORKERS))
        .collect::<Result<_>>()?;
    let backend_ips: Vec<_> = topo.backends.iter().map(|p| p.ip).collect();
    let services = cluster::with_measured(
        n,
        settings.endpoints_per_service,
        cluster::measured(&backend_ips),
    );
    let targets: Vec<SocketAddrV4> = match contender {
        Contender::Direct => backend_ips
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, MEASURED_PORT))
            .collect(),
        _ => vec![SocketAddrV4::new(MEASURED_VIP, MEASURED_PORT)],
    };
    // Declared after the servers and the topology, so it is dropped (stopped) first.
    let mut _agent = None;
    match contender {
        Contender::Direct => {}
        Contender::Bpfproxy => {
            let running = agent::start(
                &topo.node,
                &topo.run,
                &topo.node_interfaces_glob(),
                &services,
            )?;
            running
                .agent
                .wait_for_backends(
                    cluster::NAMESPACE,
                    cluster::MEASURED_NAME,
                    MEASURED_PORT,
                    &backend_ips,
                )
                .context("the measured service")?;
            _agent = Some(running);
        }
        Contender::Iptables => {
            netfilter::iptables_restore(&topo.node, &rules::iptables_base(), LOAD_TIMEOUT)?
                .finished()?;
            netfilter::iptables_restore(
                &topo.node,
                &rules::iptables_full(&services),
                LOAD_TIMEOUT,
            )?
            .finished()
            .context("loading the rules")?;
        }
        Contender::Nftables => {
            netfilter::nft_apply(&topo.node, &rules::nft_full(&services), LOAD_TIMEOUT)?
                .finished()
                .context("loading the rules")?;
        }
    }
    let client = &topo.client().ns;
    load::wait_reachable(client, targets[0], Duration::from_secs(10))?;
    load::connection_rate(client, &targets, settings.client_threads, WARM_UP)?;
    let rate = load::connection_rate(
        client,
        &targets,
        settings.client_threads,
        settings.conn_rate_time(),
    )?;
    let latency = load::request_latency(client, targets[0], settings.latency_time())?;
    Ok(Sample {
        conn_rate: rate.per_second(),
        errors: rate.errors,
        p50_us: latency.p50_us,
        p99_us: latency.p99_us,
        requests: latency.requests,
    })
}

pub fn run(settings: &Settings, notes: &mut Vec<String>) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &n in &settings.e2e_scales {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); CONTENDERS.len()];
        for round in 0..settings.e2e_rounds {
            for k in 0..CONTENDERS.len() {
                let i = (k + round) % CONTENDERS.len();
                let c = CONTENDERS[i];
                if testbed::stop_requested() {
                    anyhow::bail!("interrupted");
                }
                let s = run_contender(settings, c, n)
                    .with_context(|| format!("{} with {n} services", c.name()))?;
                eprintln!(
                    "e2e: {n} services, round {round}, {:<8}: {:>8.0} conn/s ({} errors), p50 {:.1} us, p99 {:.1} us ({} requests)",
                    c.name(),
                    s.conn_rate,
                    s.errors,
                    s.p50_us,
                    s.p99_us,
                    s.requests
                );
                samples[i].push(s);
            }
        }
        let direct = &samples[0];
        let reference = |f: fn(&Sample) -> f64| direct.iter().map(f).collect::<Vec<f64>>();
        for (c, runs) in CONTENDERS.iter().zip(&samples) {
            let errors: u64 = runs.iter().map(|s| s.errors).sum();
            if errors > 0 {
                notes.push(format!(
                    "e2e, {n} services, {}: {errors} failed connections over the rounds",
                    c.name()
                ));
            }
            let metrics: [Metric; 3] = [
                ("conn_rate", "conn/s", |s| s.conn_rate),
                ("latency_p50", "us", |s| s.p50_us),
                ("latency_p99", "us", |s| s.p99_us),
            ];
            for (metric, unit, get) in metrics {
                let fig = Figure::new(
                    "e2e",
                    metric,
                    c.name(),
                    n,
                    unit,
                    runs.iter().map(get).collect(),
                );
                figures.push(if *c == Contender::Direct {
                    fig
                } else {
                    fig.with_ratio("direct", &reference(get))
                });
            }
        }
    }
    Ok(figures)
}
