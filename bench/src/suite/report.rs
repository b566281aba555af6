//! The report's data model: what each scenario measured, as JSON
//! (`report.json`), and as tables, targets and plots for `BENCHMARKS.md`.
//!
//! Scenarios fill these in; [`super::render`] turns them into files.

use serde::{Deserialize, Serialize};

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The command line that produced it.
    pub command: String,
    /// `--quick`.
    pub quick: bool,
    /// Size of the large snapshots (scenarios 2 and 3), bytes.
    pub size: u64,
    /// When the run started (UTC, RFC 3339).
    pub started: String,
    /// Seconds the run took.
    pub duration_s: f64,
    /// The machine.
    pub machine: Machine,
    /// One entry per scenario run.
    pub scenarios: Vec<ScenarioReport>,
}

/// What the run ran on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -srm`.
    pub kernel: String,
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory, bytes.
    pub memory: u64,
    /// The KVM module's flavour, if any (`kvm_pvm`, `kvm_intel`, ...).
    pub kvm: Option<String>,
}

/// One scenario's results.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioReport {
    /// Short id, also the subcommand: `latency`, `restore`, ...
    pub id: String,
    /// Heading in `BENCHMARKS.md`.
    pub title: String,
    /// What is measured and how, in a sentence or two.
    pub method: String,
    /// Why the scenario could not run, if it did not (the rest is then empty).
    pub skipped: Option<String>,
    /// Tables for `BENCHMARKS.md`.
    pub tables: Vec<Table>,
    /// The targets this scenario speaks to.
    pub targets: Vec<Target>,
    /// Plots, rendered to PNG next to the report.
    pub plots: Vec<Plot>,
    /// Remarks worth reading next to the numbers.
    pub notes: Vec<String>,
    /// Every number measured, structured as the scenario likes.
    pub data: serde_json::Value,
    /// Seconds the scenario took.
    pub duration_s: f64,
}

/// A table: a header row and rows of cells, already formatted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Table {
    /// Caption.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with `columns` and no rows yet.
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

/// A goal of the issue and where faultline stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    /// What is compared, e.g. "demand-fault p50 vs local handler".
    pub name: String,
    /// The goal, e.g. "<= 3x".
    pub goal: String,
    /// The measured value, e.g. "2.4x".
    pub value: String,
    /// Whether the goal is met.
    pub met: bool,
}

/// A plot to render.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Plot {
    /// Cumulative distributions of samples (latencies), one line per series.
    Cdf {
        /// File name inside the output directory (`.png`).
        file: String,
        /// Title.
        title: String,
        /// X axis label (the unit of the samples).
        x_label: String,
        /// Logarithmic x axis.
        log_x: bool,
        /// (label, samples). Not in `report.json`: the scenario's `data`
        /// holds the samples once.
        #[serde(skip_serializing, default)]
        series: Vec<(String, Vec<f64>)>,
    },
    /// Bars with error whiskers (median, min, max).
    Bars {
        /// File name inside the output directory (`.png`).
        file: String,
        /// Title.
        title: String,
        /// Y axis label (the unit).
        y_label: String,
        /// The bars, left to right.
        bars: Vec<Bar>,
    },
    /// Lines through points, one per series (e.g. slowdown against a budget).
    Lines {
        /// File name inside the output directory (`.png`).
        file: String,
        /// Title.
        title: String,
        /// X axis label.
        x_label: String,
        /// Y axis label.
        y_label: String,
        /// Logarithmic y axis.
        log_y: bool,
        /// The lines.
        series: Vec<Series>,
    },
}

/// One line of [`Plot::Lines`]: (x, y) points, drawn in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// One bar of [`Plot::Bars`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bar {
    /// Label under the bar.
    pub label: String,
    /// Height and whiskers.
    pub value: Summary,
}

/// Median and spread of repeated measurements (the median of an even count
/// is the mean of the middle two).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Number of measurements.
    pub n: usize,
}

impl Summary {
    /// The summary of `values` (all zero if empty).
    pub fn of(values: &[f64]) -> Self {
        let v = sorted(values);
        if v.is_empty() {
            return Self::default();
        }
        let mid = v.len() / 2;
        Self {
            median: if v.len().is_multiple_of(2) {
                (v[mid - 1] + v[mid]) / 2.0
            } else {
                v[mid]
            },
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }

    /// "median (min–max)" with `digits` decimals.
    pub fn fmt(&self, digits: usize) -> String {
        if self.n <= 1 {
            return format!("{:.digits$}", self.median);
        }
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

/// Percentiles of a latency distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `samples` (all zero if empty).
    pub fn of(samples: &[f64]) -> Self {
        let v = sorted(samples);
        if v.is_empty() {
            return Self::default();
        }
        Self {
            n: v.len(),
            p50: percentile_sorted(&v, 50.0),
            p90: percentile_sorted(&v, 90.0),
            p99: percentile_sorted(&v, 99.0),
            max: v[v.len() - 1],
        }
    }
}

/// `values` in ascending order (NaN last, by `total_cmp`).
pub fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p`th percentile of sorted `v` (nearest rank).
pub fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// `a / b` formatted as a ratio, "n/a" when `b` is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Median, spread and percentiles follow nearest rank.
    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Summary::of(&[4.0, 1.0]).median, 2.5);
        let p = Percentiles::of(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Summary::of(&[]), Summary::default());
        assert_eq!(ratio(3.0, 0.0), "n/a");
    }
}
