//! The files in `grafana/` and the queries the dashboards hold: shared by tests/grafana.rs
//! (static checks against a real /metrics) and tests/prometheus.rs (every query evaluated by a
//! real Prometheus).
#![allow(dead_code)]

use serde_json::Value;

/// A file under `grafana/`, e.g. `prometheus.yml`.
pub fn grafana_file(rel: &str) -> String {
    let path = format!("{}/grafana/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The provisioned dashboard, `grafana/dashboards/iotunnel.json`.
pub fn dashboard() -> Value {
    serde_json::from_str(&grafana_file("dashboards/iotunnel.json"))
        .expect("dashboard is valid JSON")
}

/// Every dashboard under `grafana/dashboards/` as (file name, JSON), sorted by name.
pub fn dashboards() -> Vec<(String, Value)> {
    let dir = format!("{}/grafana/dashboards", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| {
            e.expect("readable dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no dashboard JSON in {dir}");
    names
        .into_iter()
        .map(|n| {
            let text = grafana_file(&format!("dashboards/{n}"));
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, json)
        })
        .collect()
}

/// Every panel, rows' nested panels included.
pub fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            out.push(p);
            walk(p, out);
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

/// (panel title, expr) for every query target.
pub fn exprs(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("target has an expr");
            out.push((p["title"].as_str().unwrap().to_string(), expr.to_string()));
        }
    }
    out
}

/// A `query` template variable: its name, its query (`label_values(...)`) and the value
/// Grafana substitutes when "All" is selected.
#[derive(Debug, Clone)]
pub struct QueryVariable {
    pub name: String,
    pub query: String,
    pub all_value: Option<String>,
}

/// The dashboard's query variables, in dashboard order (a later one may use an earlier one).
pub fn query_variables(dash: &Value) -> Vec<QueryVariable> {
    dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| QueryVariable {
            name: v["name"].as_str().expect("variable name").to_string(),
            query: v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .or(v["definition"].as_str())
                .expect("query variable has a query")
                .to_string(),
            all_value: v["allValue"].as_str().map(str::to_string),
        })
        .collect()
}

/// Template variable queries (`label_values(...)`): they name metrics too.
pub fn variable_queries(dash: &Value) -> Vec<String> {
    query_variables(dash).into_iter().map(|v| v.query).collect()
}
