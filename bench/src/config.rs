//! How much of everything a run measures: the full run, `--quick` (about two minutes) and
//! `--smoke` (tiny sizes, for the test that keeps the harness working).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

/// Sizes, counts and durations of one run; saved with the results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub mode: Mode,
    /// Section 1: services programmed.
    pub datapath_scales: Vec<usize>,
    /// Section 1: runs per figure (each a `repeat` test run, or a batch of single runs).
    pub datapath_runs: usize,
    /// Section 1: BPF_PROG_TEST_RUN `repeat` of the repeated figures.
    pub datapath_repeat: u32,
    /// Section 1: single runs (repeat 1, distinct source ports) per new-connection run.
    pub new_conn_samples: usize,
    /// Section 2: services programmed, the measured one last.
    pub e2e_scales: Vec<usize>,
    /// Section 2: rounds; each round runs every contender once, in fresh namespaces.
    pub e2e_rounds: usize,
    /// Section 2: how long the connection-rate load runs.
    pub conn_rate_secs: f64,
    /// Section 2: how long the request-latency load runs.
    pub latency_secs: f64,
    /// Section 2: client threads of the connection-rate load.
    pub client_threads: usize,
    /// Section 2: backend pods of the measured service.
    pub backends: usize,
    /// Section 3: services programmed.
    pub control_scales: Vec<usize>,
    /// Section 3: runs per figure.
    pub control_runs: usize,
    /// Section 3: an `iptables-restore` or `nft -f` still running after this long is
    /// killed and the figure recorded as a lower bound (no further runs at that scale).
    pub netfilter_timeout_secs: f64,
    /// Endpoints of every service that is not measured end to end.
    pub endpoints_per_service: usize,
    /// Section 4: services the agent serves while its memory is read.
    pub memory_scales: Vec<usize>,
    /// Section 4: agent starts per scale.
    pub memory_runs: usize,
    /// Section 5: services in the cluster while API events are measured.
    #[serde(default)]
    pub api_scales: Vec<usize>,
    /// Section 5: endpoint changes, and services added, per scale.
    #[serde(default)]
    pub api_events: usize,
    /// Section 5: endpoints per service of the event runs.
    #[serde(default)]
    pub api_endpoints: usize,
    /// Section 5: services of the initial-sync runs.
    #[serde(default)]
    pub api_sync_services: usize,
    /// Section 5: endpoints per service of the initial-sync runs.
    #[serde(default)]
    pub api_sync_endpoints: usize,
    /// Section 5: initial-sync runs.
    #[serde(default)]
    pub api_sync_runs: usize,
}

impl Settings {
    pub fn new(mode: Mode) -> Self {
        match mode {
            Mode::Full => Settings {
                mode,
                datapath_scales: vec![1, 1_000, 10_000, 100_000],
                datapath_runs: 7,
                datapath_repeat: 1_000_000,
                new_conn_samples: 3_000,
                e2e_scales: vec![1, 1_000, 10_000],
                e2e_rounds: 3,
                conn_rate_secs: 4.0,
                latency_secs: 2.0,
                client_threads: 4,
                backends: 2,
                control_scales: vec![1_000, 10_000, 50_000],
                control_runs: 3,
                netfilter_timeout_secs: 120.0,
                endpoints_per_service: 2,
                memory_scales: vec![1, 1_000, 10_000, 50_000],
                memory_runs: 2,
                api_scales: vec![1_000, 10_000],
                api_events: 300,
                api_endpoints: 10,
                api_sync_services: 10_000,
                api_sync_endpoints: 10,
                api_sync_runs: 3,
            },
            Mode::Quick => Settings {
                mode,
                datapath_scales: vec![1, 1_000, 10_000, 100_000],
                datapath_runs: 3,
                datapath_repeat: 200_000,
                new_conn_samples: 1_000,
                e2e_scales: vec![1, 1_000],
                e2e_rounds: 2,
                conn_rate_secs: 2.0,
                latency_secs: 1.0,
                client_threads: 4,
                backends: 2,
                control_scales: vec![1_000, 10_000],
                control_runs: 2,
                netfilter_timeout_secs: 20.0,
                endpoints_per_service: 2,
                memory_scales: vec![1, 1_000, 10_000],
                memory_runs: 1,
                api_scales: vec![1_000, 10_000],
                api_events: 100,
                api_endpoints: 10,
                api_sync_services: 10_000,
                api_sync_endpoints: 10,
                api_sync_runs: 1,
            },
            Mode::Smoke => Settings {
                mode,
                datapath_scales: vec![1, 100],
                datapath_runs: 2,
                datapath_repeat: 10_000,
                new_conn_samples: 100,
                e2e_scales: vec![1, 20],
                e2e_rounds: 1,
                conn_rate_secs: 0.3,
                latency_secs: 0.2,
                client_threads: 2,
                backends: 2,
                control_scales: vec![10, 100],
                control_runs: 2,
                netfilter_timeout_secs: 30.0,
                endpoints_per_service: 2,
                memory_scales: vec![1, 20],
                memory_runs: 1,
                api_scales: vec![20],
                api_events: 10,
                api_endpoints: 2,
                api_sync_services: 50,
                api_sync_endpoints: 2,
                api_sync_runs: 1,
            },
        }
    }

    pub fn conn_rate_time(&self) -> Duration {
        Duration::from_secs_f64(self.conn_rate_secs)
    }

    pub fn latency_time(&self) -> Duration {
        Duration::from_secs_f64(self.latency_secs)
    }

    pub fn netfilter_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.netfilter_timeout_secs)
    }
}
