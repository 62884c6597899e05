//! Connecting, migrating, and the per-connection SQLite settings.

use sqlx::AssertSqlSafe;
use tradeeon_shared::store::{Backend, MIGRATIONS_TABLE, Store};

async fn our_migration_versions(store: &Store) -> Vec<i64> {
    let sql = format!("SELECT version FROM {MIGRATIONS_TABLE} ORDER BY version");
    match store.backend() {
        Backend::Postgres => sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(store.pg_pool().unwrap()).await.unwrap(),
        Backend::Sqlite => {
            sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(store.sqlite_pool().unwrap()).await.unwrap()
        }
    }
}

/// Ours and apalis's migrations are tracked in separate tables, and a second run changes nothing.
async fn migrate_twice_is_a_noop(store: Store) {
    let before = our_migration_versions(&store).await;
    assert!(!before.is_empty());
    let mut files: Vec<i64> = std::fs::read_dir(match store.backend() {
        Backend::Postgres => "../migrations/postgres",
        Backend::Sqlite => "../migrations/sqlite",
    })
    .unwrap()
    .map(|e| e.unwrap().file_name().to_string_lossy().split('_').next().unwrap().parse().unwrap())
    .collect();
    files.sort();
    assert_eq!(before, files, "our table holds exactly our migrations");

    store.migrate().await.expect("second migrate");
    store.ping().await.expect("ping");
    assert_eq!(our_migration_versions(&store).await, before);

    // apalis's tables exist next to ours.
    let apalis_jobs: i64 = match store.backend() {
        Backend::Postgres => {
            sqlx::query_scalar("SELECT count(*) FROM apalis.jobs").fetch_one(store.pg_pool().unwrap()).await.unwrap()
        }
        Backend::Sqlite => {
            sqlx::query_scalar("SELECT count(*) FROM Jobs").fetch_one(store.sqlite_pool().unwrap()).await.unwrap()
        }
    };
    assert_eq!(apalis_jobs, 0);
}

/// Every pooled connection keeps WAL, synchronous=NORMAL, foreign keys and a busy timeout,
/// even though apalis's setup sets synchronous=OFF.
async fn sqlite_pragmas_hold_after_migrate(store: Store) {
    let pool = store.sqlite_pool().unwrap();
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(pool.acquire().await.unwrap());
    }
    for conn in &mut conns {
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut **conn).await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut **conn).await.unwrap();
        let fks: i64 = sqlx::query_scalar("PRAGMA foreign_keys").fetch_one(&mut **conn).await.unwrap();
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut **conn).await.unwrap();
        assert_eq!(synchronous, 1, "synchronous = NORMAL");
        assert_eq!(journal, "wal");
        assert_eq!(fks, 1);
        assert!(busy >= 1000, "busy_timeout {busy}");
    }
}

contract!(migrate_twice_is_a_noop);
sqlite_only!(sqlite_pragmas_hold_after_migrate);
