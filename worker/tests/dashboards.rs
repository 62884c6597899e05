//! `dashboards/`: the CloudWatch dashboard names only metrics the publisher emits (with their
//! exact dimensions) and CloudWatch's API (moto) accepts it; the Grafana dashboard queries only
//! metric names that `/metrics` shows.

mod aws_emulator;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use prometheus::Registry;
use serde_json::Value;
use tradeeon_shared::config::DEFAULT_CLOUDWATCH_NAMESPACE;
use tradeeon_shared::domain::{ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::JobKind;
use tradeeon_shared::store::QueueStats;
use tradeeon_worker::metrics::{CLOUDWATCH_METRICS, WorkerMetrics, outcome};

/// The CloudWatch dashboard's `${AWS::Region}` placeholder (filled by CloudFormation's `Fn::Sub`).
const REGION_PLACEHOLDER: &str = "${AWS::Region}";

fn dashboard(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One metric a CloudWatch widget names: namespace, metric name, dimensions (a `SEARCH` names
/// dimension names only, with empty values).
#[derive(Debug)]
struct NamedMetric {
    namespace: String,
    name: String,
    dimensions: Vec<(String, String)>,
    stat: Option<String>,
}

/// `SEARCH('{Namespace,Dim1,Dim2} MetricName="Name"', 'Stat', period)`.
fn parse_search(expression: &str) -> NamedMetric {
    let schema = expression
        .split_once("SEARCH('{")
        .and_then(|(_, rest)| rest.split_once('}'))
        .unwrap_or_else(|| panic!("unsupported expression {expression:?}"))
        .0;
    let mut parts = schema.split(',').map(str::trim);
    let namespace = parts.next().unwrap().to_string();
    let dimensions = parts.map(|d| (d.to_string(), String::new())).collect();
    let name = expression
        .split_once("MetricName=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .unwrap_or_else(|| panic!("a SEARCH must name its metric: {expression:?}"))
        .0
        .to_string();
    NamedMetric { namespace, name, dimensions, stat: None }
}

/// Every metric named by the dashboard's metric widgets (the `"."` shorthand repeats the previous
/// row's value).
fn cloudwatch_metrics(body: &Value) -> Vec<NamedMetric> {
    let mut named = Vec::new();
    for widget in body["widgets"].as_array().expect("widgets") {
        if widget["type"] != "metric" {
            continue;
        }
        let properties = &widget["properties"];
        assert!(properties["region"].is_string(), "a metric widget needs a region: {widget}");
        let mut previous: Vec<String> = Vec::new();
        for row in properties["metrics"].as_array().expect("metrics") {
            let row = row.as_array().expect("a metrics row is an array");
            if let Some(expression) = row.first().and_then(|v| v["expression"].as_str()) {
                named.push(parse_search(expression));
                continue;
            }
            let options = row.last().filter(|v| v.is_object());
            let strings: Vec<String> = row
                .iter()
                .filter_map(Value::as_str)
                .enumerate()
                .map(|(i, s)| if s == "." { previous.get(i).cloned().expect("'.' after a row") } else { s.to_string() })
                .collect();
            assert!(strings.len() >= 2 && strings.len().is_multiple_of(2), "bad metrics row {row:?}");
            let stat =
                options.and_then(|o| o["stat"].as_str()).or_else(|| properties["stat"].as_str()).map(str::to_string);
            named.push(NamedMetric {
                namespace: strings[0].clone(),
                name: strings[1].clone(),
                dimensions: strings[2..].chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect(),
                stat,
            });
            previous = strings;
        }
    }
    named
}

fn valid_dimension_value(dimension: &str, value: &str) -> bool {
    match dimension {
        "Exchange" => Exchange::from_str(value).is_ok_and(|e| e.as_str() == value),
        "Status" => ConnectionStatus::from_str(value).is_ok_and(|s| s.as_str() == value),
        "Code" => CheckCode::ALL.iter().any(|c| c.as_str() == value),
        "JobKind" => JobKind::ALL.iter().any(|k| k.as_str() == value),
        _ => false,
    }
}

#[test]
fn cloudwatch_dashboard_names_only_metrics_the_worker_publishes() {
    let body: Value = serde_json::from_str(&dashboard("cloudwatch.json")).expect("valid JSON");
    for widget in body["widgets"].as_array().unwrap() {
        let (x, width) = (widget["x"].as_u64().unwrap(), widget["width"].as_u64().unwrap());
        assert!(x + width <= 24 && widget["height"].as_u64().unwrap() > 0, "layout of {widget}");
    }
    let named = cloudwatch_metrics(&body);
    assert!(!named.is_empty());
    for metric in &named {
        assert_eq!(metric.namespace, DEFAULT_CLOUDWATCH_NAMESPACE, "{metric:?}");
        let published = CLOUDWATCH_METRICS
            .iter()
            .find(|m| m.name == metric.name)
            .unwrap_or_else(|| panic!("{} is not a metric the worker publishes: {metric:?}", metric.name));
        // CloudWatch matches dimension sets exactly: a subset or superset would show nothing.
        let dims: BTreeSet<&str> = metric.dimensions.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(dims, published.dimensions.iter().copied().collect(), "{metric:?}");
        for (dimension, value) in &metric.dimensions {
            assert!(value.is_empty() || valid_dimension_value(dimension, value), "{dimension}={value:?} in {metric:?}");
        }
    }
    let used: BTreeSet<&str> = named.iter().map(|m| m.name.as_str()).collect();
    for metric in CLOUDWATCH_METRICS {
        assert!(used.contains(metric.name), "the dashboard does not show {}", metric.name);
    }
    let latency_stats: BTreeSet<&str> =
        named.iter().filter(|m| m.name == "HealthCheckLatency").filter_map(|m| m.stat.as_deref()).collect();
    assert_eq!(latency_stats, BTreeSet::from(["p50", "p95"]));
    for exchange in Exchange::ALL {
        for metric in ["ConnectionsByStatus", "HealthCheckLatency", "RateLimited"] {
            assert!(
                named.iter().any(|m| m.name == metric && m.dimensions.iter().any(|(_, v)| v == exchange.as_str())),
                "{metric} for {exchange} is missing"
            );
        }
    }
}

#[tokio::test]
async fn cloudwatch_dashboard_is_accepted_by_put_dashboard() {
    let Some(emulator) = aws_emulator::emulator("cloudwatch_dashboard_is_accepted_by_put_dashboard") else { return };
    let text = dashboard("cloudwatch.json");
    assert!(text.contains(REGION_PLACEHOLDER));
    let body = text.replace(REGION_PLACEHOLDER, aws_emulator::REGION);
    let name = format!("tradeeon-connections-{}", std::process::id());

    let client = aws_emulator::client(&emulator.cloudwatch_url);
    let put = client.put_dashboard().dashboard_name(&name).dashboard_body(&body).send().await.expect("PutDashboard");
    assert!(put.dashboard_validation_messages().is_empty(), "{:?}", put.dashboard_validation_messages());
    let got = client.get_dashboard().dashboard_name(&name).send().await.expect("GetDashboard");
    let stored: Value = serde_json::from_str(got.dashboard_body().unwrap()).unwrap();
    assert_eq!(stored, serde_json::from_str::<Value>(&body).unwrap());

    let invalid = client.put_dashboard().dashboard_name(&name).dashboard_body("{not json").send().await;
    assert!(invalid.is_err(), "moto validates the body, so the check above means something");
}

/// The registry's text output after one observation of everything the workers record.
fn observed_metrics() -> (Registry, String) {
    let registry = Registry::new();
    let metrics = WorkerMetrics::register(&registry).unwrap();
    metrics.job_finished(JobKind::Verify, outcome::DONE, Duration::from_millis(250));
    metrics.check_recorded(Exchange::Binance, CheckCode::Timeout, Duration::from_millis(900));
    metrics.rate_limit_wait(Exchange::Binance, Duration::from_millis(30));
    metrics.rate_limited(Exchange::Kraken);
    metrics.set_queue(&QueueStats {
        queued: 3,
        running: 1,
        scheduled: 2,
        oldest_queued_age: Some(Duration::from_secs(9)),
    });
    metrics.set_connections(&[(Exchange::Coinbase, ConnectionStatus::Connected, 2)]);
    metrics.sweep_completed();
    metrics.sweep_stretched(Exchange::Binance);
    let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
    (registry, text)
}

/// Every `tradeeon_*` name in the dashboard's queries (panel targets and template variables).
fn grafana_queried_names(value: &Value, names: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if matches!(key.as_str(), "expr" | "query" | "definition")
                    && let Some(query) = v.as_str()
                {
                    let mut rest = query;
                    while let Some(at) = rest.find("tradeeon_") {
                        let name: String =
                            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        rest = &rest[at + name.len()..];
                        names.insert(name);
                    }
                }
                grafana_queried_names(v, names);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| grafana_queried_names(v, names)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_queries_only_metrics_on_the_metrics_endpoint() {
    let dashboard: Value = serde_json::from_str(&dashboard("grafana.json")).expect("valid JSON");
    let (registry, text) = observed_metrics();
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();

    let mut queried = BTreeSet::new();
    grafana_queried_names(&dashboard, &mut queried);
    assert!(!queried.is_empty());
    for name in &queried {
        assert!(exposed.contains(name.as_str()), "the dashboard queries {name}, which /metrics does not show");
    }
    // And the other way round: every worker metric is on the dashboard.
    for family in registry.gather() {
        let family = family.name();
        assert!(
            queried.iter().any(|q| q == family || q.strip_prefix(family).is_some_and(|s| s.starts_with('_'))),
            "the dashboard does not show {family}"
        );
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{} has no targets", panel["title"]));
        assert!(targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())), "{}", panel["title"]);
    }
}
