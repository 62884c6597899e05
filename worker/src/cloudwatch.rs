//! The CloudWatch publisher: every `METRICS_PUBLISH_INTERVAL` it drains the aggregates that
//! [`WorkerMetrics`] keeps and sends them with `PutMetricData` to `CLOUDWATCH_NAMESPACE`.
//!
//! * Batches hold at most [`MAX_DATUMS_PER_CALL`] datums and stay under CloudWatch's request size
//!   limit; latencies travel as values and counts, so CloudWatch's p50/p95 work.
//! * A failed call is retried by the SDK's standard strategy (transient errors only, exponential
//!   backoff with jitter, a bounded number of attempts, a timeout per attempt). After the last
//!   attempt the batch is logged and dropped: nothing piles up, and one interval never holds more
//!   than [`MAX_PENDING_DATUMS`] datums (the aggregates are bounded by construction anyway).
//! * Jobs never wait for it: they only update in-memory aggregates (see [`crate::metrics`]).
//! * Failures are logged once per streak (then every tenth), so a laptop without credentials is
//!   not flooded.
//!
//! AWS settings come from the standard places (`AWS_REGION`/`AWS_DEFAULT_REGION` or the profile,
//! the default credentials chain, `AWS_ENDPOINT_URL[_CLOUDWATCH]`). The region is deliberately
//! not looked up from EC2 instance metadata: without a configured region, publishing is off and
//! the worker says so once. (ECS sets `AWS_REGION` for its tasks.)

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_cloudwatch::config::SharedHttpClient;
use aws_sdk_cloudwatch::error::DisplayErrorContext;
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use tradeeon_shared::config::{MetricsConfig, MetricsPublisher};

use crate::metrics::{CloudWatchDatum, DatumValue, WorkerMetrics};

/// CloudWatch's limit of datums per `PutMetricData` call.
pub const MAX_DATUMS_PER_CALL: usize = 1000;
/// Our estimate of a request's size stays below this (CloudWatch accepts 1 MB).
pub const MAX_REQUEST_BYTES: usize = 800_000;
/// At most this many datums are published per interval; the rest are dropped (and counted).
pub const MAX_PENDING_DATUMS: usize = 10_000;
/// On shutdown, the last publish may take this long.
pub const FINAL_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the publisher sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherSettings {
    /// `CLOUDWATCH_NAMESPACE`.
    pub namespace: String,
    /// `METRICS_PUBLISH_INTERVAL`.
    pub interval: Duration,
    /// Attempts per `PutMetricData` call, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles (with jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Time one attempt may take, connecting included.
    pub attempt_timeout: Duration,
}

impl PublisherSettings {
    pub fn from_config(config: &MetricsConfig) -> Self {
        Self {
            namespace: config.cloudwatch_namespace.clone(),
            interval: config.publish_interval,
            max_attempts: 4,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// What one publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// `PutMetricData` calls made (retries not counted).
    pub calls: usize,
    /// Datums CloudWatch accepted.
    pub published: usize,
    /// Datums given up on (failed calls, or over [`MAX_PENDING_DATUMS`]).
    pub dropped: usize,
}

/// The HTTPS client the publisher uses: hyper 1 with rustls and ring (no OpenSSL, no aws-lc).
/// Plain `http://` endpoints work too (a local emulator in tests).
pub fn https_client() -> SharedHttpClient {
    use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// Splits datums into `PutMetricData` batches: at most [`MAX_DATUMS_PER_CALL`] datums and about
/// [`MAX_REQUEST_BYTES`] each.
pub fn batches(datums: Vec<CloudWatchDatum>) -> Vec<Vec<CloudWatchDatum>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for datum in datums {
        let size = approximate_size(&datum);
        if !batch.is_empty() && (batch.len() == MAX_DATUMS_PER_CALL || bytes + size > MAX_REQUEST_BYTES) {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(datum);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// A generous estimate of a datum's encoded size.
fn approximate_size(datum: &CloudWatchDatum) -> usize {
    let dimensions: usize = datum.dimensions.iter().map(|(n, v)| n.len() + v.len() + 24).sum();
    96 + datum.name.len() + dimensions + 2 * 10 * datum.value_count()
}

fn to_sdk(datum: &CloudWatchDatum, timestamp: DateTime) -> MetricDatum {
    let dimensions =
        datum.dimensions.iter().map(|(name, value)| Dimension::builder().name(*name).value(value).build()).collect();
    let builder = MetricDatum::builder()
        .metric_name(datum.name)
        .unit(StandardUnit::from(datum.unit.as_str()))
        .timestamp(timestamp)
        .set_dimensions(Some(dimensions));
    match &datum.value {
        DatumValue::Value(value) => builder.value(*value),
        DatumValue::Values { values, counts } => {
            builder.set_values(Some(values.clone())).set_counts(Some(counts.clone()))
        }
        DatumValue::Statistics { sample_count, sum, min, max } => builder.statistic_values(
            StatisticSet::builder().sample_count(*sample_count).sum(*sum).minimum(*min).maximum(*max).build(),
        ),
    }
    .build()
}

/// Pushes [`WorkerMetrics`]' aggregates to CloudWatch.
pub struct CloudWatchPublisher {
    client: aws_sdk_cloudwatch::Client,
    metrics: WorkerMetrics,
    settings: PublisherSettings,
    /// Failed calls since the last successful one (for logging once per streak).
    failure_streak: AtomicU64,
}

impl std::fmt::Debug for CloudWatchPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudWatchPublisher").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl CloudWatchPublisher {
    /// The publisher `config` asks for, with the standard AWS configuration; `None` (logged once,
    /// with the reason) when `METRICS_PUBLISHER=none` or no AWS region is configured.
    pub async fn from_config(config: &MetricsConfig, metrics: WorkerMetrics) -> Option<Self> {
        if config.publisher == MetricsPublisher::None {
            tracing::info!("CloudWatch publishing is off (METRICS_PUBLISHER=none)");
            return None;
        }
        // Environment and profile only: no instance-metadata lookup on a machine that is not EC2.
        let region = RegionProviderChain::first_try(aws_config::environment::EnvironmentVariableRegionProvider::new())
            .or_else(aws_config::profile::ProfileFileRegionProvider::new());
        let sdk_config =
            aws_config::defaults(BehaviorVersion::latest()).region(region).http_client(https_client()).load().await;
        let Some(region) = sdk_config.region() else {
            tracing::info!(
                "CloudWatch publishing is off: no AWS region is configured (set AWS_REGION to publish, or \
                 METRICS_PUBLISHER=none to say it is meant to be off)"
            );
            return None;
        };
        tracing::info!(
            %region,
            namespace = %config.cloudwatch_namespace,
            interval_secs = config.publish_interval.as_secs(),
            "publishing metrics to CloudWatch"
        );
        Some(Self::new(&sdk_config, PublisherSettings::from_config(config), metrics))
    }

    /// A publisher with an explicit AWS configuration (tests point it at a local emulator). The
    /// retry and timeout settings come from `settings`; without an HTTP client in `sdk_config`,
    /// [`https_client`] is used.
    pub fn new(sdk_config: &SdkConfig, settings: PublisherSettings, metrics: WorkerMetrics) -> Self {
        let mut builder = aws_sdk_cloudwatch::config::Builder::from(sdk_config)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts.max(1))
                    .with_initial_backoff(settings.initial_backoff)
                    .with_max_backoff(settings.max_backoff),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.attempt_timeout)
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .build(),
            );
        if sdk_config.http_client().is_none() {
            builder = builder.http_client(https_client());
        }
        Self {
            client: aws_sdk_cloudwatch::Client::from_conf(builder.build()),
            metrics,
            settings,
            failure_streak: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &PublisherSettings {
        &self.settings
    }

    /// Drains the aggregates and publishes them now.
    pub async fn publish_now(&self) -> PublishReport {
        let datums = self.metrics.drain_cloudwatch();
        self.publish(datums).await
    }

    /// Publishes `datums` (timestamped now) in batches; failed batches are dropped after the
    /// retries.
    pub async fn publish(&self, mut datums: Vec<CloudWatchDatum>) -> PublishReport {
        let mut report = PublishReport::default();
        if datums.len() > MAX_PENDING_DATUMS {
            report.dropped += datums.len() - MAX_PENDING_DATUMS;
            tracing::warn!(dropped = report.dropped, "too many CloudWatch datums in one interval; dropping the rest");
            datums.truncate(MAX_PENDING_DATUMS);
        }
        let timestamp = DateTime::from(SystemTime::now());
        for batch in batches(datums) {
            report.calls += 1;
            let metric_data = batch.iter().map(|d| to_sdk(d, timestamp)).collect();
            let sent = self
                .client
                .put_metric_data()
                .namespace(&self.settings.namespace)
                .set_metric_data(Some(metric_data))
                .send()
                .await;
            match sent {
                Ok(_) => {
                    report.published += batch.len();
                    let failures = self.failure_streak.swap(0, Ordering::Relaxed);
                    if failures > 0 {
                        tracing::info!(failed_calls = failures, "CloudWatch publishing works again");
                    }
                }
                Err(error) => {
                    report.dropped += batch.len();
                    let failures = self.failure_streak.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(
                            error = %DisplayErrorContext(&error),
                            datums = batch.len(),
                            failed_calls = failures,
                            "CloudWatch PutMetricData failed after retries; dropping these datums"
                        );
                    } else {
                        tracing::debug!(error = %DisplayErrorContext(&error), failed_calls = failures, "CloudWatch PutMetricData failed");
                    }
                }
            }
        }
        self.metrics.cloudwatch_datums("published", report.published);
        self.metrics.cloudwatch_datums("dropped", report.dropped);
        report
    }

    /// Publishes every interval until `shutdown` resolves, then once more (within
    /// [`FINAL_PUBLISH_TIMEOUT`]) so the last partial interval is not lost. A publish in flight
    /// when `shutdown` resolves is abandoned.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let interval = self.settings.interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = async {
                    ticker.tick().await;
                    self.publish_now().await
                } => {}
            }
        }
        if tokio::time::timeout(FINAL_PUBLISH_TIMEOUT, self.publish_now()).await.is_err() {
            tracing::warn!("the last CloudWatch publish did not finish before shutdown");
        }
    }
}

/// Runs the publisher `config` asks for until `shutdown` resolves; returns at once (after saying
/// why) if publishing is off.
pub async fn run_publisher(config: MetricsConfig, metrics: WorkerMetrics, shutdown: impl Future<Output = ()> + Send) {
    if let Some(publisher) = CloudWatchPublisher::from_config(&config, metrics).await {
        publisher.run(shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{QUEUE_DEPTH, Unit};

    fn datum(values: usize) -> CloudWatchDatum {
        let value = if values == 1 {
            DatumValue::Value(1.0)
        } else {
            DatumValue::Values { values: (0..values).map(|v| v as f64).collect(), counts: vec![1.0; values] }
        };
        CloudWatchDatum::new(&QUEUE_DEPTH, &[], value)
    }

    #[test]
    fn batches_hold_at_most_1000_datums() {
        let sizes: Vec<usize> = batches((0..2_345).map(|_| datum(1)).collect()).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1000, 1000, 345]);
        assert!(batches(Vec::new()).is_empty());
    }

    #[test]
    fn batches_stay_under_the_request_size() {
        let all = batches((0..1_000).map(|_| datum(150)).collect());
        assert!(all.len() > 1, "{}", all.len());
        for batch in &all {
            assert!(batch.iter().map(approximate_size).sum::<usize>() <= MAX_REQUEST_BYTES);
        }
        assert_eq!(all.iter().map(Vec::len).sum::<usize>(), 1_000);
    }

    #[test]
    fn datums_convert_with_units_dimensions_and_values() {
        let d = CloudWatchDatum {
            name: "HealthCheckLatency",
            unit: Unit::Milliseconds,
            dimensions: vec![("Exchange", "kraken".to_string())],
            value: DatumValue::Values { values: vec![10.0, 20.0], counts: vec![3.0, 1.0] },
        };
        let sdk = to_sdk(&d, DateTime::from_secs(1_700_000_000));
        assert_eq!(sdk.metric_name(), Some("HealthCheckLatency"));
        assert_eq!(sdk.unit(), Some(&StandardUnit::Milliseconds));
        assert_eq!(sdk.dimensions()[0].name(), Some("Exchange"));
        assert_eq!(sdk.dimensions()[0].value(), Some("kraken"));
        assert_eq!(sdk.values(), &[10.0, 20.0]);
        assert_eq!(sdk.counts(), &[3.0, 1.0]);
        for unit in [Unit::Count, Unit::Milliseconds, Unit::Seconds] {
            assert!(StandardUnit::values().contains(&unit.as_str()), "{unit:?}");
        }
    }
}
