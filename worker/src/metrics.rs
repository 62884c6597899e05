//! The workers' metrics, each named once here.
//!
//! [`WorkerMetrics`] is the one place the job runner, the jobs, the rate limiter and the scheduler
//! report to. Every observation updates two views of the same numbers:
//!
//! * **Prometheus** series in the process's [`Registry`] (the worker's own `/metrics` listener, or
//!   the API's `/metrics` in `tradeeon serve`, where the API registers its HTTP metrics in the
//!   same registry);
//! * **CloudWatch aggregates** since the last publish, which the publisher
//!   ([`crate::cloudwatch`]) drains every interval with [`WorkerMetrics::drain_cloudwatch`]. They
//!   carry only low-cardinality dimensions (exchange, status, code, job kind: never a user or a
//!   connection) and are bounded: counters per closed enum value, latencies rounded to two
//!   significant digits, gauges as one statistic set per interval.
//!
//! Recording never waits on anything but a short in-memory lock, so a slow or dead CloudWatch
//! endpoint cannot hold up a job.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{
    CounterVec, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tradeeon_shared::domain::{ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::JobKind;
use tradeeon_shared::store::QueueStats;

/// The `outcome` of [`WorkerMetrics::job_finished`].
pub mod outcome {
    /// The job reached its verdict (which may be a failed credential check).
    pub const DONE: &str = "done";
    /// The job could not be carried out and will not be retried.
    pub const FAILED: &str = "failed";
    /// The attempt failed transiently; the job was rescheduled.
    pub const RETRIED: &str = "retried";
    /// Our own rate budget held the request back; the job was rescheduled for when it frees
    /// (the attempt does not count).
    pub const DEFERRED: &str = "deferred";
    /// Any other string passed in (keeps the label set bounded).
    pub const OTHER: &str = "other";
}

/// Job durations, in seconds: a check is one or two exchange calls, bounded by the exchange
/// timeout (15 s by default).
const JOB_DURATION_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0];
/// Credential check latency, in seconds: `degraded` starts at 2 s, `timeout` at 15 s by default.
const CHECK_LATENCY_BUCKETS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0];

/// Latencies above this are recorded as this, for CloudWatch (one hour).
const MAX_LATENCY_MS: u64 = 3_600_000;

/// CloudWatch accepts at most this many distinct values in one datum's `Values`/`Counts`.
pub const MAX_VALUES_PER_DATUM: usize = 150;

/// A CloudWatch unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
    Seconds,
}

impl Unit {
    /// CloudWatch's spelling (`StandardUnit`).
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Milliseconds => "Milliseconds",
            Unit::Seconds => "Seconds",
        }
    }
}

/// One metric the workers publish to CloudWatch: its name, its dimension names (in order) and its
/// unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudWatchMetric {
    pub name: &'static str,
    pub dimensions: &'static [&'static str],
    pub unit: Unit,
}

/// Connections per exchange and status (a snapshot; all pairs, zeros included).
pub const CONNECTIONS_BY_STATUS: CloudWatchMetric =
    CloudWatchMetric { name: "ConnectionsByStatus", dimensions: &["Exchange", "Status"], unit: Unit::Count };
/// Credential check latency per exchange, as values and counts so percentiles work.
pub const HEALTH_CHECK_LATENCY: CloudWatchMetric =
    CloudWatchMetric { name: "HealthCheckLatency", dimensions: &["Exchange"], unit: Unit::Milliseconds };
/// Credential checks that did not pass, per exchange and code.
pub const HEALTH_CHECK_FAILURES: CloudWatchMetric =
    CloudWatchMetric { name: "HealthCheckFailures", dimensions: &["Exchange", "Code"], unit: Unit::Count };
/// Times an exchange rate-limited us (a 429/418 or a pause it asked for).
pub const RATE_LIMITED: CloudWatchMetric =
    CloudWatchMetric { name: "RateLimited", dimensions: &["Exchange"], unit: Unit::Count };
/// Job attempts finished, whatever their outcome.
pub const JOBS_PROCESSED: CloudWatchMetric =
    CloudWatchMetric { name: "JobsProcessed", dimensions: &["JobKind"], unit: Unit::Count };
/// Jobs that failed for good (outcome `failed`; retried attempts are not counted).
pub const JOBS_FAILED: CloudWatchMetric =
    CloudWatchMetric { name: "JobsFailed", dimensions: &["JobKind"], unit: Unit::Count };
/// Jobs due and not yet picked up (also the autoscaling signal).
pub const QUEUE_DEPTH: CloudWatchMetric = CloudWatchMetric { name: "QueueDepth", dimensions: &[], unit: Unit::Count };
/// How long the oldest due job has waited.
pub const OLDEST_QUEUED_JOB_AGE: CloudWatchMetric =
    CloudWatchMetric { name: "OldestQueuedJobAgeSeconds", dimensions: &[], unit: Unit::Seconds };
/// Health sweeps completed.
pub const SWEEP_COMPLETED: CloudWatchMetric =
    CloudWatchMetric { name: "SweepCompleted", dimensions: &[], unit: Unit::Count };

/// Every metric the CloudWatch publisher emits (the dashboards are checked against this list).
pub const CLOUDWATCH_METRICS: [CloudWatchMetric; 9] = [
    CONNECTIONS_BY_STATUS,
    HEALTH_CHECK_LATENCY,
    HEALTH_CHECK_FAILURES,
    RATE_LIMITED,
    JOBS_PROCESSED,
    JOBS_FAILED,
    QUEUE_DEPTH,
    OLDEST_QUEUED_JOB_AGE,
    SWEEP_COMPLETED,
];

/// One CloudWatch datum, independent of the SDK (the publisher converts it and adds the
/// timestamp).
#[derive(Debug, Clone, PartialEq)]
pub struct CloudWatchDatum {
    pub name: &'static str,
    pub unit: Unit,
    /// `(name, value)` pairs, in the metric's dimension order.
    pub dimensions: Vec<(&'static str, String)>,
    pub value: DatumValue,
}

impl CloudWatchDatum {
    /// A datum of `metric`; `values` are its dimension values, in order.
    pub fn new(metric: &CloudWatchMetric, values: &[&str], value: DatumValue) -> Self {
        debug_assert_eq!(metric.dimensions.len(), values.len(), "{}: dimension values", metric.name);
        Self {
            name: metric.name,
            unit: metric.unit,
            dimensions: metric.dimensions.iter().zip(values).map(|(n, v)| (*n, (*v).to_string())).collect(),
            value,
        }
    }

    /// How many values the datum carries (what CloudWatch bills and limits).
    pub fn value_count(&self) -> usize {
        match &self.value {
            DatumValue::Values { values, .. } => values.len(),
            _ => 1,
        }
    }
}

/// What a datum carries.
#[derive(Debug, Clone, PartialEq)]
pub enum DatumValue {
    /// One value (a count over the interval, or a snapshot).
    Value(f64),
    /// Distinct values and how often each was seen (at most [`MAX_VALUES_PER_DATUM`]): lets
    /// CloudWatch compute percentiles.
    Values { values: Vec<f64>, counts: Vec<f64> },
    /// A summary of the interval's samples of a gauge.
    Statistics { sample_count: f64, sum: f64, min: f64, max: f64 },
}

/// Samples of a gauge within one interval.
#[derive(Debug, Clone, Copy)]
struct Stats {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn add(this: &mut Option<Stats>, value: f64) {
        match this {
            None => *this = Some(Stats { count: 1, sum: value, min: value, max: value }),
            Some(s) => {
                s.count += 1;
                s.sum += value;
                s.min = s.min.min(value);
                s.max = s.max.max(value);
            }
        }
    }

    fn datum(self, metric: &CloudWatchMetric) -> CloudWatchDatum {
        CloudWatchDatum::new(
            metric,
            &[],
            DatumValue::Statistics { sample_count: self.count as f64, sum: self.sum, min: self.min, max: self.max },
        )
    }
}

/// What happened since the last CloudWatch publish. Every map is keyed by closed enums, and the
/// latency maps by rounded values, so its size is bounded whatever the load.
#[derive(Debug, Default)]
struct Pending {
    latency_ms: HashMap<Exchange, BTreeMap<u64, u64>>,
    failures: HashMap<(Exchange, CheckCode), u64>,
    rate_limited: HashMap<Exchange, u64>,
    jobs_processed: HashMap<JobKind, u64>,
    jobs_failed: HashMap<JobKind, u64>,
    queue_depth: Option<Stats>,
    oldest_queued_age: Option<Stats>,
    connections: Option<HashMap<(Exchange, ConnectionStatus), i64>>,
    sweeps: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.latency_ms.values().map(BTreeMap::len).sum::<usize>()
            + self.failures.len()
            + self.rate_limited.len()
            + self.jobs_processed.len()
            + self.jobs_failed.len()
            + usize::from(self.queue_depth.is_some())
            + usize::from(self.oldest_queued_age.is_some())
            + self.connections.as_ref().map_or(0, |_| Exchange::ALL.len() * ConnectionStatus::ALL.len())
            + usize::from(self.sweeps > 0)
    }

    fn into_datums(self) -> Vec<CloudWatchDatum> {
        let mut datums = Vec::new();
        if let Some(connections) = self.connections {
            for exchange in Exchange::ALL {
                for status in ConnectionStatus::ALL {
                    let count = connections.get(&(*exchange, *status)).copied().unwrap_or(0);
                    datums.push(CloudWatchDatum::new(
                        &CONNECTIONS_BY_STATUS,
                        &[exchange.as_str(), status.as_str()],
                        DatumValue::Value(count as f64),
                    ));
                }
            }
        }
        let mut latency: Vec<_> = self.latency_ms.into_iter().collect();
        latency.sort_by_key(|(exchange, _)| exchange.as_str());
        for (exchange, samples) in latency {
            let samples: Vec<(u64, u64)> = samples.into_iter().collect();
            for chunk in samples.chunks(MAX_VALUES_PER_DATUM) {
                datums.push(CloudWatchDatum::new(
                    &HEALTH_CHECK_LATENCY,
                    &[exchange.as_str()],
                    DatumValue::Values {
                        values: chunk.iter().map(|(ms, _)| *ms as f64).collect(),
                        counts: chunk.iter().map(|(_, n)| *n as f64).collect(),
                    },
                ));
            }
        }
        let mut failures: Vec<_> = self.failures.into_iter().collect();
        failures.sort_by_key(|((exchange, code), _)| (exchange.as_str(), code.as_str()));
        for ((exchange, code), n) in failures {
            datums.push(CloudWatchDatum::new(
                &HEALTH_CHECK_FAILURES,
                &[exchange.as_str(), code.as_str()],
                DatumValue::Value(n as f64),
            ));
        }
        let mut rate_limited: Vec<_> = self.rate_limited.into_iter().collect();
        rate_limited.sort_by_key(|(exchange, _)| exchange.as_str());
        for (exchange, n) in rate_limited {
            datums.push(CloudWatchDatum::new(&RATE_LIMITED, &[exchange.as_str()], DatumValue::Value(n as f64)));
        }
        for (metric, counts) in [(&JOBS_PROCESSED, self.jobs_processed), (&JOBS_FAILED, self.jobs_failed)] {
            let mut counts: Vec<_> = counts.into_iter().collect();
            counts.sort_by_key(|(kind, _)| kind.as_str());
            for (kind, n) in counts {
                datums.push(CloudWatchDatum::new(metric, &[kind.as_str()], DatumValue::Value(n as f64)));
            }
        }
        if let Some(stats) = self.queue_depth {
            datums.push(stats.datum(&QUEUE_DEPTH));
        }
        if let Some(stats) = self.oldest_queued_age {
            datums.push(stats.datum(&OLDEST_QUEUED_JOB_AGE));
        }
        if self.sweeps > 0 {
            datums.push(CloudWatchDatum::new(&SWEEP_COMPLETED, &[], DatumValue::Value(self.sweeps as f64)));
        }
        datums
    }
}

/// Rounds a latency to two significant digits (at most 5% off), so that however many checks an
/// interval sees, it keeps a few hundred distinct values per exchange at most.
fn round_latency_ms(latency: Duration) -> u64 {
    let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX).min(MAX_LATENCY_MS);
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    (ms + scale / 2) / scale * scale
}

/// The workers' metrics. Cheap to clone: clones share the same series and aggregates.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// `tradeeon_jobs_total{kind, outcome}`
    jobs: IntCounterVec,
    /// `tradeeon_job_duration_seconds{kind}`
    job_duration: HistogramVec,
    /// `tradeeon_queue_depth`
    queue_depth: IntGauge,
    /// `tradeeon_queue_running_jobs`
    queue_running: IntGauge,
    /// `tradeeon_queue_scheduled_jobs`
    queue_scheduled: IntGauge,
    /// `tradeeon_queue_oldest_job_age_seconds`
    queue_oldest_age: Gauge,
    /// `tradeeon_health_checks_total{exchange, code}`
    checks: IntCounterVec,
    /// `tradeeon_health_check_latency_seconds{exchange}`
    check_latency: HistogramVec,
    /// `tradeeon_rate_limit_waits_total{exchange}`
    rate_limit_waits: IntCounterVec,
    /// `tradeeon_rate_limit_wait_seconds_total{exchange}`
    rate_limit_wait_seconds: CounterVec,
    /// `tradeeon_rate_limited_total{exchange}`
    rate_limited: IntCounterVec,
    /// `tradeeon_connections{exchange, status}`
    connections: IntGaugeVec,
    /// `tradeeon_sweeps_completed_total`
    sweeps: IntCounter,
    /// `tradeeon_sweeps_stretched_total{exchange}`
    sweeps_stretched: IntCounterVec,
    /// `tradeeon_cloudwatch_datums_total{outcome}` (`published` or `dropped`)
    cloudwatch_datums: IntCounterVec,
    pending: Arc<Mutex<Pending>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// Creates the metrics and registers them in `registry`. Fails if they are registered there
    /// already (one `WorkerMetrics` per registry; share it by cloning).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let jobs = IntCounterVec::new(
            Opts::new("tradeeon_jobs_total", "Job attempts finished, by kind and outcome (done, failed, retried)."),
            &["kind", "outcome"],
        )?;
        let job_duration = HistogramVec::new(
            HistogramOpts::new("tradeeon_job_duration_seconds", "Time one job attempt took, by kind.")
                .buckets(JOB_DURATION_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let queue_depth = IntGauge::new("tradeeon_queue_depth", "Jobs due now or earlier and not yet picked up.")?;
        let queue_running = IntGauge::new("tradeeon_queue_running_jobs", "Jobs a worker holds.")?;
        let queue_scheduled = IntGauge::new(
            "tradeeon_queue_scheduled_jobs",
            "Jobs waiting for a later time (retries, spread-out sweeps).",
        )?;
        let queue_oldest_age =
            Gauge::new("tradeeon_queue_oldest_job_age_seconds", "How long the oldest due job has waited (0 if none).")?;
        let checks = IntCounterVec::new(
            Opts::new("tradeeon_health_checks_total", "Credential checks, by exchange and result code."),
            &["exchange", "code"],
        )?;
        let check_latency = HistogramVec::new(
            HistogramOpts::new("tradeeon_health_check_latency_seconds", "Credential check latency, by exchange.")
                .buckets(CHECK_LATENCY_BUCKETS.to_vec()),
            &["exchange"],
        )?;
        let rate_limit_waits = IntCounterVec::new(
            Opts::new("tradeeon_rate_limit_waits_total", "Requests that waited for a rate-limit budget or pause."),
            &["exchange"],
        )?;
        let rate_limit_wait_seconds = CounterVec::new(
            Opts::new("tradeeon_rate_limit_wait_seconds_total", "Time spent waiting for rate-limit budgets or pauses."),
            &["exchange"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "tradeeon_rate_limited_total",
                "Times an exchange rate-limited us (429, ban or requested pause).",
            ),
            &["exchange"],
        )?;
        let connections = IntGaugeVec::new(
            Opts::new("tradeeon_connections", "Active connections by exchange and status (last snapshot)."),
            &["exchange", "status"],
        )?;
        let sweeps = IntCounter::new("tradeeon_sweeps_completed_total", "Health sweeps completed.")?;
        let sweeps_stretched = IntCounterVec::new(
            Opts::new(
                "tradeeon_sweeps_stretched_total",
                "Sweeps spread over more than their interval to stay within an exchange's rate budget.",
            ),
            &["exchange"],
        )?;
        let cloudwatch_datums = IntCounterVec::new(
            Opts::new("tradeeon_cloudwatch_datums_total", "CloudWatch datums published or dropped after retries."),
            &["outcome"],
        )?;

        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(job_duration.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_running.clone()))?;
        registry.register(Box::new(queue_scheduled.clone()))?;
        registry.register(Box::new(queue_oldest_age.clone()))?;
        registry.register(Box::new(checks.clone()))?;
        registry.register(Box::new(check_latency.clone()))?;
        registry.register(Box::new(rate_limit_waits.clone()))?;
        registry.register(Box::new(rate_limit_wait_seconds.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(sweeps.clone()))?;
        registry.register(Box::new(sweeps_stretched.clone()))?;
        registry.register(Box::new(cloudwatch_datums.clone()))?;

        // Zero series for the counters, so rate() and dashboards see them before the first event.
        for kind in JobKind::ALL {
            for outcome in [outcome::DONE, outcome::FAILED, outcome::RETRIED, outcome::DEFERRED] {
                jobs.with_label_values(&[kind.as_str(), outcome]);
            }
        }
        for exchange in Exchange::ALL {
            for code in CheckCode::ALL {
                checks.with_label_values(&[exchange.as_str(), code.as_str()]);
            }
            rate_limit_waits.with_label_values(&[exchange.as_str()]);
            rate_limit_wait_seconds.with_label_values(&[exchange.as_str()]);
            rate_limited.with_label_values(&[exchange.as_str()]);
            sweeps_stretched.with_label_values(&[exchange.as_str()]);
        }
        for outcome in ["published", "dropped"] {
            cloudwatch_datums.with_label_values(&[outcome]);
        }

        Ok(Self {
            jobs,
            job_duration,
            queue_depth,
            queue_running,
            queue_scheduled,
            queue_oldest_age,
            checks,
            check_latency,
            rate_limit_waits,
            rate_limit_wait_seconds,
            rate_limited,
            connections,
            sweeps,
            sweeps_stretched,
            cloudwatch_datums,
            pending: Arc::default(),
        })
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain counters behind: still worth publishing.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A job attempt finished. `outcome` is one of [`outcome::DONE`], [`outcome::FAILED`],
    /// [`outcome::RETRIED`] or [`outcome::DEFERRED`] (anything else is counted as [`outcome::OTHER`]).
    pub fn job_finished(&self, kind: JobKind, outcome: &str, duration: Duration) {
        let outcome = match outcome {
            outcome::DONE => outcome::DONE,
            outcome::FAILED => outcome::FAILED,
            outcome::RETRIED => outcome::RETRIED,
            outcome::DEFERRED => outcome::DEFERRED,
            _ => outcome::OTHER,
        };
        self.jobs.with_label_values(&[kind.as_str(), outcome]).inc();
        self.job_duration.with_label_values(&[kind.as_str()]).observe(duration.as_secs_f64());
        let mut pending = self.pending();
        *pending.jobs_processed.entry(kind).or_default() += 1;
        if outcome == outcome::FAILED {
            *pending.jobs_failed.entry(kind).or_default() += 1;
        }
    }

    /// Job attempts of `kind` finished with `outcome` since start (`tradeeon_jobs_total`).
    pub fn jobs_finished(&self, kind: JobKind, outcome: &str) -> u64 {
        self.jobs.with_label_values(&[kind.as_str(), outcome]).get()
    }

    /// A credential check against `exchange` reached `code` after `latency`.
    pub fn check_recorded(&self, exchange: Exchange, code: CheckCode, latency: Duration) {
        self.checks.with_label_values(&[exchange.as_str(), code.as_str()]).inc();
        self.check_latency.with_label_values(&[exchange.as_str()]).observe(latency.as_secs_f64());
        let mut pending = self.pending();
        *pending.latency_ms.entry(exchange).or_default().entry(round_latency_ms(latency)).or_default() += 1;
        if code != CheckCode::Ok {
            *pending.failures.entry((exchange, code)).or_default() += 1;
        }
    }

    /// A request to `exchange` waited `waited` for our budget or a pause before it was sent.
    pub fn rate_limit_wait(&self, exchange: Exchange, waited: Duration) {
        self.rate_limit_waits.with_label_values(&[exchange.as_str()]).inc();
        self.rate_limit_wait_seconds.with_label_values(&[exchange.as_str()]).inc_by(waited.as_secs_f64());
    }

    /// `exchange` rate-limited us: a 429/418, or a pause it asked for.
    pub fn rate_limited(&self, exchange: Exchange) {
        self.rate_limited.with_label_values(&[exchange.as_str()]).inc();
        *self.pending().rate_limited.entry(exchange).or_default() += 1;
    }

    /// The queue as last counted.
    pub fn set_queue(&self, stats: &QueueStats) {
        let oldest = stats.oldest_queued_age.unwrap_or_default().as_secs_f64();
        self.queue_depth.set(stats.queued);
        self.queue_running.set(stats.running);
        self.queue_scheduled.set(stats.scheduled);
        self.queue_oldest_age.set(oldest);
        let mut pending = self.pending();
        Stats::add(&mut pending.queue_depth, stats.queued as f64);
        Stats::add(&mut pending.oldest_queued_age, oldest);
    }

    /// A full snapshot of active connections per exchange and status; pairs not listed are 0.
    pub fn set_connections(&self, counts: &[(Exchange, ConnectionStatus, i64)]) {
        let mut snapshot: HashMap<(Exchange, ConnectionStatus), i64> = HashMap::new();
        for (exchange, status, count) in counts {
            *snapshot.entry((*exchange, *status)).or_default() += count;
        }
        for exchange in Exchange::ALL {
            for status in ConnectionStatus::ALL {
                let count = snapshot.get(&(*exchange, *status)).copied().unwrap_or(0);
                self.connections.with_label_values(&[exchange.as_str(), status.as_str()]).set(count);
            }
        }
        self.pending().connections = Some(snapshot);
    }

    /// A health sweep completed.
    pub fn sweep_completed(&self) {
        self.sweeps.inc();
        self.pending().sweeps += 1;
    }

    /// A sweep had to be spread over more than its interval to fit `exchange`'s rate budget.
    pub fn sweep_stretched(&self, exchange: Exchange) {
        self.sweeps_stretched.with_label_values(&[exchange.as_str()]).inc();
    }

    /// Takes everything observed since the last call as CloudWatch datums (the publisher calls
    /// this once per interval). Counters cover the interval; gauges are the interval's samples;
    /// the connection snapshot is included only if it was refreshed during the interval.
    pub fn drain_cloudwatch(&self) -> Vec<CloudWatchDatum> {
        let pending = std::mem::take(&mut *self.pending());
        pending.into_datums()
    }

    /// How many distinct series and values wait for the next publish (bounded by construction).
    pub fn cloudwatch_backlog(&self) -> usize {
        self.pending().len()
    }

    /// Counts datums the publisher sent or gave up on.
    pub(crate) fn cloudwatch_datums(&self, outcome: &'static str, n: usize) {
        self.cloudwatch_datums.with_label_values(&[outcome]).inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (Registry, WorkerMetrics) {
        let registry = Registry::new();
        let metrics = WorkerMetrics::register(&registry).unwrap();
        (registry, metrics)
    }

    fn find<'a>(datums: &'a [CloudWatchDatum], name: &str, dims: &[&str]) -> Option<&'a CloudWatchDatum> {
        datums.iter().find(|d| d.name == name && d.dimensions.iter().map(|(_, v)| v.as_str()).eq(dims.iter().copied()))
    }

    #[test]
    fn registering_twice_in_one_registry_fails() {
        let (registry, _metrics) = metrics();
        assert!(WorkerMetrics::register(&registry).is_err());
    }

    #[test]
    fn latencies_round_to_two_significant_digits() {
        let ms = |n| round_latency_ms(Duration::from_millis(n));
        assert_eq!(ms(0), 0);
        assert_eq!(ms(99), 99);
        assert_eq!(ms(104), 100);
        assert_eq!(ms(105), 110);
        assert_eq!(ms(1_234), 1_200);
        assert_eq!(ms(999), 1_000);
        assert_eq!(ms(10_000_000), MAX_LATENCY_MS);
        assert_eq!(round_latency_ms(Duration::from_micros(1_700)), 1);
    }

    #[test]
    fn one_observation_feeds_prometheus_and_cloudwatch_alike() {
        let (registry, m) = metrics();
        m.job_finished(JobKind::Verify, outcome::DONE, Duration::from_millis(300));
        m.job_finished(JobKind::Verify, outcome::FAILED, Duration::from_millis(100));
        m.job_finished(JobKind::Rotate, "exploded", Duration::from_millis(100));
        m.check_recorded(Exchange::Binance, CheckCode::Ok, Duration::from_millis(120));
        m.check_recorded(Exchange::Binance, CheckCode::Ok, Duration::from_millis(121));
        m.check_recorded(Exchange::Binance, CheckCode::IpNotAllowed, Duration::from_millis(480));
        m.rate_limit_wait(Exchange::Kraken, Duration::from_millis(1500));
        m.rate_limited(Exchange::Kraken);
        m.set_queue(&QueueStats {
            queued: 7,
            running: 2,
            scheduled: 3,
            oldest_queued_age: Some(Duration::from_secs(42)),
        });
        m.set_queue(&QueueStats { queued: 3, running: 0, scheduled: 0, oldest_queued_age: None });
        m.set_connections(&[
            (Exchange::Kraken, ConnectionStatus::Connected, 5),
            (Exchange::Kraken, ConnectionStatus::Error, 1),
        ]);
        m.sweep_completed();
        m.sweep_stretched(Exchange::Binance);

        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        for line in [
            r#"tradeeon_jobs_total{kind="verify",outcome="done"} 1"#,
            r#"tradeeon_jobs_total{kind="verify",outcome="failed"} 1"#,
            r#"tradeeon_jobs_total{kind="rotate",outcome="other"} 1"#,
            r#"tradeeon_job_duration_seconds_count{kind="verify"} 2"#,
            r#"tradeeon_health_checks_total{code="ip_not_allowed",exchange="binance"} 1"#,
            r#"tradeeon_health_check_latency_seconds_count{exchange="binance"} 3"#,
            r#"tradeeon_rate_limit_waits_total{exchange="kraken"} 1"#,
            r#"tradeeon_rate_limit_wait_seconds_total{exchange="kraken"} 1.5"#,
            r#"tradeeon_rate_limited_total{exchange="kraken"} 1"#,
            "tradeeon_queue_depth 3",
            "tradeeon_queue_oldest_job_age_seconds 0",
            r#"tradeeon_connections{exchange="kraken",status="connected"} 5"#,
            r#"tradeeon_connections{exchange="binance",status="connected"} 0"#,
            "tradeeon_sweeps_completed_total 1",
            r#"tradeeon_sweeps_stretched_total{exchange="binance"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }

        let datums = m.drain_cloudwatch();
        assert_eq!(find(&datums, "JobsProcessed", &["verify"]).unwrap().value, DatumValue::Value(2.0));
        assert_eq!(find(&datums, "JobsFailed", &["verify"]).unwrap().value, DatumValue::Value(1.0));
        assert!(find(&datums, "JobsFailed", &["rotate"]).is_none());
        assert_eq!(
            find(&datums, "HealthCheckLatency", &["binance"]).unwrap().value,
            DatumValue::Values { values: vec![120.0, 480.0], counts: vec![2.0, 1.0] }
        );
        assert_eq!(
            find(&datums, "HealthCheckFailures", &["binance", "ip_not_allowed"]).unwrap().value,
            DatumValue::Value(1.0)
        );
        assert!(find(&datums, "HealthCheckFailures", &["binance", "ok"]).is_none());
        assert_eq!(find(&datums, "RateLimited", &["kraken"]).unwrap().value, DatumValue::Value(1.0));
        assert_eq!(
            find(&datums, "QueueDepth", &[]).unwrap().value,
            DatumValue::Statistics { sample_count: 2.0, sum: 10.0, min: 3.0, max: 7.0 }
        );
        assert_eq!(
            find(&datums, "OldestQueuedJobAgeSeconds", &[]).unwrap().value,
            DatumValue::Statistics { sample_count: 2.0, sum: 42.0, min: 0.0, max: 42.0 }
        );
        assert_eq!(
            find(&datums, "ConnectionsByStatus", &["kraken", "connected"]).unwrap().value,
            DatumValue::Value(5.0)
        );
        assert_eq!(
            find(&datums, "ConnectionsByStatus", &["zerodha", "expired"]).unwrap().value,
            DatumValue::Value(0.0)
        );
        assert_eq!(datums.iter().filter(|d| d.name == "ConnectionsByStatus").count(), 20);
        assert_eq!(find(&datums, "SweepCompleted", &[]).unwrap().value, DatumValue::Value(1.0));
        for datum in &datums {
            let metric = CLOUDWATCH_METRICS.iter().find(|m| m.name == datum.name).expect("a known metric");
            assert_eq!(datum.unit, metric.unit);
            assert!(datum.dimensions.iter().map(|(n, _)| *n).eq(metric.dimensions.iter().copied()));
        }

        // Drained: the next interval starts empty, and Prometheus keeps its totals.
        assert!(m.drain_cloudwatch().is_empty());
        assert_eq!(m.cloudwatch_backlog(), 0);
        let text = prometheus::TextEncoder::new().encode_to_string(&registry.gather()).unwrap();
        assert!(text.contains("tradeeon_sweeps_completed_total 1"));
    }

    #[test]
    fn latency_values_are_split_into_datums_of_at_most_150() {
        let (_registry, m) = metrics();
        for ms in 0..400 {
            m.check_recorded(Exchange::Coinbase, CheckCode::Ok, Duration::from_millis(ms));
        }
        let datums = m.drain_cloudwatch();
        let latency: Vec<_> = datums.iter().filter(|d| d.name == "HealthCheckLatency").collect();
        // 0..=99 exact, then 100..=400 rounded to tens: 100 + 31 distinct values.
        assert_eq!(latency.iter().map(|d| d.value_count()).sum::<usize>(), 131);
        assert!(latency.iter().all(|d| d.value_count() <= MAX_VALUES_PER_DATUM));
        let total: f64 = latency
            .iter()
            .map(|d| match &d.value {
                DatumValue::Values { counts, .. } => counts.iter().sum::<f64>(),
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total, 400.0);
    }

    #[test]
    fn the_backlog_is_bounded_whatever_the_load() {
        let (_registry, m) = metrics();
        let mut ms = 1u64;
        for i in 0..200_000u64 {
            ms = ms.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let exchange = Exchange::ALL[(i % 4) as usize];
            let code = CheckCode::ALL[(i % 12) as usize];
            m.check_recorded(exchange, code, Duration::from_millis(ms % 100_000_000));
            m.job_finished(JobKind::ALL[(i % 5) as usize], outcome::FAILED, Duration::from_millis(1));
            m.rate_limited(exchange);
        }
        // 4 exchanges x (100 + 4 decades x 90 + 27) latency values, 4 x 11 failure codes, ...
        let backlog = m.cloudwatch_backlog();
        assert!(backlog <= 4 * 487 + 44 + 4 + 10, "{backlog}");
        let datums = m.drain_cloudwatch();
        assert!(datums.len() < 100, "{}", datums.len());
    }
}
