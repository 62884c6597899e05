//! SQLite backend (the single-process default).
//!
//! No RLS here: every user-scoped statement filters by `user_id` itself. Ids are TEXT
//! (lowercase hyphenated UUIDs, made here); timestamps are TEXT in a fixed-width RFC 3339 UTC
//! form with milliseconds (see [`ts`]) so that text order is time order.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool, Transaction};
use uuid::Uuid;

use super::{
    AuditEntry, AuditEntryInput, Backend, ConnectionRecord, DecidedFrom, EncryptedCredentials, HealthEntry,
    HealthRecord, MIGRATIONS_TABLE, NewConnection, PageCursor, Result, StatusUpdate, StoreError, StoredSecrets,
    UserContext, decode_error, placeholder_email,
};
use crate::domain::{ApiKeyHint, ConnectionId, UserId};

macro_rules! connection_columns {
    () => {
        "id, user_id, exchange, nickname, status, status_message, last_checked_at, \
         last_latency_ms, consecutive_failures, features, permissions, api_key_hint, \
         session_expires_at, is_active, created_at, updated_at, credentials_version"
    };
}

macro_rules! audit_columns {
    () => {
        "id, connection_id, action, ip_address, user_agent, details, created_at"
    };
}

/// How long a connection waits for another's write lock before failing with "database is
/// locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub(super) struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// Kept for opening the migration connection; shared so that cloning a store stays cheap.
    options: Arc<SqliteConnectOptions>,
    in_memory: bool,
}

fn connect_error(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Connect { backend: Backend::Sqlite, source: Box::new(err) }
}

impl SqliteStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        // Pragmas set here apply to every connection the pool opens, so they hold whatever
        // another component (apalis's setup sets `synchronous = OFF`) did on one connection.
        let options = SqliteConnectOptions::from_str(url)
            .map_err(connect_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if !in_memory
            && let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(connect_error)?;
        }
        let mut pool_options =
            SqlitePoolOptions::new().max_connections(max_connections.max(1)).acquire_timeout(Duration::from_secs(10));
        if in_memory {
            // An in-memory database lives as long as one connection to it: keep exactly one.
            pool_options = pool_options.max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None);
        }
        let pool = pool_options.connect_with(options.clone()).await.map_err(connect_error)?;
        Ok(Self { pool, options: Arc::new(options), in_memory })
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        if self.in_memory {
            return migrate_on(&self.pool).await;
        }
        // apalis's setup leaves `synchronous = OFF` (and other tuning) on whichever connection
        // ran it. Running it on a throwaway connection keeps the shared pool's connections as
        // configured in `connect`.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with((*self.options).clone())
            .await
            .map_err(connect_error)?;
        let result = migrate_on(&pool).await;
        pool.close().await;
        result
    }

    pub(super) async fn ensure_user(&self, user: &UserContext) -> Result<()> {
        sqlx::query(
            "INSERT INTO users (id, email, created_at, updated_at)
             VALUES (?1, COALESCE(?2, ?3), ?4, ?4)
             ON CONFLICT (id) DO UPDATE SET email = excluded.email, updated_at = excluded.updated_at
             WHERE ?2 IS NOT NULL AND users.email IS NOT ?2",
        )
        .bind(user.user_id.0.to_string())
        .bind(user.email.as_deref())
        .bind(placeholder_email(user.user_id))
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn list_connections(&self, user: &UserContext) -> Result<Vec<ConnectionRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            connection_columns!(),
            " FROM exchange_keys WHERE user_id = ?1 AND is_active = 1
              ORDER BY created_at DESC, id DESC"
        ))
        .bind(user.user_id.0.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(connection_from_row).collect()
    }

    pub(super) async fn get_connection(
        &self,
        user: &UserContext,
        id: ConnectionId,
    ) -> Result<Option<ConnectionRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            connection_columns!(),
            " FROM exchange_keys WHERE id = ?1 AND user_id = ?2 AND is_active = 1"
        ))
        .bind(id.0.to_string())
        .bind(user.user_id.0.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    pub(super) async fn list_audit(
        &self,
        user: &UserContext,
        limit: i64,
        before: Option<PageCursor>,
    ) -> Result<Vec<AuditEntry>> {
        let rows = match before {
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM connection_audit_log WHERE user_id = ?1
                      ORDER BY created_at DESC, id DESC LIMIT ?2"
                ))
                .bind(user.user_id.0.to_string())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(cursor) => {
                sqlx::query(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM connection_audit_log
                      WHERE user_id = ?1 AND (created_at, id) < (?2, ?3)
                      ORDER BY created_at DESC, id DESC LIMIT ?4"
                ))
                .bind(user.user_id.0.to_string())
                .bind(ts(cursor.at))
                .bind(cursor.id.to_string())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) async fn list_health_history(
        &self,
        user: &UserContext,
        id: ConnectionId,
        limit: i64,
        before: Option<PageCursor>,
    ) -> Result<Vec<HealthEntry>> {
        let rows = match before {
            None => {
                sqlx::query(
                    "SELECT h.id, h.checked_at, h.status, h.code, h.latency_ms, h.message
                     FROM connection_health_history h
                     JOIN exchange_keys k ON k.id = h.connection_id
                     WHERE h.connection_id = ?1 AND k.user_id = ?2
                     ORDER BY h.checked_at DESC, h.id DESC LIMIT ?3",
                )
                .bind(id.0.to_string())
                .bind(user.user_id.0.to_string())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(cursor) => {
                sqlx::query(
                    "SELECT h.id, h.checked_at, h.status, h.code, h.latency_ms, h.message
                     FROM connection_health_history h
                     JOIN exchange_keys k ON k.id = h.connection_id
                     WHERE h.connection_id = ?1 AND k.user_id = ?2 AND (h.checked_at, h.id) < (?3, ?4)
                     ORDER BY h.checked_at DESC, h.id DESC LIMIT ?5",
                )
                .bind(id.0.to_string())
                .bind(user.user_id.0.to_string())
                .bind(ts(cursor.at))
                .bind(cursor.id.to_string())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(health_from_row).collect()
    }

    pub(super) async fn load_credentials(
        &self,
        id: ConnectionId,
    ) -> Result<Option<(ConnectionRecord, EncryptedCredentials, i32)>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            connection_columns!(),
            ", api_key_encrypted, api_secret_encrypted, passphrase_encrypted
             FROM exchange_keys WHERE id = ?1 AND is_active = 1"
        ))
        .bind(id.0.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let record = connection_from_row(&row)?;
        let credentials = EncryptedCredentials {
            api_key: row.try_get("api_key_encrypted")?,
            api_secret: row.try_get("api_secret_encrypted")?,
            passphrase: row.try_get("passphrase_encrypted")?,
        };
        let version = record.credentials_version;
        Ok(Some((record, credentials, version)))
    }

    pub(super) async fn swap_credentials(
        &self,
        id: ConnectionId,
        expected_version: i32,
        new: &EncryptedCredentials,
        api_key_hint: &ApiKeyHint,
        audit: AuditEntryInput,
    ) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let swapped = sqlx::query(
            "UPDATE exchange_keys SET
                 api_key_encrypted = ?3, api_secret_encrypted = ?4, passphrase_encrypted = ?5,
                 api_key_hint = ?6, credentials_version = credentials_version + 1,
                 access_token_encrypted = NULL, session_expires_at = NULL, updated_at = ?7
             WHERE id = ?1 AND credentials_version = ?2 AND is_active = 1",
        )
        .bind(id.0.to_string())
        .bind(expected_version)
        .bind(&new.api_key)
        .bind(&new.api_secret)
        .bind(new.passphrase.as_deref())
        .bind(api_key_hint.as_str())
        .bind(ts(Utc::now()))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !swapped {
            return Ok(false);
        }
        insert_connection_audit(&mut tx, id, &audit).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// [`update_status_on`] and, only if it applied, the history row, in one write transaction.
    pub(super) async fn record_check(
        &self,
        id: ConnectionId,
        update: &StatusUpdate,
        health: &HealthRecord,
        decided_from: Option<DecidedFrom>,
    ) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        if !update_status_on(&mut *tx, id, update, decided_from).await? {
            return Ok(false); // dropping `tx` rolls back (nothing was written)
        }
        insert_health(&mut *tx, health).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn insert_connection_audit(&self, id: ConnectionId, audit: AuditEntryInput) -> Result<AuditEntry> {
        let mut conn = self.pool.acquire().await?;
        insert_connection_audit(&mut conn, id, &audit).await
    }

    pub(super) async fn store_session(
        &self,
        id: ConnectionId,
        access_token: &str,
        expires_at: DateTime<Utc>,
        audit: Option<AuditEntryInput>,
    ) -> Result<bool> {
        let mut tx = begin_write(&self.pool).await?;
        let stored = sqlx::query(
            "UPDATE exchange_keys SET access_token_encrypted = ?2, session_expires_at = ?3
             WHERE id = ?1 AND is_active = 1",
        )
        .bind(id.0.to_string())
        .bind(access_token)
        .bind(ts(expires_at))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !stored {
            return Ok(false);
        }
        if let Some(audit) = audit {
            insert_connection_audit(&mut tx, id, &audit).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn load_access_token(&self, id: ConnectionId) -> Result<Option<String>> {
        let token: Option<Option<String>> =
            sqlx::query_scalar("SELECT access_token_encrypted FROM exchange_keys WHERE id = ?1 AND is_active = 1")
                .bind(id.0.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(token.flatten())
    }

    pub(super) async fn record_health(&self, record: &HealthRecord) -> Result<()> {
        insert_health(&self.pool, record).await
    }

    pub(super) async fn prune_health_history(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM connection_health_history WHERE checked_at < ?1")
            .bind(ts(older_than))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    pub(super) async fn list_encrypted_secrets(
        &self,
        after: Option<ConnectionId>,
        limit: i64,
    ) -> Result<Vec<StoredSecrets>> {
        let rows = sqlx::query(
            "SELECT id, credentials_version, api_key_encrypted, api_secret_encrypted,
                    passphrase_encrypted, access_token_encrypted
             FROM exchange_keys
             WHERE (api_key_encrypted <> '' OR api_secret_encrypted <> ''
                    OR passphrase_encrypted IS NOT NULL OR access_token_encrypted IS NOT NULL)
               AND (?1 IS NULL OR id > ?1)
             ORDER BY id LIMIT ?2",
        )
        .bind(after.map(|a| a.0.to_string()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredSecrets {
                    id: ConnectionId(parse_uuid("id", &row.try_get::<String, _>("id")?)?),
                    credentials_version: row.try_get("credentials_version")?,
                    credentials: EncryptedCredentials {
                        api_key: row.try_get("api_key_encrypted")?,
                        api_secret: row.try_get("api_secret_encrypted")?,
                        passphrase: row.try_get("passphrase_encrypted")?,
                    },
                    access_token: row.try_get("access_token_encrypted")?,
                })
            })
            .collect()
    }

    pub(super) async fn replace_encrypted_secrets(
        &self,
        previous: &StoredSecrets,
        new: &EncryptedCredentials,
        new_access_token: Option<&str>,
    ) -> Result<bool> {
        // `IS` is SQLite's null-safe equality (PostgreSQL's IS NOT DISTINCT FROM).
        let replaced = sqlx::query(
            "UPDATE exchange_keys SET
                 api_key_encrypted = ?7, api_secret_encrypted = ?8, passphrase_encrypted = ?9,
                 access_token_encrypted = ?10
             WHERE id = ?1 AND credentials_version = ?2
               AND api_key_encrypted = ?3 AND api_secret_encrypted = ?4
               AND passphrase_encrypted IS ?5 AND access_token_encrypted IS ?6",
        )
        .bind(previous.id.0.to_string())
        .bind(previous.credentials_version)
        .bind(&previous.credentials.api_key)
        .bind(&previous.credentials.api_secret)
        .bind(previous.credentials.passphrase.as_deref())
        .bind(previous.access_token.as_deref())
        .bind(&new.api_key)
        .bind(&new.api_secret)
        .bind(new.passphrase.as_deref())
        .bind(new_access_token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(replaced == 1)
    }
}

async fn migrate_on(pool: &SqlitePool) -> Result<()> {
    apalis_sqlite::SqliteStorage::setup(pool)
        .await
        .map_err(|e| StoreError::Migrate { what: "job queue (apalis)", source: Box::new(e) })?;
    let mut migrator = sqlx::migrate!("../migrations/sqlite");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator.run(pool).await.map_err(|e| StoreError::Migrate { what: "tradeeon", source: Box::new(e) })?;
    // Undo apalis's `synchronous = OFF` on this connection too: with WAL, NORMAL is durable
    // against application crashes and only risks the last commits on power loss.
    sqlx::query("PRAGMA synchronous = NORMAL").execute(pool).await?;
    Ok(())
}

/// A write transaction. `BEGIN IMMEDIATE` takes the write lock up front: a deferred
/// transaction that reads and then writes can fail with SQLITE_BUSY when another connection
/// committed in between, which busy_timeout cannot fix.
pub(super) async fn begin_write(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

/// Timestamps as stored: RFC 3339, UTC, `Z`, exactly three fractional digits — the same as the
/// schema's `strftime('%Y-%m-%dT%H:%M:%fZ', 'now')` defaults, so stored values are comparable.
/// A check's outcome on an active connection whose credentials are still those checked (and,
/// given `decided_from`, that nothing checked or re-sessioned since); `false` if not applied.
async fn update_status_on(
    db: impl sqlx::SqliteExecutor<'_>,
    id: ConnectionId,
    update: &StatusUpdate,
    decided_from: Option<DecidedFrom>,
) -> Result<bool> {
    let permissions = update.permissions.map(|p| serde_json::json!(p).to_string());
    let updated = sqlx::query(
        "UPDATE exchange_keys SET
             status = ?2, status_message = ?3, last_latency_ms = ?4,
             permissions = COALESCE(?5, permissions), consecutive_failures = ?6,
             last_checked_at = ?7
         WHERE id = ?1 AND is_active = 1 AND credentials_version = ?8
           AND (?9 = 0 OR (last_checked_at IS ?10 AND session_expires_at IS ?11))",
    )
    .bind(id.0.to_string())
    .bind(update.status.as_str())
    .bind(update.status_message.as_deref())
    .bind(update.latency_ms)
    .bind(permissions)
    .bind(update.consecutive_failures)
    .bind(ts(update.checked_at))
    .bind(update.credentials_version)
    .bind(decided_from.is_some())
    .bind(decided_from.and_then(|d| d.last_checked_at).map(ts))
    .bind(decided_from.and_then(|d| d.session_expires_at).map(ts))
    .execute(db)
    .await?
    .rows_affected();
    Ok(updated == 1)
}

async fn insert_health(db: impl sqlx::SqliteExecutor<'_>, record: &HealthRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO connection_health_history
             (id, connection_id, checked_at, status, code, latency_ms, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(record.connection_id.0.to_string())
    .bind(ts(record.checked_at))
    .bind(record.status.as_str())
    .bind(record.code.as_deref())
    .bind(record.latency_ms)
    .bind(record.message.as_deref())
    .execute(db)
    .await?;
    Ok(())
}

pub(super) fn ts(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(super) fn parse_ts(column: &'static str, value: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value).map(|t| t.with_timezone(&Utc)).map_err(|e| decode_error(column, e))
}

pub(super) fn parse_opt_ts(row: &SqliteRow, column: &'static str) -> Result<Option<DateTime<Utc>>> {
    row.try_get::<Option<String>, _>(column)?.map(|v| parse_ts(column, &v)).transpose()
}

pub(super) fn parse_uuid(column: &'static str, value: &str) -> Result<Uuid> {
    Uuid::try_parse(value).map_err(|e| decode_error(column, e))
}

pub(super) fn parse_json(column: &'static str, value: &str) -> Result<Value> {
    serde_json::from_str(value).map_err(|e| decode_error(column, e))
}

pub(super) async fn upsert_connection(
    conn: &mut SqliteConnection,
    user: &UserContext,
    new: &NewConnection,
) -> Result<ConnectionRecord> {
    let row = sqlx::query(concat!(
        "INSERT INTO exchange_keys
             (id, user_id, exchange, api_key_encrypted, api_secret_encrypted,
              passphrase_encrypted, nickname, api_key_hint, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
         ON CONFLICT (user_id, exchange) DO UPDATE SET
             api_key_encrypted = excluded.api_key_encrypted,
             api_secret_encrypted = excluded.api_secret_encrypted,
             passphrase_encrypted = excluded.passphrase_encrypted,
             api_key_hint = excluded.api_key_hint,
             nickname = COALESCE(excluded.nickname, exchange_keys.nickname),
             status = 'pending', status_message = NULL, last_checked_at = NULL,
             last_latency_ms = NULL, consecutive_failures = 0, permissions = '{}',
             is_active = 1, access_token_encrypted = NULL, session_expires_at = NULL,
             credentials_version = exchange_keys.credentials_version + 1,
             updated_at = excluded.updated_at
         RETURNING ",
        connection_columns!()
    ))
    .bind(Uuid::new_v4().to_string())
    .bind(user.user_id.0.to_string())
    .bind(new.exchange.as_str())
    .bind(&new.credentials.api_key)
    .bind(&new.credentials.api_secret)
    .bind(new.credentials.passphrase.as_deref())
    .bind(new.nickname.as_deref())
    .bind(new.api_key_hint.as_str())
    .bind(ts(Utc::now()))
    .fetch_one(&mut *conn)
    .await?;
    connection_from_row(&row)
}

pub(super) async fn revoke_connection(
    conn: &mut SqliteConnection,
    user: &UserContext,
    id: ConnectionId,
) -> Result<bool> {
    let revoked = sqlx::query(
        "UPDATE exchange_keys SET
             is_active = 0, api_key_encrypted = '', api_secret_encrypted = '',
             passphrase_encrypted = NULL, access_token_encrypted = NULL,
             session_expires_at = NULL, updated_at = ?3
         WHERE id = ?1 AND user_id = ?2 AND is_active = 1",
    )
    .bind(id.0.to_string())
    .bind(user.user_id.0.to_string())
    .bind(ts(Utc::now()))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(revoked == 1)
}

pub(super) async fn insert_audit(
    conn: &mut SqliteConnection,
    user_id: UserId,
    audit: &AuditEntryInput,
) -> Result<AuditEntry> {
    let row = sqlx::query(concat!(
        "INSERT INTO connection_audit_log
             (id, connection_id, user_id, action, ip_address, user_agent, details, created_at)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
         WHERE ?2 IS NULL
            OR EXISTS (SELECT 1 FROM exchange_keys WHERE id = ?2 AND user_id = ?3)
         RETURNING ",
        audit_columns!()
    ))
    .bind(Uuid::new_v4().to_string())
    .bind(audit.connection_id.map(|c| c.0.to_string()))
    .bind(user_id.0.to_string())
    .bind(audit.action.as_str())
    .bind(audit.ip_address.map(|ip| ip.to_string()))
    .bind(audit.user_agent.as_deref())
    .bind(details_text(&audit.details))
    .bind(ts(Utc::now()))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(audit_from_row).transpose()?.ok_or(StoreError::NotFound)
}

async fn insert_connection_audit(
    conn: &mut SqliteConnection,
    id: ConnectionId,
    audit: &AuditEntryInput,
) -> Result<AuditEntry> {
    let row = sqlx::query(concat!(
        "INSERT INTO connection_audit_log
             (id, connection_id, user_id, action, ip_address, user_agent, details, created_at)
         SELECT ?1, k.id, k.user_id, ?3, ?4, ?5, ?6, ?7
         FROM exchange_keys k WHERE k.id = ?2
         RETURNING ",
        audit_columns!()
    ))
    .bind(Uuid::new_v4().to_string())
    .bind(id.0.to_string())
    .bind(audit.action.as_str())
    .bind(audit.ip_address.map(|ip| ip.to_string()))
    .bind(audit.user_agent.as_deref())
    .bind(details_text(&audit.details))
    .bind(ts(Utc::now()))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(audit_from_row).transpose()?.ok_or(StoreError::NotFound)
}

fn details_text(details: &Value) -> Option<String> {
    (!details.is_null()).then(|| details.to_string())
}

fn connection_from_row(row: &SqliteRow) -> Result<ConnectionRecord> {
    Ok(ConnectionRecord {
        id: ConnectionId(parse_uuid("id", &row.try_get::<String, _>("id")?)?),
        user_id: UserId(parse_uuid("user_id", &row.try_get::<String, _>("user_id")?)?),
        exchange: super::parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
        nickname: row.try_get("nickname")?,
        status: super::parse_column("status", &row.try_get::<String, _>("status")?)?,
        status_message: row.try_get("status_message")?,
        last_checked_at: parse_opt_ts(row, "last_checked_at")?,
        last_latency_ms: row.try_get("last_latency_ms")?,
        consecutive_failures: row.try_get("consecutive_failures")?,
        features: super::features_from_json(parse_json("features", &row.try_get::<String, _>("features")?)?)?,
        permissions: super::permissions_from_json(parse_json(
            "permissions",
            &row.try_get::<String, _>("permissions")?,
        )?)?,
        api_key_hint: row.try_get::<Option<String>, _>("api_key_hint")?.map(ApiKeyHint::from_stored),
        session_expires_at: parse_opt_ts(row, "session_expires_at")?,
        is_active: row.try_get("is_active")?,
        created_at: parse_ts("created_at", &row.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts("updated_at", &row.try_get::<String, _>("updated_at")?)?,
        credentials_version: row.try_get("credentials_version")?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: parse_uuid("id", &row.try_get::<String, _>("id")?)?,
        connection_id: row
            .try_get::<Option<String>, _>("connection_id")?
            .map(|c| parse_uuid("connection_id", &c).map(ConnectionId))
            .transpose()?,
        action: super::parse_column("action", &row.try_get::<String, _>("action")?)?,
        ip_address: row
            .try_get::<Option<String>, _>("ip_address")?
            .map(|ip| ip.parse().map_err(|e| decode_error("ip_address", e)))
            .transpose()?,
        user_agent: row.try_get("user_agent")?,
        details: row
            .try_get::<Option<String>, _>("details")?
            .map(|d| parse_json("details", &d))
            .transpose()?
            .unwrap_or(Value::Null),
        created_at: parse_ts("created_at", &row.try_get::<String, _>("created_at")?)?,
    })
}

fn health_from_row(row: &SqliteRow) -> Result<HealthEntry> {
    Ok(HealthEntry {
        id: parse_uuid("id", &row.try_get::<String, _>("id")?)?,
        checked_at: parse_ts("checked_at", &row.try_get::<String, _>("checked_at")?)?,
        status: super::parse_column("status", &row.try_get::<String, _>("status")?)?,
        code: row.try_get("code")?,
        latency_ms: row.try_get("latency_ms")?,
        message: row.try_get("message")?,
    })
}
