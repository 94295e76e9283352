//! The data plane's series: the shards' snapshots of one scrape, summed (counters, gauges) or
//! merged (hdrhistograms) into one series per label set, plus the per-shard and optional
//! per-tunnel series.
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::{gauges, BUCKETS};
use crate::relay::stats::{MeshDirection, StatsSnapshot, DISCONNECT_REASONS, HANDSHAKE_FAILURES};
use crate::relay::upgrade::Refusal;

const ROLES: [&str; 2] = ["device", "client"];
const FAMILIES: [&str; 2] = ["aws", "aliyun"];
const DIRECTIONS: [&str; 2] = ["client_to_device", "device_to_client"];

type Fmt = Result<(), std::fmt::Error>;

/// Encodes the snapshots the exporter put in `shards` for the scrape in progress.
#[derive(Debug)]
pub(super) struct RelayCollector {
    pub(super) shards: Arc<Mutex<Vec<StatsSnapshot>>>,
    /// At most this many tunnels get per-tunnel series (0: none, the default).
    pub(super) per_tunnel: usize,
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Fmt {
        let shards = self.shards.lock().expect("metrics lock");
        encode_relay(&mut encoder, &shards)?;
        encode_mesh(&mut encoder, &shards)?;
        encode_per_tunnel(&mut encoder, &shards, self.per_tunnel)
    }
}

/// A counter family, one series per label set. `name` without `_total`: the library adds it.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// An hdrhistogram (nanoseconds) as a Prometheus histogram in seconds over [`BUCKETS`].
fn histogram(mut m: MetricEncoder, h: &Histogram<u64>) -> Fmt {
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = BUCKETS
        .iter()
        .map(|b| {
            let cumulative = h.count_between(0, (*b * 1e9) as u64);
            let in_bucket = cumulative - below;
            below = cumulative;
            (*b, in_bucket)
        })
        .collect();
    // Explicit: the OpenMetrics encoder writes only the buckets it is given.
    buckets.push((f64::INFINITY, h.len() - below));
    // hdrhistogram keeps no exact sum; the mean times the count is within its 0.1% precision.
    let sum = h.mean() * h.len() as f64 / 1e9;
    m.encode_histogram::<NoLabelSet>(sum, h.len(), &buckets, None)
}

fn merge<'a>(hs: impl Iterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut total =
        Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static bounds are valid");
    for h in hs {
        let _ = total.add(h);
    }
    total
}

fn encode_relay(encoder: &mut DescriptorEncoder, shards: &[StatsSnapshot]) -> Fmt {
    let sum2 = |f: &dyn Fn(&StatsSnapshot) -> [u64; 2]| {
        shards.iter().fold([0u64; 2], |acc, s| {
            let v = f(s);
            [acc[0] + v[0], acc[1] + v[1]]
        })
    };
    let peers = sum2(&|s| s.peers);
    gauges(
        encoder,
        "iotunnel_peers_connected",
        "Peers connected to the relay, by role.",
        (0..2).map(|r| ([("role", ROLES[r])], peers[r])),
    )?;
    counters(
        encoder,
        "iotunnel_peer_connects",
        "Peer connections accepted, by role and family.",
        (0..2).flat_map(|r| {
            (0..2).map(move |f| {
                let n = shards.iter().map(|s| s.connects[r][f]).sum();
                ([("role", ROLES[r]), ("family", FAMILIES[f])], n)
            })
        }),
    )?;
    counters(
        encoder,
        "iotunnel_peer_disconnects",
        "Peer disconnections, by role and reason.",
        (0..2).flat_map(|r| {
            DISCONNECT_REASONS.iter().map(move |reason| {
                let n = shards
                    .iter()
                    .map(|s| s.disconnects.get(&(r, *reason)).copied().unwrap_or(0))
                    .sum();
                ([("role", ROLES[r]), ("reason", *reason)], n)
            })
        }),
    )?;
    let bytes = sum2(&|s| s.bytes);
    counters(
        encoder,
        "iotunnel_relay_bytes",
        "Bytes forwarded (WebSocket frames), by direction.",
        (0..2).map(|d| ([("direction", DIRECTIONS[d])], bytes[d])),
    )?;
    let frames = sum2(&|s| s.frames);
    counters(
        encoder,
        "iotunnel_relay_frames",
        "Frames forwarded, by direction.",
        (0..2).map(|d| ([("direction", DIRECTIONS[d])], frames[d])),
    )?;
    let m = encoder.encode_descriptor(
        "iotunnel_forward_latency_seconds",
        "Time from a frame fully read to fully written to the other side.",
        None,
        MetricType::Histogram,
    )?;
    histogram(m, &merge(shards.iter().map(|s| &s.forward_latency)))?;
    let mut m = encoder.encode_descriptor(
        "iotunnel_peer_rtt_seconds",
        "WebSocket ping round trips, by role.",
        None,
        MetricType::Histogram,
    )?;
    for (r, role) in ROLES.iter().enumerate() {
        let h = merge(shards.iter().map(|s| &s.rtt[r]));
        histogram(m.encode_family(&[("role", *role)])?, &h)?;
    }
    let reasons = Refusal::ALL
        .iter()
        .map(|r| r.label())
        .chain(HANDSHAKE_FAILURES.iter().copied());
    counters(
        encoder,
        "iotunnel_handshake_failures",
        "Relay handshakes that failed, by reason.",
        reasons.map(|reason| {
            let n = shards
                .iter()
                .map(|s| s.handshake_failures.get(reason).copied().unwrap_or(0))
                .sum();
            ([("reason", reason)], n)
        }),
    )?;
    gauges(
        encoder,
        "iotunnel_shard_tunnels",
        "Tunnels with a connected peer, by owner shard.",
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| ([("shard", i)], s.tunnels)),
    )?;
    counters(
        encoder,
        "iotunnel_shard_bytes",
        "Bytes forwarded (WebSocket frames, both directions), by the shard that forwarded them.",
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| ([("shard", i)], s.bytes[0] + s.bytes[1])),
    )
}

/// The fleet's mesh series (all zero on a single node).
fn encode_mesh(encoder: &mut DescriptorEncoder, shards: &[StatsSnapshot]) -> Fmt {
    let sum = |f: &dyn Fn(&StatsSnapshot) -> u64| shards.iter().map(f).sum::<u64>();
    counters(
        encoder,
        "iotunnel_mesh_forwards",
        "Connections this node forwarded to a tunnel's owner node, by result.",
        ["ok", "unreachable"]
            .iter()
            .enumerate()
            .map(|(i, result)| ([("result", *result)], sum(&|s| s.mesh_forwards[i]))),
    )?;
    gauges(
        encoder,
        "iotunnel_mesh_connections",
        "Forwarded connections open now (outbound: to an owner node, inbound: from another node).",
        MeshDirection::ALL.map(|d| {
            (
                [("direction", d.as_str())],
                sum(&|s| s.mesh_connections[d as usize]),
            )
        }),
    )?;
    counters(
        encoder,
        "iotunnel_mesh_bytes",
        "Bytes carried by forwarded connections, both ways summed, by direction.",
        MeshDirection::ALL.map(|d| {
            (
                [("direction", d.as_str())],
                sum(&|s| s.mesh_bytes[d as usize]),
            )
        }),
    )
}

/// The optional per-tunnel series (`--metrics-per-tunnel`), for at most `max` tunnels.
fn encode_per_tunnel(encoder: &mut DescriptorEncoder, shards: &[StatsSnapshot], max: usize) -> Fmt {
    if max == 0 {
        return Ok(());
    }
    let mut all: Vec<_> = shards.iter().flat_map(|s| &s.per_tunnel).collect();
    all.sort_by(|a, b| a.tunnel_id.cmp(&b.tunnel_id));
    all.truncate(max);
    counters(
        encoder,
        "iotunnel_tunnel_relay_bytes",
        "Bytes forwarded per tunnel, by direction.",
        all.iter().flat_map(|t| {
            (0..2).map(move |d| {
                (
                    [
                        ("tunnel_id", t.tunnel_id.as_str()),
                        ("direction", DIRECTIONS[d]),
                    ],
                    t.bytes[d],
                )
            })
        }),
    )?;
    gauges(
        encoder,
        "iotunnel_tunnel_peer_connected",
        "Whether each side of a tunnel is connected.",
        all.iter().flat_map(|t| {
            (0..2).map(move |r| {
                (
                    [("tunnel_id", t.tunnel_id.as_str()), ("role", ROLES[r])],
                    u64::from(t.connected[r]),
                )
            })
        }),
    )?;
    let mut m = encoder.encode_descriptor(
        "iotunnel_tunnel_peer_rtt_seconds",
        "Smoothed ping RTT of each side of a tunnel.",
        None,
        MetricType::Gauge,
    )?;
    for t in &all {
        for (r, role) in ROLES.iter().enumerate() {
            if let Some(us) = t.srtt_us[r] {
                let labels = [("tunnel_id", t.tunnel_id.as_str()), ("role", *role)];
                ConstGauge::new(us as f64 / 1e6).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}
