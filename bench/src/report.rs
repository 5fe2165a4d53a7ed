//! The results: the JSON of raw figures, the Markdown tables, the SVG plots.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use plotters::{coord::ranged1d::ValueFormatter, prelude::*};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Mode, Settings},
    figures::{Figure, find},
    machine::Machine,
};

pub const SCHEMA: &str = "bpfproxy-bench/1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub schema: String,
    /// When the run started (UTC, RFC 3339).
    pub started: String,
    pub mode: Mode,
    pub duration_secs: f64,
    pub machine: Machine,
    pub settings: Settings,
    /// How each section measures.
    pub methods: Vec<String>,
    pub notes: Vec<String>,
    pub figures: Vec<Figure>,
}

/// Datapath rows: metric, contender, label.
/// Section 6: (metric, contender, label).
const XDP_ROWS: &[(&str, &str, &str)] = &[
    ("floor", "xdp_floor", "xdp_floor, repeated (the floor)"),
    ("non_service", "bpfproxy", "non-service packet"),
    (
        "established_dnat",
        "bpfproxy",
        "established, DNAT (local backend)",
    ),
    (
        "established_snat",
        "bpfproxy",
        "established, DNAT + SNAT (remote backend)",
    ),
    ("snat_reply", "bpfproxy", "SNAT reply back to the client"),
    (
        "floor_single",
        "xdp_floor",
        "xdp_floor, single runs (floor of new connections)",
    ),
    (
        "new_dnat",
        "bpfproxy",
        "new connection, DNAT (local backend)",
    ),
    (
        "new_snat",
        "bpfproxy",
        "new connection, DNAT + SNAT port allocation",
    ),
];

const DATAPATH_ROWS: &[(&str, &str, &str)] = &[
    ("floor", "tc_floor", "tc_floor, repeated (the floor)"),
    (
        "non_service",
        "bpfproxy",
        "non-service packet, reply filter miss",
    ),
    (
        "non_service_filter_hit",
        "bpfproxy",
        "non-service packet, reply filter hit (conntrack miss)",
    ),
    ("established", "bpfproxy", "established connection"),
    ("reply", "bpfproxy", "reply"),
    (
        "new_connection_repeated",
        "bpfproxy",
        "new connection, repeated on a closed tuple (SYN+FIN; upper bound)",
    ),
    (
        "floor_single",
        "tc_floor",
        "tc_floor, single runs (the floor)",
    ),
    ("new_connection", "bpfproxy", "new connection, single runs"),
];

/// How many of [`DATAPATH_ROWS`] are repeated runs (the rest are single runs).
const DATAPATH_REPEATED: usize = 6;

const E2E_METRICS: &[(&str, &str)] = &[
    (
        "conn_rate",
        "connections per second (connect, one request, close)",
    ),
    (
        "latency_p50",
        "request latency p50 over one kept-alive connection (µs)",
    ),
    (
        "latency_p99",
        "request latency p99 over one kept-alive connection (µs)",
    ),
];

const CONTENDERS_E2E: &[&str] = &["direct", "bpfproxy", "iptables", "nftables"];
const CONTENDERS_CONTROL: &[&str] = &["bpfproxy", "iptables", "nftables"];

const MEMORY_ROWS: &[(&str, &str)] = &[
    ("agent_rss", "agent VmRSS after programming (MiB)"),
    ("agent_peak_rss", "agent VmHWM, peak RSS (MiB)"),
    (
        "maps_memlock",
        "kernel memory of the maps, bytes_memlock (MiB)",
    ),
];

/// `1234567.8` -> `1,234,568`; small values keep a few significant digits; whole numbers
/// stay whole.
pub fn num(v: f64) -> String {
    if v.abs() >= 1000.0 || (v.fract() == 0.0 && v.abs() < 1e15) {
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 { format!("-{out}") } else { out }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A count with thousands separators.
pub fn count(n: usize) -> String {
    num(n as f64)
}

fn cell(f: Option<&Figure>) -> String {
    match f {
        None => "–".into(),
        Some(f) => {
            if f.lower_bound {
                let mut s = format!("> {} (cut off)", num(f.min));
                if let Some(r) = &f.ratio {
                    let _ = write!(s, " **> {:.0}x**", r.min);
                }
                return s;
            }
            let mut s = format!("{} [{}–{}]", num(f.median), num(f.min), num(f.max));
            if let Some(r) = &f.ratio {
                let _ = write!(s, " **{:.2}x**", r.median);
            }
            s
        }
    }
}

fn scales(figures: &[Figure], section: &str) -> Vec<usize> {
    let set: BTreeSet<usize> = figures
        .iter()
        .filter(|f| f.section == section)
        .map(|f| f.services)
        .collect();
    set.into_iter().collect()
}

fn header(out: &mut String, first: &str, scales: &[usize]) {
    let _ = write!(out, "| {first} |");
    for s in scales {
        let _ = write!(out, " {} |", count(*s));
    }
    out.push_str("\n|---|");
    for _ in scales {
        out.push_str("---|");
    }
    out.push('\n');
}

fn row(out: &mut String, label: &str, scales: &[usize], get: impl Fn(usize) -> Option<Figure>) {
    let _ = write!(out, "| {label} |");
    for &s in scales {
        let _ = write!(out, " {} |", cell(get(s).as_ref()));
    }
    out.push('\n');
}

/// Rows of section 5: (metric, label).
const API_ROWS: &[(&str, &str)] = &[
    ("endpoint_event_p50", "endpoint change to map, p50"),
    ("endpoint_event_p99", "endpoint change to map, p99"),
    ("service_added_p50", "service added to map, p50"),
    ("service_added_p99", "service added to map, p99"),
    ("initial_sync", "initial sync, agent start to programmed"),
    (
        "initial_sync_after_lists",
        "initial sync, lists done to programmed",
    ),
];

/// What the goals say against what was measured (for reading, not asserted anywhere).
pub fn goals(figures: &[Figure]) -> Vec<String> {
    let mut out = Vec::new();
    let f = |section: &str, metric: &str, contender: &str, n: usize| {
        find(figures, section, metric, contender, n).cloned()
    };
    // Established cost.
    let est: Vec<Figure> = scales(figures, "datapath")
        .into_iter()
        .filter_map(|n| f("datapath", "established", "bpfproxy", n))
        .collect();
    if !est.is_empty() {
        let worst = est
            .iter()
            .filter_map(|e| e.ratio.as_ref().map(|r| (r.median, e.services)))
            .fold((0.0f64, 0), |a, b| if b.0 > a.0 { b } else { a });
        let lo = est.iter().map(|e| e.median).fold(f64::INFINITY, f64::min);
        let hi = est.iter().map(|e| e.median).fold(0.0f64, f64::max);
        let spread = hi / lo - 1.0;
        out.push(format!(
            "established connection within 2x of the floor: {} (worst {:.2}x at {} services)",
            if worst.0 <= 2.0 { "met" } else { "missed" },
            worst.0,
            count(worst.1)
        ));
        out.push(format!(
            "established cost flat within 10% from {} to {} services: {} (spread {:.1}%: {}–{} ns)",
            count(est[0].services),
            count(est[est.len() - 1].services),
            if spread <= 0.10 { "met" } else { "missed" },
            spread * 100.0,
            num(lo),
            num(hi)
        ));
    }
    // End to end.
    if let Some(bp) = f("e2e", "conn_rate", "bpfproxy", 1)
        && let Some(r) = &bp.ratio
    {
        out.push(format!(
            "new-connection rate at least 0.95x direct at 1 service: {} ({:.2}x)",
            if r.median >= 0.95 { "met" } else { "missed" },
            r.median
        ));
    }
    let e2e_scales = scales(figures, "e2e");
    let mut vs_nft = Vec::new();
    for &n in &e2e_scales {
        if let (Some(bp), Some(nft)) = (
            f("e2e", "conn_rate", "bpfproxy", n),
            f("e2e", "conn_rate", "nftables", n),
        ) {
            vs_nft.push((n, bp.median / nft.median));
        }
    }
    if !vs_nft.is_empty() {
        let all = vs_nft.iter().all(|(_, r)| *r >= 1.0);
        let list: Vec<String> = vs_nft
            .iter()
            .map(|(n, r)| format!("{:.2}x at {}", r, count(*n)))
            .collect();
        out.push(format!(
            "new-connection rate at least nftables' at every scale: {} ({})",
            if all { "met" } else { "missed" },
            list.join(", ")
        ));
    }
    match (
        f("e2e", "conn_rate", "bpfproxy", 10_000),
        f("e2e", "conn_rate", "iptables", 10_000),
    ) {
        (Some(bp), Some(ipt)) => {
            let r = bp.median / ipt.median;
            out.push(format!(
                "new-connection rate at least 2x iptables' at 10,000 services: {} ({r:.2}x)",
                if r >= 2.0 { "met" } else { "missed" }
            ));
        }
        _ => out.push(
            "new-connection rate at least 2x iptables' at 10,000 services: not measured in this run"
                .into(),
        ),
    }
    for (metric, label, limit_ms) in [
        ("program", "programming 10,000 services under 1 s", 1000.0),
        (
            "endpoint_change",
            "one endpoint change at 10,000 services under 10 ms",
            10.0,
        ),
    ] {
        match f("control", metric, "bpfproxy", 10_000) {
            Some(fig) => out.push(format!(
                "{label}: {} ({} ms)",
                if fig.median < limit_ms {
                    "met"
                } else {
                    "missed"
                },
                num(fig.median)
            )),
            None => out.push(format!("{label}: not measured in this run")),
        }
    }
    for (metric, label, limit_ms) in [
        (
            "endpoint_event_p99",
            "endpoint change to map p99 under 5 ms at 10,000 services",
            5.0,
        ),
        (
            "service_added_p99",
            "service added to map p99 under 5 ms at 10,000 services",
            5.0,
        ),
        (
            "initial_sync",
            "initial sync of 10,000 services x 10 endpoints under 1 s (agent start to programmed)",
            1000.0,
        ),
    ] {
        match f("api", metric, "bpfproxy", 10_000) {
            Some(fig) => out.push(format!(
                "{label}: {} ({} ms)",
                if fig.median < limit_ms {
                    "met"
                } else {
                    "missed"
                },
                num(fig.median)
            )),
            None => out.push(format!("{label}: not measured in this run")),
        }
    }
    out
}

/// The Markdown report; `plots` are (title, path relative to the report).
pub fn markdown(r: &Results, plots: &[(String, String)]) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(
        out,
        "# bpfproxy bench, {} run of {}\n",
        match r.mode {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
        },
        r.started
    );
    let _ = writeln!(
        out,
        "Machine: Linux {}, {} ({} cores), {:.1} GiB; {}; {}; {}{}. Run took {:.0} s; load average {:.2} and {} rustc processes at its start.\n",
        m.kernel,
        m.cpu_model,
        m.cores,
        m.memory_bytes as f64 / (1u64 << 30) as f64,
        m.iptables,
        m.nft,
        m.bpftool,
        if m.commit.is_empty() {
            String::new()
        } else {
            format!("; commit {}", m.commit)
        },
        r.duration_secs,
        m.loadavg_at_start,
        m.rustc_processes_at_start
    );
    out.push_str(
        "Each cell: median [min–max] over the runs, and in bold the median of the run-by-run \
         ratios to the reference measured side by side in the same run (the floor, direct \
         access, or bpfproxy).\n\n",
    );

    let dp = scales(&r.figures, "datapath");
    if !dp.is_empty() {
        let _ = writeln!(
            out,
            "## 1. Datapath cost: ns per packet (BPF_PROG_TEST_RUN), by services programmed\n"
        );
        header(&mut out, "packet", &dp);
        for (metric, contender, label) in DATAPATH_ROWS {
            row(&mut out, label, &dp, |n| {
                find(&r.figures, "datapath", metric, contender, n).cloned()
            });
        }
        out.push('\n');
    }

    let e2e = scales(&r.figures, "e2e");
    if !e2e.is_empty() {
        let _ = writeln!(out, "## 2. End to end through the ClusterIP, real TCP\n");
        for (metric, title) in E2E_METRICS {
            let _ = writeln!(out, "{title}; ratio to direct access:\n");
            header(&mut out, "contender", &e2e);
            for c in CONTENDERS_E2E {
                row(&mut out, c, &e2e, |n| {
                    find(&r.figures, "e2e", metric, c, n).cloned()
                });
            }
            out.push('\n');
        }
    }

    let cp = scales(&r.figures, "control");
    if !cp.is_empty() {
        let _ = writeln!(
            out,
            "## 3. Control plane: ms to program N services, and one endpoint change at that scale; ratio to bpfproxy\n"
        );
        let cp_scales: Vec<usize> = cp
            .iter()
            .copied()
            .filter(|n| find(&r.figures, "control", "program", "bpfproxy", *n).is_some())
            .collect();
        header(&mut out, "what", &cp_scales);
        for (metric, what) in [
            ("program", "program all"),
            ("endpoint_change", "one endpoint change"),
        ] {
            for c in CONTENDERS_CONTROL {
                row(&mut out, &format!("{what}: {c}"), &cp_scales, |n| {
                    find(&r.figures, "control", metric, c, n).cloned()
                });
            }
        }
        out.push('\n');
        let start_scales: Vec<usize> = cp
            .iter()
            .copied()
            .filter(|n| find(&r.figures, "control", "agent_start", "bpfproxy", *n).is_some())
            .collect();
        if !start_scales.is_empty() {
            out.push_str(
                "The real agent, from process start to every service in the maps (parsing the \
                 manifests included), in seconds:\n\n",
            );
            header(&mut out, "what", &start_scales);
            row(
                &mut out,
                "agent start to programmed (s)",
                &start_scales,
                |n| find(&r.figures, "control", "agent_start", "bpfproxy", n).cloned(),
            );
            row(
                &mut out,
                "agent CPU time from start until idle (s)",
                &start_scales,
                |n| find(&r.figures, "control", "agent_start_cpu", "bpfproxy", n).cloned(),
            );
            out.push('\n');
        }
    }

    let mem = scales(&r.figures, "memory");
    if !mem.is_empty() {
        let _ = writeln!(out, "## 4. Memory of the agent, by services served\n");
        header(&mut out, "what", &mem);
        for (metric, label) in MEMORY_ROWS {
            row(&mut out, label, &mem, |n| {
                find(&r.figures, "memory", metric, "bpfproxy", n).cloned()
            });
        }
        out.push('\n');
    }

    let api = scales(&r.figures, "api");
    if !api.is_empty() {
        let _ = writeln!(
            out,
            "## 5. Kubernetes API source: ms from an API event to the kernel map, and the initial sync, by services in the cluster\n"
        );
        header(&mut out, "what", &api);
        for (metric, label) in API_ROWS {
            row(&mut out, label, &api, |n| {
                find(&r.figures, "api", metric, "bpfproxy", n).cloned()
            });
        }
        out.push('\n');
    }

    let xdp = scales(&r.figures, "xdp");
    if !xdp.is_empty() {
        let _ = writeln!(
            out,
            "## 6. XDP external view (xdp_nodeport): ns per packet (BPF_PROG_TEST_RUN); ratio to xdp_floor\n"
        );
        header(&mut out, "packet", &xdp);
        for (metric, contender, label) in XDP_ROWS {
            row(&mut out, label, &xdp, |n| {
                find(&r.figures, "xdp", metric, contender, n).cloned()
            });
        }
        out.push('\n');
    }

    let g = goals(&r.figures);
    if !g.is_empty() {
        out.push_str("## Against the goals\n\n");
        for line in g {
            let _ = writeln!(out, "- {line}");
        }
        out.push('\n');
    }
    out.push_str("## Method\n\n");
    for line in &r.methods {
        let _ = writeln!(out, "- {line}");
    }
    if !r.notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for line in &r.notes {
            let _ = writeln!(out, "- {line}");
        }
    }
    if !plots.is_empty() {
        out.push_str("\n## Plots\n\n");
        for (title, path) in plots {
            let _ = writeln!(out, "![{title}]({path})\n");
        }
    }
    out
}

struct Point {
    x: f64,
    median: f64,
    min: f64,
    max: f64,
}

type Series = Vec<(String, Vec<Point>)>;

fn series_of(figures: &[Figure], section: &str, keys: &[(&str, &str, &str)]) -> Series {
    keys.iter()
        .map(|(metric, contender, label)| {
            let mut pts: Vec<Point> = figures
                .iter()
                .filter(|f| {
                    f.section == section && f.metric == *metric && f.contender == *contender
                })
                .map(|f| Point {
                    x: f.services as f64,
                    median: f.median,
                    min: f.min,
                    max: f.max,
                })
                .collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            (label.to_string(), pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect()
}

fn draw<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<LogCoord<f64>, Y>>,
    y_desc: &str,
    series: &Series,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("services")
        .y_desc(y_desc)
        .x_label_formatter(&|x| num(*x))
        .y_label_formatter(&|y| num(*y))
        .draw()?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.x, p.median)),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            pts.iter()
                .map(|p| ErrorBar::new_vertical(p.x, p.min, p.median, p.max, color.filled(), 8)),
        )?;
        chart.draw_series(
            pts.iter()
                .map(|p| Circle::new((p.x, p.median), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

fn chart(path: &Path, title: &str, y_desc: &str, series: &Series, log_y: bool) -> Result<()> {
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let x_lo = all().map(|p| p.x).fold(f64::INFINITY, f64::min).max(1.0);
    let x_hi = all().map(|p| p.x).fold(1.0f64, f64::max);
    let y_hi = all().map(|p| p.max.max(p.median)).fold(0.0f64, f64::max);
    let y_lo = all()
        .map(|p| p.min.min(p.median))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let x_range = (x_lo / 2.0)..(x_hi * 2.0);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(80);
    if log_y {
        let y_lo = if y_lo.is_finite() { y_lo / 2.0 } else { 0.01 };
        let mut c = builder.build_cartesian_2d(
            x_range.log_scale(),
            (y_lo..(y_hi * 2.0).max(y_lo * 10.0)).log_scale(),
        )?;
        draw(&mut c, y_desc, series)?;
    } else {
        let mut c = builder.build_cartesian_2d(x_range.log_scale(), 0.0..(y_hi * 1.2).max(1e-9))?;
        draw(&mut c, y_desc, series)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the plots into `dir`; returns (title, file name) of each.
pub fn plots(figures: &[Figure], dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    let mut plot = |file: &str, title: &str, y: &str, series: Series, log_y: bool| -> Result<()> {
        if series.is_empty() {
            return Ok(());
        }
        let path = dir.join(file);
        chart(&path, title, y, &series, log_y)?;
        out.push((title.to_string(), PathBuf::from(file)));
        Ok(())
    };
    plot(
        "datapath.svg",
        "Datapath cost per packet, repeated runs (BPF_PROG_TEST_RUN)",
        "ns per packet",
        series_of(figures, "datapath", &DATAPATH_ROWS[..DATAPATH_REPEATED]),
        false,
    )?;
    plot(
        "datapath-single.svg",
        "Datapath cost of a new connection, single runs (BPF_PROG_TEST_RUN)",
        "ns per packet",
        series_of(figures, "datapath", &DATAPATH_ROWS[DATAPATH_REPEATED..]),
        false,
    )?;
    for (metric, title) in E2E_METRICS {
        let keys: Vec<(&str, &str, &str)> =
            CONTENDERS_E2E.iter().map(|c| (*metric, *c, *c)).collect();
        let y = if *metric == "conn_rate" {
            "connections per second"
        } else {
            "µs"
        };
        plot(
            &format!("e2e-{metric}.svg"),
            title,
            y,
            series_of(figures, "e2e", &keys),
            false,
        )?;
    }
    for (metric, title) in [
        ("program", "Time to program N services (ms)"),
        (
            "endpoint_change",
            "Time to apply one endpoint change with N services (ms)",
        ),
    ] {
        let keys: Vec<(&str, &str, &str)> = CONTENDERS_CONTROL
            .iter()
            .map(|c| (metric, *c, *c))
            .collect();
        plot(
            &format!("control-{metric}.svg"),
            title,
            "ms",
            series_of(figures, "control", &keys),
            true,
        )?;
    }
    plot(
        "control-agent_start.svg",
        "The agent's start: time to every service programmed, CPU time until idle (s)",
        "s",
        series_of(
            figures,
            "control",
            &[
                ("agent_start", "bpfproxy", "start to programmed"),
                ("agent_start_cpu", "bpfproxy", "CPU time until idle"),
            ],
        ),
        false,
    )?;
    let mem_keys: Vec<(&str, &str, &str)> = MEMORY_ROWS
        .iter()
        .map(|(m, label)| (*m, "bpfproxy", *label))
        .collect();
    plot(
        "memory.svg",
        "Agent memory (MiB)",
        "MiB",
        series_of(figures, "memory", &mem_keys),
        false,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(1_234_567.8), "1,234,568");
        assert_eq!(num(1000.0), "1,000");
        assert_eq!(num(999.4), "999");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(20.0), "20");
        assert_eq!(count(100_000), "100,000");
    }
}
