//! Several `tradeeon worker` processes on one PostgreSQL database: each health-sweep slot is swept
//! exactly once, and SIGTERM stops every worker cleanly.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tradeeon_shared::domain::{ApiKeyHint, Exchange, UserId};
use tradeeon_shared::store::{EncryptedCredentials, NewConnection, Store, UserContext, sweep_job_key};
use tradeeon_shared::vault::{Keyring, SecretValue};
use tradeeon_simulator::{SimState, Simulator, binance as sim_binance};

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own, dropped when the guard goes.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Self {
        let name = format!("tradeeon_test_{}", ulid::Ulid::generate().to_string().to_lowercase());
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin connection");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(&name);
        Self { name, url: url.to_string() }
    }

    async fn drop_now(self) {
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin connection");
        let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut admin)
            .await;
    }
}

fn spawn_worker(db: &TestDatabase, key: &str, sim: &Simulator) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tradeeon"));
    cmd.arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("ENCRYPTION_KEY", key)
        .env("HEALTH_SWEEP_INTERVAL", "1s")
        .env("WORKER_METRICS_PORT", "0")
        .env("METRICS_PUBLISHER", "none")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (variable, value) in sim.urls.as_env() {
        cmd.env(variable, value);
    }
    cmd.spawn().expect("spawn tradeeon worker")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "worker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn three_worker_processes_sweep_each_slot_exactly_once() {
    let db = TestDatabase::create().await;
    let key = Keyring::generate_key();
    let keyring = Keyring::parse(&key).unwrap();
    let store = Store::connect(&db.url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();

    // Four users with a Binance connection each (the seeded key, encrypted as the API would).
    let encrypt = |v: &str| keyring.encrypt(&SecretValue::new(v.to_string())).into_inner();
    let mut connections = Vec::new();
    for _ in 0..4 {
        let user = UserContext { user_id: UserId::new_random(), email: None };
        store.ensure_user(&user).await.unwrap();
        let new = NewConnection {
            exchange: Exchange::Binance,
            credentials: EncryptedCredentials {
                api_key: encrypt(sim_binance::SEEDED_FULL_KEY),
                api_secret: encrypt(sim_binance::SEEDED_FULL_SECRET),
                passphrase: None,
            },
            nickname: None,
            api_key_hint: ApiKeyHint::from_api_key(sim_binance::SEEDED_FULL_KEY),
        };
        connections.push(store.upsert_connection(&user, new, None).await.unwrap().id);
    }

    let mut workers: Vec<Child> = (0..3).map(|_| spawn_worker(&db, &key, &sim)).collect();
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let statuses: Vec<_> = workers.iter_mut().map(terminate).collect();
    for status in &statuses {
        assert!(status.success(), "a worker exited with {status:?}");
    }

    let pool = store.pg_pool().unwrap();
    let slots: Vec<(DateTime<Utc>, String)> =
        sqlx::query_as("SELECT slot, owner FROM health_sweeps ORDER BY slot").fetch_all(pool).await.unwrap();
    assert!(slots.len() >= 3, "several one-second slots were swept: {slots:?}");
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM tradeeon_jobs WHERE kind = 'health_check'")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(keys.len(), slots.len() * connections.len(), "one check per connection per slot, no more");
    for (slot, _) in &slots {
        for connection in &connections {
            assert!(keys.contains(&sweep_job_key(*slot, *connection)), "slot {slot} missed {connection}");
        }
    }
    // The workers really ran the checks against the simulator.
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tradeeon_jobs WHERE kind = 'health_check' AND status = 'done'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(done >= connections.len() as i64, "checks ran: {done}");
    assert!(!sim.state.faults.requests(Exchange::Binance).is_empty());

    store.close().await;
    db.drop_now().await;
}
