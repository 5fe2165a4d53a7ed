//! Figures: the raw values of several runs, their median, min and max, and a ratio to a
//! reference measured side by side (paired run by run).

use serde::{Deserialize, Serialize};

/// One measured quantity at one scale for one contender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    /// `datapath`, `e2e`, `control` or `memory`.
    pub section: String,
    /// What was measured, e.g. `established`, `conn_rate`, `program`, `agent_rss`.
    pub metric: String,
    /// `bpfproxy`, `tc_floor`, `direct`, `iptables`, `nftables`.
    pub contender: String,
    /// Services programmed.
    pub services: usize,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Every run's value, in run order.
    pub runs: Vec<f64>,
    /// The same runs divided by the reference's runs of the same round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Ratio>,
    /// The measurement was cut off at these values: the true ones are larger.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lower_bound: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratio {
    /// Contender (and metric, when it differs) of the reference.
    pub to: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

/// Median (mean of the middle two for an even count), min and max. Panics on no values.
pub fn summary(values: &[f64]) -> (f64, f64, f64) {
    assert!(!values.is_empty(), "a figure needs at least one run");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Figure {
    pub fn new(
        section: &str,
        metric: &str,
        contender: &str,
        services: usize,
        unit: &str,
        runs: Vec<f64>,
    ) -> Self {
        let (median, min, max) = summary(&runs);
        Figure {
            section: section.into(),
            metric: metric.into(),
            contender: contender.into(),
            services,
            unit: unit.into(),
            median,
            min,
            max,
            runs,
            ratio: None,
            lower_bound: false,
        }
    }

    /// Marks the values as cut off (the true values are larger).
    pub fn lower_bound(mut self, cut: bool) -> Self {
        self.lower_bound = cut;
        self
    }

    /// Adds the ratio to `reference`, run by run (both must have the same number of runs).
    pub fn with_ratio(mut self, to: &str, reference: &[f64]) -> Self {
        let runs: Vec<f64> = self
            .runs
            .iter()
            .zip(reference)
            .map(|(v, r)| if *r > 0.0 { v / r } else { 0.0 })
            .collect();
        if !runs.is_empty() {
            let (median, min, max) = summary(&runs);
            self.ratio = Some(Ratio {
                to: to.into(),
                median,
                min,
                max,
                runs,
            });
        }
        self
    }

    pub fn key(&self) -> (&str, &str, &str, usize) {
        (&self.section, &self.metric, &self.contender, self.services)
    }
}

/// Finds a figure.
pub fn find<'a>(
    figures: &'a [Figure],
    section: &str,
    metric: &str,
    contender: &str,
    services: usize,
) -> Option<&'a Figure> {
    figures
        .iter()
        .find(|f| f.key() == (section, metric, contender, services))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(summary(&[7.0]), (7.0, 7.0, 7.0));
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
    }

    #[test]
    fn ratios_pair_runs() {
        let f = Figure::new("s", "m", "c", 1, "ns", vec![20.0, 30.0, 40.0])
            .with_ratio("floor", &[10.0, 10.0, 20.0]);
        let r = f.ratio.unwrap();
        assert_eq!(r.runs, vec![2.0, 3.0, 2.0]);
        assert_eq!((r.median, r.min, r.max), (2.0, 2.0, 3.0));
    }
}
