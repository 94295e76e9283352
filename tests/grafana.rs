//! The Grafana dashboard and Prometheus config in `grafana/`: the dashboard parses, has every
//! panel issue 5 asks for, and queries only metrics, labels and label values that a real
//! server exports.
mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::dashboard::{dashboard, exprs, grafana_file, panels, variable_queries};
use common::*;

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A PromQL token scan: (identifier, byte offset just after it), outside string literals.
fn identifiers(expr: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            // Skip the literal (label values such as "4..|5..").
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if !is_ident(d) {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            out.push((expr[i..end].to_string(), end));
        }
    }
    out
}

fn is_metric(name: &str) -> bool {
    name.starts_with("iotunnel_") || name.starts_with("process_")
}

/// A label matcher: (label, op, value).
type Matcher = (String, String, String);

/// Metric names used in an expression, each with the label matchers of its selector.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut out = Vec::new();
    for (name, end) in identifiers(expr) {
        if !is_metric(&name) {
            continue;
        }
        let rest = &expr[end..];
        let matchers = match rest.strip_prefix('{') {
            Some(body) => parse_matchers(&body[..body.find('}').expect("closed selector")]),
            None => Vec::new(),
        };
        out.push((name, matchers));
    }
    out
}

/// `a="x", b=~"y"` into (name, op, value).
fn parse_matchers(body: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let name_end = rest
            .find(|c: char| !is_ident(c))
            .expect("matcher has an op");
        let name = rest[..name_end].to_string();
        let after = rest[name_end..].trim_start();
        let op_len = after.find('"').expect("matcher value is quoted");
        let op = after[..op_len].trim().to_string();
        let value_and_rest = &after[op_len + 1..];
        let close = value_and_rest.find('"').expect("closed quote");
        let value = value_and_rest[..close].to_string();
        out.push((name, op, value));
        rest = value_and_rest[close + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    out
}

/// Label names in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)` clauses.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ids = identifiers(expr);
    for (word, end) in &ids {
        if ["by", "without", "on", "ignoring"].contains(&word.as_str()) {
            let rest = expr[*end..].trim_start();
            if let Some(body) = rest.strip_prefix('(') {
                let body = &body[..body.find(')').expect("closed grouping")];
                for l in body.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                    out.insert(l.to_string());
                }
            }
        }
    }
    out
}

/// What a scrape exports: family name to type, and sample lines by family.
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, Vec<String>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut types = BTreeMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                types.insert(name.to_string(), kind.to_string());
            }
        }
        let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = &l[..l.find(['{', ' ']).unwrap()];
            let family = Self::family_of(&types, name).unwrap_or(name);
            samples
                .entry(family.to_string())
                .or_default()
                .push(l.to_string());
        }
        Self { types, samples }
    }

    /// The family a sample or query name belongs to: itself, or a histogram's
    /// `_bucket`/`_sum`/`_count` series.
    fn family_of<'a>(types: &BTreeMap<String, String>, name: &'a str) -> Option<&'a str> {
        if types.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|s| {
            let base = name.strip_suffix(s)?;
            (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
        })
    }

    fn has_label(&self, family: &str, label: &str) -> bool {
        let needle = format!("{label}=\"");
        self.samples.get(family).into_iter().flatten().any(|l| {
            l.find('{').is_some_and(|i| {
                l[i..]
                    .split(['{', ','])
                    .any(|part| part.starts_with(&needle))
            })
        })
    }

    fn has_label_value(&self, family: &str, label: &str, value: &str) -> bool {
        let needle = format!("{label}=\"{value}\"");
        self.samples
            .get(family)
            .into_iter()
            .flatten()
            .any(|l| l.contains(&needle))
    }
}

/// Target labels Prometheus adds at scrape time: not in /metrics.
const SCRAPE_LABELS: [&str; 2] = ["job", "instance"];

#[test]
fn dashboard_is_valid_and_provisionable() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "iotunnel");
    assert_eq!(dash["title"], "iotunnel relay");
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    // Variables: a Prometheus datasource, and job/instance so several relay nodes can be viewed.
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name} missing"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let ds_uid = var("datasource")["current"]["value"].as_str().unwrap();
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}");
        assert_eq!(var(name)["includeAll"], true);
    }

    // The provisioned datasource is the variable's default.
    let ds = grafana_file("provisioning/datasources/prometheus.yml");
    assert!(ds.contains("apiVersion: 1"), "{ds}");
    assert!(ds.contains("type: prometheus"), "{ds}");
    assert!(ds.contains(&format!("uid: {ds_uid}")), "{ds}");
    assert!(ds.contains("url: http://localhost:9090"), "{ds}");
    let provider = grafana_file("provisioning/dashboards/iotunnel.yml");
    assert!(provider.contains("type: file"), "{provider}");
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards"),
        "{provider}"
    );

    // Panels: unique ids, laid out, timeseries/stat/row only, queries through the variable.
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().expect("panel title");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        let kind = p["type"].as_str().unwrap();
        assert!(
            ["row", "timeseries", "stat"].contains(&kind),
            "{title}: {kind}"
        );
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            assert!(refs.insert(t["refId"].as_str().unwrap()), "{title}: refId");
        }
        // Units: latencies in seconds, byte rates in Bps.
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        let all = targets
            .iter()
            .map(|t| t["expr"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        if all.contains("histogram_quantile") {
            assert_eq!(unit, "s", "{title}");
        }
        if all.contains("rate(iotunnel_relay_bytes_total") {
            assert_eq!(unit, "Bps", "{title}");
        }
        if all.contains("process_resident_memory_bytes") {
            assert_eq!(unit, "bytes", "{title}");
        }
    }

    // Every selector is filtered by the job/instance variables, and histograms are queried
    // through their buckets with rate().
    for (title, expr) in exprs(&dash) {
        let sels = selectors(&expr);
        assert!(!sels.is_empty(), "{title}: no metric in {expr}");
        for (name, matchers) in sels {
            for (label, var) in [("job", "$job"), ("instance", "$instance")] {
                assert!(
                    matchers
                        .iter()
                        .any(|(l, op, v)| l == label && op == "=~" && v == var),
                    "{title}: {name} not filtered by {label}=~\"{var}\" in {expr}"
                );
            }
        }
        if expr.contains("histogram_quantile") {
            assert!(expr.contains("_bucket{"), "{title}: {expr}");
            assert!(expr.contains("rate("), "{title}: {expr}");
            assert!(
                grouping_labels(&expr).contains("le"),
                "{title}: quantile without `by (le)`: {expr}"
            );
        }
        if expr.contains("_total{") {
            assert!(
                expr.contains("rate(") || expr.contains("increase("),
                "{title}: raw counter: {expr}"
            );
        }
    }

    // Scrape config.
    let prom = grafana_file("prometheus.yml");
    assert!(prom.contains("scrape_configs:"), "{prom}");
    assert!(
        prom.contains("job_name: \"iotunnel\"") || prom.contains("job_name: iotunnel"),
        "{prom}"
    );
    // The server's default metrics address.
    assert!(
        prom.contains(&format!("\"{}\"", iotunnel::config::DEFAULT_METRICS_ADDR)),
        "{prom}"
    );
    assert!(prom.contains("scrape_interval: 15s"), "{prom}");
    assert!(prom.contains("metrics_path: /metrics"), "{prom}");
}

#[test]
fn every_panel_the_issue_asks_for_exists() {
    let dash = dashboard();
    let all = exprs(&dash);
    // (title keyword, a metric the panel must query, a PromQL fragment it must use).
    let required: &[(&str, &str, &str)] = &[
        ("tunnels by state", "iotunnel_tunnels{", "by (state)"),
        (
            "connected devices and clients",
            "iotunnel_peers_connected",
            "by (role)",
        ),
        (
            "connected devices and clients",
            "iotunnel_device_channels_connected",
            "",
        ),
        ("connects", "iotunnel_peer_connects_total", "rate("),
        (
            "disconnects by reason",
            "iotunnel_peer_disconnects_total",
            "reason",
        ),
        ("throughput", "iotunnel_relay_bytes_total", "by (direction)"),
        (
            "throughput",
            "iotunnel_relay_frames_total",
            "by (direction)",
        ),
        (
            "forwarding latency",
            "iotunnel_forward_latency_seconds_bucket",
            "histogram_quantile(0.5,",
        ),
        (
            "forwarding latency",
            "iotunnel_forward_latency_seconds_bucket",
            "histogram_quantile(0.99,",
        ),
        (
            "forwarding latency",
            "iotunnel_forward_latency_seconds_bucket",
            "histogram_quantile(0.999,",
        ),
        (
            "peer rtt",
            "iotunnel_peer_rtt_seconds_bucket",
            "histogram_quantile(0.5,",
        ),
        (
            "peer rtt",
            "iotunnel_peer_rtt_seconds_bucket",
            "histogram_quantile(0.99,",
        ),
        ("peer rtt", "iotunnel_peer_rtt_seconds_bucket", "role"),
        (
            "handshake failures",
            "iotunnel_handshake_failures_total",
            "by (reason)",
        ),
        ("tunnels per shard", "iotunnel_shard_tunnels", "shard"),
        // Shard balance (issue 12, item 5): per-shard throughput and min/max across shards.
        (
            "throughput per shard",
            "iotunnel_shard_bytes_total",
            "by (instance, shard)",
        ),
        (
            "shard balance",
            "iotunnel_shard_tunnels",
            "min by (instance)",
        ),
        (
            "shard balance",
            "iotunnel_shard_tunnels",
            "max by (instance)",
        ),
        (
            "shard balance",
            "iotunnel_shard_bytes_total",
            "min by (instance) (rate(",
        ),
        (
            "shard balance",
            "iotunnel_shard_bytes_total",
            "max by (instance) (rate(",
        ),
        (
            "api request rate",
            "iotunnel_api_requests_total",
            "by (route)",
        ),
        (
            "api error",
            "iotunnel_api_requests_total",
            "status=~\"4..|5..\"",
        ),
        (
            "api latency",
            "iotunnel_api_request_duration_seconds_bucket",
            "histogram_quantile(0.5,",
        ),
        (
            "api latency",
            "iotunnel_api_request_duration_seconds_bucket",
            "histogram_quantile(0.99,",
        ),
        ("cpu", "process_cpu_seconds_total", "rate("),
        ("rss", "process_resident_memory_bytes", ""),
        ("fds", "process_open_fds", ""),
        ("build", "iotunnel_build_info", "version"),
        // The fleet row (issue 11).
        ("nodes live", "iotunnel_fleet_nodes", "state=\"live\""),
        (
            "owned tunnels per node",
            "iotunnel_tunnels{",
            "by (instance)",
        ),
        ("peers per node", "iotunnel_peers_connected", "by (instance"),
        (
            "mesh traffic per node",
            "iotunnel_mesh_bytes_total",
            "by (instance, direction)",
        ),
        ("mesh forwards", "iotunnel_mesh_forwards_total", "rate("),
        ("mesh connections", "iotunnel_mesh_connections", ""),
        ("leader", "iotunnel_fleet_leader", ""),
    ];
    for (keyword, metric, fragment) in required {
        let found = all.iter().any(|(title, expr)| {
            title.to_lowercase().contains(keyword)
                && expr.contains(metric)
                && expr.contains(fragment)
        });
        assert!(
            found,
            "no panel titled ~{keyword:?} querying {metric} with {fragment:?}"
        );
    }
}

#[tokio::test]
async fn every_dashboard_metric_and_label_is_exported_by_a_real_server() {
    let t = TestServer::start_with(|s| s.relay_plaintext = true).await;
    let url = format!("http://{}/metrics", t.server().metrics_addr);
    let resp = reqwest::get(url).await.unwrap();
    assert!(resp.status().is_success());
    let text = resp.text().await.unwrap();
    let exp = Exposition::parse(&text);

    let dash = dashboard();
    let mut queries: Vec<(String, String)> = exprs(&dash);
    queries.extend(
        variable_queries(&dash)
            .into_iter()
            .map(|q| ("variable".to_string(), q)),
    );
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let mut families = BTreeSet::new();
        for (name, matchers) in selectors(expr) {
            let family = Exposition::family_of(&exp.types, &name).unwrap_or_else(|| {
                panic!("{title}: {name} is not exported (no `# TYPE {name}` in /metrics): {expr}")
            });
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{title}: {family}"
            );
            assert!(
                !(family == name && exp.types[family] == "histogram"),
                "{title}: histogram {name} has no series of its own; use {name}_bucket: {expr}"
            );
            // Label matchers name labels the family has, and exact values it exports.
            for (label, op, value) in matchers {
                if SCRAPE_LABELS.contains(&label.as_str()) {
                    continue;
                }
                assert!(
                    exp.has_label(family, &label),
                    "{title}: {family} has no label {label}: {expr}"
                );
                if op == "=" {
                    assert!(
                        exp.has_label_value(family, &label, &value),
                        "{title}: {family} has no series {label}=\"{value}\": {expr}"
                    );
                }
            }
            families.insert(family.to_string());
            used.insert(family.to_string());
        }
        // Grouping labels exist on at least one family the expression reads.
        for label in grouping_labels(expr) {
            if SCRAPE_LABELS.contains(&label.as_str()) {
                continue;
            }
            assert!(
                families.iter().any(|f| exp.has_label(f, &label)),
                "{title}: no series of {families:?} has label {label}: {expr}"
            );
        }
    }

    // The contract metrics are all on the dashboard.
    for name in [
        "iotunnel_tunnels",
        "iotunnel_peers_connected",
        "iotunnel_peer_connects_total",
        "iotunnel_peer_disconnects_total",
        "iotunnel_relay_bytes_total",
        "iotunnel_relay_frames_total",
        "iotunnel_forward_latency_seconds",
        "iotunnel_peer_rtt_seconds",
        "iotunnel_handshake_failures_total",
        "iotunnel_shard_tunnels",
        "iotunnel_shard_bytes_total",
        "iotunnel_device_channels_connected",
        "iotunnel_api_requests_total",
        "iotunnel_api_request_duration_seconds",
        "iotunnel_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(used.contains(name), "{name} is not on the dashboard");
        assert!(exp.types.contains_key(name), "{name} is not exported");
    }
    // And everything the server exports is on the dashboard.
    let missing: Vec<_> = exp
        .types
        .keys()
        .filter(|n| is_metric(n) && !used.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "exported but not on the dashboard: {missing:?}"
    );
}
