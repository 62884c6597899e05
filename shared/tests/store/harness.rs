//! Runs one contract case against a fresh database of either backend.
//!
//! * SQLite: a file in a temporary directory (in a not-yet-existing subdirectory, so `connect`
//!   must create it).
//! * PostgreSQL: `CREATE DATABASE tradeeon_test_<ulid>` through the admin URL
//!   (`TEST_DATABASE_ADMIN_URL`, default [`DEFAULT_ADMIN_URL`]), dropped `WITH (FORCE)` when the
//!   case ends, also when it panics (the case runs in its own task so a panic comes back as a
//!   value). Databases left behind by a killed run are dropped by the first test of a later run
//!   once they are an hour old (the ULID in the name says when they were made).

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tradeeon_shared::domain::{ApiKeyHint, ConnectionId, Exchange, UserId};
use tradeeon_shared::store::{EncryptedCredentials, HealthRecord, NewConnection, StatusUpdate, Store, UserContext};

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DB_PREFIX: &str = "tradeeon_test_";
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Generates `mod <case> { fn postgres(); fn sqlite() }` for each `async fn <case>(Store)`.
macro_rules! contract {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn postgres() {
                crate::harness::run_postgres(super::$case).await;
            }
            #[tokio::test]
            async fn sqlite() {
                crate::harness::run_sqlite(super::$case).await;
            }
        }
    )+};
}

/// Like `contract!` for cases that only make sense on one backend.
macro_rules! postgres_only {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn postgres() {
                crate::harness::run_postgres(super::$case).await;
            }
        }
    )+};
}

macro_rules! sqlite_only {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn sqlite() {
                crate::harness::run_sqlite(super::$case).await;
            }
        }
    )+};
}

/// Connects and migrates a store for `url`, runs `case` on it, closes it.
async fn connect_and_run<F, Fut>(url: String, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = Store::connect(&url, 5).await.expect("connect");
    store.migrate().await.expect("migrate");
    case(store.clone()).await;
    store.close().await;
}

/// Runs `body` in its own task with a timeout; re-raises its panic after `cleanup`.
async fn isolate<Fut>(body: Fut, cleanup: impl AsyncFnOnce())
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, body)).await;
    cleanup().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_elapsed)) => panic!("test case timed out after {CASE_TIMEOUT:?}"),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

pub async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/not-yet/there/tradeeon.db", dir.path().display());
    isolate(connect_and_run(url, case), async || drop(dir)).await;
}

pub async fn run_postgres<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_postgres_database(|url| connect_and_run(url, case)).await;
}

/// Creates an empty database, gives `body` its URL, drops the database afterwards.
pub async fn with_postgres_database<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    drop_stale_databases().await;
    let name = format!("{DB_PREFIX}{}", ulid::Ulid::generate().to_string().to_lowercase());
    let mut admin = PgConnection::connect(&admin_url()).await.expect("connect to admin database");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let mut url = url::Url::parse(&admin_url()).expect("admin url");
    url.set_path(&name);
    isolate(body(url.to_string()), async move || {
        let dropped = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut admin)
            .await;
        if let Err(e) = dropped {
            eprintln!("could not drop test database {name}: {e}");
        }
        let _ = admin.close().await;
    })
    .await;
}

/// Once per test binary: drop `tradeeon_test_*` databases (and roles) more than an hour old.
async fn drop_stale_databases() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(mut admin) = PgConnection::connect(&admin_url()).await else { return };
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'tradeeon\\_test\\_%'")
                .fetch_all(&mut admin)
                .await
                .unwrap_or_default();
        let cutoff = Utc::now().timestamp_millis() as u64 - 3_600_000;
        for name in names {
            let Some(ulid) = name.strip_prefix(DB_PREFIX).and_then(|u| ulid::Ulid::from_string(&u.to_uppercase()).ok())
            else {
                continue;
            };
            if ulid.timestamp_ms() < cutoff {
                let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await;
            }
        }
        // Login roles made by `rls` and `roles` cases whose test was killed.
        let roles: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'tradeeon\\_test\\_%'")
                .fetch_all(&mut admin)
                .await
                .unwrap_or_default();
        for name in roles {
            let stale = name
                .strip_prefix(DB_PREFIX)
                .and_then(|u| ulid::Ulid::from_string(&u.to_uppercase()).ok())
                .is_some_and(|ulid| ulid.timestamp_ms() < cutoff);
            if stale {
                let _ = sqlx::query(AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}"))).execute(&mut admin).await;
            }
        }
        let _ = admin.close().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

pub fn new_user() -> UserContext {
    let id = UserId::new_random();
    UserContext { user_id: id, email: Some(format!("{id}@example.com")) }
}

/// A user with a profile row.
pub async fn user(store: &Store) -> UserContext {
    let user = new_user();
    store.ensure_user(&user).await.expect("ensure_user");
    user
}

/// Stand-ins for Fernet tokens, distinct per `tag`.
pub fn creds(tag: &str) -> EncryptedCredentials {
    EncryptedCredentials {
        api_key: format!("gAAAA-key-{tag}"),
        api_secret: format!("gAAAA-secret-{tag}"),
        passphrase: Some(format!("gAAAA-pass-{tag}")),
    }
}

pub fn new_connection(exchange: Exchange, tag: &str) -> NewConnection {
    NewConnection {
        exchange,
        credentials: creds(tag),
        nickname: Some(format!("nick-{tag}")),
        api_key_hint: ApiKeyHint::from_api_key(&format!("plain-key-{tag}")),
    }
}

/// Runs a query returning one optional text value, on whichever backend `store` is.
pub async fn text(store: &Store, pg_sql: &str, sqlite_sql: &str, bind: &str) -> Option<String> {
    if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(pg_sql.to_owned()))
            .bind(uuid::Uuid::parse_str(bind).expect("uuid bind"))
            .fetch_one(pool)
            .await
            .expect("pg query")
    } else {
        let pool = store.sqlite_pool().expect("sqlite pool");
        sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(sqlite_sql.to_owned()))
            .bind(bind)
            .fetch_one(pool)
            .await
            .expect("sqlite query")
    }
}

/// Records a check whose history row says what `update` says, as the worker does; `false` if
/// it did not apply (a gone or revoked connection, or replaced credentials).
pub async fn record_check(store: &Store, id: ConnectionId, update: StatusUpdate) -> bool {
    let health = HealthRecord {
        connection_id: id,
        checked_at: update.checked_at,
        status: update.status,
        code: None,
        latency_ms: update.latency_ms,
        message: update.status_message.clone(),
    };
    store.record_check(id, update, health, None).await.unwrap()
}
