//! Worker throughput and rate-limit benchmark (not a test: it prints numbers and ratios).
//!
//! Run: `cargo bench -p tradeeon-worker --bench throughput` (PostgreSQL at
//! `TEST_DATABASE_ADMIN_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! `BENCH_JOBS` (default 5000) sets the job count of each throughput run, `BENCH_ROUNDS`
//! (default 3) how many rounds of the two runs below.
//!
//! 1. Baseline: apalis on the same PostgreSQL queue running a no-op handler, same concurrency.
//! 2. Ours: `test` jobs end to end — claim the record, decrypt, sign, real HTTP to the simulated
//!    Binance, settle — with our own rate limits off. Printed as the ratio to the baseline, the
//!    median of the rounds' ratios (a single run's ratio varies by ±0.1 on the 2-core box): a
//!    measurement to compare changes by.
//! 3. Limiter: a Binance `/sapi` budget of 120 weight/min, more checks queued than it allows,
//!    for `LIMITER_SECONDS` (default 150): requests per complete calendar minute after the first
//!    (which holds governor's burst) against the budget (goal ≥ 0.95) and the 429s the simulator
//!    sent (goal 0).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tradeeon_shared::config::{self, ExchangeEndpoints, WorkerConfig};
use tradeeon_shared::domain::{Exchange, UserId};
use tradeeon_shared::jobs::{JobId, JobKind, JobPayload, JobTicket, NewJob, Requester};
use tradeeon_shared::store::{EncryptedCredentials, Store, UserContext};
use tradeeon_shared::vault::{Keyring, SecretValue};
use tradeeon_simulator::{SimState, Simulator, binance as sim_binance};
use tradeeon_worker::jobs::JobEnv;
use tradeeon_worker::metrics::{WorkerMetrics, outcome};
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
    config::from_vars(&map).expect("simulator endpoints")
}

/// A stopwatch for a run that ends when a watched count reaches its target: the time the
/// count was first seen there, polled every 5 ms on both sides of the comparison alike (the
/// runner's own shutdown afterwards is not part of the figure).
#[derive(Clone, Default)]
struct Finish(Arc<Mutex<Option<Instant>>>);

impl Finish {
    /// Resolves once `count()` reaches `target`, noting when.
    async fn when(&self, target: usize, count: impl Fn() -> usize) {
        while count() < target {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *self.0.lock().unwrap() = Some(Instant::now());
    }

    fn since(&self, started: Instant) -> Duration {
        self.0.lock().unwrap().expect("the run finished").duration_since(started)
    }
}

/// Earlier runs leave dead rows behind in the queue's tables (every ticket is deleted or
/// updated several times, and autovacuum would set to work on them during the next run):
/// vacuumed before each run, every run starts as the first one does.
async fn settle_database(store: &Store) -> anyhow::Result<()> {
    let pool = store.pg_pool().expect("PostgreSQL");
    sqlx::query("VACUUM (ANALYZE) apalis.jobs, public.tradeeon_jobs").execute(pool).await?;
    Ok(())
}

/// apalis alone: `n` tickets through a no-op handler on the same database and concurrency,
/// jobs/s from the worker's start until the `n`-th handler returned.
async fn baseline(store: &Store, n: usize) -> anyhow::Result<f64> {
    // The pool the worker's own queue backend runs on, too.
    let pool = store.queue_pg_pool().expect("PostgreSQL");
    let queue = "bench-noop";
    // apalis keeps done tickets, and its fetches and acknowledgements slow down as they pile
    // up: every round starts from an empty queue, as the first does.
    sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1").bind(queue).execute(pool).await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let tasks = chunk
            .iter()
            .map(|_| TaskBuilder::new(serde_json::to_vec(&JobTicket { job_id: JobId::new() }).unwrap()).build())
            .collect();
        let mut conn = pool.acquire().await?;
        apalis_postgres::queries::push_tasks(&mut *conn, queue, tasks).await?;
    }
    settle_database(store).await?;
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
    let finish = Finish::default();
    let (watch, stop) = (done.clone(), finish.clone());
    let started = Instant::now();
    // A new name per run: apalis refuses a worker name whose heartbeat is recent.
    WorkerBuilder::new(format!("bench-noop-{}", ulid::Ulid::generate()))
        .backend(backend)
        .data(done.clone())
        .concurrency(concurrency())
        .build(noop)
        .run_until(async move {
            stop.when(n, || watch.load(Ordering::SeqCst)).await;
            Ok::<(), WorkerError>(())
        })
        .await?;
    Ok(n as f64 / finish.since(started).as_secs_f64())
}

/// How many users the benchmark's jobs belong to.
const BENCH_USERS: usize = 64;

/// Enqueues `n` Binance `test` jobs with the simulator's full-permission key, round robin over
/// [`BENCH_USERS`] users.
async fn enqueue_test_jobs(store: &Store, keyring: &Keyring, n: usize) -> anyhow::Result<()> {
    // Many users' tests, as in service: each settle locks its jobs' owners (`FOR KEY SHARE`, the
    // audit entry's foreign key), and one owner shared by every job turns the concurrent settles'
    // locks into multixacts, which a queue of many users' jobs never pays at this rate.
    let mut users = Vec::with_capacity(BENCH_USERS);
    for _ in 0..BENCH_USERS {
        let user = UserContext { user_id: UserId::new_random(), email: None };
        store.ensure_user(&user).await?;
        users.push(user.user_id);
    }
    let encrypt = |v: &str| keyring.encrypt(&SecretValue::new(v.to_string())).into_inner();
    let credentials = EncryptedCredentials {
        api_key: encrypt(sim_binance::SEEDED_FULL_KEY),
        api_secret: encrypt(sim_binance::SEEDED_FULL_SECRET),
        passphrase: None,
    };
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| {
            NewJob::new(
                users[i % users.len()],
                Exchange::Binance,
                // As the API enqueues them: the settle writes each one's `tested` audit entry.
                JobPayload::Test {
                    exchange: Exchange::Binance,
                    credentials: credentials.clone(),
                    requested_by: Some(Requester {
                        ip_address: Some(std::net::IpAddr::from([127, 0, 0, 1])),
                        user_agent: Some("bench".into()),
                    }),
                },
            )
        })
        .collect();
    for chunk in jobs.chunks(500) {
        store.enqueue_jobs(chunk).await?;
    }
    Ok(())
}

fn bench_settings() -> RuntimeSettings {
    RuntimeSettings {
        concurrency: concurrency(),
        poll_interval: Duration::from_millis(50),
        ..RuntimeSettings::default()
    }
}

/// Enqueues `n` Binance `test` jobs and runs the real job runner until all have finished;
/// jobs/s from the runner's start until the `n`-th job reached its verdict.
async fn run_test_jobs(store: &Store, env: Arc<JobEnv>, keyring: &Keyring, n: usize) -> anyhow::Result<f64> {
    enqueue_test_jobs(store, keyring, n).await?;
    settle_database(store).await?;
    let metrics = WorkerMetrics::register(&prometheus::Registry::new())?;
    let finish = Finish::default();
    let (watch, stop) = (metrics.clone(), finish.clone());
    let finished = move || {
        (watch.jobs_finished(JobKind::Test, outcome::DONE) + watch.jobs_finished(JobKind::Test, outcome::FAILED))
            as usize
    };
    let started = Instant::now();
    runtime::run_queue(env, Some(metrics), bench_settings(), async move { stop.when(n, finished).await }).await?;
    Ok(n as f64 / finish.since(started).as_secs_f64())
}

/// Enqueues `n` Binance `test` jobs and runs the real job runner for `limit`, or until all
/// have settled.
async fn run_test_jobs_for(
    store: &Store,
    env: Arc<JobEnv>,
    keyring: &Keyring,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    enqueue_test_jobs(store, keyring, n).await?;
    let started = Instant::now();
    let watch = store.clone();
    runtime::run_queue(env, None, bench_settings(), async move {
        while started.elapsed() < limit {
            match watch.queue_stats().await {
                Ok(s) if s.queued + s.running + s.scheduled == 0 => return,
                // Not much more often: this count is a query, and it loads the same database.
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let (name, url) = create_database().await?;
    let result = async {
        let store = Store::connect(&url, 24).await?;
        store.migrate().await?;
        let sim = Simulator::start(Arc::new(SimState::seeded())).await?;
        let keyring = Arc::new(Keyring::parse(&Keyring::generate_key())?);

        // Rounds alternate which side runs first, so that a drift of the machine's speed over
        // the run does not favour either; each round of ours gets a fresh simulator (Binance
        // counts request weight per IP and minute, and rounds back to back would reach its
        // limit) and so a fresh worker environment.
        let mut ratios = Vec::with_capacity(rounds);
        for round in 1..=rounds {
            let sim = Simulator::start(Arc::new(SimState::seeded())).await?;
            let mut unlimited = WorkerConfig::default();
            unlimited.rate_limits.enabled = false;
            let env = Arc::new(JobEnv::from_config(store.clone(), keyring.clone(), &endpoints(&sim), &unlimited)?);
            let (base, ours) = if round % 2 == 1 {
                let base = baseline(&store, n).await?;
                (base, run_test_jobs(&store, env, &keyring, n).await?)
            } else {
                let ours = run_test_jobs(&store, env, &keyring, n).await?;
                (baseline(&store, n).await?, ours)
            };
            println!(
                "round {round}   baseline (apalis no-op handler) {base:>6.0} jobs/s   tradeeon (test jobs, limits off) {ours:>6.0} jobs/s   ratio {:.2}",
                ours / base
            );
            ratios.push(ours / base);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "worker    median ratio over {rounds} rounds: {:.2}; {n} jobs per run, concurrency {}",
            ratios[ratios.len() / 2],
            concurrency()
        );
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
        let all_requests = sim.state.faults.requests(Exchange::Binance);
        let limited_429 = all_requests.iter().filter(|r| r.status == 429 || r.status == 418).count();
        // The budget is the `/sapi` bucket's; anything else (a time resync) is another bucket.
        let (requests, other): (Vec<_>, Vec<_>) = all_requests.into_iter().partition(|r| r.path.starts_with("/sapi/"));
        let rejected = requests.iter().filter(|r| r.status != 200).count();
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
            "limiter   {per_minute}/min budget, {seconds} s: {} /sapi requests; per complete calendar minute after the burst: {per_complete_minute:?} = worst {} x budget (goal >= 0.95); {limited_429} x 429/418 (goal 0)",
            requests.len(),
            worst.map_or("n/a (run longer)".to_string(), |w| format!("{:.2}", w as f64 / per_minute)),
        );
        println!(
            "          of them answered with an error: {rejected}; other Binance requests: {} (goal 0 and 0: every request the budget paid for was a check)",
            other.len()
        );
        store.close().await;
        anyhow::Ok(())
    }
    .await;
    drop_database(&name).await;
    result
}
