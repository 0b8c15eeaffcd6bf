//! Observability end to end: the Grafana dashboard only queries metrics a
//! running server really exports, its provisioning files are well formed,
//! and a real Prometheus scrapes ouro and answers every dashboard query.
//! One shared server serves every test of this file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

/// The shared server, warmed up with a few requests (tokens generated, one
/// error counted) so every request-level metric has a series.
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let s = common::start(&["--kv-cache-bytes", "268435456", "--experience", "obs-lib"]);
        for prompt in ["Count from one to five.", "Name three colors."] {
            let body =
                format!(r#"{{"model":"{}","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":12,"temperature":0}}"#, s.model);
            let (status, text) = raw_post(&s.addr, "/v1/chat/completions", &body).unwrap();
            assert_eq!(status, 200, "{text}");
        }
        let (status, _) = raw_post(&s.addr, "/v1/chat/completions", "{not json").unwrap();
        assert_eq!(status, 400);
        s
    })
}

/// A plain HTTP/1.1 POST of a JSON body, returning status and body.
fn raw_post(addr: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

// --- the dashboard ---

fn dashboard() -> Value {
    let path = common::root().join("grafana/dashboards/ouro.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("dashboard has panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets, and the metric
/// of `label_values(metric, label)` template variables (as a selector).
fn exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {:?}: a target without expr", p["title"]));
            out.push((p["title"].as_str().unwrap_or("").to_string(), expr.to_string()));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let q = match &v["query"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("query").and_then(Value::as_str).unwrap_or("").to_string(),
            _ => String::new(),
        };
        if let Some(args) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            let metric = args.split(',').next().unwrap().trim();
            out.push((format!("variable {}", v["name"]), metric.to_string()));
        }
    }
    out
}

/// Grafana's variables replaced by values Prometheus accepts.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("${model}", ".*").replace("$model", ".*")
}

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

const KEYWORDS: &[&str] =
    &["by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"];

/// The metric names a PromQL expression selects. A small lexer: string
/// literals, label matchers (`{...}`) and range/subquery brackets (`[...]`)
/// are skipped; an identifier followed by `(` is a function or aggregation;
/// identifiers in the label lists of `by`/`without`/`on`/`ignoring`/
/// `group_left`/`group_right` are labels; keywords are keywords; what is
/// left is a metric name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut label_list_next = false; // the next `(` opens a label list
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let mut quote = None;
                i += 1;
                while i < chars.len() {
                    match (quote, chars[i]) {
                        (None, q @ ('"' | '\'' | '`')) => quote = Some(q),
                        (Some(q), ch) if ch == q => quote = None,
                        (Some(_), '\\') => i += 1,
                        (None, ch) if ch == close => break,
                        _ => {}
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_next => {
                label_list_next = false;
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // a number or duration literal (`0.99`, `1e3`, `5m`, `1h30m`)
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':' || chars[i] == '$') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                let next_word: String = chars[j..].iter().take_while(|c| c.is_ascii_alphabetic() || **c == '_').collect();
                if AGGREGATIONS.contains(&lower.as_str()) && ["by", "without"].contains(&next_word.to_ascii_lowercase().as_str()) {
                    // `sum by (..) (..)`: an aggregation, not a metric
                } else if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&lower.as_str()) {
                    label_list_next = j < chars.len() && chars[j] == '(';
                } else if j < chars.len() && chars[j] == '(' {
                    // a function or aggregation (its arguments are lexed next)
                } else if !KEYWORDS.contains(&lower.as_str()) && !word.starts_with('$') {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn the_promql_lexer_finds_metric_names_only() {
    let e = r#"sum by (drafter, position) (rate(a_total{model_name=~"$model", x="b_total"}[$__rate_interval])) / on (drafter) group_left sum by (drafter) (rate(c_count[5m] offset 1m)) > bool 0"#;
    assert_eq!(metric_names(e), ["a_total", "c_count"].iter().map(|s| s.to_string()).collect());
    let q = r#"histogram_quantile(0.99, sum without (instance) (rate(h_bucket{le!="+Inf"}[1m])))"#;
    assert_eq!(metric_names(q), ["h_bucket".to_string()].into_iter().collect());
    assert_eq!(metric_names("1 + max(g)"), ["g".to_string()].into_iter().collect());
    let agg = "sum by (le) (rate(x_bucket[5m])) / count without (a) (y) + topk(3, z)";
    assert_eq!(metric_names(agg), ["x_bucket", "y", "z"].iter().map(|s| s.to_string()).collect());
}

/// The exposition of `/metrics`: series names, and each family's type.
struct Exported {
    series: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

fn exported(text: &str) -> Exported {
    let mut series = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            series.insert(line[..end].to_string());
        }
    }
    Exported { series, types }
}

impl Exported {
    /// Whether `name` is a series the server exports: a counter or gauge by
    /// its own name, or a histogram's `_bucket`/`_sum`/`_count` (the bare
    /// family name of a histogram is not a series).
    fn has(&self, name: &str) -> Result<(), String> {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(kind) = self.types.get(base) {
                    return match kind.as_str() {
                        "histogram" if self.series.contains(name) => Ok(()),
                        "summary" if suffix != "_bucket" && self.series.contains(name) => Ok(()),
                        k => Err(format!("{name}: family {base} is a {k}, which has no {suffix} series")),
                    };
                }
            }
        }
        match self.types.get(name).map(String::as_str) {
            Some("histogram") | Some("summary") => Err(format!("{name} is a histogram family: query {name}_bucket, _sum or _count")),
            Some(_) if self.series.contains(name) => Ok(()),
            Some(_) => Err(format!("{name} is declared but has no series yet")),
            None => Err(format!("{name} is not exported by the server")),
        }
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_server_exports() {
    let s = server();
    let (status, text) = common::raw_get(&s.addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    let exp = exported(&text);
    let d = dashboard();
    let exprs = exprs(&d);
    assert!(exprs.len() >= 20, "the dashboard has only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        if names.is_empty() {
            problems.push(format!("{title}: no metric in `{expr}`"));
        }
        for n in names {
            if let Err(e) = exp.has(&n) {
                problems.push(format!("{title}: {e} (in `{expr}`)"));
            }
            used.insert(n);
        }
        if expr.contains("histogram_quantile(") {
            assert!(expr.contains("_bucket") && expr.contains("le"), "{title}: histogram_quantile needs _bucket by le: {expr}");
        }
    }
    assert!(problems.is_empty(), "dashboard problems:\n{}", problems.join("\n"));
    // The sections the dashboard promises.
    for m in [
        "ouro_time_to_first_token_seconds_bucket",
        "ouro_inter_token_latency_seconds_bucket",
        "ouro_e2e_request_latency_seconds_bucket",
        "ouro_prompt_tokens_total",
        "ouro_generation_tokens_total",
        "ouro_num_requests_running",
        "ouro_num_requests_waiting",
        "ouro_kv_cache_usage_perc",
        "ouro_kv_cache_bytes",
        "ouro_spec_decode_num_accepted_tokens_total",
        "ouro_spec_decode_num_draft_tokens_total",
        "ouro_spec_decode_num_drafts_total",
        "ouro_spec_decode_num_accepted_tokens_per_pos_total",
        "ouro_speculator_version",
        "ouro_speculator_swaps_total",
        "ouro_trainer_loss",
        "ouro_trainer_traces_dropped_total",
        "ouro_experience_library_items",
        "ouro_experience_library_version",
        "ouro_experience_jobs",
        "ouro_experience_distill_failures_total",
    ] {
        assert!(used.contains(m), "the dashboard does not chart {m}");
    }
}

#[test]
fn the_dashboard_and_provisioning_files_are_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "ouro-overview");
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        let g = &p["gridPos"];
        assert!(g["w"].as_u64().unwrap() + g["x"].as_u64().unwrap() <= 24, "panel {id} is wider than the grid");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id} must use the datasource variable");
        }
    }
    let ds: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(common::root().join("grafana/provisioning/datasources/prometheus.yaml")).unwrap())
            .unwrap();
    assert_eq!(ds["apiVersion"], serde_yaml::Value::from(1));
    assert_eq!(ds["datasources"][0]["type"], serde_yaml::Value::from("prometheus"));
    let prov: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(common::root().join("grafana/provisioning/dashboards/ouro.yaml")).unwrap()).unwrap();
    assert_eq!(prov["providers"][0]["type"], serde_yaml::Value::from("file"));
    let path = prov["providers"][0]["options"]["path"].as_str().unwrap();
    let readme = std::fs::read_to_string(common::root().join("grafana/README.md")).unwrap();
    assert!(readme.contains(path), "grafana/README.md must mount the dashboards at {path}");
}

// --- a real Prometheus ---

/// Kills the child when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Prometheus binary, if installed (scripts/test.sh installs the Debian package).
fn prometheus_bin() -> Option<std::path::PathBuf> {
    let candidates = [std::env::var_os("OURO_PROMETHEUS").map(std::path::PathBuf::from), Some("/usr/bin/prometheus".into())];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

async fn prom_query(client: &reqwest::Client, base: &str, query: &str) -> Value {
    let resp = client.get(format!("{base}/api/v1/query")).query(&[("query", query)]).send().await.unwrap();
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_ouro_and_answers_the_dashboard_queries() {
    let Some(bin) = prometheus_bin() else {
        println!("SKIPPED: no Prometheus binary at /usr/bin/prometheus (install the Debian package `prometheus`, or set OURO_PROMETHEUS)");
        return;
    };
    let s = server();
    let dir = std::env::temp_dir().join(format!("ouro-test-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ouro\n    static_configs:\n      - targets: ['{}']\n",
            s.addr
        ),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(&bin)
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    let _reaper = Reaper(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    // ouro_generation_tokens_total comes back through Prometheus's API.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let tokens = loop {
        if let Ok(resp) = client.get(format!("{base}/api/v1/query")).query(&[("query", "ouro_generation_tokens_total")]).send().await {
            if let Ok(v) = resp.json::<Value>().await {
                if let Some(x) = v["data"]["result"][0]["value"][1].as_str().and_then(|x| x.parse::<f64>().ok()) {
                    assert_eq!(v["data"]["result"][0]["metric"]["job"], "ouro");
                    break x;
                }
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
            panic!("Prometheus did not return ouro_generation_tokens_total within 60 s; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(tokens >= 12.0, "ouro_generation_tokens_total = {tokens}");
    println!("Prometheus returned ouro_generation_tokens_total = {tokens} after {:.1} s", started.elapsed().as_secs_f64());

    // Every dashboard query is valid PromQL that Prometheus evaluates.
    let mut failures = Vec::new();
    for (title, expr) in exprs(&dashboard()) {
        let v = prom_query(&client, &base, &concrete(&expr)).await;
        if v["status"] != "success" {
            failures.push(format!("{title}: `{expr}`: {}", v["error"]));
        }
    }
    assert!(failures.is_empty(), "Prometheus rejected dashboard queries:\n{}", failures.join("\n"));
    // Gauges over the learning and experience sections come back too.
    let v = prom_query(&client, &base, "ouro_experience_library_items{library=\"obs-lib\"}").await;
    assert_eq!(v["data"]["result"].as_array().map(Vec::len), Some(1), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
