//! Job records on PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::jobs::{QueueStats, TICKET_MAX_ATTEMPTS, ticket};
use super::postgres::PgStore;
use super::wakeups::wakeup_payload;
use super::{AuditEntryInput, PgServiceTx, Result, ServiceTx, UserContext, decode_error, parse_column};
use crate::domain::{ConnectionId, UserId};
use crate::jobs::{ClaimedJob, JobId, JobOutcome, JobPayload, JobRecord, JobStatus, JobTicket, NewJob, QUEUE};

macro_rules! job_columns {
    () => {
        "id, kind, status, connection_id, exchange, attempts, created_at, started_at, finished_at, result, error"
    };
}

/// The job record and its first apalis ticket in one statement (`$1`–`$11`; see
/// [`insert_job_row`]). apalis-postgres's own `push_tasks` would be a second round trip; the
/// ticket's columns are those of its `queries/task/sink.sql` (apalis-postgres 1.0), which the
/// queue tests exercise end to end.
macro_rules! insert_job_and_ticket {
    () => {
        "WITH job AS (
             INSERT INTO public.tradeeon_jobs
                 (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING *
         ), ticket AS (
             INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             SELECT id, $9, $10, 'Pending', 0, $11, run_at, 0 FROM job
         )"
    };
}

/// Inserts the record and its first ticket; once the transaction commits, a ticket that is due
/// now wakes an idle worker (see [`super::wakeups`]).
pub(super) async fn insert_job(tx: &mut PgServiceTx, job: &NewJob) -> Result<Option<JobRecord>> {
    let query = sqlx::query(concat!(insert_job_and_ticket!(), " SELECT ", job_columns!(), " FROM job"));
    let row = bind_job(query, job)?.fetch_optional(&mut *tx.tx).await?;
    let Some(row) = row else { return Ok(None) };
    let record = job_from_row(&row)?;
    tx.due_tickets.extend(wakeup_payload(QUEUE, job.id.0, run_at(job)));
    Ok(Some(record))
}

/// An audit entry of the user's that names no connection, and a job, in one statement and so
/// one implicit transaction: the hot path of `POST /connections/test`, which would otherwise
/// spend seven round trips (user scope, audit, service scope, job, ticket, commit). It runs as
/// the service, so the owner is set by the statement (`user`), not by RLS.
pub(super) async fn enqueue_with_audit(
    store: &PgStore,
    user: &UserContext,
    audit: &AuditEntryInput,
    job: &NewJob,
) -> Result<Option<JobRecord>> {
    let query = sqlx::query(concat!(
        insert_job_and_ticket!(),
        ", audit AS (
             INSERT INTO public.connection_audit_log (user_id, action, ip_address, user_agent, details)
             SELECT $12, $13, $14::inet, $15, $16 FROM job
         )
         SELECT ",
        job_columns!(),
        " FROM job"
    ));
    let row = bind_job(query, job)?
        .bind(user.user_id.0)
        .bind(audit.action.as_str())
        .bind(audit.ip_address.map(|ip| ip.to_string()))
        .bind(audit.user_agent.as_deref())
        .bind((!audit.details.is_null()).then_some(&audit.details))
        .fetch_optional(&store.pool)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let record = job_from_row(&row)?;
    store.wakeups.send(wakeup_payload(QUEUE, job.id.0, run_at(job)).into_iter().collect());
    Ok(Some(record))
}

/// Many job records and their tickets in one statement, from arrays. A health sweep enqueues a
/// check per connection, page by page; row by row that was two round trips per check (~540
/// checks per second, slower than a large sweep is meant to take), as arrays it is one per page.
/// Same rows as [`insert_job`]; a key already used (or repeated in the page) is skipped.
pub(super) async fn insert_jobs(store: &PgStore, jobs: &[NewJob]) -> Result<usize> {
    if jobs.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(jobs.len());
    let mut kinds = Vec::with_capacity(jobs.len());
    let mut users = Vec::with_capacity(jobs.len());
    let mut connections = Vec::with_capacity(jobs.len());
    let mut exchanges = Vec::with_capacity(jobs.len());
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut keys = Vec::with_capacity(jobs.len());
    let mut run_ats = Vec::with_capacity(jobs.len());
    let mut tickets = Vec::with_capacity(jobs.len());
    for job in jobs {
        ids.push(job.id.to_string());
        kinds.push(job.payload.kind().as_str());
        users.push(job.user_id.0);
        connections.push(job.payload.connection_id().map(|c| c.0));
        exchanges.push(job.exchange.as_str());
        payloads.push(serde_json::to_value(&job.payload).map_err(|e| decode_error("payload", e))?);
        keys.push(job.idempotency_key.as_deref());
        run_ats.push(run_at(job));
        tickets.push(serde_json::to_vec(&JobTicket { job_id: job.id }).map_err(|e| decode_error("ticket", e))?);
    }
    let inserted: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "WITH job AS (
             INSERT INTO public.tradeeon_jobs
                 (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at)
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[],
                                  $6::jsonb[], $7::text[], $8::timestamptz[])
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id, run_at
         ), ticket AS (
             INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
             SELECT job.id, $9, t.ticket, 'Pending', 0, $11, job.run_at, 0
               FROM job JOIN unnest($1::text[], $10::bytea[]) AS t (id, ticket) USING (id)
         )
         SELECT id, run_at FROM job",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&users)
    .bind(&connections)
    .bind(&exchanges)
    .bind(&payloads)
    .bind(&keys)
    .bind(&run_ats)
    .bind(QUEUE)
    .bind(&tickets)
    .bind(i32::from(TICKET_MAX_ATTEMPTS))
    .fetch_all(&store.pool)
    .await?;
    let due = inserted
        .iter()
        .filter_map(|(id, run_at)| {
            let ticket: ulid::Ulid = id.parse().ok()?;
            wakeup_payload(QUEUE, ticket, *run_at)
        })
        .collect();
    store.wakeups.send(due);
    Ok(inserted.len())
}

fn run_at(job: &NewJob) -> DateTime<Utc> {
    job.run_at.unwrap_or_else(Utc::now)
}

/// Binds `$1`–`$11` of [`insert_job_and_ticket`].
fn bind_job<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    job: &'q NewJob,
) -> Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>> {
    let payload = serde_json::to_value(&job.payload).map_err(|e| decode_error("payload", e))?;
    let ticket = serde_json::to_vec(&JobTicket { job_id: job.id }).map_err(|e| decode_error("ticket", e))?;
    Ok(query
        .bind(job.id.to_string())
        .bind(job.payload.kind().as_str())
        .bind(job.user_id.0)
        .bind(job.payload.connection_id().map(|c| c.0))
        .bind(job.exchange.as_str())
        .bind(payload)
        .bind(job.idempotency_key.as_deref())
        .bind(run_at(job))
        .bind(QUEUE)
        .bind(ticket)
        .bind(i32::from(TICKET_MAX_ATTEMPTS)))
}

async fn push_ticket(conn: &mut PgConnection, job_id: JobId, ticket_id: ulid::Ulid, run_at: DateTime<Utc>) -> Result<()> {
    apalis_postgres::queries::push_tasks(conn, QUEUE, vec![ticket(job_id, ticket_id, run_at)?])
        .await
        .map_err(queue_error)
}

fn queue_error(err: apalis_postgres::Error) -> super::StoreError {
    match err {
        apalis_postgres::Error::Database(e) => super::StoreError::from(e),
        other => super::StoreError::Database(sqlx::Error::Protocol(format!("job queue: {other}"))),
    }
}

pub(super) async fn cancel_connection_jobs(
    conn: &mut PgConnection,
    connection_id: ConnectionId,
    reason: &str,
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE public.tradeeon_jobs
            SET status = 'failed', error = $2, finished_at = now(), payload = NULL
          WHERE connection_id = $1 AND status = 'queued'",
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

// `NO_FLUSH`: the worker's claim and settle statements set `synchronous_commit = off` for their
// own (implicit) transaction, so they do not each wait for an fsync. That is safe because both
// are followed by apalis's acknowledgement of the ticket, which commits synchronously: WAL is
// flushed in order, so once the ack is durable the claim and settle before it are too; a crash
// before the ack loses at most those two writes, and the ticket — still unacknowledged — runs
// the job again (claiming and every job are idempotent). The API's writes always flush.

impl PgStore {
    pub(super) async fn begin_service(&self) -> Result<ServiceTx> {
        let tx = self.pool.begin().await?;
        Ok(ServiceTx::Postgres(PgServiceTx { tx, wakeups: self.wakeups.clone(), due_tickets: Vec::new() }))
    }

    pub(super) async fn get_job(&self, user: &UserContext, id: JobId) -> Result<Option<JobRecord>> {
        // The one user-scoped read that skips the RLS transaction: the portal polls it, and the
        // role switch costs three extra round trips (BEGIN, set_config, COMMIT) around a
        // primary-key lookup. Ownership is in the statement itself, and the cross-user tests
        // (api `cross_user`, store `jobs_are_private_to_their_user`) hold it to that.
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM public.tradeeon_jobs WHERE id = $1 AND user_id = $2"
        ))
        .bind(id.to_string())
        .bind(user.user_id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn active_change_job(&self, connection_id: ConnectionId) -> Result<Option<JobId>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM public.tradeeon_jobs
              WHERE connection_id = $1 AND status IN ('queued', 'running')
                AND kind IN ('verify', 'rotate', 'kite_session')
              LIMIT 1",
        )
        .bind(connection_id.0)
        .fetch_optional(&self.pool)
        .await?;
        id.map(|id| parse_column("id", &id)).transpose()
    }

    pub(super) async fn claim_job(&self, id: JobId) -> Result<Option<ClaimedJob>> {
        // Claiming and settling commit without waiting for a WAL flush (see `NO_FLUSH`).
        let row = sqlx::query(concat!(
            "UPDATE public.tradeeon_jobs
                SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, now())
               FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush
              WHERE id = $1 AND status IN ('queued', 'running') AND payload IS NOT NULL
              RETURNING user_id, payload, ",
            job_columns!()
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let payload: Value = row.try_get("payload")?;
        Ok(Some(ClaimedJob {
            record: job_from_row(&row)?,
            user_id: UserId(row.try_get("user_id")?),
            payload: serde_json::from_value::<JobPayload>(payload).map_err(|e| decode_error("payload", e))?,
        }))
    }

    pub(super) async fn finish_job(&self, id: JobId, outcome: &JobOutcome) -> Result<bool> {
        let (status, result, error) = match outcome {
            JobOutcome::Done(result) => (
                JobStatus::Done,
                Some(serde_json::to_value(result).map_err(|e| decode_error("result", e))?),
                None,
            ),
            JobOutcome::Failed(error) => (JobStatus::Failed, None, Some(error.as_str())),
        };
        let updated = sqlx::query(
            "UPDATE public.tradeeon_jobs
                SET status = $2, result = $3, error = $4, finished_at = now(), payload = NULL
               FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush
              WHERE id = $1 AND status IN ('queued', 'running')",
        )
        .bind(id.to_string())
        .bind(status.as_str())
        .bind(result)
        .bind(error)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    pub(super) async fn requeue_job(&self, id: JobId, run_at: DateTime<Utc>, refund_attempt: bool) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE public.tradeeon_jobs
                SET status = 'queued', run_at = $2, attempts = attempts - CASE WHEN $3 THEN 1 ELSE 0 END
              WHERE id = $1 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(run_at)
        .bind(refund_attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 1 {
            push_ticket(&mut tx, id, ulid::Ulid::generate(), run_at).await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    pub(super) async fn due_jobs(&self, limit: i64) -> Result<Vec<JobId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM public.tradeeon_jobs WHERE status = 'queued' AND run_at <= now() ORDER BY run_at, id LIMIT $1",
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
              WHERE status IN ('queued', 'running')",
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
        Ok(sqlx::query("DELETE FROM public.tradeeon_jobs WHERE finished_at < $1")
            .bind(older_than)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
