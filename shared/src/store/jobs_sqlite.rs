//! Job records on SQLite. Same semantics as `jobs_postgres`; timestamps are the store's RFC 3339
//! text, and the user filter is explicit (no RLS here).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};

use super::jobs::{QueueStats, TicketState, due_second};
use super::sqlite::{SqliteStore, begin_write, parse_json, parse_opt_ts, parse_ts, parse_uuid, ts};
use super::{AuditAction, AuditEntryInput, Result, ServiceTx, UserContext, decode_error, parse_column};
use crate::domain::{ConnectionId, UserId};
use crate::jobs::{
    ClaimedJob, JobId, JobOutcome, JobPayload, JobRecord, JobStatus, JobTicket, NewJob, QUEUE, Requester, TicketId,
};
use crate::retry::RetryPolicy;

macro_rules! job_columns {
    () => {
        "id, kind, status, connection_id, exchange, attempts, created_at, started_at, finished_at, result, error"
    };
}

pub(super) async fn insert_job(conn: &mut SqliteConnection, job: &NewJob) -> Result<Option<JobRecord>> {
    let payload = serde_json::to_string(&job.payload).map_err(|e| decode_error("payload", e))?;
    let now = Utc::now();
    let run_at = job.run_at.unwrap_or(now);
    let row = sqlx::query(concat!(
        "INSERT INTO tradeeon_jobs
             (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING ",
        job_columns!()
    ))
    .bind(job.id.to_string())
    .bind(job.payload.kind().as_str())
    .bind(job.user_id.0.to_string())
    .bind(job.payload.connection_id().map(|c| c.0.to_string()))
    .bind(job.exchange.as_str())
    .bind(payload)
    .bind(job.idempotency_key.as_deref())
    .bind(ts(run_at))
    .bind(ts(now))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let record = job_from_row(&row)?;
    push_ticket(conn, job.id, job.id.0, run_at).await?;
    Ok(Some(record))
}

/// A worker's acknowledgement of the ticket it ran: the ticket is deleted (the job record keeps
/// the outcome).
async fn acknowledge(conn: &mut SqliteConnection, ticket: &TicketId) -> Result<()> {
    sqlx::query("DELETE FROM Jobs WHERE id = ?1 AND job_type = ?2")
        .bind(&ticket.0)
        .bind(QUEUE)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Pushes the apalis ticket inside our transaction. apalis-sqlite keeps its own `push_tasks`
/// private, so this is the same insert written against its `Jobs` table (the columns of
/// apalis-sqlite 1.0's migrations; the worker tests fail if a new version changes them).
async fn push_ticket(
    conn: &mut SqliteConnection,
    job_id: JobId,
    ticket_id: ulid::Ulid,
    run_at: DateTime<Utc>,
) -> Result<()> {
    let args = serde_json::to_vec(&JobTicket { job_id }).map_err(|e| decode_error("ticket", e))?;
    sqlx::query(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, metadata)
         VALUES (?1, ?2, ?3, 'Pending', 0, ?4, ?5, 0, '{}')",
    )
    .bind(&args)
    .bind(ticket_id.to_string())
    .bind(QUEUE)
    .bind(i64::from(RetryPolicy::TICKET.max_attempts))
    .bind(due_second(run_at))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn cancel_connection_jobs(
    conn: &mut SqliteConnection,
    connection_id: ConnectionId,
    reason: &str,
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE tradeeon_jobs
            SET status = 'failed', error = ?2, finished_at = ?3, payload = NULL
          WHERE connection_id = ?1 AND status = 'queued'",
    )
    .bind(connection_id.0.to_string())
    .bind(reason)
    .bind(ts(Utc::now()))
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

pub(super) async fn credentials_version(
    conn: &mut SqliteConnection,
    connection_id: ConnectionId,
) -> Result<Option<i32>> {
    // The write transaction (`BEGIN IMMEDIATE`) already excludes every other writer.
    Ok(sqlx::query_scalar("SELECT credentials_version FROM exchange_keys WHERE id = ?1 AND is_active = 1")
        .bind(connection_id.0.to_string())
        .fetch_optional(&mut *conn)
        .await?)
}

/// The `tested` entry of a settled `test` job: as PostgreSQL's settle statement writes it.
fn tested_audit(
    id: JobId,
    exchange: &str,
    status: JobStatus,
    outcome: &JobOutcome,
    requester: Requester,
) -> AuditEntryInput {
    let mut details = serde_json::json!({
        "stage": "finished", "job_id": id, "exchange": exchange, "outcome": status.as_str(),
    });
    if let JobOutcome::Done(result) = outcome {
        details["ok"] = result.ok.into();
        details["code"] = serde_json::to_value(result.code).unwrap_or_default();
    }
    AuditEntryInput {
        connection_id: None,
        action: AuditAction::Tested,
        ip_address: requester.ip_address,
        user_agent: requester.user_agent,
        details,
    }
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord> {
    let result: Option<String> = row.try_get("result")?;
    Ok(JobRecord {
        id: parse_column("id", &row.try_get::<String, _>("id")?)?,
        kind: parse_column("kind", &row.try_get::<String, _>("kind")?)?,
        status: parse_column("status", &row.try_get::<String, _>("status")?)?,
        connection_id: row
            .try_get::<Option<String>, _>("connection_id")?
            .map(|id| parse_uuid("connection_id", &id).map(ConnectionId))
            .transpose()?,
        exchange: parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
        attempts: row.try_get("attempts")?,
        created_at: parse_ts("created_at", &row.try_get::<String, _>("created_at")?)?,
        started_at: parse_opt_ts(row, "started_at")?,
        finished_at: parse_opt_ts(row, "finished_at")?,
        result: result
            .map(|r| parse_json("result", &r))
            .transpose()?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| decode_error("result", e))?,
        error: row.try_get("error")?,
    })
}

impl SqliteStore {
    pub(super) async fn begin_service(&self) -> Result<ServiceTx> {
        Ok(ServiceTx::Sqlite(begin_write(&self.pool).await?))
    }

    pub(super) async fn get_job(&self, user: &UserContext, id: JobId) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!("SELECT ", job_columns!(), " FROM tradeeon_jobs WHERE id = ?1 AND user_id = ?2"))
            .bind(id.to_string())
            .bind(user.user_id.0.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn active_change_job(&self, connection_id: ConnectionId) -> Result<Option<JobId>> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT id FROM tradeeon_jobs
              WHERE connection_id = ?1 AND status IN ('queued', 'running')
                AND kind IN ('verify', 'rotate', 'kite_session')
              LIMIT 1",
        )
        .bind(connection_id.0.to_string())
        .fetch_optional(&self.pool)
        .await?;
        id.map(|id| parse_column("id", &id)).transpose()
    }

    pub(super) async fn claim_job(&self, id: JobId) -> Result<Option<ClaimedJob>> {
        let mut tx = begin_write(&self.pool).await?;
        let row = sqlx::query(concat!(
            "UPDATE tradeeon_jobs
                SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, ?2)
              WHERE id = ?1 AND status IN ('queued', 'running') AND payload IS NOT NULL
              RETURNING user_id, payload, ",
            job_columns!()
        ))
        .bind(id.to_string())
        .bind(ts(Utc::now()))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else { return Ok(None) };
        let payload: String = row.try_get("payload")?;
        Ok(Some(ClaimedJob {
            record: job_from_row(&row)?,
            user_id: UserId(parse_uuid("user_id", &row.try_get::<String, _>("user_id")?)?),
            payload: serde_json::from_str::<JobPayload>(&payload).map_err(|e| decode_error("payload", e))?,
        }))
    }

    pub(super) async fn finish_job(&self, id: JobId, outcome: &JobOutcome, ticket: Option<&TicketId>) -> Result<bool> {
        let (status, result, error) = match outcome {
            JobOutcome::Done(result) => {
                (JobStatus::Done, Some(serde_json::to_string(result).map_err(|e| decode_error("result", e))?), None)
            }
            JobOutcome::Failed(error) => (JobStatus::Failed, None, Some(error.as_str())),
        };
        let mut tx = begin_write(&self.pool).await?;
        // Read before the update wipes the payload: a `test` job's requester, for its audit entry.
        let requested: Option<(String, String, String)> = sqlx::query_as(
            "SELECT user_id, exchange, payload FROM tradeeon_jobs
              WHERE id = ?1 AND kind = 'test' AND status IN ('queued', 'running') AND payload IS NOT NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let updated = sqlx::query(
            "UPDATE tradeeon_jobs
                SET status = ?2, result = ?3, error = ?4, finished_at = ?5, payload = NULL
              WHERE id = ?1 AND status IN ('queued', 'running')",
        )
        .bind(id.to_string())
        .bind(status.as_str())
        .bind(result)
        .bind(error)
        .bind(ts(Utc::now()))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if let (1, Some((user_id, exchange, payload))) = (updated, requested) {
            let payload: JobPayload = serde_json::from_str(&payload).map_err(|e| decode_error("payload", e))?;
            if let JobPayload::Test { requested_by: Some(requester), .. } = payload {
                let audit = tested_audit(id, &exchange, status, outcome, requester);
                super::sqlite::insert_audit(&mut tx, UserId(parse_uuid("user_id", &user_id)?), &audit).await?;
            }
        }
        if let Some(ticket) = ticket {
            acknowledge(&mut tx, ticket).await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    pub(super) async fn requeue_job(
        &self,
        id: JobId,
        run_at: DateTime<Utc>,
        refund_attempt: bool,
        ran: Option<&TicketId>,
    ) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let updated = sqlx::query(
            "UPDATE tradeeon_jobs SET status = 'queued', run_at = ?2, attempts = attempts - ?3
              WHERE id = ?1 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(ts(run_at))
        .bind(i64::from(refund_attempt))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 1 {
            push_ticket(&mut tx, id, ulid::Ulid::generate(), run_at).await?;
        }
        if let Some(ticket) = ran {
            acknowledge(&mut tx, ticket).await?;
        }
        tx.commit().await?;
        Ok(updated == 1)
    }

    pub(super) async fn drop_ticket(&self, ticket: &TicketId) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        acknowledge(&mut tx, ticket).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn retry_ticket(&self, ticket: &TicketId) -> Result<()> {
        // `Failed` with attempts left is what apalis's own fetch takes again once `run_at` has
        // passed; with none left it never does. The write transaction holds the row from reading
        // the attempts so far, which set the delay, to writing the next.
        let mut tx = begin_write(&self.pool).await?;
        let attempts: Option<i64> = sqlx::query_scalar("SELECT attempts FROM Jobs WHERE id = ?1 AND job_type = ?2")
            .bind(&ticket.0)
            .bind(QUEUE)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(attempts) = attempts else { return Ok(()) };
        let attempt = i32::try_from(attempts).unwrap_or(i32::MAX).saturating_add(1);
        // Whole seconds, as this queue counts them. Rounded down, so up to a second early: that
        // matters only for an exchange's `Retry-After` (see `due_second`), and a ticket has none.
        let run_at = (Utc::now() + RetryPolicy::TICKET.delay(attempt)).timestamp();
        sqlx::query(
            "UPDATE Jobs
                SET status = 'Failed', attempts = ?3, lock_by = NULL, lock_at = NULL,
                    done_at = strftime('%s', 'now'), run_at = ?4
              WHERE id = ?1 AND job_type = ?2",
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
            "SELECT status, attempts, lock_by, CAST(run_at - strftime('%s', 'now') AS REAL) AS due_in_seconds
               FROM Jobs
              WHERE job_type = ?2 AND json_extract(CAST(job AS TEXT), '$.job_id') = ?1",
        )
        .bind(id.to_string())
        .bind(QUEUE)
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn due_jobs(&self, limit: i64) -> Result<Vec<JobId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tradeeon_jobs WHERE status = 'queued' AND run_at <= ?1 ORDER BY run_at, id LIMIT ?2",
        )
        .bind(ts(Utc::now()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.iter().map(|id| parse_column("id", id)).collect()
    }

    pub(super) async fn queue_stats(&self) -> Result<QueueStats> {
        let now = ts(Utc::now());
        let row = sqlx::query(
            "SELECT coalesce(sum(status = 'queued' AND run_at <= ?1), 0) AS queued,
                    coalesce(sum(status = 'running'), 0) AS running,
                    coalesce(sum(status = 'queued' AND run_at > ?1), 0) AS scheduled,
                    min(CASE WHEN status = 'queued' AND run_at <= ?1 THEN run_at END) AS oldest
               FROM tradeeon_jobs
              WHERE status IN ('queued', 'running')",
        )
        .bind(&now)
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<String> = row.try_get("oldest")?;
        let oldest_queued_age = oldest
            .map(|t| parse_ts("run_at", &t))
            .transpose()?
            .map(|t| (Utc::now() - t).to_std().unwrap_or(Duration::ZERO));
        Ok(QueueStats {
            queued: row.try_get("queued")?,
            running: row.try_get("running")?,
            scheduled: row.try_get("scheduled")?,
            oldest_queued_age,
        })
    }

    pub(super) async fn prune_jobs(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let mut tx = begin_write(&self.pool).await?;
        let deleted = sqlx::query("DELETE FROM tradeeon_jobs WHERE finished_at < ?1")
            .bind(ts(older_than))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Tickets that failed for good go with the records (done ones are deleted by the worker's
        // settle, or by migration `drop_acknowledged_tickets` when apalis acknowledges them).
        // apalis counts in seconds.
        sqlx::query(
            "DELETE FROM Jobs
              WHERE job_type = ?1 AND done_at < ?2
                AND (status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))",
        )
        .bind(QUEUE)
        .bind(older_than.timestamp())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    pub(super) async fn release_tickets(&self, worker: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE Jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, done_at = NULL
              WHERE job_type = ?1 AND lock_by = ?2 AND status IN ('Queued', 'Running')
                AND NOT EXISTS (SELECT 1 FROM tradeeon_jobs AS t
                                 WHERE t.id = json_extract(CAST(Jobs.job AS TEXT), '$.job_id') AND t.status = 'running')",
        )
        .bind(QUEUE)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}
