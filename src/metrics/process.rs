//! `process_*`: CPU, resident memory and open fds from /proc, under the names every Prometheus
//! client library uses for them.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Reads /proc/self at each scrape.
#[derive(Debug)]
pub(super) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // clock ticks per second and the page size are 100 and 4096 on every Linux we run on.
        const TICKS: f64 = 100.0;
        const PAGE: u64 = 4096;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            // After the command: state is field 3, utime 14, stime 15, rss 24 (1-based in proc(5)).
            let get = |n: usize| {
                fields
                    .get(n - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new((get(14) + get(15)) as f64 / TICKS).encode(m)?;
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(get(24) * PAGE).encode(m)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(dir.count() as u64).encode(m)?;
        }
        Ok(())
    }
}
