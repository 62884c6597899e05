//! The CloudWatch publisher through the real SDK: against moto (behind the CBOR proxy) for what
//! CloudWatch stores, and against small local stubs for retries and dead endpoints.

mod aws_emulator;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat};
use axum::http::{HeaderMap, StatusCode};
use prometheus::Registry;
use tradeeon_shared::domain::{ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::JobKind;
use tradeeon_shared::store::QueueStats;
use tradeeon_worker::cloudwatch::{CloudWatchPublisher, MAX_PENDING_DATUMS, PublisherSettings};
use tradeeon_worker::metrics::{CLOUDWATCH_METRICS, CloudWatchDatum, DatumValue, Unit, WorkerMetrics, outcome};

fn settings(namespace: &str) -> PublisherSettings {
    PublisherSettings {
        namespace: namespace.to_string(),
        interval: Duration::from_secs(60),
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        attempt_timeout: Duration::from_secs(10),
    }
}

fn worker_metrics() -> (Registry, WorkerMetrics) {
    let registry = Registry::new();
    let metrics = WorkerMetrics::register(&registry).unwrap();
    (registry, metrics)
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `(metric, [(dimension, value)], statistic)`.
type Query<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

/// Each query's statistic over `[start, end)`: one value per query, since moto aggregates the
/// whole (short) window into one period; none when nothing was published.
async fn read_back(
    client: &aws_sdk_cloudwatch::Client,
    namespace: &str,
    start: i64,
    end: i64,
    queries: &[Query<'_>],
) -> Vec<Vec<f64>> {
    let data_queries = queries
        .iter()
        .enumerate()
        .map(|(i, (name, dims, stat))| {
            let dims = dims.iter().map(|(n, v)| Dimension::builder().name(*n).value(*v).build()).collect();
            MetricDataQuery::builder()
                .id(format!("q{i}"))
                .metric_stat(
                    MetricStat::builder()
                        .metric(
                            Metric::builder()
                                .namespace(namespace)
                                .metric_name(*name)
                                .set_dimensions(Some(dims))
                                .build(),
                        )
                        .period(60)
                        .stat(*stat)
                        .build(),
                )
                .build()
        })
        .collect();
    let output = client
        .get_metric_data()
        .set_metric_data_queries(Some(data_queries))
        .start_time(DateTime::from_secs(start))
        .end_time(DateTime::from_secs(end))
        .send()
        .await
        .expect("GetMetricData");
    let by_id: BTreeMap<&str, Vec<f64>> =
        output.metric_data_results().iter().map(|r| (r.id().unwrap_or_default(), r.values().to_vec())).collect();
    (0..queries.len()).map(|i| by_id.get(format!("q{i}").as_str()).cloned().unwrap_or_default()).collect()
}

#[tokio::test]
async fn published_metrics_read_back_with_their_names_dimensions_and_values() {
    let Some(emulator) = aws_emulator::emulator("published_metrics_read_back") else { return };
    let namespace = aws_emulator::unique_namespace("readback");
    let (_registry, metrics) = worker_metrics();

    for _ in 0..2 {
        metrics.job_finished(JobKind::Verify, outcome::DONE, Duration::from_millis(300));
    }
    metrics.job_finished(JobKind::Verify, outcome::FAILED, Duration::from_millis(40));
    metrics.job_finished(JobKind::HealthCheck, outcome::RETRIED, Duration::from_millis(40));
    for _ in 0..3 {
        metrics.check_recorded(Exchange::Kraken, CheckCode::Ok, Duration::from_millis(120));
    }
    metrics.check_recorded(Exchange::Kraken, CheckCode::InvalidSignature, Duration::from_millis(480));
    metrics.rate_limited(Exchange::Binance);
    metrics.rate_limited(Exchange::Binance);
    metrics.set_queue(&QueueStats {
        queued: 7,
        running: 1,
        scheduled: 2,
        oldest_queued_age: Some(Duration::from_secs(42)),
    });
    metrics.set_connections(&[
        (Exchange::Kraken, ConnectionStatus::Connected, 5),
        (Exchange::Kraken, ConnectionStatus::Error, 1),
    ]);
    metrics.sweep_completed();

    let start = now_secs() - 1;
    let publisher = CloudWatchPublisher::new(
        &aws_emulator::sdk_config(&emulator.cloudwatch_url),
        settings(&namespace),
        metrics.clone(),
    );
    let report = publisher.publish_now().await;
    assert_eq!(report.dropped, 0, "{report:?}");
    assert_eq!(report.calls, 1, "{report:?}");
    assert!(report.published > 20, "{report:?}");
    let end = now_secs() + 2;

    let client = aws_emulator::client(&emulator.cloudwatch_url);
    let kraken = [("Exchange", "kraken")];
    let queries: &[Query<'_>] = &[
        ("HealthCheckLatency", &kraken, "SampleCount"),
        ("HealthCheckLatency", &kraken, "Sum"),
        ("HealthCheckLatency", &kraken, "Maximum"),
        ("HealthCheckLatency", &kraken, "Minimum"),
        ("HealthCheckFailures", &[("Exchange", "kraken"), ("Code", "invalid_signature")], "Sum"),
        ("RateLimited", &[("Exchange", "binance")], "Sum"),
        ("JobsProcessed", &[("JobKind", "verify")], "Sum"),
        ("JobsProcessed", &[("JobKind", "health_check")], "Sum"),
        ("JobsFailed", &[("JobKind", "verify")], "Sum"),
        ("QueueDepth", &[], "Maximum"),
        ("OldestQueuedJobAgeSeconds", &[], "Maximum"),
        ("ConnectionsByStatus", &[("Exchange", "kraken"), ("Status", "connected")], "Maximum"),
        ("ConnectionsByStatus", &[("Exchange", "kraken"), ("Status", "error")], "Maximum"),
        ("ConnectionsByStatus", &[("Exchange", "zerodha"), ("Status", "expired")], "SampleCount"),
        ("SweepCompleted", &[], "Sum"),
        // Not published: checks that passed are not failures, retried jobs did not fail.
        ("HealthCheckFailures", &[("Exchange", "kraken"), ("Code", "ok")], "Sum"),
        ("JobsFailed", &[("JobKind", "health_check")], "Sum"),
    ];
    let values = read_back(&client, &namespace, start, end, queries).await;
    let expected: &[&[f64]] = &[
        &[4.0],
        &[840.0],
        &[480.0],
        &[120.0],
        &[1.0],
        &[2.0],
        &[2.0 + 1.0],
        &[1.0],
        &[1.0],
        &[7.0],
        &[42.0],
        &[5.0],
        &[1.0],
        &[1.0],
        &[1.0],
        &[],
        &[],
    ];
    for ((query, got), want) in queries.iter().zip(&values).zip(expected) {
        assert_eq!(got.as_slice(), *want, "{query:?}");
    }

    // Every metric the publisher defines arrived, with exactly its documented dimensions.
    let listed = client.list_metrics().namespace(&namespace).send().await.expect("ListMetrics");
    let mut seen: BTreeMap<String, BTreeSet<Vec<String>>> = BTreeMap::new();
    for metric in listed.metrics() {
        let dims = metric.dimensions().iter().map(|d| d.name().unwrap_or_default().to_string()).collect();
        seen.entry(metric.metric_name().unwrap_or_default().to_string()).or_default().insert(dims);
    }
    for metric in CLOUDWATCH_METRICS {
        let dims = seen.get(metric.name).unwrap_or_else(|| panic!("{} was not published: {seen:?}", metric.name));
        let mut want: Vec<String> = metric.dimensions.iter().map(|d| d.to_string()).collect();
        want.sort();
        for got in dims {
            let mut got = got.clone();
            got.sort();
            assert_eq!(got, want, "{}", metric.name);
        }
    }
    assert_eq!(seen.len(), CLOUDWATCH_METRICS.len(), "{seen:?}");
}

#[tokio::test]
async fn more_than_1000_datums_go_out_in_several_calls() {
    let Some(emulator) = aws_emulator::emulator("more_than_1000_datums") else { return };
    let namespace = aws_emulator::unique_namespace("batching");
    let run = namespace.rsplit('/').next().unwrap().to_string();
    let (registry, metrics) = worker_metrics();
    let datums: Vec<CloudWatchDatum> = (0..2_500)
        .map(|i| CloudWatchDatum {
            name: "BatchProbe",
            unit: Unit::Count,
            dimensions: vec![("Run", run.clone())],
            value: DatumValue::Value(f64::from(i % 3)),
        })
        .collect();

    let start = now_secs() - 1;
    let publisher =
        CloudWatchPublisher::new(&aws_emulator::sdk_config(&emulator.cloudwatch_url), settings(&namespace), metrics);
    let report = publisher.publish(datums).await;
    assert_eq!(report.calls, 3, "{report:?}");
    assert_eq!(report.published, 2_500, "{report:?}");
    assert_eq!(report.dropped, 0, "{report:?}");
    let end = now_secs() + 2;

    let client = aws_emulator::client(&emulator.cloudwatch_url);
    let dims = [("Run", run.as_str())];
    let values = read_back(
        &client,
        &namespace,
        start,
        end,
        &[("BatchProbe", &dims, "SampleCount"), ("BatchProbe", &dims, "Sum")],
    )
    .await;
    assert_eq!(values, vec![vec![2_500.0], vec![f64::from(833 + 2 * 833)]]);
    let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
    assert!(text.contains(r#"tradeeon_cloudwatch_datums_total{outcome="published"} 2500"#), "{text}");
}

/// A local stand-in for CloudWatch that answers PutMetricData with `statuses` in turn (then 200),
/// counting requests.
async fn stub_cloudwatch(statuses: Vec<u16>) -> (String, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let counter = counter.clone();
        let statuses = statuses.clone();
        async move {
            assert_eq!(headers.get("smithy-protocol").map(|v| v.to_str().unwrap()), Some("rpc-v2-cbor"));
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let status = statuses.get(n).copied().unwrap_or(200);
            let body = if status == 200 { vec![0xa0] } else { cbor_error("InvalidParameterValue", "stub says no") };
            (
                StatusCode::from_u16(status).unwrap(),
                [("smithy-protocol", "rpc-v2-cbor"), ("content-type", "application/cbor")],
                body,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, requests)
}

/// `{"__type": "com.amazonaws.cloudwatch#CODE", "message": MESSAGE}` in CBOR (short strings).
fn cbor_error(code: &str, message: &str) -> Vec<u8> {
    let text = |s: &str| {
        assert!(s.len() < 256);
        let mut out = if s.len() < 24 { vec![0x60 + s.len() as u8] } else { vec![0x78, s.len() as u8] };
        out.extend_from_slice(s.as_bytes());
        out
    };
    let mut out = vec![0xa2];
    out.extend(text("__type"));
    out.extend(text(&format!("com.amazonaws.cloudwatch#{code}")));
    out.extend(text("message"));
    out.extend(text(message));
    out
}

fn one_datum() -> Vec<CloudWatchDatum> {
    vec![CloudWatchDatum {
        name: "SweepCompleted",
        unit: Unit::Count,
        dimensions: vec![],
        value: DatumValue::Value(1.0),
    }]
}

#[tokio::test]
async fn transient_failures_are_retried_and_client_errors_are_not() {
    let (_registry, metrics) = worker_metrics();

    let (url, requests) = stub_cloudwatch(vec![503, 500]).await;
    let publisher =
        CloudWatchPublisher::new(&aws_emulator::sdk_config(&url), settings("Tradeeon/Test"), metrics.clone());
    let report = publisher.publish(one_datum()).await;
    assert_eq!((report.published, report.dropped), (1, 0), "{report:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 3, "two failures, then success");

    // Out of attempts: dropped, never raised.
    let (url, requests) = stub_cloudwatch(vec![503, 503, 503, 503]).await;
    let publisher =
        CloudWatchPublisher::new(&aws_emulator::sdk_config(&url), settings("Tradeeon/Test"), metrics.clone());
    let report = publisher.publish(one_datum()).await;
    assert_eq!((report.published, report.dropped), (0, 1), "{report:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 3, "max_attempts");

    let (url, requests) = stub_cloudwatch(vec![400]).await;
    let publisher = CloudWatchPublisher::new(&aws_emulator::sdk_config(&url), settings("Tradeeon/Test"), metrics);
    let report = publisher.publish(one_datum()).await;
    assert_eq!((report.published, report.dropped), (0, 1), "{report:?}");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "a 400 is not retried");
}

/// Accepts connections and never answers.
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_never_blocks_recording_and_memory_stays_bounded() {
    let (registry, metrics) = worker_metrics();
    let url = black_hole().await;
    let settings = PublisherSettings {
        interval: Duration::from_millis(20),
        attempt_timeout: Duration::from_millis(200),
        max_attempts: 2,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(10),
        ..settings("Tradeeon/Test")
    };
    let publisher = CloudWatchPublisher::new(&aws_emulator::sdk_config(&url), settings, metrics.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(publisher.run(async {
        let _ = stopped.await;
    }));

    // Record for a while, as jobs would, while the publisher is stuck on the dead endpoint.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut i = 0u64;
    while started.elapsed() < Duration::from_millis(1_500) {
        let exchange = Exchange::ALL[(i % 4) as usize];
        let call = Instant::now();
        metrics.job_finished(JobKind::ALL[(i % 5) as usize], outcome::FAILED, Duration::from_millis(i % 5_000));
        metrics.check_recorded(exchange, CheckCode::ALL[(i % 12) as usize], Duration::from_millis(i * 7919 % 60_000));
        metrics.rate_limit_wait(exchange, Duration::from_millis(3));
        metrics.rate_limited(exchange);
        metrics.set_queue(&QueueStats { queued: (i % 100) as i64, ..QueueStats::default() });
        metrics.set_connections(&[(exchange, ConnectionStatus::Connected, (i % 10) as i64)]);
        metrics.sweep_completed();
        slowest = slowest.max(call.elapsed());
        i += 1;
        if i.is_multiple_of(1_000) {
            tokio::task::yield_now().await;
        }
    }
    assert!(i > 10_000, "only {i} rounds of recording in 1.5 s");
    assert!(slowest < Duration::from_millis(100), "one round of recording took {slowest:?}");
    // Bounded: 4 exchanges x at most 487 rounded latencies, plus a few dozen counters.
    let backlog = metrics.cloudwatch_backlog();
    assert!(backlog <= 4 * 487 + 100, "backlog {backlog}");

    // The publisher gave up on batches (dropping them) rather than holding them.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        let dropped = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"tradeeon_cloudwatch_datums_total{outcome="dropped"} "#))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if dropped > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing was dropped:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Shutdown is not held up by the dead endpoint beyond the final publish's time limit.
    let stopping = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running).await.expect("the publisher stops").unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(7), "{:?}", stopping.elapsed());
}

#[tokio::test]
async fn one_interval_never_holds_more_than_the_cap() {
    let (_registry, metrics) = worker_metrics();
    // Nothing listens on port 1: every call fails at once.
    let publisher = CloudWatchPublisher::new(
        &aws_emulator::sdk_config("http://127.0.0.1:1"),
        PublisherSettings { max_attempts: 1, ..settings("Tradeeon/Test") },
        metrics,
    );
    let datums = (0..MAX_PENDING_DATUMS + 500)
        .map(|_| CloudWatchDatum {
            name: "SweepCompleted",
            unit: Unit::Count,
            dimensions: vec![],
            value: DatumValue::Value(1.0),
        })
        .collect();
    let report = publisher.publish(datums).await;
    assert_eq!(report.calls, MAX_PENDING_DATUMS.div_ceil(1000), "{report:?}");
    assert_eq!(report.dropped, MAX_PENDING_DATUMS + 500, "{report:?}");
    assert_eq!(report.published, 0);
}

#[tokio::test]
async fn publishing_is_off_when_configured_so() {
    let (_registry, metrics) = worker_metrics();
    let config = tradeeon_shared::config::MetricsConfig {
        publisher: tradeeon_shared::config::MetricsPublisher::None,
        cloudwatch_namespace: "Tradeeon/Connections".into(),
        publish_interval: Duration::from_secs(60),
        worker_port: 9100,
        api_port: 9101,
    };
    assert!(CloudWatchPublisher::from_config(&config, metrics).await.is_none());
}

#[tokio::test]
async fn publishing_is_off_without_an_aws_region() {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let home_config = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".aws/config"));
    if ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"].iter().any(|v| set(v))
        || home_config.is_some_and(|p| p.exists())
    {
        eprintln!("skipping: this machine configures an AWS region");
        return;
    }
    let (_registry, metrics) = worker_metrics();
    let no_vars = std::iter::empty::<(&str, &str)>();
    let config: tradeeon_shared::config::MetricsConfig = tradeeon_shared::config::from_vars(no_vars).expect("defaults");
    assert_eq!(config.publisher, tradeeon_shared::config::MetricsPublisher::CloudWatch);
    let started = Instant::now();
    assert!(CloudWatchPublisher::from_config(&config, metrics).await.is_none());
    // Decided from the environment alone: no instance-metadata lookup that would have to time out.
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}
