//! `iotunnel-loadtest`: the load generator for iotunnel.
//!
//! One subcommand per scenario, one module per scenario. Shared: [`setup`] (the API: products,
//! devices, device channels), [`peers`] (tunnel pairs: dialing, tunnels through the API,
//! `--direct`, `--baseline`), [`wire`] (the AWS and Alibaba framing), [`procs`] (`--procs K`),
//! [`sys`] (/proc readings, the fd limit, usage over time), [`report`] (histograms, progress,
//! JSON) and [`chart`] (the PNG beside the JSON).
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod chart;
mod churn;
mod create;
mod idle;
mod latency;
mod peers;
mod procs;
mod report;
mod setup;
mod sys;
mod throughput;
mod wire;

/// Load generator for the iotunnel control plane and relay.
#[derive(Parser, Debug)]
#[command(name = "iotunnel-loadtest", version, about)]
struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    scenario: Scenario,
}

/// The scenarios.
#[derive(Subcommand, Debug)]
enum Scenario {
    /// Concurrent API clients creating tunnels (POST /v1/tunnels) to online devices.
    Create(create::CreateArgs),
    /// Bulk data both ways over N tunnel pairs (relay, --baseline relay, or --direct).
    Throughput(throughput::ThroughputArgs),
    /// Ping-pong at a fixed total rate over N tunnel pairs: latency percentiles.
    Latency(latency::LatencyArgs),
    /// Create, pair, exchange one message and close, again and again: cycles/s and step latency.
    Churn(churn::ChurnArgs),
    /// Open N idle tunnel pairs and hold them: the relay's memory and open files per pair.
    Idle(idle::IdleArgs),
}

/// Flags of every peer scenario about the run itself.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// How long to measure (idle: to hold the pairs), e.g. `10s`, `500ms`, `2m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Split the peers (and the rate) over this many child processes and merge their results.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub procs: u32,
    /// A free-form label copied into the JSON (for scripts).
    #[arg(long)]
    pub label: Option<String>,
}

/// Flags every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Control API base URL.
    #[arg(long, env = "IOTUNNEL_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// API key (an account's key or the admin key).
    #[arg(long, env = "IOTUNNEL_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// How long to run the measured phase, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

/// Parses `10s`, `250ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 10s, 500ms, 2m"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?}: use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Many peers need many files; the hard limit is ours to take.
    sys::raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.scenario {
            Scenario::Create(args) => create::run(args).await,
            Scenario::Throughput(args) => throughput::run(args).await,
            Scenario::Latency(args) => latency::run(args).await,
            Scenario::Churn(args) => churn::run(args).await,
            Scenario::Idle(args) => idle::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("10x").is_err());
    }
}
