//! The job runner: apalis workers consuming tickets from the shared queue.
//!
//! A ticket only names a job record. Running it is always the same three steps — claim the
//! record, run the job, settle or reschedule it — so the job modules never touch the queue and
//! the runtime never looks inside a job.
//!
//! Why the settings below: orphaned tickets (a worker killed mid-job) are re-enqueued after
//! `heartbeat × missed_heartbeats`, which must stay well under the 60 s promised for handing a
//! job to another worker; LISTEN/NOTIFY wakes PostgreSQL workers within milliseconds of an
//! enqueue, with polling as the fallback.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use chrono::Utc;
use tradeeon_shared::jobs::{ClaimedJob, JobId, JobOutcome, JobTicket, QUEUE};
use tradeeon_shared::store::Store;

use crate::jobs::{self, JobEnv, Step};
use crate::metrics::WorkerMetrics;

/// How the queue is consumed.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Jobs run at once by this process.
    pub concurrency: usize,
    /// How often to look for due tickets when no notification arrives (retries become due by
    /// time, not by a notification).
    pub poll_interval: Duration,
    /// How often this worker tells the queue it is alive.
    pub heartbeat: Duration,
    /// Missed heartbeats after which another worker takes over this worker's tickets.
    pub missed_heartbeats: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            poll_interval: Duration::from_millis(500),
            heartbeat: Duration::from_secs(10),
            missed_heartbeats: 3,
        }
    }
}

/// Runs one ticket's job: claim, run, settle or reschedule.
///
/// Public so tests (and benchmarks) can drive jobs deterministically without the queue.
pub async fn process(env: &JobEnv, metrics: Option<&WorkerMetrics>, id: JobId) -> anyhow::Result<()> {
    let Some(job) = env.store.claim_job(id).await? else {
        // Settled already: a duplicate or late ticket. Nothing to do.
        tracing::debug!(job_id = %id, "ticket for a settled job dropped");
        return Ok(());
    };
    let kind = job.record.kind;
    let span = tracing::info_span!("job", job_id = %id, kind = kind.as_str(), attempt = job.record.attempts);
    let started = std::time::Instant::now();
    let step = tracing::Instrument::instrument(jobs::run(env, &job), span.clone()).await;
    if let Some(metrics) = metrics {
        record(metrics, &job, &step, started.elapsed());
    }
    match step {
        Step::Finish(outcome) => {
            env.store.finish_job(id, &outcome).await?;
        }
        Step::Retry { after, .. } => {
            let run_at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(60));
            tracing::info!(parent: &span, delay_ms = after.as_millis() as u64, "retrying later");
            env.store.requeue_job(id, run_at).await?;
        }
        Step::Defer { after } => {
            let run_at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(60));
            tracing::debug!(parent: &span, delay_ms = after.as_millis() as u64, "rate budget exhausted; deferred");
            env.store.defer_job(id, run_at).await?;
        }
    }
    Ok(())
}

/// One job attempt in the metrics: its outcome and duration. (The checks it made are counted
/// where they are made, in `JobEnv::check`.)
fn record(metrics: &WorkerMetrics, job: &ClaimedJob, step: &Step, duration: std::time::Duration) {
    use crate::metrics::outcome;
    let label = match step {
        Step::Finish(JobOutcome::Done(_)) => outcome::DONE,
        Step::Finish(JobOutcome::Failed(_)) => outcome::FAILED,
        Step::Retry { .. } => outcome::RETRIED,
        Step::Defer { .. } => outcome::DEFERRED,
    };
    metrics.job_finished(job.record.kind, label, duration);
}

/// Runs every job that is due now, one after another, until none is left. For tests: "run the
/// worker until the queue is empty" without sleeping or racing a background runner.
pub async fn run_due_jobs(env: &JobEnv, metrics: Option<&WorkerMetrics>) -> anyhow::Result<usize> {
    let mut ran = 0;
    loop {
        let due = env.store.due_jobs(64).await?;
        if due.is_empty() {
            return Ok(ran);
        }
        for id in due {
            process(env, metrics, id).await?;
            ran += 1;
        }
    }
}

/// What every ticket handler shares.
struct Runner {
    env: Arc<JobEnv>,
    metrics: Option<WorkerMetrics>,
}

async fn handle(ticket: JobTicket, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    // An error here means the job could not even be claimed or settled (the database is down):
    // apalis re-runs the ticket, and claiming is idempotent.
    process(&runner.env, runner.metrics.as_ref(), ticket.job_id).await.map_err(|e| {
        tracing::warn!(job_id = %ticket.job_id, error = format!("{e:#}"), "job could not be processed");
        BoxDynError::from(e)
    })
}

pub fn worker_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_string());
    format!("tradeeon-{host}-{}-{}", std::process::id(), ulid::Ulid::generate())
}

/// Consumes the queue until `shutdown` resolves; then stops taking tickets and lets the running
/// jobs finish (ECS gives the task its stop timeout for that).
///
/// apalis stops a worker on the first failed poll of its backend (the database restarting, a
/// failover). The process must outlive that: the runner starts a new apalis worker, under a new
/// name, after a backoff of 1 s doubling to 30 s, until shutdown. Tickets the stopped instance
/// had fetched are handed over by the orphan rule (its heartbeats stop), and claiming is
/// idempotent, so nothing runs twice at once and nothing is lost.
pub async fn run_queue(
    env: Arc<JobEnv>,
    metrics: Option<WorkerMetrics>,
    settings: RuntimeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use futures::FutureExt;
    let shutdown = shutdown.boxed().shared();
    let runner = Arc::new(Runner { env, metrics });
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        match run_worker(&runner, &settings, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(err) if shutdown.peek().is_some() => {
                tracing::info!(error = format!("{err:#}"), "job runner stopped with an error during shutdown");
                return Ok(());
            }
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    restart_in_ms = backoff.as_millis() as u64,
                    "job runner stopped (queue unreachable?); restarting"
                );
            }
        }
        tokio::select! {
            () = shutdown.clone() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// Restarts of the queue runner wait this long at first, doubling up to [`RESTART_BACKOFF_MAX`].
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One apalis worker instance, until `shutdown` (Ok) or a backend failure (Err).
async fn run_worker(
    runner: &Arc<Runner>,
    settings: &RuntimeSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store: Store = runner.env.store.clone();
    let name = worker_name();
    tracing::info!(worker = %name, concurrency = settings.concurrency, backend = %store.backend(), "job runner started");
    let stop = async move {
        shutdown.await;
        Ok::<(), WorkerError>(())
    };
    if let Some(pool) = store.pg_pool() {
        let config = apalis_postgres::Config::default()
            .queue(QUEUE)
            .batch_size(settings.concurrency.max(1))
            .heartbeat_interval(settings.heartbeat)
            .missed_heartbeats(settings.missed_heartbeats);
        let backend = apalis_postgres::PostgresStorage::<JobTicket>::new(pool)
            .with_config(config)
            .with_pubsub()
            .poll_with_interval(settings.poll_interval);
        WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(runner.clone())
            .concurrency(settings.concurrency.max(1))
            .build(handle)
            .run_until(stop)
            .await?;
    } else if let Some(pool) = store.sqlite_pool() {
        let config = apalis_sqlite::Config::default()
            .queue(QUEUE)
            .batch_size(settings.concurrency.max(1))
            .heartbeat_interval(settings.heartbeat)
            .missed_heartbeats(settings.missed_heartbeats);
        let backend = apalis_sqlite::SqliteStorage::<JobTicket>::new(pool)
            .with_config(config)
            .poll_with_interval(settings.poll_interval);
        WorkerBuilder::new(name.as_str())
            .backend(backend)
            .data(runner.clone())
            .concurrency(settings.concurrency.max(1))
            .build(handle)
            .run_until(stop)
            .await?;
    }
    // Stopped for shutdown, its jobs finished: a fetch the shutdown cut short may still have
    // locked tickets to this worker that it will never run. Hand them back now rather than
    // after the orphan handover. (A backend failure returns above with `?`: those go by the
    // orphan rule, as the database may not be there to ask.)
    match store.release_tickets(&name).await {
        Ok(0) => {}
        Ok(released) => tracing::info!(worker = %name, released, "tickets fetched but not run put back in the queue"),
        Err(err) => {
            tracing::warn!(worker = %name, error = %err, "could not put fetched tickets back; the orphan handover will")
        }
    }
    tracing::info!(worker = %name, "job runner stopped");
    Ok(())
}
