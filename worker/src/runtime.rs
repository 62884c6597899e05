//! The job runner: apalis workers consuming tickets from the shared queue.
//!
//! A ticket only names a job record. Running it is always the same three steps — claim the
//! record, run the job, settle or reschedule it — so the job modules never touch the queue and
//! the runtime never looks inside a job.
//!
//! apalis only fetches tickets here; it neither locks nor acknowledges them (`lock_tasks` and
//! `persist_results` off). The statement that settles or reschedules a job deletes its ticket
//! too, so a job costs the database one write fewer, and apalis's acknowledgement transaction —
//! which it runs between fetches, holding the next fetch back — is gone. A ticket whose handler
//! could not reach the database is handed back with a delay ([`Store::retry_ticket`]).
//!
//! Why the settings below: orphaned tickets (a worker killed mid-job) are re-enqueued after
//! `heartbeat × missed_heartbeats`, which must stay well under the 60 s promised for handing a
//! job to another worker; LISTEN/NOTIFY wakes PostgreSQL workers within milliseconds of an
//! enqueue, with polling as the fallback.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use chrono::Utc;
use tradeeon_shared::jobs::{ClaimedJob, JobId, JobOutcome, JobTicket, QUEUE, TicketId};
use tradeeon_shared::retry::RetryPolicy;
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

/// Runs one ticket's job: claim, run, settle or reschedule — and acknowledge `ticket`, the
/// queue ticket that named the job, in the same statement as the settle or reschedule.
///
/// Public so tests (and benchmarks) can drive jobs deterministically without the queue (no
/// ticket).
pub async fn process(
    env: &JobEnv,
    metrics: Option<&WorkerMetrics>,
    id: JobId,
    ticket: Option<&TicketId>,
) -> anyhow::Result<()> {
    let Some(job) = env.store.claim_job(id).await? else {
        // Settled already: a duplicate or late ticket. Nothing to do but acknowledge it.
        tracing::debug!(job_id = %id, "ticket for a settled job dropped");
        if let Some(ticket) = ticket {
            env.store.drop_ticket(ticket).await?;
        }
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
            env.store.finish_job(id, &outcome, ticket).await?;
        }
        Step::Retry { after, .. } => {
            let run_at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(60));
            tracing::info!(parent: &span, delay_ms = after.as_millis() as u64, "retrying later");
            env.store.requeue_job(id, run_at, ticket).await?;
        }
        Step::Defer { after } => {
            let run_at = Utc::now() + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::seconds(60));
            tracing::debug!(parent: &span, delay_ms = after.as_millis() as u64, "rate budget exhausted; deferred");
            env.store.defer_job(id, run_at, ticket).await?;
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
            process(env, metrics, id, None).await?;
            ran += 1;
        }
    }
}

/// What every ticket handler shares.
struct Runner {
    env: Arc<JobEnv>,
    metrics: Option<WorkerMetrics>,
}

async fn handle(ticket: JobTicket, task_id: TaskId, runner: Data<Arc<Runner>>) -> Result<(), BoxDynError> {
    let ticket_id = TicketId(task_id.to_string());
    let Err(err) = process(&runner.env, runner.metrics.as_ref(), ticket.job_id, Some(&ticket_id)).await else {
        return Ok(());
    };
    // The job could not be claimed, settled or rescheduled: the database failed us. Hand the
    // ticket back so that it runs again later, here or elsewhere (claiming is idempotent).
    tracing::warn!(job_id = %ticket.job_id, error = format!("{err:#}"), "job could not be processed; retrying later");
    hand_back(&runner.env.store, &ticket_id).await;
    Err(BoxDynError::from(err))
}

/// Hands a ticket back to the queue, trying for about 15 s. If the database stays out of reach
/// that long, this worker's fetches and heartbeats fail too: apalis stops it, the runner starts a
/// new one, and the orphan handover returns the ticket with the others it held.
async fn hand_back(store: &Store, ticket: &TicketId) {
    for attempt in 1..=HAND_BACK.max_attempts {
        match store.retry_ticket(ticket).await {
            Ok(()) => return,
            Err(err) if !HAND_BACK.has_attempts_left(attempt) => {
                tracing::error!(%ticket, error = %err, "could not hand the ticket back; the orphan handover will");
            }
            Err(_) => tokio::time::sleep(HAND_BACK.delay(attempt)).await,
        }
    }
}

/// Handing a ticket back: 500 ms doubling, 6 attempts (waits of 0.5 + 1 + 2 + 4 + 8 s).
const HAND_BACK: RetryPolicy = RetryPolicy {
    first_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(8),
    jitter: 0.0,
    max_attempts: 6,
};

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
    let mut failures: i32 = 0;
    loop {
        match run_worker(&runner, &settings, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(err) if shutdown.peek().is_some() => {
                tracing::info!(error = format!("{err:#}"), "job runner stopped with an error during shutdown");
                return Ok(());
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                let backoff = RUNNER_RESTART.delay(failures);
                tracing::warn!(
                    error = format!("{err:#}"),
                    restart_in_ms = backoff.as_millis() as u64,
                    "job runner stopped (queue unreachable?); restarting"
                );
                tokio::select! {
                    () = shutdown.clone() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

/// Restarting the queue runner: 1 s doubling to 30 s, until shutdown.
const RUNNER_RESTART: RetryPolicy = RetryPolicy {
    first_delay: Duration::from_secs(1),
    max_delay: Duration::from_secs(30),
    jitter: 0.0,
    max_attempts: i32::MAX,
};

/// Tickets taken per fetch: twice the jobs run at once. apalis fetches only when the tickets of
/// the previous fetch have all been started, and the slots that free up while that fetch is
/// under way stay idle until it returns; with a batch of `concurrency` that happened once per
/// round of jobs (the worker benchmark: ~2,500 jobs/s, against 2,800–3,400 with a batch twice
/// as large). What is fetched and not yet started goes back to the queue when the worker stops.
fn fetch_batch(settings: &RuntimeSettings) -> usize {
    settings.concurrency.max(1) * 2
}

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
    if let Some(pool) = store.queue_pg_pool() {
        let config = apalis_postgres::Config::default()
            .queue(QUEUE)
            .batch_size(fetch_batch(settings))
            .heartbeat_interval(settings.heartbeat)
            .missed_heartbeats(settings.missed_heartbeats)
            .lock_tasks(false)
            .persist_results(false);
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
            .batch_size(fetch_batch(settings))
            .heartbeat_interval(settings.heartbeat)
            .missed_heartbeats(settings.missed_heartbeats)
            .lock_tasks(false)
            .persist_results(false);
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
