//! Job records on PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::coalesce::{BatchFn, CoalescedStats, Coalescer, in_order};
use super::jobs::{QueueStats, TicketState};
use super::postgres::{CheckWrite, PgStore, record_checks};
use super::wakeups::{Wakeups, wakeup_payload};
use super::{PgServiceTx, Result, ServiceTx, UserContext, decode_error, parse_column};
use crate::domain::{ConnectionId, UserId};
use crate::jobs::{
    ClaimedJob, JobId, JobOutcome, JobPayload, JobRecord, JobStatus, JobTicket, NewJob, QUEUE, TicketId,
};
use crate::retry::RetryPolicy;

macro_rules! job_columns {
    () => {
        "id, kind, status, connection_id, exchange, attempts, created_at, started_at, finished_at, result, error"
    };
}

/// Inserts the record and its first ticket; once the transaction commits, a ticket that is due
/// now wakes an idle worker (see [`super::wakeups`]).
pub(super) async fn insert_job(tx: &mut PgServiceTx, job: &NewJob) -> Result<Option<JobRecord>> {
    let (mut records, due) = insert_rows(&mut *tx.tx, std::slice::from_ref(job)).await?;
    tx.due_tickets.extend(due);
    Ok(records.pop().flatten())
}

/// One job and its ticket, coalesced with concurrent enqueues into one statement (see
/// [`super::coalesce`]), so one implicit transaction: the hot path of
/// `POST /connections/test`, which would otherwise spend four round trips (begin, job, ticket,
/// commit) on each.
pub(super) async fn enqueue(store: &PgStore, job: &NewJob) -> Result<Option<JobRecord>> {
    store.batches.enqueue.call(job.clone()).await
}

/// Many job records and their tickets in one statement: what a health sweep enqueues, page by
/// page. Row by row that was two round trips per check (~540 checks per second, slower than a
/// large sweep is meant to take); as arrays it is one per page. A key already used (or repeated
/// in the page) is skipped. Returns how many were enqueued.
pub(super) async fn insert_jobs(store: &PgStore, jobs: &[NewJob]) -> Result<usize> {
    let (inserted, due) = insert_rows(&store.pool, jobs).await?;
    store.wakeups.send(due);
    Ok(inserted.iter().filter(|record| record.is_some()).count())
}

/// Job records and their apalis tickets, in one statement over arrays; the records in the order
/// of `jobs`, `None` where the idempotency key was used already (or earlier in `jobs`), and the
/// wake-ups of the inserted tickets that are due, to send once the statement has committed.
/// apalis-postgres's own `push_tasks` would be a second round trip; the ticket's columns are
/// those of its `queries/task/sink.sql` (apalis-postgres 1.0), which the queue tests exercise
/// end to end.
async fn insert_rows(db: impl sqlx::PgExecutor<'_>, jobs: &[NewJob]) -> Result<(Vec<Option<JobRecord>>, Vec<String>)> {
    if jobs.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let n = jobs.len();
    let (mut ids, mut kinds, mut users, mut connections, mut exchanges) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut payloads, mut keys, mut run_ats, mut tickets) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for job in jobs {
        ids.push(job.id.to_string());
        kinds.push(job.payload.kind().as_str());
        users.push(job.user_id.0);
        connections.push(job.payload.connection_id().map(|c| c.0));
        exchanges.push(job.exchange.as_str());
        payloads.push(serde_json::to_value(&job.payload).map_err(|e| decode_error("payload", e))?);
        keys.push(job.idempotency_key.clone());
        run_ats.push(run_at(job));
        tickets.push(serde_json::to_vec(&JobTicket { job_id: job.id }).map_err(|e| decode_error("ticket", e))?);
    }
    let rows = sqlx::query(concat!(
        "WITH input AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::jsonb[],
                                  $7::text[], $8::timestamptz[], $9::bytea[])
                 AS i (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at, ticket)
         ), job AS (
             INSERT INTO public.tradeeon_jobs
                 (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at)
             SELECT id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at FROM input
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING ",
        // Not `*`: the payload (the encrypted credentials) need not be copied back.
        job_columns!(),
        ", run_at
         ), ticket AS (
             INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             SELECT job.id, $10, input.ticket, 'Pending', 0, $11, job.run_at, 0 FROM job JOIN input USING (id)
         )
         SELECT ",
        job_columns!(),
        " FROM job"
    ))
    .bind(&ids)
    .bind(&kinds)
    .bind(&users)
    .bind(&connections)
    .bind(&exchanges)
    .bind(&payloads)
    .bind(&keys)
    .bind(&run_ats)
    .bind(&tickets)
    .bind(QUEUE)
    .bind(RetryPolicy::TICKET.max_attempts)
    .fetch_all(db)
    .await?;
    let records = rows.iter().map(job_from_row).collect::<Result<Vec<_>>>()?;
    let inserted: HashSet<JobId> = records.iter().map(|record| record.id).collect();
    let due = jobs
        .iter()
        .filter(|job| inserted.contains(&job.id))
        .filter_map(|job| wakeup_payload(QUEUE, job.id.0, run_at(job)))
        .collect();
    let keyed = records.into_iter().map(|record| (record.id, record)).collect();
    Ok((in_order(&jobs.iter().map(|job| job.id).collect::<Vec<_>>(), keyed), due))
}

fn run_at(job: &NewJob) -> DateTime<Utc> {
    job.run_at.unwrap_or_else(Utc::now)
}

pub(super) async fn cancel_connection_jobs(
    conn: &mut PgConnection,
    connection_id: ConnectionId,
    reason: &str,
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE public.tradeeon_jobs
            SET status = 'failed', error = $2, finished_at = now(), payload = NULL
          WHERE connection_id = $1 AND active AND status = 'queued'",
    )
    .bind(connection_id.0)
    .bind(reason)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

pub(super) async fn credentials_version(conn: &mut PgConnection, connection_id: ConnectionId) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT credentials_version FROM public.exchange_keys WHERE id = $1 AND is_active FOR UPDATE",
    )
    .bind(connection_id.0)
    .fetch_optional(&mut *conn)
    .await?)
}

fn job_from_row(row: &PgRow) -> Result<JobRecord> {
    let id: String = row.try_get("id")?;
    let result: Option<Value> = row.try_get("result")?;
    Ok(JobRecord {
        id: parse_column("id", &id)?,
        kind: parse_column("kind", &row.try_get::<String, _>("kind")?)?,
        status: parse_column("status", &row.try_get::<String, _>("status")?)?,
        connection_id: row.try_get::<Option<Uuid>, _>("connection_id")?.map(ConnectionId),
        exchange: parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
        attempts: row.try_get("attempts")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        result: result.map(serde_json::from_value).transpose().map_err(|e| decode_error("result", e))?,
        error: row.try_get("error")?,
    })
}

impl PgStore {
    pub(super) async fn begin_service(&self) -> Result<ServiceTx> {
        let tx = self.pool.begin().await?;
        Ok(ServiceTx::Postgres(PgServiceTx { tx, wakeups: self.wakeups.clone(), due_tickets: Vec::new() }))
    }

    pub(super) async fn get_job(&self, user: &UserContext, id: JobId) -> Result<Option<JobRecord>> {
        self.batches.get_job.call((id, user.user_id)).await
    }

    pub(super) async fn active_change_job(&self, connection_id: ConnectionId) -> Result<Option<JobId>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM public.tradeeon_jobs
              WHERE connection_id = $1 AND active AND kind IN ('verify', 'rotate', 'kite_session')
              LIMIT 1",
        )
        .bind(connection_id.0)
        .fetch_optional(&self.pool)
        .await?;
        id.map(|id| parse_column("id", &id)).transpose()
    }

    pub(super) async fn claim_job(&self, id: JobId) -> Result<Option<ClaimedJob>> {
        self.batches.claim.call(id).await
    }

    pub(super) async fn finish_job(&self, id: JobId, outcome: &JobOutcome, ticket: Option<&TicketId>) -> Result<bool> {
        self.batches.finish.call((id, outcome.clone(), ticket.cloned())).await
    }

    pub(super) async fn requeue_job(
        &self,
        id: JobId,
        run_at: DateTime<Utc>,
        refund_attempt: bool,
        ran: Option<&TicketId>,
    ) -> Result<bool> {
        // The record, its new ticket and the acknowledgement of the old one in one statement. The
        // ticket is written here rather than by apalis's `push_tasks`, which takes whole
        // seconds: a retry could then start up to a second before the delay it was given (an
        // exchange's `Retry-After`, say).
        let ticket = serde_json::to_vec(&JobTicket { job_id: id }).map_err(|e| decode_error("ticket", e))?;
        let requeued: i64 = sqlx::query_scalar(
            "WITH job AS (
                 UPDATE public.tradeeon_jobs
                    SET status = 'queued', run_at = $2, attempts = attempts - CASE WHEN $3 THEN 1 ELSE 0 END
                  WHERE id = $1 AND status = 'running'
                  RETURNING run_at
             ), ticket AS (
                 INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
                 SELECT $4, $5, $6, 'Pending', 0, $7, job.run_at, 0 FROM job
             ), acknowledged AS (
                 DELETE FROM apalis.jobs WHERE id = $8 AND job_type = $5
             )
             SELECT count(*) FROM job",
        )
        .bind(id.to_string())
        .bind(run_at)
        .bind(refund_attempt)
        .bind(ulid::Ulid::generate().to_string())
        .bind(QUEUE)
        .bind(ticket)
        .bind(RetryPolicy::TICKET.max_attempts)
        .bind(ran.map(|t| t.0.as_str()))
        .fetch_one(&self.pool)
        .await?;
        if requeued == 1 {
            // Due already (a zero delay): wake a worker rather than wait for its next poll.
            self.wakeups.send(wakeup_payload(QUEUE, id.0, run_at).into_iter().collect());
        }
        Ok(requeued == 1)
    }

    pub(super) async fn drop_ticket(&self, ticket: &TicketId) -> Result<()> {
        sqlx::query("DELETE FROM apalis.jobs WHERE id = $1 AND job_type = $2")
            .bind(&ticket.0)
            .bind(QUEUE)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn retry_ticket(&self, ticket: &TicketId) -> Result<()> {
        // `Failed` with attempts left is what apalis's own fetch takes again once `run_at` has
        // passed; with none left it never does. The delay depends on the attempts so far, so the
        // row stays locked from reading them to writing the next.
        let mut tx = self.pool.begin().await?;
        let attempts: Option<i32> =
            sqlx::query_scalar("SELECT attempts FROM apalis.jobs WHERE id = $1 AND job_type = $2 FOR UPDATE")
                .bind(&ticket.0)
                .bind(QUEUE)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(attempts) = attempts else { return Ok(()) };
        let attempt = attempts.saturating_add(1);
        let run_at = Utc::now() + RetryPolicy::TICKET.delay(attempt);
        sqlx::query(
            "UPDATE apalis.jobs
                SET status = 'Failed', attempts = $3, lock_by = NULL, lock_at = NULL, done_at = now(), run_at = $4
              WHERE id = $1 AND job_type = $2",
        )
        .bind(&ticket.0)
        .bind(QUEUE)
        .bind(attempt)
        .bind(run_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn tickets_of_job(&self, id: JobId) -> Result<Vec<TicketState>> {
        Ok(sqlx::query_as(
            "SELECT status, attempts::int8 AS attempts, lock_by,
                    extract(epoch FROM run_at - now())::float8 AS due_in_seconds
               FROM apalis.jobs
              WHERE job_type = $2 AND convert_from(job, 'UTF8')::jsonb ->> 'job_id' = $1",
        )
        .bind(id.to_string())
        .bind(QUEUE)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn due_jobs(&self, limit: i64) -> Result<Vec<JobId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM public.tradeeon_jobs WHERE active AND status = 'queued' AND run_at <= now() ORDER BY run_at, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_column("id", id)).collect()
    }

    pub(super) async fn queue_stats(&self) -> Result<QueueStats> {
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'queued' AND run_at <= now()) AS queued,
                    count(*) FILTER (WHERE status = 'running') AS running,
                    count(*) FILTER (WHERE status = 'queued' AND run_at > now()) AS scheduled,
                    EXTRACT(EPOCH FROM now() - min(run_at) FILTER (WHERE status = 'queued' AND run_at <= now()))::float8
                        AS oldest_seconds
               FROM public.tradeeon_jobs
              WHERE active",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<f64> = row.try_get("oldest_seconds")?;
        Ok(QueueStats {
            queued: row.try_get("queued")?,
            running: row.try_get("running")?,
            scheduled: row.try_get("scheduled")?,
            oldest_queued_age: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    pub(super) async fn prune_jobs(&self, older_than: DateTime<Utc>) -> Result<u64> {
        // Tickets that failed for good go with the records (done ones are deleted by the worker's
        // settle, or by migration `drop_acknowledged_tickets` when apalis acknowledges them).
        Ok(sqlx::query(
            "WITH tickets AS (
                 DELETE FROM apalis.jobs
                  WHERE job_type = $2 AND done_at < $1
                    AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))
             )
             DELETE FROM public.tradeeon_jobs WHERE finished_at < $1",
        )
        .bind(older_than)
        .bind(QUEUE)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub(super) async fn release_tickets(&self, worker: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE apalis.jobs AS a SET status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL
              WHERE job_type = $1 AND lock_by = $2 AND status IN ('Queued', 'Running')
                AND NOT EXISTS (SELECT 1 FROM public.tradeeon_jobs AS t
                                 WHERE t.id = convert_from(a.job, 'UTF8')::jsonb ->> 'job_id' AND t.status = 'running')",
        )
        .bind(QUEUE)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

/// The statements the API and the workers issue most, each coalesced with concurrent calls of
/// the same kind into one statement per batch (see [`super::coalesce`]).
#[derive(Clone, Debug)]
pub(super) struct PgBatches {
    enqueue: Coalescer<NewJob, Option<JobRecord>>,
    get_job: Coalescer<(JobId, UserId), Option<JobRecord>>,
    claim: Coalescer<JobId, Option<ClaimedJob>>,
    finish: Coalescer<(JobId, JobOutcome, Option<TicketId>), bool>,
    pub(super) record_check: Coalescer<CheckWrite, bool>,
}

/// Most calls in one statement.
const MAX_BATCH: usize = 128;

impl PgBatches {
    /// Calls and statements per kind of batched statement, since start.
    pub(super) fn stats(&self) -> [CoalescedStats; 5] {
        [
            self.enqueue.stats("enqueue"),
            self.get_job.stats("get_job"),
            self.claim.stats("claim"),
            self.finish.stats("finish"),
            self.record_check.stats("record_check"),
        ]
    }

    /// Starts the dispatchers on the current Tokio runtime. An eighth of the pool's connections
    /// (at least one; one with the default pool of 10) may run batches of each kind at once:
    /// fewer lanes make larger batches and less work for the database per call, more lanes less
    /// waiting for a free lane; the rest of the pool stays free for every other statement. A
    /// quarter (two lanes at 10) did worse at 32 concurrent `POST /connections/test`: ~11 calls
    /// per statement and 0.55-0.59 x the pgbench baseline, against ~17.5 calls and 0.62-0.66
    /// with one lane (bench/README.md). Processes scale out, each with its own lanes.
    pub(super) fn start(pool: &PgPool, wakeups: &Wakeups, max_connections: u32) -> Self {
        let lanes = (max_connections as usize / 8).max(1);
        let enqueue = {
            let wakeups = wakeups.clone();
            batch_fn(move |mut conn, jobs: Vec<NewJob>| {
                let wakeups = wakeups.clone();
                async move {
                    let (records, due) = insert_rows(&mut *conn, &jobs).await?;
                    wakeups.send(due);
                    Ok(records)
                }
            })
        };
        let get_job = batch_fn(|mut conn, keys| async move { get_jobs(&mut *conn, keys).await });
        let claim = batch_fn(|mut conn, ids| async move { claim_jobs(&mut *conn, ids).await });
        let finish = batch_fn(|mut conn, outcomes| async move { finish_jobs(&mut *conn, outcomes).await });
        let record_check = batch_fn(|mut conn, writes| async move { record_checks(&mut conn, writes).await });
        Self {
            enqueue: Coalescer::start(pool, lanes, MAX_BATCH, enqueue),
            get_job: Coalescer::start(pool, lanes, MAX_BATCH, get_job),
            claim: Coalescer::start(pool, lanes, MAX_BATCH, claim),
            finish: Coalescer::start(pool, lanes, MAX_BATCH, finish),
            record_check: Coalescer::start(pool, lanes, MAX_BATCH, record_check),
        }
    }
}

fn batch_fn<I, O, F, Fut>(f: F) -> BatchFn<I, O>
where
    F: Fn(PoolConnection<sqlx::Postgres>, Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<O>>> + Send + 'static,
{
    Arc::new(move |conn, inputs| Box::pin(f(conn, inputs)))
}

/// The callers' jobs, each only if it is theirs: ownership is in the statement itself (no RLS
/// transaction — the portal polls this, and the role switch would cost three extra round trips
/// around a primary-key lookup), and the cross-user tests (api `cross_user`, store
/// `jobs_are_private_to_their_user`) hold it to that.
async fn get_jobs(db: impl sqlx::PgExecutor<'_>, keys: Vec<(JobId, UserId)>) -> Result<Vec<Option<JobRecord>>> {
    let ids: Vec<String> = keys.iter().map(|(id, _)| id.to_string()).collect();
    let users: Vec<Uuid> = keys.iter().map(|(_, user)| user.0).collect();
    let rows = sqlx::query(concat!(
        "SELECT user_id, ",
        job_columns!(),
        " FROM public.tradeeon_jobs JOIN unnest($1::text[], $2::uuid[]) AS caller (id, user_id) USING (id, user_id)"
    ))
    .bind(&ids)
    .bind(&users)
    .fetch_all(db)
    .await?;
    let found = rows
        .iter()
        .map(|row| {
            let record = job_from_row(row)?;
            Ok(((record.id, UserId(row.try_get("user_id")?)), record))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(in_order(&keys, found))
}

// `NO_FLUSH`: the worker's claim and settle statements set `synchronous_commit = off` for their
// own (implicit) transaction, so they do not each wait for an fsync. That is safe because the
// settle statement is also the ticket's acknowledgement (it deletes the ticket): a database
// crash before its commit reached the disk (at most three `wal_writer_delay`s, 600 ms by
// default) loses the settle and the acknowledgement together, so the ticket is still there,
// locked to a worker whose heartbeats have stopped, and the orphan handover runs the job again
// (claiming and every job are idempotent). A lost claim leaves the ticket just as it was. The
// price: a job a client has seen `done` may, after such a crash, be run and settled once more.
// The API's writes always flush.

/// Takes jobs for running: each is marked `running` and its attempt counted, unless settled.
async fn claim_jobs(db: impl sqlx::PgExecutor<'_>, ids: Vec<JobId>) -> Result<Vec<Option<ClaimedJob>>> {
    let keys: Vec<String> = ids.iter().map(JobId::to_string).collect();
    let rows = sqlx::query(concat!(
        "UPDATE public.tradeeon_jobs
            SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, now())
           FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush
          WHERE id = ANY($1) AND status IN ('queued', 'running') AND payload IS NOT NULL
          RETURNING user_id, payload, ",
        job_columns!()
    ))
    .bind(&keys)
    .fetch_all(db)
    .await?;
    let claimed = rows
        .iter()
        .map(|row| {
            let payload: Value = row.try_get("payload")?;
            let job = ClaimedJob {
                record: job_from_row(row)?,
                user_id: UserId(row.try_get("user_id")?),
                payload: serde_json::from_value::<JobPayload>(payload).map_err(|e| decode_error("payload", e))?,
            };
            Ok((job.record.id, job))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(in_order(&ids, claimed))
}

/// Settles jobs with their outcomes and wipes their payloads, acknowledges (deletes) the
/// tickets that ran them, and writes the `tested` audit entry of each `test` job settled that
/// names its requester (see [`crate::jobs::Requester`]); `false` for a job already settled.
async fn finish_jobs(
    db: impl sqlx::PgExecutor<'_>,
    outcomes: Vec<(JobId, JobOutcome, Option<TicketId>)>,
) -> Result<Vec<bool>> {
    let n = outcomes.len();
    let (mut ids, mut statuses, mut results, mut errors) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let tickets: Vec<&str> =
        outcomes.iter().filter_map(|(_, _, ticket)| ticket.as_ref()).map(|t| t.0.as_str()).collect();
    for (id, outcome, _) in &outcomes {
        ids.push(id.to_string());
        match outcome {
            JobOutcome::Done(result) => {
                statuses.push(JobStatus::Done.as_str());
                results.push(Some(serde_json::to_value(result).map_err(|e| decode_error("result", e))?));
                errors.push(None);
            }
            JobOutcome::Failed(error) => {
                statuses.push(JobStatus::Failed.as_str());
                results.push(None);
                errors.push(Some(error.clone()));
            }
        }
    }
    // `requested` reads the payloads that `settled` wipes: both see the statement's snapshot.
    // Only jobs this statement settles are audited, so a job settled twice is audited once.
    let settled: Vec<String> = sqlx::query_scalar(
        "WITH outcome AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[]) AS o (id, status, result, error)
         ), requested AS (
             SELECT j.id, j.user_id, j.exchange, j.payload -> 'requested_by' AS requester
               FROM public.tradeeon_jobs AS j JOIN outcome USING (id)
              WHERE j.kind = 'test' AND j.payload ? 'requested_by'
         ), settled AS (
             UPDATE public.tradeeon_jobs AS j
                SET status = o.status, result = o.result, error = o.error, finished_at = now(), payload = NULL
               FROM outcome AS o, (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush
              WHERE j.id = o.id AND j.status IN ('queued', 'running')
              RETURNING j.id
         ), acknowledged AS (
             DELETE FROM apalis.jobs WHERE id = ANY($5) AND job_type = $6
         ), audited AS (
             INSERT INTO public.connection_audit_log (user_id, action, ip_address, user_agent, details)
             SELECT r.user_id, 'tested', (r.requester ->> 'ip_address')::inet, r.requester ->> 'user_agent',
                    jsonb_strip_nulls(jsonb_build_object(
                        'stage', 'finished', 'job_id', r.id, 'exchange', r.exchange, 'outcome', o.status,
                        'ok', o.result -> 'ok', 'code', o.result -> 'code'))
               FROM settled JOIN requested AS r USING (id) JOIN outcome AS o USING (id)
         )
         SELECT id FROM settled",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&results)
    .bind(&errors)
    .bind(&tickets)
    .bind(QUEUE)
    .fetch_all(db)
    .await?;
    let settled: HashSet<&str> = settled.iter().map(String::as_str).collect();
    Ok(ids.iter().map(|id| settled.contains(id.as_str())).collect())
}
