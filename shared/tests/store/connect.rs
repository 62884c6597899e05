//! `Store::connect`: URL schemes, error messages, SQLite files.
//!
//! (Named so it sorts early: the unreachable-server case waits out the pool's acquire timeout,
//! and starting it first keeps it off the end of the run.)

use tradeeon_shared::domain::Exchange;
use tradeeon_shared::store::{Backend, Store, StoreError};

use crate::harness::{self, new_connection};

#[tokio::test]
async fn sqlite_memory_url_works() {
    let store = Store::connect("sqlite::memory:", 8).await.unwrap();
    assert_eq!(store.backend(), Backend::Sqlite);
    store.migrate().await.unwrap();
    let user = harness::user(&store).await;
    let record = store.upsert_connection(&user, new_connection(Exchange::Kraken, "m"), None).await.unwrap();
    assert_eq!(store.list_connections(&user).await.unwrap(), vec![record]);
}

#[tokio::test]
async fn unsupported_url_names_database_url_and_hides_credentials() {
    for url in ["mysql://admin:hunter2@db.internal/prod", "admin:hunter2@localhost:5432", ""] {
        let err = Store::connect(url, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedUrl { .. }), "{url}: {err:?}");
        let message = err.to_string();
        assert!(message.contains("DATABASE_URL"), "{message}");
        assert!(message.contains("sqlite://") && message.contains("postgres://"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
    let err = Store::connect("mysql://admin:hunter2@db.internal/prod", 1).await.unwrap_err();
    assert!(err.to_string().contains("`mysql`"), "{err}");
}

#[tokio::test]
async fn unreachable_postgres_is_an_error_with_context() {
    let err = Store::connect("postgres://postgres:hunter2@127.0.0.1:1/nowhere", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Connect { backend: Backend::Postgres, .. }), "{err:?}");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(chain.contains("DATABASE_URL"), "{chain}");
    assert!(!chain.contains("hunter2"), "{chain}");
}

#[tokio::test]
async fn sqlite_creates_missing_parent_directories() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c/tradeeon.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()), 2).await.unwrap();
    store.migrate().await.unwrap();
    assert!(path.exists());
    store.close().await;
}
