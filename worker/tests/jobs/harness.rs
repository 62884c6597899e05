//! Runs one case against a fresh database of either backend (as in `shared/tests/store`).
//!
//! * SQLite: a file in a temporary directory.
//! * PostgreSQL: `CREATE DATABASE tradeeon_test_<ulid>` through the admin URL
//!   (`TEST_DATABASE_ADMIN_URL`, default [`DEFAULT_ADMIN_URL`]), dropped `WITH (FORCE)` when the
//!   case ends, also when it panics (the case runs in its own task).

use std::future::Future;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tradeeon_shared::store::Store;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DB_PREFIX: &str = "tradeeon_test_";
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// Generates `mod <case> { fn postgres(); fn sqlite() }` for each `async fn <case>(Store)`.
macro_rules! both_backends {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                crate::harness::run_postgres(super::$case).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                crate::harness::run_sqlite(super::$case).await;
            }
        }
    )+};
}

/// For cases about several processes sharing one PostgreSQL database: `async fn <case>(url)`.
macro_rules! postgres_url_only {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                crate::harness::with_postgres_database(super::$case).await;
            }
        }
    )+};
}

/// Connects and migrates a store for `url`.
pub async fn connect(url: &str) -> Store {
    let store = Store::connect(url, 5).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

async fn connect_and_run<F, Fut>(url: String, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = connect(&url).await;
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
    let url = format!("sqlite://{}/tradeeon.db", dir.path().display());
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
