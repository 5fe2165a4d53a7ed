//! Keeps the benchmark harness working: runs `bpfproxy-bench --smoke` (tiny sizes, well
//! under a minute) and checks that it wrote well-formed JSON with every figure of every
//! section present and positive. Times are never compared with anything.
//!
//! Needs what the end-to-end tests need (root, the agent binary, the eBPF object, bpftool)
//! plus iptables and nft, which `cargo xtask setup` installs.

use std::{path::Path, process::Command};

use serde_json::Value;

const DATAPATH: &[(&str, &str)] = &[
    ("floor", "tc_floor"),
    ("floor_single", "tc_floor"),
    ("non_service", "bpfproxy"),
    ("non_service_filter_hit", "bpfproxy"),
    ("established", "bpfproxy"),
    ("reply", "bpfproxy"),
    ("new_connection_repeated", "bpfproxy"),
    ("new_connection", "bpfproxy"),
];
const XDP: &[(&str, &str)] = &[
    ("floor", "xdp_floor"),
    ("floor_single", "xdp_floor"),
    ("non_service", "bpfproxy"),
    ("established_dnat", "bpfproxy"),
    ("established_snat", "bpfproxy"),
    ("snat_reply", "bpfproxy"),
    ("new_dnat", "bpfproxy"),
    ("new_snat", "bpfproxy"),
];
const E2E_METRICS: &[&str] = &["conn_rate", "latency_p50", "latency_p99"];
const E2E_CONTENDERS: &[&str] = &["direct", "bpfproxy", "iptables", "nftables"];
const CONTROL_METRICS: &[&str] = &["program", "endpoint_change"];
const CONTROL_CONTENDERS: &[&str] = &["bpfproxy", "iptables", "nftables"];
const MEMORY_METRICS: &[&str] = &["agent_rss", "agent_peak_rss", "maps_memlock"];
const API_EVENT_METRICS: &[&str] = &[
    "endpoint_event",
    "endpoint_event_p50",
    "endpoint_event_p99",
    "service_added",
    "service_added_p50",
    "service_added_p99",
];

fn scales(settings: &Value, key: &str) -> Vec<u64> {
    settings[key]
        .as_array()
        .unwrap_or_else(|| panic!("settings.{key} is not a list"))
        .iter()
        .map(|v| v.as_u64().expect("a scale is a number"))
        .collect()
}

/// The figure `(section, metric, contender, services)`; checks its numbers are positive.
fn check_figure(figures: &[Value], section: &str, metric: &str, contender: &str, n: u64) {
    let what = format!("{section}/{metric}/{contender} at {n} services");
    let f = figures
        .iter()
        .find(|f| {
            f["section"] == section
                && f["metric"] == metric
                && f["contender"] == contender
                && f["services"] == n
        })
        .unwrap_or_else(|| panic!("missing figure {what}"));
    for key in ["median", "min", "max"] {
        let v = f[key].as_f64().unwrap_or(f64::NAN);
        assert!(v > 0.0 && v.is_finite(), "{what}: {key} is {v}");
    }
    let runs = f["runs"].as_array().expect("runs");
    assert!(!runs.is_empty(), "{what}: no runs");
    assert!(
        runs.iter().all(|r| r.as_f64().is_some_and(|v| v > 0.0)),
        "{what}: a run is not positive: {runs:?}"
    );
    assert!(
        !f["unit"].as_str().unwrap_or_default().is_empty(),
        "{what}: no unit"
    );
    if let Some(ratio) = f.get("ratio") {
        let m = ratio["median"].as_f64().unwrap_or(f64::NAN);
        assert!(m > 0.0 && m.is_finite(), "{what}: ratio median is {m}");
    }
}

#[test]
fn smoke_run_writes_every_figure() {
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_bpfproxy-bench"))
        .arg("--smoke")
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("running bpfproxy-bench");
    assert!(
        run.status.success(),
        "bpfproxy-bench --smoke failed ({}); it needs root, `cargo xtask build` and \
         iptables/nft (`cargo xtask setup`):\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr),
        String::from_utf8_lossy(&run.stdout)
    );

    let jsons: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(jsons.len(), 1, "expected one JSON result, found {jsons:?}");
    let json = &jsons[0];
    let results: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap())
        .expect("the results are well-formed JSON");
    assert_eq!(results["schema"], "bpfproxy-bench/1");
    assert_eq!(results["mode"], "smoke");
    let machine = &results["machine"];
    for key in ["kernel", "cpu_model", "iptables", "nft"] {
        assert!(
            !machine[key].as_str().unwrap_or_default().is_empty(),
            "machine.{key} missing"
        );
    }
    assert!(machine["cores"].as_u64().unwrap_or(0) > 0, "machine.cores");
    assert!(
        machine["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "machine.memory_bytes"
    );

    let settings = &results["settings"];
    let figures = results["figures"].as_array().expect("figures");
    for n in scales(settings, "datapath_scales") {
        for (metric, contender) in DATAPATH {
            check_figure(figures, "datapath", metric, contender, n);
        }
    }
    for n in scales(settings, "e2e_scales") {
        for metric in E2E_METRICS {
            for contender in E2E_CONTENDERS {
                check_figure(figures, "e2e", metric, contender, n);
            }
        }
    }
    for n in scales(settings, "control_scales") {
        for metric in CONTROL_METRICS {
            for contender in CONTROL_CONTENDERS {
                check_figure(figures, "control", metric, contender, n);
            }
        }
    }
    for n in scales(settings, "memory_scales") {
        for metric in MEMORY_METRICS {
            check_figure(figures, "memory", metric, "bpfproxy", n);
        }
        check_figure(figures, "control", "agent_start", "bpfproxy", n);
        check_figure(figures, "control", "agent_start_cpu", "bpfproxy", n);
    }

    for n in scales(settings, "api_scales") {
        for metric in API_EVENT_METRICS {
            check_figure(figures, "api", metric, "bpfproxy", n);
        }
    }
    let sync = settings["api_sync_services"]
        .as_u64()
        .expect("api_sync_services");
    check_figure(figures, "api", "initial_sync", "bpfproxy", sync);
    check_figure(figures, "api", "initial_sync_after_lists", "bpfproxy", sync);
    for (metric, contender) in XDP {
        check_figure(figures, "xdp", metric, contender, 1);
    }

    // The tables and plots next to it.
    let stem = json.file_stem().unwrap().to_string_lossy().into_owned();
    let md = std::fs::read_to_string(out.path().join(format!("{stem}.md"))).expect("tables");
    assert!(md.contains("## 1. Datapath cost"), "{md}");
    assert!(md.contains("## 5. Kubernetes API source"), "{md}");
    let plots = Path::new(out.path()).join(&stem);
    let svgs = std::fs::read_dir(&plots)
        .expect("plots folder")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "svg"))
        .count();
    assert!(svgs >= 8, "only {svgs} plots in {}", plots.display());
}
