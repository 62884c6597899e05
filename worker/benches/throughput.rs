//! Worker throughput and rate-limit benchmark (not a test: it prints numbers and ratios).
//!
//! Run: `cargo bench -p tradeeon-worker --bench throughput` (PostgreSQL at
//! `TEST_DATABASE_ADMIN_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! `BENCH_JOBS` (default 2000) sets the job count of the throughput runs.
//!
//! 1. Baseline: apalis on the same PostgreSQL queue running a no-op handler, same concurrency.
//! 2. Ours: `test` jobs end to end — claim the record, decrypt, sign, real HTTP to the simulated
//!    Binance, settle — with our own rate limits off. Goal ≥ 0.8 × the baseline.
//! 3. Limiter: a Binance `/sapi` budget of 120 weight/min, more checks queued than it allows,
//!    for `LIMITER_SECONDS` (default 150): requests per complete calendar minute after the first
//!    (which holds governor's burst) against the budget (goal ≥ 0.95) and the 429s the simulator
//!    sent (goal 0).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tradeeon_shared::config::{ExchangeEndpoints, WorkerConfig};
use tradeeon_shared::domain::{Exchange, UserId};
use tradeeon_shared::jobs::{JobId, JobPayload, JobTicket, NewJob};
use tradeeon_shared::store::{EncryptedCredentials, Store, UserContext};
use tradeeon_shared::vault::{Keyring, SecretValue};
use tradeeon_simulator::{SimState, Simulator, binance as sim_binance};
use tradeeon_worker::jobs::JobEnv;
use tradeeon_worker::runtime::{self, RuntimeSettings};

/// Jobs run at once, by the baseline and by ours: `BENCH_CONCURRENCY`, default the worker's own
/// default (`WORKER_CONCURRENCY`).
fn concurrency() -> usize {
    std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| tradeeon_worker::runtime::RuntimeSettings::default().concurrency)
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn create_database() -> anyhow::Result<(String, String)> {
    let name = format!("tradeeon_bench_{}", ulid::Ulid::generate().to_string().to_lowercase());
    let mut admin = PgConnection::connect(&admin_url()).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    let mut url = url::Url::parse(&admin_url())?;
    url.set_path(&name);
    Ok((name, url.to_string()))
}

async fn drop_database(name: &str) {
    if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
            .execute(&mut admin)
            .await;
    }
}

fn endpoints(sim: &Simulator) -> ExchangeEndpoints {
    let env = sim.urls.as_env();
    let map: HashMap<&str, &str> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ExchangeEndpoints::from_source(&map).expect("simulator endpoints")
}

/// apalis alone: `n` tickets through a no-op handler on the same database and concurrency.
async fn baseline(store: &Store, n: usize) -> anyhow::Result<f64> {
    let pool = store.pg_pool().expect("PostgreSQL");
    let queue = "bench-noop";
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let tasks = chunk
            .iter()
            .map(|_| TaskBuilder::new(serde_json::to_vec(&JobTicket { job_id: JobId::new() }).unwrap()).build())
            .collect();
        let mut conn = pool.acquire().await?;
        apalis_postgres::queries::push_tasks(&mut *conn, queue, tasks).await?;
    }
    let done = Arc::new(AtomicUsize::new(0));
    async fn noop(_: JobTicket, done: Data<Arc<AtomicUsize>>) -> Result<(), BoxDynError> {
        done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    let config = apalis_postgres::Config::default().queue(queue).batch_size(concurrency());
    let backend = apalis_postgres::PostgresStorage::<JobTicket>::new(pool)
        .with_config(config)
        .with_pubsub()
        .poll_with_interval(Duration::from_millis(50));
    let started = Instant::now();
    let watch = done.clone();
    WorkerBuilder::new("bench-noop")
        .backend(backend)
        .data(done.clone())
        .concurrency(concurrency())
        .build(noop)
        .run_until(async move {
            while watch.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<(), WorkerError>(())
        })
        .await?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Enqueues `n` Binance `test` jobs and runs the real job runner until all have settled.
async fn run_test_jobs(store: &Store, env: Arc<JobEnv>, keyring: &Keyring, n: usize) -> anyhow::Result<Duration> {
    run_test_jobs_until(store, env, keyring, n, None).await
}

/// Like [`run_test_jobs`], but stops the runner after `limit` whether or not all have settled.
async fn run_test_jobs_for(
    store: &Store,
    env: Arc<JobEnv>,
    keyring: &Keyring,
    n: usize,
    limit: Duration,
) -> anyhow::Result<Duration> {
    run_test_jobs_until(store, env, keyring, n, Some(limit)).await
}

async fn run_test_jobs_until(
    store: &Store,
    env: Arc<JobEnv>,
    keyring: &Keyring,
    n: usize,
    limit: Option<Duration>,
) -> anyhow::Result<Duration> {
    let user = UserContext { user_id: UserId::new_random(), email: None };
    store.ensure_user(&user).await?;
    let encrypt = |v: &str| keyring.encrypt(&SecretValue::new(v.to_string())).into_inner();
    let credentials = EncryptedCredentials {
        api_key: encrypt(sim_binance::SEEDED_FULL_KEY),
        api_secret: encrypt(sim_binance::SEEDED_FULL_SECRET),
        passphrase: None,
    };
    let jobs: Vec<NewJob> = (0..n)
        .map(|_| {
            NewJob::new(
                user.user_id,
                Exchange::Binance,
                JobPayload::Test { exchange: Exchange::Binance, credentials: credentials.clone() },
            )
        })
        .collect();
    for chunk in jobs.chunks(500) {
        store.enqueue_jobs(chunk).await?;
    }
    let settings = RuntimeSettings {
        concurrency: concurrency(),
        poll_interval: Duration::from_millis(50),
        ..RuntimeSettings::default()
    };
    let started = Instant::now();
    let watch = store.clone();
    runtime::run_queue(env, None, settings, async move {
        loop {
            if limit.is_some_and(|limit| started.elapsed() >= limit) {
                return;
            }
            match watch.queue_stats().await {
                Ok(s) if s.queued + s.running + s.scheduled == 0 => return,
                // Not much more often: this count is a query, and it loads the same database.
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await?;
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let (name, url) = create_database().await?;
    let result = async {
        let store = Store::connect(&url, 24).await?;
        store.migrate().await?;
        let sim = Simulator::start(Arc::new(SimState::seeded())).await?;
        let keyring = Arc::new(Keyring::parse(&Keyring::generate_key())?);

        let base = baseline(&store, n).await?;
        println!("baseline  apalis no-op handler        : {base:>8.0} jobs/s  ({n} jobs, concurrency {})", concurrency());

        let mut unlimited = WorkerConfig::default();
        unlimited.rate_limits.enabled = false;
        let env = Arc::new(JobEnv::from_config(store.clone(), keyring.clone(), &endpoints(&sim), &unlimited)?);
        let elapsed = run_test_jobs(&store, env, &keyring, n).await?;
        let ours = n as f64 / elapsed.as_secs_f64();
        println!("tradeeon  test jobs (limits off)       : {ours:>8.0} jobs/s  ratio {:.2} (goal >= 0.80)", ours / base);
        let pool = store.pg_pool().expect("PostgreSQL");
        let codes: Vec<(Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT result->>'code', count(*), count(*) FILTER (WHERE attempts > 1) FROM tradeeon_jobs GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(pool)
        .await?;
        println!("          results (code, jobs, of them retried): {codes:?}");
        // Where a job's claim and settle spend their time: waiting for a statement (a free lane,
        // a pooled connection and sqlx's liveness check of it), then the statement itself.
        for stats in store.coalesced_statements().iter().filter(|s| s.calls > 0) {
            println!("          {}", stats.summary());
        }
        // Claims are meant to be HOT updates (no index work; see the lean_job_indexes migration).
        // The statistics arrive within a second or so.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (updates, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'tradeeon_jobs'",
        )
        .fetch_one(pool)
        .await?;
        println!("          job record updates: {updates}, of them HOT: {hot} ({:.0} %)", 100.0 * hot as f64 / updates.max(1) as f64);

        // The limiter: 120 /sapi weight per minute (2 checks/s). Binance counts weight per
        // calendar minute and so does our pause at the budget; governor lets the first minute's
        // burst through at once. So the achieved rate is counted per complete calendar minute
        // after the first (which holds the burst), over LIMITER_SECONDS (default 150 s), with
        // more checks queued than the budget can take.
        let mut limited = WorkerConfig::default();
        limited.rate_limits.binance_sapi_weight_per_minute = 120;
        let per_minute = 120.0;
        let seconds: u64 = std::env::var("LIMITER_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
        let checks = 120 + 2 * seconds as usize + 60;
        sim.state.faults.clear_log();
        let (wall0, instant0) = (std::time::SystemTime::now(), Instant::now());
        let env = Arc::new(JobEnv::from_config(store.clone(), keyring.clone(), &endpoints(&sim), &limited)?);
        run_test_jobs_for(&store, env, &keyring, checks, Duration::from_secs(seconds)).await?;
        let requests = sim.state.faults.requests(Exchange::Binance);
        let limited_429 = requests.iter().filter(|r| r.status == 429 || r.status == 418).count();
        let minute_of = |at: Instant| {
            let wall = wall0 + at.duration_since(instant0);
            wall.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() / 60
        };
        let first = requests.iter().map(|r| minute_of(r.at)).min().expect("requests were sent");
        let end = minute_of(instant0 + Duration::from_secs(seconds));
        let mut per_complete_minute = Vec::new();
        for minute in first + 1..end {
            per_complete_minute.push(requests.iter().filter(|r| minute_of(r.at) == minute).count());
        }
        let worst = per_complete_minute.iter().copied().min();
        println!(
            "limiter   {per_minute}/min budget, {seconds} s: {} requests; per complete calendar minute after the burst: {per_complete_minute:?} = worst {} x budget (goal >= 0.95); {limited_429} x 429/418 (goal 0)",
            requests.len(),
            worst.map_or("n/a (run longer)".to_string(), |w| format!("{:.2}", w as f64 / per_minute)),
        );
        store.close().await;
        anyhow::Ok(())
    }
    .await;
    drop_database(&name).await;
    result
}
