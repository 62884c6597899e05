//! Job records on PostgreSQL.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::jobs::{QueueStats, ticket};
use super::postgres::{PgStore, begin_user};
use super::{Result, ServiceTx, UserContext, decode_error, parse_column};
use crate::domain::{ConnectionId, UserId};
use crate::jobs::{ClaimedJob, JobId, JobOutcome, JobPayload, JobRecord, JobStatus, NewJob, QUEUE};

macro_rules! job_columns {
    () => {
        "id, kind, status, connection_id, exchange, attempts, created_at, started_at, finished_at, result, error"
    };
}

pub(super) async fn insert_job(conn: &mut PgConnection, job: &NewJob) -> Result<Option<JobRecord>> {
    let payload = serde_json::to_value(&job.payload).map_err(|e| decode_error("payload", e))?;
    let run_at = job.run_at.unwrap_or_else(Utc::now);
    let row = sqlx::query(concat!(
        "INSERT INTO public.tradeeon_jobs
             (id, kind, user_id, connection_id, exchange, payload, idempotency_key, run_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING ",
        job_columns!()
    ))
    .bind(job.id.to_string())
    .bind(job.payload.kind().as_str())
    .bind(job.user_id.0)
    .bind(job.payload.connection_id().map(|c| c.0))
    .bind(job.exchange.as_str())
    .bind(payload)
    .bind(job.idempotency_key.as_deref())
    .bind(run_at)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let record = job_from_row(&row)?;
    push_ticket(conn, job.id, job.id.0, run_at).await?;
    Ok(Some(record))
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
        Ok(ServiceTx::Postgres(self.pool.begin().await?))
    }

    pub(super) async fn get_job(&self, user: &UserContext, id: JobId) -> Result<Option<JobRecord>> {
        // Under RLS like every user-scoped read; the WHERE on user_id is defence in depth.
        let mut tx = begin_user(&self.pool, user).await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM public.tradeeon_jobs WHERE id = $1 AND user_id = $2"
        ))
        .bind(id.to_string())
        .bind(user.user_id.0)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
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
        let row = sqlx::query(concat!(
            "UPDATE public.tradeeon_jobs
                SET status = 'running', attempts = attempts + 1, started_at = COALESCE(started_at, now())
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

    pub(super) async fn requeue_job(&self, id: JobId, run_at: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE public.tradeeon_jobs SET status = 'queued', run_at = $2
              WHERE id = $1 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(run_at)
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
