//! PostgreSQL backend (plain PostgreSQL ≥ 13 or Supabase).
//!
//! User-scoped statements run on a transaction opened by [`begin_user`], which switches to the
//! [`USER_ROLE`] and sets the JWT claims that `auth.uid()` reads, so Row Level Security filters
//! them. Service statements run as the connecting login role, a member of [`SERVICE_ROLE`],
//! whose policies let it see every row. The tables' owner runs `tradeeon migrate` only: RLS is
//! forced, so as the owner the service would see nothing (see
//! migrations/postgres/20261207000001_service_roles.sql).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use super::jobs_postgres::PgBatches;
use super::wakeups::Wakeups;
use super::{
    AuditEntry, AuditEntryInput, Backend, ConnectionRecord, DecidedFrom, EncryptedCredentials, HealthEntry,
    HealthRecord, MIGRATIONS_TABLE, NewConnection, PageCursor, Result, StatusUpdate, StoreError, StoredSecrets,
    UserContext, decode_error, placeholder_email,
};
use crate::domain::{ApiKeyHint, ConnectionId, Permissions, UserId};

/// The columns [`connection_from_row`] reads, for `SELECT` and `RETURNING`.
macro_rules! connection_columns {
    () => {
        "id, user_id, exchange, nickname, status, status_message, last_checked_at, \
         last_latency_ms, consecutive_failures, features, permissions, api_key_hint, \
         session_expires_at, is_active, created_at, updated_at, credentials_version"
    };
}

macro_rules! audit_columns {
    () => {
        "id, connection_id, action, host(ip_address) AS ip_address, user_agent, details, created_at"
    };
}

/// The role user-scoped transactions switch to (`SET LOCAL ROLE`).
pub const USER_ROLE: &str = "tradeeon_user";
/// The role whose members may act as the service: the API's and workers' login role.
pub const SERVICE_ROLE: &str = "tradeeon_service";

/// The connecting role's relation to the schema, for the checks at start.
#[derive(Debug, Clone)]
pub(super) struct RoleStanding {
    pub(super) role: String,
    pub(super) superuser: bool,
    /// Owns `public.exchange_keys` (or is a member of its owner), or nothing is migrated yet.
    pub(super) owns_schema: bool,
    /// Has the privileges of [`SERVICE_ROLE`].
    pub(super) serves: bool,
    /// [`USER_ROLE`] may call `auth.uid()`, which every user policy does.
    pub(super) user_role_has_auth: bool,
}

#[derive(Clone, Debug)]
pub(super) struct PgStore {
    pub(super) pool: PgPool,
    /// The job queue's (apalis's) own connections; see [`QUEUE_POOL_CONNECTIONS`].
    pub(super) queue_pool: PgPool,
    pub(super) wakeups: Wakeups,
    pub(super) batches: PgBatches,
}

fn connect_error(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Connect { backend: Backend::Postgres, source: Box::new(err) }
}

/// Connections of the job queue's own pool: apalis keeps one for its wake-up listener and runs
/// one fetch and one heartbeat at a time. Apart from the store's pool, so the worker's claims
/// and settles do not wait behind apalis's fetches for a connection (bench/README.md).
const QUEUE_POOL_CONNECTIONS: u32 = 4;

/// The settings both pools share.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        // While the server is down, sqlx retries refused connections until this runs out, so
        // it is how long every request waits before it can answer 503 (and `/ready` must turn
        // 503 within a second). Queries hold a connection for milliseconds: a healthy pool
        // does not make anyone wait this long.
        .acquire_timeout(Duration::from_millis(750))
}

impl PgStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(connect_error)?.application_name("tradeeon");
        // One direct attempt first: a pool that cannot connect only says "timed out", which hides
        // the cause a user needs (refused, authentication failed, no such database).
        let probe = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect_with(&options))
            .await
            .map_err(|_| connect_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s")))?
            .map_err(connect_error)?;
        let _ = probe.close().await;
        let pool = pool_options(max_connections.max(1)).connect_with(options.clone()).await.map_err(connect_error)?;
        // Lazy: an API process never runs the queue and opens none of these.
        let queue_pool = pool_options(QUEUE_POOL_CONNECTIONS).connect_lazy_with(options);
        let wakeups = Wakeups::start(pool.clone());
        let batches = PgBatches::start(&pool, &wakeups, max_connections.max(1));
        Ok(Self { pool, queue_pool, wakeups, batches })
    }

    pub(super) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn migrate(&self) -> Result<()> {
        apalis_postgres::PostgresStorage::setup(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate { what: "job queue (apalis)", source: Box::new(e) })?;
        let mut migrator = sqlx::migrate!("../migrations/postgres");
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&self.pool).await.map_err(|e| StoreError::Migrate { what: "tradeeon", source: Box::new(e) })
    }

    /// What the connecting role is to the schema (see [`RoleStanding`]).
    pub(super) async fn standing(&self) -> Result<RoleStanding> {
        let row = sqlx::query(
            "SELECT current_user::text AS role,
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
                    COALESCE((SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class
                              WHERE oid = to_regclass('public.exchange_keys')), true) AS owns_schema,
                    EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)
                        AND pg_has_role(current_user, $1, 'USAGE') AS serves,
                    EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            JOIN pg_roles r ON r.rolname = $2
                            WHERE n.nspname = 'auth' AND p.proname = 'uid' AND p.pronargs = 0
                              AND has_schema_privilege(r.oid, n.oid, 'USAGE')
                              AND has_function_privilege(r.oid, p.oid, 'EXECUTE')) AS user_role_has_auth",
        )
        .bind(SERVICE_ROLE)
        .bind(USER_ROLE)
        .fetch_one(&self.pool)
        .await?;
        Ok(RoleStanding {
            role: row.try_get("role")?,
            superuser: row.try_get("superuser")?,
            owns_schema: row.try_get("owns_schema")?,
            serves: row.try_get("serves")?,
            user_role_has_auth: row.try_get("user_role_has_auth")?,
        })
    }

    /// Whether some of our migrations are not applied yet (readable by the service's role).
    pub(super) async fn migrations_pending(&self) -> Result<bool> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("public.{MIGRATIONS_TABLE}"))
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Ok(true);
        }
        let applied: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT version FROM public.{MIGRATIONS_TABLE} WHERE success"
        )))
        .fetch_all(&self.pool)
        .await?;
        let migrator = sqlx::migrate!("../migrations/postgres");
        Ok(migrator.iter().any(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version)))
    }

    /// Makes `login` (with `password`) a login role that is a member of [`SERVICE_ROLE`]:
    /// created if missing, its password set otherwise. The password travels as a SCRAM
    /// verifier, never in clear text (a server logging statements would keep it).
    pub(super) async fn provision_service_login(&self, login: &str, password: &str) -> Result<()> {
        let verifier = super::scram::verifier(password)?;
        let mut tx = self.pool.begin().await?;
        // Two `tradeeon migrate` runs at once (say the API's and the worker's) take turns.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tradeeon: service login'))").execute(&mut *tx).await?;
        let row = sqlx::query(
            "SELECT r.rolsuper AS superuser,
                    pg_has_role(current_user, r.oid, 'USAGE')
                        OR COALESCE((SELECT pg_has_role(r.oid, relowner, 'USAGE') FROM pg_class
                                     WHERE oid = to_regclass('public.exchange_keys')), false) AS owner_like
             FROM pg_roles r WHERE r.rolname = $1",
        )
        .bind(login)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = &row
            && (row.try_get::<bool, _>("superuser")? || row.try_get::<bool, _>("owner_like")?)
        {
            return Err(StoreError::AppRole(
                "must name a login role of its own: not a superuser, not the tables' owner or one of its roles",
            ));
        }
        let statement =
            if row.is_some() { "ALTER ROLE %I WITH LOGIN PASSWORD %L" } else { "CREATE ROLE %I LOGIN PASSWORD %L" };
        for statement in [statement, "GRANT tradeeon_service TO %I"] {
            let sql: String = sqlx::query_scalar("SELECT format($1, $2, $3)")
                .bind(statement)
                .bind(login)
                .bind(&verifier)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn ensure_user(&self, user: &UserContext) -> Result<()> {
        match upsert_profile(&self.pool, user).await {
            Err(StoreError::Database(sqlx::Error::Database(db))) if db.is_foreign_key_violation() => {}
            done => return done,
        }
        // No auth.users row: plain PostgreSQL, where the stand-in is ours to fill. On Supabase the
        // row always exists (the JWT came from it) and we may not write there, so this path is
        // taken only when the first attempt says it must be.
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO auth.users (id, email) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(user.user_id.0)
            .bind(user.email.as_deref())
            .execute(&mut *tx)
            .await?;
        upsert_profile(&mut *tx, user).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn list_connections(&self, user: &UserContext) -> Result<Vec<ConnectionRecord>> {
        let mut tx = begin_user(&self.pool, user).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            connection_columns!(),
            " FROM public.exchange_keys WHERE user_id = $1 AND is_active
              ORDER BY created_at DESC, id DESC"
        ))
        .bind(user.user_id.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(connection_from_row).collect()
    }

    pub(super) async fn get_connection(
        &self,
        user: &UserContext,
        id: ConnectionId,
    ) -> Result<Option<ConnectionRecord>> {
        let mut tx = begin_user(&self.pool, user).await?;
        let row = sqlx::query(concat!(
            "SELECT ",
            connection_columns!(),
            " FROM public.exchange_keys WHERE id = $1 AND user_id = $2 AND is_active"
        ))
        .bind(id.0)
        .bind(user.user_id.0)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.as_ref().map(connection_from_row).transpose()
    }

    pub(super) async fn list_audit(
        &self,
        user: &UserContext,
        limit: i64,
        before: Option<PageCursor>,
    ) -> Result<Vec<AuditEntry>> {
        let mut tx = begin_user(&self.pool, user).await?;
        let rows = match before {
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM public.connection_audit_log WHERE user_id = $1
                      ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(user.user_id.0)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
            Some(cursor) => {
                sqlx::query(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM public.connection_audit_log
                      WHERE user_id = $1 AND (created_at, id) < ($2, $3)
                      ORDER BY created_at DESC, id DESC LIMIT $4"
                ))
                .bind(user.user_id.0)
                .bind(cursor.at)
                .bind(cursor.id)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        tx.commit().await?;
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) async fn list_health_history(
        &self,
        user: &UserContext,
        id: ConnectionId,
        limit: i64,
        before: Option<PageCursor>,
    ) -> Result<Vec<HealthEntry>> {
        let mut tx = begin_user(&self.pool, user).await?;
        let rows = match before {
            None => {
                sqlx::query(
                    "SELECT h.id, h.checked_at, h.status, h.code, h.latency_ms, h.message
                     FROM public.connection_health_history h
                     JOIN public.exchange_keys k ON k.id = h.connection_id
                     WHERE h.connection_id = $1 AND k.user_id = $2
                     ORDER BY h.checked_at DESC, h.id DESC LIMIT $3",
                )
                .bind(id.0)
                .bind(user.user_id.0)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
            Some(cursor) => {
                sqlx::query(
                    "SELECT h.id, h.checked_at, h.status, h.code, h.latency_ms, h.message
                     FROM public.connection_health_history h
                     JOIN public.exchange_keys k ON k.id = h.connection_id
                     WHERE h.connection_id = $1 AND k.user_id = $2 AND (h.checked_at, h.id) < ($3, $4)
                     ORDER BY h.checked_at DESC, h.id DESC LIMIT $5",
                )
                .bind(id.0)
                .bind(user.user_id.0)
                .bind(cursor.at)
                .bind(cursor.id)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        tx.commit().await?;
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
             FROM public.exchange_keys WHERE id = $1 AND is_active"
        ))
        .bind(id.0)
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
        let mut tx = self.pool.begin().await?;
        let swapped = sqlx::query(
            "UPDATE public.exchange_keys SET
                 api_key_encrypted = $3, api_secret_encrypted = $4, passphrase_encrypted = $5,
                 api_key_hint = $6, credentials_version = credentials_version + 1,
                 access_token_encrypted = NULL, session_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND credentials_version = $2 AND is_active",
        )
        .bind(id.0)
        .bind(expected_version)
        .bind(&new.api_key)
        .bind(&new.api_secret)
        .bind(new.passphrase.as_deref())
        .bind(api_key_hint.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !swapped {
            return Ok(false); // dropping `tx` rolls back (nothing was written)
        }
        insert_connection_audit(&mut tx, id, &audit).await?;
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
        let mut tx = self.pool.begin().await?;
        let stored = sqlx::query(
            "UPDATE public.exchange_keys SET access_token_encrypted = $2, session_expires_at = $3
             WHERE id = $1 AND is_active",
        )
        .bind(id.0)
        .bind(access_token)
        .bind(expires_at)
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
            sqlx::query_scalar("SELECT access_token_encrypted FROM public.exchange_keys WHERE id = $1 AND is_active")
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await?;
        Ok(token.flatten())
    }

    pub(super) async fn record_health(&self, record: &HealthRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO public.connection_health_history
                 (connection_id, checked_at, status, code, latency_ms, message)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(record.connection_id.0)
        .bind(record.checked_at)
        .bind(record.status.as_str())
        .bind(record.code.as_deref())
        .bind(record.latency_ms)
        .bind(record.message.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn record_check(&self, write: CheckWrite) -> Result<bool> {
        self.batches.record_check.call(write).await
    }

    pub(super) async fn prune_health_history(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let deleted = sqlx::query("DELETE FROM public.connection_health_history WHERE checked_at < $1")
            .bind(older_than)
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
             FROM public.exchange_keys
             WHERE (api_key_encrypted <> '' OR api_secret_encrypted <> ''
                    OR passphrase_encrypted IS NOT NULL OR access_token_encrypted IS NOT NULL)
               AND ($1::uuid IS NULL OR id > $1)
             ORDER BY id LIMIT $2",
        )
        .bind(after.map(|a| a.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredSecrets {
                    id: ConnectionId(row.try_get("id")?),
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
        let replaced = sqlx::query(
            "UPDATE public.exchange_keys SET
                 api_key_encrypted = $7, api_secret_encrypted = $8, passphrase_encrypted = $9,
                 access_token_encrypted = $10
             WHERE id = $1 AND credentials_version = $2
               AND api_key_encrypted = $3 AND api_secret_encrypted = $4
               AND passphrase_encrypted IS NOT DISTINCT FROM $5
               AND access_token_encrypted IS NOT DISTINCT FROM $6",
        )
        .bind(previous.id.0)
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

/// Begins a transaction in which Row Level Security applies to `user`: the role becomes
/// [`USER_ROLE`] and `request.jwt.claims` holds the claims Supabase would set, which is what
/// `auth.uid()` reads. `set_config(.., true)` is `SET LOCAL` (what PostgREST does), so both end
/// with the transaction and a pooled connection never leaks them into the next use.
pub(super) async fn begin_user(pool: &PgPool, user: &UserContext) -> Result<Transaction<'static, Postgres>> {
    let claims = serde_json::json!({
        "sub": user.user_id.0,
        "role": "authenticated",
        "email": user.email,
    });
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('role', $2, true),
                set_config('request.jwt.claims', $1, true)",
    )
    .bind(claims.to_string())
    .bind(USER_ROLE)
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}

/// Ends the user scope inside an open transaction: back to the session's own role, no claims.
pub(super) async fn leave_user_scope(conn: &mut PgConnection) -> Result<()> {
    // `SET LOCAL ROLE NONE` is `RESET ROLE` for the rest of the transaction; one statement.
    sqlx::query("SELECT set_config('role', 'none', true), set_config('request.jwt.claims', '', true)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The user's profile row: inserted, or its email replaced by a given one.
async fn upsert_profile(db: impl sqlx::PgExecutor<'_>, user: &UserContext) -> Result<()> {
    sqlx::query(
        "INSERT INTO public.users (id, email) VALUES ($1, COALESCE($2, $3))
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, updated_at = now()
         WHERE $2::text IS NOT NULL AND users.email IS DISTINCT FROM $2::text",
    )
    .bind(user.user_id.0)
    .bind(user.email.as_deref())
    .bind(placeholder_email(user.user_id))
    .execute(db)
    .await?;
    Ok(())
}

pub(super) async fn upsert_connection(
    conn: &mut PgConnection,
    user: &UserContext,
    new: &NewConnection,
) -> Result<ConnectionRecord> {
    let row = sqlx::query(concat!(
        "INSERT INTO public.exchange_keys
             (user_id, exchange, api_key_encrypted, api_secret_encrypted, passphrase_encrypted,
              nickname, api_key_hint)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (user_id, exchange) DO UPDATE SET
             api_key_encrypted = EXCLUDED.api_key_encrypted,
             api_secret_encrypted = EXCLUDED.api_secret_encrypted,
             passphrase_encrypted = EXCLUDED.passphrase_encrypted,
             api_key_hint = EXCLUDED.api_key_hint,
             nickname = COALESCE(EXCLUDED.nickname, exchange_keys.nickname),
             status = 'pending', status_message = NULL, last_checked_at = NULL,
             last_latency_ms = NULL, consecutive_failures = 0, permissions = '{}',
             is_active = true, access_token_encrypted = NULL, session_expires_at = NULL,
             credentials_version = exchange_keys.credentials_version + 1,
             updated_at = now()
         RETURNING ",
        connection_columns!()
    ))
    .bind(user.user_id.0)
    .bind(new.exchange.as_str())
    .bind(&new.credentials.api_key)
    .bind(&new.credentials.api_secret)
    .bind(new.credentials.passphrase.as_deref())
    .bind(new.nickname.as_deref())
    .bind(new.api_key_hint.as_str())
    .fetch_one(&mut *conn)
    .await?;
    connection_from_row(&row)
}

/// Soft-deletes and wipes the user's active connection; `false` if there is none to revoke.
pub(super) async fn revoke_connection(conn: &mut PgConnection, user: &UserContext, id: ConnectionId) -> Result<bool> {
    let revoked = sqlx::query(
        "UPDATE public.exchange_keys SET
             is_active = false, api_key_encrypted = '', api_secret_encrypted = '',
             passphrase_encrypted = NULL, access_token_encrypted = NULL,
             session_expires_at = NULL, updated_at = now()
         WHERE id = $1 AND user_id = $2 AND is_active",
    )
    .bind(id.0)
    .bind(user.user_id.0)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(revoked == 1)
}

/// Writes an audit row for `user_id`; a `connection_id` that is not theirs writes nothing and
/// yields NotFound (the RLS insert policy would reject it too, with a less useful error).
pub(super) async fn insert_audit(
    conn: &mut PgConnection,
    user_id: UserId,
    audit: &AuditEntryInput,
) -> Result<AuditEntry> {
    let row = sqlx::query(concat!(
        "INSERT INTO public.connection_audit_log
             (connection_id, user_id, action, ip_address, user_agent, details)
         SELECT $1, $2, $3, $4::inet, $5, $6
         WHERE $1::uuid IS NULL
            OR EXISTS (SELECT 1 FROM public.exchange_keys WHERE id = $1 AND user_id = $2)
         RETURNING ",
        audit_columns!()
    ))
    .bind(audit.connection_id.map(|c| c.0))
    .bind(user_id.0)
    .bind(audit.action.as_str())
    .bind(audit.ip_address.map(|ip| ip.to_string()))
    .bind(audit.user_agent.as_deref())
    .bind(details_json(&audit.details))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(audit_from_row).transpose()?.ok_or(StoreError::NotFound)
}

/// Service path: an audit row for connection `id`, owned by the connection's user.
async fn insert_connection_audit(
    conn: &mut PgConnection,
    id: ConnectionId,
    audit: &AuditEntryInput,
) -> Result<AuditEntry> {
    let row = sqlx::query(concat!(
        "INSERT INTO public.connection_audit_log
             (connection_id, user_id, action, ip_address, user_agent, details)
         SELECT k.id, k.user_id, $2, $3::inet, $4, $5
         FROM public.exchange_keys k WHERE k.id = $1
         RETURNING ",
        audit_columns!()
    ))
    .bind(id.0)
    .bind(audit.action.as_str())
    .bind(audit.ip_address.map(|ip| ip.to_string()))
    .bind(audit.user_agent.as_deref())
    .bind(details_json(&audit.details))
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(audit_from_row).transpose()?.ok_or(StoreError::NotFound)
}

fn details_json(details: &Value) -> Option<&Value> {
    (!details.is_null()).then_some(details)
}

/// One check's outcome for [`record_checks`] (see `Store::record_check`).
#[derive(Debug, Clone)]
pub(super) struct CheckWrite {
    pub(super) id: ConnectionId,
    pub(super) update: StatusUpdate,
    pub(super) health: HealthRecord,
    pub(super) decided_from: Option<DecidedFrom>,
}

/// Checks' outcomes, coalesced (see [`super::coalesce`]): each status compare-and-set and, only
/// where it applied, its history row; `true` for those applied. One statement per batch, except
/// that a second write for the same connection goes in a statement after the first: one
/// `UPDATE … FROM` would apply only one of the two, and not predictably which.
///
/// Not waiting for the WAL flush, like the claim and settle (see `NO_FLUSH` in
/// jobs_postgres.rs): only jobs record checks, and each job ends with its settle, which
/// acknowledges the ticket. WAL is replayed in order, so a crash that loses this write loses the
/// acknowledgement after it too, and the ticket runs the job again.
pub(super) async fn record_checks(conn: &mut PgConnection, writes: Vec<CheckWrite>) -> Result<Vec<bool>> {
    let mut answers = vec![false; writes.len()];
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    while !pending.is_empty() {
        let mut seen = std::collections::HashSet::with_capacity(pending.len());
        let (now, later): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| seen.insert(writes[i].id));
        let batch: Vec<&CheckWrite> = now.iter().map(|&i| &writes[i]).collect();
        for (i, applied) in now.iter().zip(record_checks_at_once(&mut *conn, &batch).await?) {
            answers[*i] = applied;
        }
        pending = later;
    }
    Ok(answers)
}

async fn record_checks_at_once(db: impl sqlx::PgExecutor<'_>, writes: &[&CheckWrite]) -> Result<Vec<bool>> {
    let column = |f: &dyn Fn(&CheckWrite) -> Option<DateTime<Utc>>| writes.iter().map(|w| f(w)).collect::<Vec<_>>();
    let ids: Vec<Uuid> = writes.iter().map(|w| w.id.0).collect();
    let statuses: Vec<&str> = writes.iter().map(|w| w.update.status.as_str()).collect();
    let messages: Vec<Option<&str>> = writes.iter().map(|w| w.update.status_message.as_deref()).collect();
    let latencies: Vec<Option<i32>> = writes.iter().map(|w| w.update.latency_ms).collect();
    let permissions: Vec<Option<Value>> = writes.iter().map(|w| w.update.permissions.map(permissions_json)).collect();
    let failures: Vec<i32> = writes.iter().map(|w| w.update.consecutive_failures).collect();
    let checked_at = column(&|w| Some(w.update.checked_at));
    let versions: Vec<i32> = writes.iter().map(|w| w.update.credentials_version).collect();
    let conditional: Vec<bool> = writes.iter().map(|w| w.decided_from.is_some()).collect();
    let last_checked = column(&|w| w.decided_from.and_then(|d| d.last_checked_at));
    let sessions = column(&|w| w.decided_from.and_then(|d| d.session_expires_at));
    let health_at = column(&|w| Some(w.health.checked_at));
    let health_statuses: Vec<&str> = writes.iter().map(|w| w.health.status.as_str()).collect();
    let codes: Vec<Option<&str>> = writes.iter().map(|w| w.health.code.as_deref()).collect();
    let health_latencies: Vec<Option<i32>> = writes.iter().map(|w| w.health.latency_ms).collect();
    let health_messages: Vec<Option<&str>> = writes.iter().map(|w| w.health.message.as_deref()).collect();
    let applied: Vec<i64> = sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::jsonb[], $6::int4[],
                                  $7::timestamptz[], $8::int4[], $9::bool[], $10::timestamptz[],
                                  $11::timestamptz[], $12::timestamptz[], $13::text[], $14::text[],
                                  $15::int4[], $16::text[])
                 WITH ORDINALITY
                 AS i (id, status, status_message, latency_ms, permissions, failures, checked_at, version,
                       conditional, last_checked_at, session_expires_at, health_at, health_status, code,
                       health_latency_ms, health_message, ord)
         ),
         updated AS (
             UPDATE public.exchange_keys AS k
                SET status = i.status, status_message = i.status_message, last_latency_ms = i.latency_ms,
                    permissions = COALESCE(i.permissions, k.permissions), consecutive_failures = i.failures,
                    last_checked_at = i.checked_at
               FROM input AS i, (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush
              WHERE k.id = i.id AND k.is_active AND k.credentials_version = i.version
                AND (NOT i.conditional
                     OR (k.last_checked_at IS NOT DISTINCT FROM i.last_checked_at
                         AND k.session_expires_at IS NOT DISTINCT FROM i.session_expires_at))
             RETURNING i.ord
         ),
         history AS (
             INSERT INTO public.connection_health_history
                 (connection_id, checked_at, status, code, latency_ms, message)
             SELECT i.id, i.health_at, i.health_status, i.code, i.health_latency_ms, i.health_message
               FROM input AS i JOIN updated AS u ON u.ord = i.ord
         )
         SELECT ord FROM updated",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&messages)
    .bind(&latencies)
    .bind(&permissions)
    .bind(&failures)
    .bind(&checked_at)
    .bind(&versions)
    .bind(&conditional)
    .bind(&last_checked)
    .bind(&sessions)
    .bind(&health_at)
    .bind(&health_statuses)
    .bind(&codes)
    .bind(&health_latencies)
    .bind(&health_messages)
    .fetch_all(db)
    .await?;
    let mut answers = vec![false; writes.len()];
    for ord in applied {
        if let Some(answer) = usize::try_from(ord - 1).ok().and_then(|i| answers.get_mut(i)) {
            *answer = true;
        }
    }
    Ok(answers)
}

fn permissions_json(permissions: Permissions) -> Value {
    serde_json::to_value(permissions).unwrap_or_else(|_| Value::Object(Default::default()))
}

fn connection_from_row(row: &PgRow) -> Result<ConnectionRecord> {
    Ok(ConnectionRecord {
        id: ConnectionId(row.try_get("id")?),
        user_id: UserId(row.try_get("user_id")?),
        exchange: super::parse_column("exchange", &row.try_get::<String, _>("exchange")?)?,
        nickname: row.try_get("nickname")?,
        status: super::parse_column("status", &row.try_get::<String, _>("status")?)?,
        status_message: row.try_get("status_message")?,
        last_checked_at: row.try_get("last_checked_at")?,
        last_latency_ms: row.try_get("last_latency_ms")?,
        consecutive_failures: row.try_get("consecutive_failures")?,
        features: super::features_from_json(row.try_get("features")?)?,
        permissions: super::permissions_from_json(row.try_get("permissions")?)?,
        api_key_hint: row.try_get::<Option<String>, _>("api_key_hint")?.map(ApiKeyHint::from_stored),
        session_expires_at: row.try_get("session_expires_at")?,
        is_active: row.try_get("is_active")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        credentials_version: row.try_get("credentials_version")?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditEntry> {
    let ip: Option<String> = row.try_get("ip_address")?;
    Ok(AuditEntry {
        id: row.try_get("id")?,
        connection_id: row.try_get::<Option<Uuid>, _>("connection_id")?.map(ConnectionId),
        action: super::parse_column("action", &row.try_get::<String, _>("action")?)?,
        ip_address: ip.map(|ip| ip.parse().map_err(|e| decode_error("ip_address", e))).transpose()?,
        user_agent: row.try_get("user_agent")?,
        details: row.try_get::<Option<Value>, _>("details")?.unwrap_or(Value::Null),
        created_at: row.try_get("created_at")?,
    })
}

fn health_from_row(row: &PgRow) -> Result<HealthEntry> {
    Ok(HealthEntry {
        id: row.try_get("id")?,
        checked_at: row.try_get("checked_at")?,
        status: super::parse_column("status", &row.try_get::<String, _>("status")?)?,
        code: row.try_get("code")?,
        latency_ms: row.try_get("latency_ms")?,
        message: row.try_get("message")?,
    })
}
