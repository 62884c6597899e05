//! Job records and their apalis tickets (see [`crate::jobs`] for the model).
//!
//! Enqueueing writes the record and pushes the ticket in one transaction, so there is never a
//! ticket without a record or a record no worker will ever see. A retry is a new ticket for the
//! same record, scheduled in the future: that is what makes backoff real, since apalis's SQL
//! backends re-run a failed task immediately.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::coalesce::CoalescedStats;
use super::{Inner, Result, ServiceTx, Store, UserContext, jobs_postgres, jobs_sqlite};
use crate::domain::ConnectionId;
use crate::jobs::{ClaimedJob, JobId, JobOutcome, JobRecord, NewJob, TicketId};

/// What the metrics report about the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Jobs due now or earlier and not yet picked up.
    pub queued: i64,
    /// Jobs a worker holds.
    pub running: i64,
    /// Jobs waiting for a later time (retries with backoff, spread-out sweeps).
    pub scheduled: i64,
    /// How long the oldest due job has waited.
    pub oldest_queued_age: Option<Duration>,
}

/// One queue ticket naming a job, as the queue's table holds it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TicketState {
    /// apalis's status: `Pending`, `Queued` (fetched), `Running`, `Failed`, …
    pub status: String,
    /// Times a handler could not carry it through (or its worker died holding it).
    pub attempts: i64,
    /// The worker holding it, if any.
    pub lock_by: Option<String>,
    /// Seconds until it is due (negative: overdue).
    pub due_in_seconds: f64,
}

/// The second at which a ticket for `run_at` may become due on a queue that counts whole
/// seconds (apalis-sqlite): rounded *up*, so a retry never starts before the delay it was given
/// (an exchange's `Retry-After`, say) — at most a second after it.
pub(super) fn due_second(run_at: DateTime<Utc>) -> i64 {
    run_at.timestamp() + i64::from(run_at.timestamp_subsec_nanos() > 0)
}

impl ServiceTx {
    /// Inserts the job record and pushes its ticket inside this transaction.
    ///
    /// `Ok(None)`: a job with the same idempotency key exists already (nothing written).
    /// `Err(StoreError::Conflict)`: the connection already has a credential-changing job queued
    /// or running (see [`Store::active_change_job`] for its id).
    #[tracing::instrument(skip_all, fields(job_id = %job.id, kind = job.payload.kind().as_str()), err(level = "info"))]
    pub async fn enqueue_job(&mut self, job: &NewJob) -> Result<Option<JobRecord>> {
        match self {
            ServiceTx::Postgres(tx) => jobs_postgres::insert_job(tx, job).await,
            ServiceTx::Sqlite(tx) => jobs_sqlite::insert_job(tx, job).await,
        }
    }

    /// The active connection's `credentials_version`, read (and on PostgreSQL the row locked)
    /// inside this transaction: what a rotation enqueued in it must expect to replace. Read
    /// earlier, outside the transaction, it could be stale by the time the job is inserted (a
    /// previous rotation swapping and settling in between), and the worker would then refuse a
    /// rotation nothing had overtaken. `None`: no such active connection.
    pub async fn credentials_version(&mut self, connection_id: ConnectionId) -> Result<Option<i32>> {
        match self {
            ServiceTx::Postgres(tx) => jobs_postgres::credentials_version(&mut tx.tx, connection_id).await,
            ServiceTx::Sqlite(tx) => jobs_sqlite::credentials_version(tx, connection_id).await,
        }
    }

    /// Settles the queued credential-changing jobs of a connection that is being revoked, and
    /// wipes their payloads (a pending rotation's new keys must not outlive the revoke). A job
    /// already running notices the revoke when it tries to apply its result.
    #[tracing::instrument(skip_all, fields(%connection_id), err)]
    pub async fn cancel_connection_jobs(&mut self, connection_id: ConnectionId, reason: &str) -> Result<u64> {
        match self {
            ServiceTx::Postgres(tx) => jobs_postgres::cancel_connection_jobs(&mut tx.tx, connection_id, reason).await,
            ServiceTx::Sqlite(tx) => jobs_sqlite::cancel_connection_jobs(tx, connection_id, reason).await,
        }
    }
}

impl Store {
    /// Enqueues a job on its own (`POST /connections/test`, the scheduler). See
    /// [`ServiceTx::enqueue_job`]. On PostgreSQL one statement, shared with concurrent enqueues.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, kind = job.payload.kind().as_str()), err(level = "info"))]
    pub async fn enqueue_job(&self, job: &NewJob) -> Result<Option<JobRecord>> {
        if let Inner::Postgres(s) = &*self.inner {
            return jobs_postgres::enqueue(s, job).await;
        }
        let mut tx = self.begin_service().await?;
        let record = tx.enqueue_job(job).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Enqueues many jobs atomically (a sweep's page of health checks): on PostgreSQL one
    /// statement for all of them, on SQLite one transaction. Jobs whose idempotency key was used
    /// already are skipped; returns how many were enqueued.
    #[tracing::instrument(skip_all, fields(jobs = jobs.len()), err)]
    pub async fn enqueue_jobs(&self, jobs: &[NewJob]) -> Result<usize> {
        if let Inner::Postgres(s) = &*self.inner {
            return jobs_postgres::insert_jobs(s, jobs).await;
        }
        let mut tx = self.begin_service().await?;
        let mut enqueued = 0;
        for job in jobs {
            if tx.enqueue_job(job).await?.is_some() {
                enqueued += 1;
            }
        }
        tx.commit().await?;
        Ok(enqueued)
    }

    /// A plain transaction for service-path writes that must be atomic with an enqueue.
    pub async fn begin_service(&self) -> Result<ServiceTx> {
        dispatch!(self, s => s.begin_service().await)
    }

    /// The caller's job; another user's job is `None`. One statement, filtered by owner (no RLS
    /// transaction: this is what the portal polls).
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, job_id = %id), err)]
    pub async fn get_job(&self, user: &UserContext, id: JobId) -> Result<Option<JobRecord>> {
        dispatch!(self, s => s.get_job(user, id).await)
    }

    /// The credential-changing job (verify, rotate, kite_session) queued or running for a
    /// connection, if any.
    #[tracing::instrument(skip_all, fields(%connection_id), err)]
    pub async fn active_change_job(&self, connection_id: ConnectionId) -> Result<Option<JobId>> {
        dispatch!(self, s => s.active_change_job(connection_id).await)
    }

    /// Takes a job for running: marks it `running` and counts the attempt. `None` if it is
    /// already settled — a duplicate or late ticket, which the worker simply drops. A job found
    /// `running` is claimed again: its previous worker died and apalis handed the ticket on.
    #[tracing::instrument(skip_all, fields(job_id = %id), err)]
    pub async fn claim_job(&self, id: JobId) -> Result<Option<ClaimedJob>> {
        dispatch!(self, s => s.claim_job(id).await)
    }

    /// Settles a job with its outcome and wipes its payload. `false` if it was already settled.
    /// With `ticket`, the ticket that ran the job is acknowledged (deleted) in the same
    /// statement, whether or not this call settled the job; without one (jobs run without the
    /// queue, in tests), the queue is not touched.
    #[tracing::instrument(skip_all, fields(job_id = %id), err)]
    pub async fn finish_job(&self, id: JobId, outcome: &JobOutcome, ticket: Option<&TicketId>) -> Result<bool> {
        dispatch!(self, s => s.finish_job(id, outcome, ticket).await)
    }

    /// Puts a running job back in the queue, due at `run_at`, with a new ticket (same
    /// statement, which also acknowledges `ticket`, as [`Store::finish_job`] does). `false` if
    /// it is not running any more.
    #[tracing::instrument(skip_all, fields(job_id = %id, %run_at), err)]
    pub async fn requeue_job(&self, id: JobId, run_at: DateTime<Utc>, ticket: Option<&TicketId>) -> Result<bool> {
        dispatch!(self, s => s.requeue_job(id, run_at, false, ticket).await)
    }

    /// Like [`Store::requeue_job`], but the attempt just claimed does not count: nothing reached
    /// the exchange (our own rate limit said "not yet"), so the job must not run out of retries
    /// by waiting for its turn.
    #[tracing::instrument(skip_all, fields(job_id = %id, %run_at), err)]
    pub async fn defer_job(&self, id: JobId, run_at: DateTime<Utc>, ticket: Option<&TicketId>) -> Result<bool> {
        dispatch!(self, s => s.requeue_job(id, run_at, true, ticket).await)
    }

    /// Acknowledges a ticket whose job needed nothing done (settled already: a duplicate or
    /// late ticket).
    #[tracing::instrument(skip_all, fields(%ticket), err)]
    pub async fn drop_ticket(&self, ticket: &TicketId) -> Result<()> {
        dispatch!(self, s => s.drop_ticket(ticket).await)
    }

    /// Hands a ticket back to the queue after its handler could neither settle nor reschedule
    /// its job (the database failed it mid-way): any worker may fetch it again after the delay
    /// that [`RetryPolicy::TICKET`](crate::retry::RetryPolicy::TICKET) gives for its attempts
    /// (2 s doubling to 30 s), and after its last attempt (25) it stays failed for an operator to
    /// see. Exchange failures never come here: the worker settles or reschedules those itself.
    /// The job itself was left `queued` or `running`, and claiming it again is safe.
    #[tracing::instrument(skip_all, fields(%ticket), err)]
    pub async fn retry_ticket(&self, ticket: &TicketId) -> Result<()> {
        dispatch!(self, s => s.retry_ticket(ticket).await)
    }

    /// How many calls of each coalesced statement were made, in how many statements they ran,
    /// and where their time went (PostgreSQL only; see `store::coalesce`): for benchmarks and
    /// tests.
    pub fn coalesced_statements(&self) -> Vec<CoalescedStats> {
        match &*self.inner {
            Inner::Postgres(s) => s.batches.stats().to_vec(),
            Inner::Sqlite(_) => Vec::new(),
        }
    }

    /// Ids of queued jobs that are due, oldest first — for running jobs without the queue in
    /// tests and benchmarks.
    pub async fn due_jobs(&self, limit: u32) -> Result<Vec<JobId>> {
        dispatch!(self, s => s.due_jobs(i64::from(limit)).await)
    }

    #[tracing::instrument(skip_all, err)]
    pub async fn queue_stats(&self) -> Result<QueueStats> {
        dispatch!(self, s => s.queue_stats().await)
    }

    /// The queue tickets naming job `id`: none once it is settled, one while it waits or runs.
    /// For tests and for looking into a stuck job.
    pub async fn tickets_of_job(&self, id: JobId) -> Result<Vec<TicketState>> {
        dispatch!(self, s => s.tickets_of_job(id).await)
    }

    /// Deletes settled jobs that finished before `older_than`.
    #[tracing::instrument(skip_all, fields(%older_than), err)]
    pub async fn prune_jobs(&self, older_than: DateTime<Utc>) -> Result<u64> {
        dispatch!(self, s => s.prune_jobs(older_than).await)
    }

    /// Puts the queue tickets `worker` still holds back in the queue, for any worker to fetch
    /// now; returns how many. For a worker that has stopped gracefully, after its running jobs
    /// finished: what it still holds was fetched and never run (a fetch cut short by the
    /// shutdown), or kept by a handler that could not reach the database to hand it back. Either
    /// is safe to hand out again, since claiming a settled job is a no-op. A ticket whose job is
    /// still `running` stays where it is, so nothing running can be handed out twice. Without
    /// this, those tickets wait for the orphan handover (heartbeat × missed heartbeats, 30 s).
    #[tracing::instrument(skip_all, fields(%worker), err)]
    pub async fn release_tickets(&self, worker: &str) -> Result<u64> {
        dispatch!(self, s => s.release_tickets(worker).await)
    }
}

/// The one message used when a revoke settles pending jobs.
pub const REVOKED_REASON: &str = "the connection was revoked";
