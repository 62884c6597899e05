//! Health-sweep bookkeeping: who owns a schedule slot, which connections a sweep covers, and
//! whether its checks have all settled. Both backends live here; the queries are small.

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::postgres::PgStore;
use super::sqlite::{SqliteStore, begin_write, parse_uuid, ts};
use super::{Inner, Result, Store, parse_column};
use crate::domain::{ConnectionId, ConnectionStatus, Exchange, UserId};

/// One connection a sweep checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepTarget {
    pub id: ConnectionId,
    pub user_id: UserId,
    pub exchange: Exchange,
}

/// The idempotency key of a sweep's check of one connection.
pub fn sweep_job_key(slot: DateTime<Utc>, connection: ConnectionId) -> String {
    format!("{}{connection}", sweep_key_prefix(slot))
}

fn sweep_key_prefix(slot: DateTime<Utc>) -> String {
    format!("sweep:{}:", slot.timestamp())
}

impl Store {
    /// Claims `slot` for `owner`. `true` for exactly one caller per slot, across processes.
    #[tracing::instrument(skip_all, fields(%slot, owner), err)]
    pub async fn claim_sweep(&self, slot: DateTime<Utc>, owner: &str) -> Result<bool> {
        dispatch!(self, s => s.claim_sweep(slot, owner).await)
    }

    /// Records how many checks the sweep enqueued and when its spread ends.
    #[tracing::instrument(skip_all, fields(%slot, enqueued), err)]
    pub async fn record_sweep_enqueued(
        &self,
        slot: DateTime<Utc>,
        enqueued: i64,
        spread_until: DateTime<Utc>,
    ) -> Result<()> {
        dispatch!(self, s => s.record_sweep_enqueued(slot, enqueued, spread_until).await)
    }

    /// Checks of the sweep that are still queued or running.
    #[tracing::instrument(skip_all, fields(%slot), err)]
    pub async fn sweep_unsettled(&self, slot: DateTime<Utc>) -> Result<i64> {
        dispatch!(self, s => s.sweep_unsettled(slot).await)
    }

    /// Marks the sweep complete (every check settled). `false` if it was already.
    #[tracing::instrument(skip_all, fields(%slot), err)]
    pub async fn complete_sweep(&self, slot: DateTime<Utc>) -> Result<bool> {
        dispatch!(self, s => s.complete_sweep(slot).await)
    }

    /// Active connections in id order after `after`: what a sweep checks.
    #[tracing::instrument(skip_all, fields(limit), err)]
    pub async fn sweep_targets(&self, after: Option<ConnectionId>, limit: u32) -> Result<Vec<SweepTarget>> {
        dispatch!(self, s => s.sweep_targets(after, i64::from(limit)).await)
    }

    /// Active connections counted by exchange and status (for the connections gauge).
    #[tracing::instrument(skip_all, err)]
    pub async fn connection_counts(&self) -> Result<Vec<(Exchange, ConnectionStatus, i64)>> {
        dispatch!(self, s => s.connection_counts().await)
    }
}

impl PgStore {
    async fn claim_sweep(&self, slot: DateTime<Utc>, owner: &str) -> Result<bool> {
        let claimed =
            sqlx::query("INSERT INTO public.health_sweeps (slot, owner) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(slot)
                .bind(owner)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(claimed == 1)
    }

    async fn record_sweep_enqueued(
        &self,
        slot: DateTime<Utc>,
        enqueued: i64,
        spread_until: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("UPDATE public.health_sweeps SET enqueued = $2, spread_until = $3 WHERE slot = $1")
            .bind(slot)
            .bind(i32::try_from(enqueued).unwrap_or(i32::MAX))
            .bind(spread_until)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn sweep_unsettled(&self, slot: DateTime<Utc>) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM public.tradeeon_jobs
              WHERE active AND kind = 'health_check' AND idempotency_key LIKE $1",
        )
        .bind(format!("{}%", sweep_key_prefix(slot)))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn complete_sweep(&self, slot: DateTime<Utc>) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE public.health_sweeps SET completed_at = now() WHERE slot = $1 AND completed_at IS NULL",
        )
        .bind(slot)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    async fn sweep_targets(&self, after: Option<ConnectionId>, limit: i64) -> Result<Vec<SweepTarget>> {
        let rows = sqlx::query(
            "SELECT id, user_id, exchange FROM public.exchange_keys
              WHERE is_active AND ($1::uuid IS NULL OR id > $1)
              ORDER BY id LIMIT $2",
        )
        .bind(after.map(|a| a.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SweepTarget {
                    id: ConnectionId(row.try_get::<Uuid, _>("id")?),
                    user_id: UserId(row.try_get::<Uuid, _>("user_id")?),
                    exchange: parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
                })
            })
            .collect()
    }

    async fn connection_counts(&self) -> Result<Vec<(Exchange, ConnectionStatus, i64)>> {
        let rows = sqlx::query(
            "SELECT exchange, status, count(*) AS n FROM public.exchange_keys WHERE is_active GROUP BY exchange, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
                    parse_column("status", &row.try_get::<String, _>("status")?)?,
                    row.try_get("n")?,
                ))
            })
            .collect()
    }
}

impl SqliteStore {
    async fn claim_sweep(&self, slot: DateTime<Utc>, owner: &str) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let claimed = sqlx::query("INSERT INTO health_sweeps (slot, owner) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
            .bind(ts(slot))
            .bind(owner)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(claimed == 1)
    }

    async fn record_sweep_enqueued(
        &self,
        slot: DateTime<Utc>,
        enqueued: i64,
        spread_until: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = begin_write(&self.pool).await?;
        sqlx::query("UPDATE health_sweeps SET enqueued = ?2, spread_until = ?3 WHERE slot = ?1")
            .bind(ts(slot))
            .bind(enqueued)
            .bind(ts(spread_until))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sweep_unsettled(&self, slot: DateTime<Utc>) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM tradeeon_jobs
              WHERE kind = 'health_check' AND status IN ('queued', 'running') AND idempotency_key LIKE ?1",
        )
        .bind(format!("{}%", sweep_key_prefix(slot)))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn complete_sweep(&self, slot: DateTime<Utc>) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let updated =
            sqlx::query("UPDATE health_sweeps SET completed_at = ?2 WHERE slot = ?1 AND completed_at IS NULL")
                .bind(ts(slot))
                .bind(ts(Utc::now()))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(updated == 1)
    }

    async fn sweep_targets(&self, after: Option<ConnectionId>, limit: i64) -> Result<Vec<SweepTarget>> {
        let rows = sqlx::query(
            "SELECT id, user_id, exchange FROM exchange_keys
              WHERE is_active = 1 AND (?1 IS NULL OR id > ?1)
              ORDER BY id LIMIT ?2",
        )
        .bind(after.map(|a| a.0.to_string()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SweepTarget {
                    id: ConnectionId(parse_uuid("id", &row.try_get::<String, _>("id")?)?),
                    user_id: UserId(parse_uuid("user_id", &row.try_get::<String, _>("user_id")?)?),
                    exchange: parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
                })
            })
            .collect()
    }

    async fn connection_counts(&self) -> Result<Vec<(Exchange, ConnectionStatus, i64)>> {
        let rows = sqlx::query(
            "SELECT exchange, status, count(*) AS n FROM exchange_keys WHERE is_active = 1 GROUP BY exchange, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
                    parse_column("status", &row.try_get::<String, _>("status")?)?,
                    row.try_get("n")?,
                ))
            })
            .collect()
    }
}
