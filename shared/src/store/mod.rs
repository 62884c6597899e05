//! Storage: every SQL statement of the system lives under this module.
//!
//! [`Store`] is a cheap-to-clone handle over either PostgreSQL (production, plain or Supabase) or
//! SQLite (the single-process default). Both backends pass the same contract test suite
//! (`shared/tests/store`). Handlers and jobs call the methods here and never hold SQL.
//!
//! Two kinds of methods:
//!
//! * **User-scoped** methods take a [`UserContext`]. On PostgreSQL each runs in a transaction that
//!   first switches to the `tradeeon_user` role and sets the user's JWT claims, so Row Level
//!   Security applies on top of the `WHERE user_id = ...` every query carries anyway. SQLite has
//!   no RLS and relies on the `WHERE` clauses. [`Store::begin_user`] exposes such a transaction
//!   so a caller can combine several writes (and, after [`UserTx::into_service`], its own job
//!   enqueue) atomically.
//! * **Service** methods (worker jobs: health checks, rotation, re-encryption) run as the
//!   service's own login role, a member of `tradeeon_service`, whose policies show it every row.
//!   It does not own the tables: the owner runs migrations only ([`Store::check_service_role`]).
//!
//! Secrets cross this layer only as Fernet tokens ([`EncryptedCredentials`]); the store never sees
//! plaintext, and [`ConnectionRecord`] — what the API returns to clients — has no secret field.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{ApiKeyHint, AuditAction, ConnectionId, ConnectionStatus, Exchange, Features, Permissions, UserId};

pub mod kraken_nonces;
mod postgres;
mod scram;
mod sqlite;

use postgres::PgStore;
pub use postgres::{SERVICE_ROLE, USER_ROLE};
use sqlite::SqliteStore;

/// Name of our migrations table. apalis keeps its own (`_sqlx_migrations` on SQLite,
/// `apalis._sqlx_migrations` on PostgreSQL); sharing one would make each migrator see the other's
/// versions as unknown.
pub const MIGRATIONS_TABLE: &str = "_tradeeon_migrations";

/// Largest page [`Store::list_audit`] and friends return, whatever the caller asks for.
pub const MAX_PAGE_SIZE: u32 = 1000;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist, is not the caller's, or is no longer active.
    #[error("not found")]
    NotFound,
    /// A unique constraint was violated; carries the constraint (index) name when known.
    #[error("conflict: {0}")]
    Conflict(String),
    /// `DATABASE_URL` has a scheme we cannot serve. Never includes the rest of the URL.
    #[error(
        "unsupported DATABASE_URL{}: expected sqlite://<path>, sqlite::memory:, postgres://... or postgresql://...",
        .scheme.as_deref().map(|s| format!(" scheme `{s}`")).unwrap_or_default()
    )]
    UnsupportedUrl { scheme: Option<String> },
    /// The database named by `DATABASE_URL` could not be opened or reached.
    #[error("could not connect to the {backend} database named by DATABASE_URL")]
    Connect {
        backend: Backend,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// Applying migrations failed; `what` says whose (the job queue's or ours).
    #[error("migrating the {what} schema failed")]
    Migrate {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `MIGRATE_ON_START` as a role that cannot migrate, with migrations to apply.
    #[error(
        "the database has migrations to apply, and DATABASE_URL's role `{role}` does not own the tables so it \
         cannot apply them: run `tradeeon migrate` with the owner's DATABASE_URL first"
    )]
    MigrationsPending { role: String },
    /// The service would run as the tables' owner, which forced RLS shows no rows.
    #[error(
        "DATABASE_URL connects as `{role}`, which owns the tables: row level security is forced on them, so it \
         would see no rows. Keep that role for `tradeeon migrate` and run the API and workers as a login role \
         that is a member of tradeeon_service (docs/operations.md, \"Database roles\")"
    )]
    ConnectsAsOwner { role: String },
    /// The service's login role lacks the service's privileges and policies.
    #[error(
        "DATABASE_URL's role `{role}` is not a member of tradeeon_service: as the tables' owner run \
         `GRANT tradeeon_service TO \"{role}\"` (or `tradeeon migrate` with DATABASE_APP_URL naming it)"
    )]
    NotServiceMember { role: String },
    /// Every user policy calls `auth.uid()`; on Supabase only an administrator may grant it.
    #[error(
        "tradeeon_user may not call auth.uid(): as an administrator run `GRANT USAGE ON SCHEMA auth TO \
         tradeeon_user, tradeeon_service; GRANT EXECUTE ON FUNCTION auth.uid() TO tradeeon_user, tradeeon_service`"
    )]
    AuthNotGranted,
    /// `DATABASE_APP_URL` cannot be provisioned as given.
    #[error("DATABASE_APP_URL: {0}")]
    AppRole(&'static str),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.constraint().unwrap_or("unique constraint").to_owned())
            }
            _ => StoreError::Database(err),
        }
    }
}

/// The role a `postgres://` URL signs in as. Supabase's pooler (Supavisor) takes the user as
/// `role.PROJECT` and signs in as `role`.
fn login_role_of(url: &url::Url) -> Option<String> {
    let user = percent_decoded(url.username())?;
    let pooled = url.host_str().is_some_and(|host| host.ends_with(".pooler.supabase.com"));
    match user.split_once('.') {
        Some((role, _project)) if pooled && !role.is_empty() => Some(role.to_owned()),
        _ => Some(user),
    }
}

/// A URL component with its `%XX` escapes undone; `None` if empty or not UTF-8.
fn percent_decoded(component: &str) -> Option<String> {
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// A stored value that does not decode into its domain type (a corrupt or foreign row).
pub(crate) fn decode_error(column: &'static str, err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Database(sqlx::Error::ColumnDecode { index: column.to_owned(), source: Box::new(err) })
}

/// Parses a stored enum string (written by us, so failure means a corrupt row).
pub(crate) fn parse_column<T>(column: &'static str, value: &str) -> Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    value.parse().map_err(|e| decode_error(column, e))
}

/// `{}` (the column default, and what a key swap resets to) means "not checked yet".
pub(crate) fn permissions_from_json(value: serde_json::Value) -> Result<Option<Permissions>> {
    if value.as_object().is_some_and(|o| o.is_empty()) || value.is_null() {
        return Ok(None);
    }
    serde_json::from_value(value).map(Some).map_err(|e| decode_error("permissions", e))
}

pub(crate) fn features_from_json(value: serde_json::Value) -> Result<Features> {
    serde_json::from_value(value).map_err(|e| decode_error("features", e))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Sqlite => "SQLite",
        })
    }
}

/// Who a user-scoped call acts for: the verified `sub` (and email) of their JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserContext {
    pub user_id: UserId,
    pub email: Option<String>,
}

/// Fernet tokens of one connection's credentials. `Debug` shows only which fields are present.
/// Serializable because job payloads carry them (as ciphertext, never plaintext).
#[derive(Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EncryptedCredentials {
    pub api_key: String,
    pub api_secret: String,
    pub passphrase: Option<String>,
}

impl fmt::Debug for EncryptedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedCredentials")
            .field("api_key", &"<encrypted>")
            .field("api_secret", &"<encrypted>")
            .field("passphrase", &self.passphrase.as_ref().map(|_| "<encrypted>"))
            .finish()
    }
}

/// A connection request: new credentials for (user, exchange).
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub exchange: Exchange,
    pub credentials: EncryptedCredentials,
    /// `None` keeps the existing nickname when the connection already exists.
    pub nickname: Option<String>,
    pub api_key_hint: ApiKeyHint,
}

/// One connection as the API may show it. Deliberately holds no encrypted secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionRecord {
    pub id: ConnectionId,
    pub user_id: UserId,
    pub exchange: Exchange,
    pub nickname: Option<String>,
    pub status: ConnectionStatus,
    pub status_message: Option<String>,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub last_latency_ms: Option<i32>,
    pub consecutive_failures: i32,
    pub features: Features,
    /// What the exchange reported the key may do; `None` until a check has run.
    pub permissions: Option<Permissions>,
    /// `None` only for rows created before hints existed (adopted from the seed schema).
    pub api_key_hint: Option<ApiKeyHint>,
    pub session_expires_at: Option<DateTime<Utc>>,
    pub is_active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped on every key swap; pass it back as `expected_version` to
    /// [`Store::swap_credentials`] so a retried rotation is a no-op.
    pub credentials_version: i32,
}

/// An audit row to write. `connection_id: None` on a connection-scoped write (upsert, revoke,
/// swap) means "the connection being written".
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntryInput {
    pub connection_id: Option<ConnectionId>,
    pub action: AuditAction,
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// `Value::Null` is stored as SQL NULL.
    pub details: serde_json::Value,
}

impl AuditEntryInput {
    /// An entry with no request metadata and no details.
    pub fn new(action: AuditAction) -> Self {
        Self { connection_id: None, action, ip_address: None, user_agent: None, details: serde_json::Value::Null }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: Uuid,
    pub connection_id: Option<ConnectionId>,
    pub action: AuditAction,
    pub ip_address: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Keyset position in a newest-first list (the audit log, a connection's health history): pass
/// the last entry of a page to get the next (older) one. Its string form, for query strings, is
/// `<unix microseconds>.<uuid without hyphens>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

impl From<&AuditEntry> for PageCursor {
    fn from(entry: &AuditEntry) -> Self {
        Self { at: entry.created_at, id: entry.id }
    }
}

impl From<&HealthEntry> for PageCursor {
    fn from(entry: &HealthEntry) -> Self {
        Self { at: entry.checked_at, id: entry.id }
    }
}

impl fmt::Display for PageCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.at.timestamp_micros(), self.id.simple())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid page cursor")]
pub struct ParseCursorError;

impl FromStr for PageCursor {
    type Err = ParseCursorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (micros, id) = s.split_once('.').ok_or(ParseCursorError)?;
        let micros: i64 = micros.parse().map_err(|_| ParseCursorError)?;
        Ok(Self {
            at: DateTime::from_timestamp_micros(micros).ok_or(ParseCursorError)?,
            id: Uuid::try_parse(id).map_err(|_| ParseCursorError)?,
        })
    }
}

/// The outcome of one health check, written by the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub status: ConnectionStatus,
    pub status_message: Option<String>,
    pub latency_ms: Option<i32>,
    /// `None` leaves the stored permissions as they are.
    pub permissions: Option<Permissions>,
    pub consecutive_failures: i32,
    pub checked_at: DateTime<Utc>,
    /// The `credentials_version` the check ran with: the update applies only while those are
    /// still the connection's credentials, so a check of keys that a rotation has just replaced
    /// can never overwrite the new keys' status.
    pub credentials_version: i32,
}

/// What a status decision was made from: the connection's last check and its Zerodha session,
/// as read before the check. A decision given to [`Store::record_check`] with this applies only
/// while both are unchanged — every status write sets `last_checked_at`, a new session moves
/// `session_expires_at`, new credentials move the version — so a check can decide from what it
/// read before calling the exchange, without reading the connection again afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecidedFrom {
    pub last_checked_at: Option<DateTime<Utc>>,
    pub session_expires_at: Option<DateTime<Utc>>,
}

impl DecidedFrom {
    pub fn of(record: &ConnectionRecord) -> Self {
        Self { last_checked_at: record.last_checked_at, session_expires_at: record.session_expires_at }
    }
}

/// One row of health history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthRecord {
    pub connection_id: ConnectionId,
    pub checked_at: DateTime<Utc>,
    pub status: ConnectionStatus,
    /// A stable machine-readable outcome, e.g. `invalid_credentials`.
    pub code: Option<String>,
    pub latency_ms: Option<i32>,
    pub message: Option<String>,
}

/// One recorded health check as read back; its id orders checks of the same instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEntry {
    pub id: Uuid,
    pub checked_at: DateTime<Utc>,
    pub status: ConnectionStatus,
    pub code: Option<String>,
    pub latency_ms: Option<i32>,
    pub message: Option<String>,
}

/// Everything encrypted on one row, as read for re-encryption under a new key. Pass it back
/// unchanged as `previous` to [`Store::replace_encrypted_secrets`].
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSecrets {
    pub id: ConnectionId,
    pub credentials_version: i32,
    pub credentials: EncryptedCredentials,
    pub access_token: Option<String>,
}

impl fmt::Debug for StoredSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSecrets")
            .field("id", &self.id)
            .field("credentials_version", &self.credentials_version)
            .field("credentials", &self.credentials)
            .field("access_token", &self.access_token.as_ref().map(|_| "<encrypted>"))
            .finish()
    }
}

/// The placeholder stored in `users.email` (UNIQUE NOT NULL, from the seed) when the JWT carries
/// no email. `.invalid` is reserved (RFC 2606) so it can never collide with a real address, and
/// the user id makes it unique. A later call with a real email replaces it.
pub fn placeholder_email(user_id: UserId) -> String {
    format!("{}@users.invalid", user_id.0)
}

fn clamp_limit(limit: u32) -> i64 {
    i64::from(limit.min(MAX_PAGE_SIZE))
}

/// Handle to the database. Cloning is cheap: one reference count, however many pools and
/// batching lanes are inside (the API clones it with its state on every request).
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
enum Inner {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match &*$self.inner {
            Inner::Postgres($s) => $call,
            Inner::Sqlite($s) => $call,
        }
    };
}

// Declared after `dispatch!` so they can use it (macro_rules scope is textual).
mod coalesce;
mod jobs;
mod jobs_postgres;
mod jobs_sqlite;
mod sweeps;
mod wakeups;

pub use coalesce::CoalescedStats;
pub use jobs::{QueueStats, REVOKED_REASON, TicketState};
pub use sweeps::{SweepTarget, sweep_job_key};

impl Store {
    /// Opens a pool for `url` (the value of `DATABASE_URL`):
    /// `sqlite://path/to/file.db` (file and parent directory are created if missing),
    /// `sqlite::memory:` (tests), or `postgres://` / `postgresql://`.
    // No `err` here: the caller reports a failed connect (the CLI as its one line of output).
    #[tracing::instrument(skip_all, fields(max_connections = max_connections))]
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store> {
        let url = url.trim();
        let inner = if url.starts_with("sqlite:") {
            Inner::Sqlite(SqliteStore::connect(url, max_connections).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Inner::Postgres(PgStore::connect(url, max_connections).await?)
        } else {
            // A scheme never holds credentials; anything else of the URL might.
            let scheme = url::Url::parse(url).ok().map(|u| u.scheme().to_owned());
            return Err(StoreError::UnsupportedUrl { scheme });
        };
        Ok(Store { inner: Arc::new(inner) })
    }

    pub fn backend(&self) -> Backend {
        match *self.inner {
            Inner::Postgres(_) => Backend::Postgres,
            Inner::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The store's PostgreSQL pool (for tests and tools that inspect the database directly).
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &*self.inner {
            Inner::Postgres(s) => Some(&s.pool),
            Inner::Sqlite(_) => None,
        }
    }

    /// The PostgreSQL pool the job queue (apalis) runs on: its own, apart from the store's (see
    /// `QUEUE_POOL_CONNECTIONS` in `postgres.rs`).
    pub fn queue_pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &*self.inner {
            Inner::Postgres(s) => Some(&s.queue_pool),
            Inner::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, for the job queue (apalis) to share.
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &*self.inner {
            Inner::Sqlite(s) => Some(&s.pool),
            Inner::Postgres(_) => None,
        }
    }

    /// Readiness: one round trip to the database.
    #[tracing::instrument(skip_all, err)]
    pub async fn ping(&self) -> Result<()> {
        dispatch!(self, s => s.ping().await)
    }

    /// Applies apalis's migrations, then ours (table [`MIGRATIONS_TABLE`]). Idempotent.
    #[tracing::instrument(skip_all, err)]
    pub async fn migrate(&self) -> Result<()> {
        dispatch!(self, s => s.migrate().await)
    }

    /// `MIGRATE_ON_START`: applies pending migrations when this role may (it owns the tables, or
    /// is a superuser, or nothing is migrated yet). A service role that does not own them
    /// applies nothing; it only makes sure there is nothing to apply
    /// ([`StoreError::MigrationsPending`] otherwise).
    #[tracing::instrument(skip_all, err)]
    pub async fn migrate_on_start(&self) -> Result<()> {
        let Inner::Postgres(s) = &*self.inner else { return self.migrate().await };
        let standing = s.standing().await?;
        if standing.superuser || standing.owns_schema {
            return s.migrate().await;
        }
        if s.migrations_pending().await? {
            return Err(StoreError::MigrationsPending { role: standing.role });
        }
        tracing::info!(role = %standing.role, "schema is up to date; migrations are left to the tables' owner");
        Ok(())
    }

    /// Refuses to serve on PostgreSQL as a role the schema does not let the service work as:
    /// the tables' owner (forced RLS would show it no rows), or a role outside
    /// `tradeeon_service`. A superuser bypasses RLS and is let through with a warning.
    #[tracing::instrument(skip_all, err)]
    pub async fn check_service_role(&self) -> Result<()> {
        let Inner::Postgres(s) = &*self.inner else { return Ok(()) };
        let standing = s.standing().await?;
        if standing.superuser {
            tracing::warn!(
                role = %standing.role,
                "DATABASE_URL connects as a superuser, which row level security does not restrict; \
                 connect as a member of tradeeon_service in production"
            );
            return Ok(());
        }
        if standing.owns_schema {
            return Err(StoreError::ConnectsAsOwner { role: standing.role });
        }
        if !standing.serves {
            return Err(StoreError::NotServiceMember { role: standing.role });
        }
        if !standing.user_role_has_auth {
            return Err(StoreError::AuthNotGranted);
        }
        Ok(())
    }

    /// `tradeeon migrate` with `DATABASE_APP_URL`: makes that URL's user a login role with that
    /// URL's password and membership in `tradeeon_service`. Returns the role's name.
    #[tracing::instrument(skip_all, err)]
    pub async fn provision_service_login(&self, app_url: &str) -> Result<String> {
        let Inner::Postgres(s) = &*self.inner else {
            return Err(StoreError::AppRole("applies to PostgreSQL only"));
        };
        let url = url::Url::parse(app_url).map_err(|_| StoreError::AppRole("is not a postgres:// URL"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(StoreError::AppRole("is not a postgres:// URL"));
        }
        let login = login_role_of(&url).ok_or(StoreError::AppRole("names no user"))?;
        let password = url
            .password()
            .and_then(percent_decoded)
            .map(zeroize::Zeroizing::new)
            .ok_or(StoreError::AppRole("carries no password"))?;
        s.provision_service_login(&login, &password).await?;
        Ok(login)
    }

    /// Closes the pools, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        match &*self.inner {
            Inner::Postgres(s) => {
                s.queue_pool.close().await;
                s.pool.close().await;
            }
            Inner::Sqlite(s) => s.pool.close().await,
        }
    }

    // ---------------------------------------------------------------------------------------
    // User-scoped
    // ---------------------------------------------------------------------------------------

    /// Begins a transaction acting for `user` (on PostgreSQL: role `tradeeon_user`, JWT claims
    /// set, so RLS applies). Dropping it without [`UserTx::commit`] rolls back.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id), err)]
    pub async fn begin_user(&self, user: &UserContext) -> Result<UserTx> {
        let tx = match &*self.inner {
            Inner::Postgres(s) => Tx::Postgres(postgres::begin_user(&s.pool, user).await?, s.wakeups.clone()),
            Inner::Sqlite(s) => Tx::Sqlite(sqlite::begin_write(&s.pool).await?),
        };
        Ok(UserTx { user: user.clone(), tx })
    }

    /// Makes sure the user has a profile row (service path, before any user-scoped write).
    /// On plain PostgreSQL also creates the `auth.users` stand-in row; on Supabase that row
    /// exists already and is not touched. A missing email becomes [`placeholder_email`]; a
    /// given email replaces the stored one. Another user's email → [`StoreError::Conflict`].
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id), err(level = "info"))]
    pub async fn ensure_user(&self, user: &UserContext) -> Result<()> {
        dispatch!(self, s => s.ensure_user(user).await)
    }

    /// Inserts the connection for (user, exchange) or, if one exists (even revoked), replaces
    /// its credentials: status `pending`, active, failures 0, permissions and last check
    /// cleared, any Zerodha session dropped, `credentials_version` + 1. Writes `audit` (if
    /// given) in the same transaction. Call [`Store::ensure_user`] first.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, exchange = %new.exchange), err)]
    pub async fn upsert_connection(
        &self,
        user: &UserContext,
        new: NewConnection,
        audit: Option<AuditEntryInput>,
    ) -> Result<ConnectionRecord> {
        let mut tx = self.begin_user(user).await?;
        let record = tx.upsert_connection(&new).await?;
        if let Some(mut audit) = audit {
            audit.connection_id.get_or_insert(record.id);
            tx.insert_audit(&audit).await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    /// The user's active connections, newest first.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id), err)]
    pub async fn list_connections(&self, user: &UserContext) -> Result<Vec<ConnectionRecord>> {
        dispatch!(self, s => s.list_connections(user).await)
    }

    /// One of the user's active connections; `None` if unknown, revoked or someone else's.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, connection_id = %id), err)]
    pub async fn get_connection(&self, user: &UserContext, id: ConnectionId) -> Result<Option<ConnectionRecord>> {
        dispatch!(self, s => s.get_connection(user, id).await)
    }

    /// Soft-deletes the connection: inactive, encrypted secrets overwritten (`''`, NULL),
    /// session cleared, and the `audit` row (normally `revoked`) written in the same
    /// transaction. [`StoreError::NotFound`] if unknown, someone else's or already revoked.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, connection_id = %id), err(level = "info"))]
    pub async fn revoke_connection(&self, user: &UserContext, id: ConnectionId, audit: AuditEntryInput) -> Result<()> {
        let mut tx = self.begin_user(user).await?;
        tx.revoke_connection(id, audit).await?;
        tx.commit().await
    }

    /// Writes one audit row for the user. A `connection_id` that is not the user's →
    /// [`StoreError::NotFound`].
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, action = %audit.action), err(level = "info"))]
    pub async fn insert_audit(&self, user: &UserContext, audit: AuditEntryInput) -> Result<AuditEntry> {
        let mut tx = self.begin_user(user).await?;
        let entry = tx.insert_audit(&audit).await?;
        tx.commit().await?;
        Ok(entry)
    }

    /// The user's audit log, newest first, at most `limit` (≤ [`MAX_PAGE_SIZE`]) entries older
    /// than `before` (exclusive).
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, limit = limit), err)]
    pub async fn list_audit(
        &self,
        user: &UserContext,
        limit: u32,
        before: Option<PageCursor>,
    ) -> Result<Vec<AuditEntry>> {
        dispatch!(self, s => s.list_audit(user, clamp_limit(limit), before).await)
    }

    /// Health history of one of the user's connections, newest first: at most `limit`
    /// (≤ [`MAX_PAGE_SIZE`]) checks older than `before` (exclusive). Empty for someone else's
    /// connection.
    #[tracing::instrument(skip_all, fields(user_id = %user.user_id, connection_id = %id), err)]
    pub async fn list_health_history(
        &self,
        user: &UserContext,
        id: ConnectionId,
        limit: u32,
        before: Option<PageCursor>,
    ) -> Result<Vec<HealthEntry>> {
        dispatch!(self, s => s.list_health_history(user, id, clamp_limit(limit), before).await)
    }

    // ---------------------------------------------------------------------------------------
    // Service (workers): no user scope, sees every row
    // ---------------------------------------------------------------------------------------

    /// An active connection with its encrypted credentials and their version.
    #[tracing::instrument(skip_all, fields(connection_id = %id), err)]
    pub async fn load_credentials(
        &self,
        id: ConnectionId,
    ) -> Result<Option<(ConnectionRecord, EncryptedCredentials, i32)>> {
        dispatch!(self, s => s.load_credentials(id).await)
    }

    /// Replaces the credentials of an active connection if its `credentials_version` is still
    /// `expected_version`, bumping the version and dropping any Zerodha session, and writes
    /// `audit` in the same transaction. `false` (and no audit row) if the version moved on —
    /// i.e. this swap already happened — or the connection is gone or revoked. Status and
    /// permissions are left for the caller's [`Store::record_check`].
    #[tracing::instrument(skip_all, fields(connection_id = %id, expected_version = expected_version), err)]
    pub async fn swap_credentials(
        &self,
        id: ConnectionId,
        expected_version: i32,
        new: EncryptedCredentials,
        api_key_hint: ApiKeyHint,
        audit: AuditEntryInput,
    ) -> Result<bool> {
        dispatch!(self, s => s.swap_credentials(id, expected_version, &new, &api_key_hint, audit).await)
    }

    /// Writes an audit row on behalf of the connection's owner (e.g. `rotate_failed`,
    /// `status_changed` from a worker; a `test` job's `tested` entry comes with its settle). [`StoreError::NotFound`] if the
    /// connection does not exist.
    #[tracing::instrument(skip_all, fields(connection_id = %id, action = %audit.action), err)]
    pub async fn insert_connection_audit(&self, id: ConnectionId, audit: AuditEntryInput) -> Result<AuditEntry> {
        dispatch!(self, s => s.insert_connection_audit(id, audit).await)
    }

    /// Stores a Zerodha session (encrypted access token and its expiry) on an active
    /// connection, with an optional audit row (normally `session_created`) in the same
    /// transaction. `false` if the connection is gone or revoked.
    #[tracing::instrument(skip_all, fields(connection_id = %id), err)]
    pub async fn store_session(
        &self,
        id: ConnectionId,
        access_token: String,
        expires_at: DateTime<Utc>,
        audit: Option<AuditEntryInput>,
    ) -> Result<bool> {
        dispatch!(self, s => s.store_session(id, &access_token, expires_at, audit).await)
    }

    /// The encrypted Zerodha access token of an active connection, if it has one.
    #[tracing::instrument(skip_all, fields(connection_id = %id), err)]
    pub async fn load_access_token(&self, id: ConnectionId) -> Result<Option<String>> {
        dispatch!(self, s => s.load_access_token(id).await)
    }

    #[tracing::instrument(skip_all, fields(connection_id = %record.connection_id, status = %record.status), err)]
    pub async fn record_health(&self, record: HealthRecord) -> Result<()> {
        dispatch!(self, s => s.record_health(&record).await)
    }

    /// A check's outcome: the connection's status (not `updated_at`, which tracks changes made
    /// by the user) and, only if that applied, the health-history row. `false` (and no history
    /// row) if the connection is gone or revoked, or its credentials are no longer those of
    /// `update.credentials_version`, or — given `decided_from` — it was checked again or got a
    /// new session since. On PostgreSQL coalesced with concurrent checks' writes into one
    /// statement, which does not wait for its WAL flush: for jobs only, whose ticket is
    /// acknowledged after it (a crash that loses this write loses the acknowledgement too, and
    /// the job runs again).
    #[tracing::instrument(skip_all, fields(connection_id = %id, status = %update.status), err)]
    pub async fn record_check(
        &self,
        id: ConnectionId,
        update: StatusUpdate,
        health: HealthRecord,
        decided_from: Option<DecidedFrom>,
    ) -> Result<bool> {
        match &*self.inner {
            Inner::Postgres(s) => s.record_check(postgres::CheckWrite { id, update, health, decided_from }).await,
            Inner::Sqlite(s) => s.record_check(id, &update, &health, decided_from).await,
        }
    }

    /// Deletes health history checked before `older_than`; returns how many rows went.
    #[tracing::instrument(skip_all, fields(%older_than), err)]
    pub async fn prune_health_history(&self, older_than: DateTime<Utc>) -> Result<u64> {
        dispatch!(self, s => s.prune_health_history(older_than).await)
    }

    /// Rows that still hold encrypted material (active or revoked-but-not-wiped), in id order
    /// after `after`, for re-encryption under a new vault key.
    #[tracing::instrument(skip_all, fields(limit = limit), err)]
    pub async fn list_encrypted_secrets(&self, after: Option<ConnectionId>, limit: u32) -> Result<Vec<StoredSecrets>> {
        dispatch!(self, s => s.list_encrypted_secrets(after, clamp_limit(limit)).await)
    }

    /// Re-encryption compare-and-swap: writes `new` and `new_access_token` only if the row
    /// still holds exactly `previous` (same version and byte-identical ciphertexts). A
    /// re-encryption is not a rotation, so `credentials_version` and `updated_at` stay as they
    /// are. Comparing the ciphertexts, not only the version, also loses safely against
    /// changes that do not bump the version: a revoke (wipes secrets) or a new Zerodha
    /// session. `false` if the row changed meanwhile (skip it: whatever is there now was
    /// written with the current key) — which also makes an interrupted run safe to repeat.
    #[tracing::instrument(skip_all, fields(connection_id = %previous.id), err)]
    pub async fn replace_encrypted_secrets(
        &self,
        previous: &StoredSecrets,
        new: EncryptedCredentials,
        new_access_token: Option<String>,
    ) -> Result<bool> {
        dispatch!(self, s => s.replace_encrypted_secrets(previous, &new, new_access_token.as_deref()).await)
    }
}

/// A transaction acting for one user (see [`Store::begin_user`]).
pub struct UserTx {
    user: UserContext,
    tx: Tx,
}

enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>, wakeups::Wakeups),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

/// A plain transaction on the store's database, no longer scoped to a user — for writing
/// something else (e.g. a job with [`ServiceTx::enqueue_job`]) atomically
/// with user-scoped writes. Commit it, or drop it to roll back.
pub enum ServiceTx {
    Postgres(PgServiceTx),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

/// A PostgreSQL service transaction and the worker wake-ups it owes once committed.
pub struct PgServiceTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    wakeups: wakeups::Wakeups,
    due_tickets: Vec<String>,
}

impl PgServiceTx {
    /// The open transaction, for statements of the caller's own.
    pub fn connection(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }
}

impl ServiceTx {
    pub async fn commit(self) -> Result<()> {
        match self {
            ServiceTx::Postgres(PgServiceTx { tx, wakeups, due_tickets }) => {
                tx.commit().await?;
                if !due_tickets.is_empty() {
                    wakeups.send(due_tickets);
                }
            }
            ServiceTx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

impl UserTx {
    pub fn user(&self) -> &UserContext {
        &self.user
    }

    /// See [`Store::upsert_connection`] (without the audit row; add one with
    /// [`UserTx::insert_audit`]).
    pub async fn upsert_connection(&mut self, new: &NewConnection) -> Result<ConnectionRecord> {
        match &mut self.tx {
            Tx::Postgres(tx, _) => postgres::upsert_connection(tx, &self.user, new).await,
            Tx::Sqlite(tx) => sqlite::upsert_connection(tx, &self.user, new).await,
        }
    }

    /// See [`Store::insert_audit`].
    pub async fn insert_audit(&mut self, audit: &AuditEntryInput) -> Result<AuditEntry> {
        match &mut self.tx {
            Tx::Postgres(tx, _) => postgres::insert_audit(tx, self.user.user_id, audit).await,
            Tx::Sqlite(tx) => sqlite::insert_audit(tx, self.user.user_id, audit).await,
        }
    }

    /// See [`Store::revoke_connection`].
    pub async fn revoke_connection(&mut self, id: ConnectionId, mut audit: AuditEntryInput) -> Result<()> {
        let revoked = match &mut self.tx {
            Tx::Postgres(tx, _) => postgres::revoke_connection(tx, &self.user, id).await?,
            Tx::Sqlite(tx) => sqlite::revoke_connection(tx, &self.user, id).await?,
        };
        if !revoked {
            return Err(StoreError::NotFound);
        }
        audit.connection_id = Some(id);
        self.insert_audit(&audit).await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<()> {
        match self.tx {
            Tx::Postgres(tx, _) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Leaves the user scope (on PostgreSQL: back to the service's own role, claims cleared)
    /// and hands over the still-open transaction.
    pub async fn into_service(self) -> Result<ServiceTx> {
        Ok(match self.tx {
            Tx::Postgres(mut tx, wakeups) => {
                postgres::leave_user_scope(&mut tx).await?;
                ServiceTx::Postgres(PgServiceTx { tx, wakeups, due_tickets: Vec::new() })
            }
            Tx::Sqlite(tx) => ServiceTx::Sqlite(tx),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_role_of_a_url() {
        let role = |url: &str| login_role_of(&url::Url::parse(url).unwrap());
        assert_eq!(role("postgres://tradeeon_app:pw@db.internal:5432/tradeeon").as_deref(), Some("tradeeon_app"));
        assert_eq!(
            role("postgres://tradeeon_app.abcdefgh:pw@aws-0-eu-west-1.pooler.supabase.com:5432/postgres").as_deref(),
            Some("tradeeon_app")
        );
        assert_eq!(role("postgres://odd.name:pw@db.internal/x").as_deref(), Some("odd.name"));
        assert_eq!(role("postgres://app%2Drole:pw@db.internal/x").as_deref(), Some("app-role"));
        assert_eq!(role("postgres://db.internal/x"), None);
    }
}
