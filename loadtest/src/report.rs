//! Results shared by the scenarios: a latency histogram per task, merged, then a table for people
//! and a JSON document for scripts.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chart::Chart;
use crate::sys::{UsageSample, UsageSampler};

/// Highest latency recorded exactly: 60 s in microseconds (longer ones are clamped).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Prints a run's error count and its first five errors, the end of every scenario's table.
pub fn print_errors(errors: &[String]) {
    println!("errors      {}", errors.len());
    for e in errors.iter().take(5) {
        println!("  {e}");
    }
}

/// A latency histogram in microseconds.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Records one latency.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    h.saturating_record(us);
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest seen.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// The percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: (h.mean() * 10.0).round() / 10.0,
        }
    }
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name, e.g. `create`.
    pub scenario: String,
    /// Measured seconds (from the start to the last task's end).
    pub seconds: f64,
    /// Successful operations.
    pub ops: u64,
    /// `ops / seconds`.
    pub ops_per_sec: f64,
    /// Latency of successful operations, microseconds.
    pub latency_us: Latency,
    /// Failed operations.
    pub errors: u64,
    /// Failed operations by kind (`429 tunnel_limit`, `transport timeout`, ...).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// The scenario's parameters (clients, devices, API URL, ...).
    pub params: BTreeMap<String, Value>,
    /// Further scenario-specific results.
    pub extra: BTreeMap<String, Value>,
}

impl Report {
    /// A report from the merged histogram and error counts.
    pub fn new(
        scenario: &str,
        elapsed: Duration,
        hist: &Histogram<u64>,
        errors_by_kind: BTreeMap<String, u64>,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let ops = hist.len();
        Self {
            scenario: scenario.to_string(),
            seconds: (seconds * 1000.0).round() / 1000.0,
            ops,
            ops_per_sec: if seconds > 0.0 {
                (ops as f64 / seconds * 10.0).round() / 10.0
            } else {
                0.0
            },
            latency_us: Latency::of(hist),
            errors: errors_by_kind.values().sum(),
            errors_by_kind,
            params: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Prints the human table.
    pub fn print(&self, op_name: &str) {
        println!();
        println!("scenario    {}  ({})", self.scenario, self.param_text());
        println!("duration    {:.2} s", self.seconds);
        println!("{:<11} {} ok, {:.1}/s", op_name, self.ops, self.ops_per_sec);
        let l = &self.latency_us;
        println!(
            "latency     {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        println!(
            "  (ms)      {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.mean / 1000.0
        );
        println!("errors      {}", self.errors);
        for (kind, n) in &self.errors_by_kind {
            println!("  {kind:<30} {n}");
        }
        for (k, v) in &self.extra {
            println!("{k:<11} {v}");
        }
    }

    /// Its chart: operations per second over time (`extra.ops_per_second`, when sampled) and
    /// the latency percentiles.
    pub fn chart(&self, rate_name: &str) -> Chart {
        use crate::chart::{Panel, Series};
        let mut chart = Chart::new(format!("{}: {}", self.scenario, self.param_text()));
        let per_second = self
            .extra
            .get("ops_per_second")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_f64).collect::<Vec<_>>())
            .unwrap_or_default();
        chart.push(Panel::Time {
            title: format!("{rate_name} ({:.1}/s over the run)", self.ops_per_sec),
            x_label: "seconds of the run".into(),
            y_label: rate_name.into(),
            series: vec![Series::per_second(rate_name, per_second)],
        });
        chart.push(Panel::Percentiles {
            title: format!("latency ({} ok, {} failed)", self.ops, self.errors),
            groups: vec![(self.scenario.clone(), self.latency_us.clone())],
        });
        chart
    }

    fn param_text(&self) -> String {
        self.params
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Writes the JSON document to `path`.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        write_json(path, self)
    }
}

/// Samples a running operation counter once a second until `stop` says so, returning the
/// operations completed in each second (the last, partial second included): shows whether a
/// rate holds steady or decays over a run.
pub fn spawn_timeline(
    counter: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut stop = stop;
        let mut per_second = Vec::new();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            let done = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            let now = counter.load(Ordering::Relaxed);
            per_second.push(now - last);
            last = now;
            if done {
                return per_second;
            }
        }
    })
}

/// A histogram as `(value, count)` pairs of its recorded buckets, for a child process to hand
/// to its parent (see `procs`).
pub fn hist_to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value, count)` pairs from [`hist_to_pairs`] to `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.clamp(1, MAX_LATENCY_US), n);
    }
}

/// Samples `pid`'s RSS and open files over the run (see [`UsageSampler`]), in the process that
/// reports: not in a `--procs` child, whose parent samples the same process.
pub fn sample_usage(pid: Option<String>) -> Option<UsageSampler> {
    match pid {
        Some(pid) if !crate::procs::is_child() => Some(UsageSampler::start(pid)),
        _ => None,
    }
}

/// The samples of [`sample_usage`]'s sampler (none without one).
pub async fn usage_samples(sampler: Option<UsageSampler>) -> Vec<UsageSample> {
    match sampler {
        Some(s) => s.finish().await,
        None => Vec::new(),
    }
}

/// A progress bar on stderr, hidden when stderr is no terminal, with `--quiet` and in child
/// processes.
pub fn progress(len: u64, what: &str, quiet: bool) -> ProgressBar {
    use std::io::IsTerminal;
    if quiet || crate::procs::is_child() || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// A peer scenario's results, as the end of its run handles them (see [`finish`]).
pub trait ScenarioReport: Serialize {
    /// Prints the human table.
    fn print(&self);
    /// Why the run counts as failed (errors, nothing measured), if it does.
    fn failure(&self) -> Option<String>;
    /// The chart drawn beside the JSON, if the report has something to draw.
    fn chart(&self) -> Option<Chart> {
        None
    }
}

/// The end of a peer scenario's run: prints `report`, writes it to `json` when given (and its
/// [`ScenarioReport::chart`] beside it), then fails with its [`ScenarioReport::failure`], if
/// any.
pub fn finish<R: ScenarioReport>(report: &R, json: Option<&Path>) -> anyhow::Result<()> {
    report.print();
    if let Some(path) = json {
        write_json(path, report)?;
        if let Some(chart) = report.chart() {
            crate::chart::write_beside_or_warn(&chart, path);
        }
    }
    match report.failure() {
        Some(why) => Err(anyhow::Error::msg(why)),
        None => Ok(()),
    }
}

/// Median of sorted values (0 when empty).
pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Rounds to one decimal.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Rounds to three decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_fields() {
        let mut h = latency_histogram();
        for i in 1..=1000u64 {
            record(&mut h, Duration::from_micros(i * 10));
        }
        let mut errs = BTreeMap::new();
        errs.insert("409 device_offline".to_string(), 3);
        let r = Report::new("create", Duration::from_secs(2), &h, errs);
        assert_eq!(r.ops, 1000);
        assert_eq!(r.ops_per_sec, 500.0);
        assert_eq!(r.errors, 3);
        assert!((4990..=5010).contains(&r.latency_us.p50));
        assert!((9900..=9910).contains(&r.latency_us.p99));
        let v = serde_json::to_value(&r).unwrap();
        for f in [
            "scenario",
            "seconds",
            "ops",
            "ops_per_sec",
            "latency_us",
            "errors",
        ] {
            assert!(v.get(f).is_some(), "{f}");
        }
        for f in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_us"].get(f).is_some(), "{f}");
        }
    }

    #[derive(Serialize)]
    struct Dummy {
        ops: u64,
    }

    impl ScenarioReport for Dummy {
        fn print(&self) {}
        fn failure(&self) -> Option<String> {
            (self.ops == 0).then(|| "nothing measured".to_string())
        }
    }

    #[test]
    fn finish_writes_then_fails() {
        let path =
            std::env::temp_dir().join(format!("loadtest-finish-{}.json", std::process::id()));
        let err = finish(&Dummy { ops: 0 }, Some(&path)).unwrap_err();
        assert_eq!(err.to_string(), "nothing measured");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\n  \"ops\": 0\n}\n");
        let _ = std::fs::remove_file(&path);
        assert!(finish(&Dummy { ops: 1 }, None).is_ok());
    }

    #[test]
    fn histograms_cross_processes() {
        let mut h = latency_histogram();
        for i in 1..=5000u64 {
            record(&mut h, Duration::from_micros(i));
        }
        let mut back = latency_histogram();
        add_pairs(&mut back, &hist_to_pairs(&h));
        add_pairs(&mut back, &hist_to_pairs(&h));
        assert_eq!(back.len(), 2 * h.len());
        assert_eq!(back.value_at_quantile(0.99), h.value_at_quantile(0.99));
    }
}
