//! Load generator for `bench/api.sh` (not a test): runs the API in-process on PostgreSQL and
//! drives it over real HTTP on loopback with N concurrent clients.
//!
//! Phase 1: `POST /connections/test` (authenticate, validate, encrypt, audit row + job record +
//! apalis ticket in one transaction) — throughput and p50/p99 latency.
//! Phase 2: `GET /jobs/{id}` on the jobs phase 1 created — throughput and p50/p99.
//!
//! `cargo run --release -p tradeeon-api --example bench_api -- DATABASE_URL [CLIENTS] [SECONDS] [POOL]`
//! The database must exist; it is migrated here. No worker runs, so the jobs stay queued.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tradeeon_shared::config::Config;
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;

/// The allocator of the `tradeeon` binary, so the server here runs as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const JWT_SECRET: &str = "bench-supabase-jwt-secret-0123456789abcdef";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let database_url = args
        .get(1)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("usage: bench_api DATABASE_URL [CLIENTS] [SECONDS] [POOL]"))?;
    let clients: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let pool: u32 = args.get(4).map_or(Ok(10), |s| s.parse())?;

    // The server gets a runtime of its own, as it would in its own process.
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("api-server").enable_all().build()?;
    let (addr, store) = server_rt.block_on(start_server(&database_url, pool))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-client")
        .enable_all()
        .build()?;
    client_rt.block_on(drive(addr, clients, Duration::from_secs(seconds), pool, &store))?;
    server_rt.block_on(store.close());
    Ok(())
}

async fn start_server(database_url: &str, pool: u32) -> anyhow::Result<(std::net::SocketAddr, Store)> {
    let store = Store::connect(database_url, pool).await?;
    store.migrate().await?;
    let pool_text = pool.to_string();
    let vars: HashMap<&str, &str> = HashMap::from([
        ("DATABASE_URL", database_url),
        ("DATABASE_MAX_CONNECTIONS", pool_text.as_str()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET),
        // The benchmark measures throughput, not the per-user write budget.
        ("API_USER_RATE_LIMIT_PER_MINUTE", "1000000000"),
    ]);
    let config = Config::from_source(&vars)?;
    let keyring = Arc::new(Keyring::parse(&Keyring::generate_key())?);
    let state = tradeeon_api::AppState::new(&config, store.clone(), keyring, prometheus::Registry::new())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(tradeeon_api::run(listener, state, std::future::pending()));
    Ok((addr, store))
}

fn token(user: uuid::Uuid) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({ "sub": user.to_string(), "aud": "authenticated", "email": format!("{user}@bench.test"), "exp": now + 3600 });
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(JWT_SECRET.as_bytes())).expect("token")
}

struct Phase {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Phase {
    fn report(&mut self, name: &str) -> f64 {
        self.latencies.sort();
        let pct = |p: f64| {
            self.latencies
                .get(((self.latencies.len() as f64 * p) as usize).min(self.latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let rps = self.requests as f64 / self.elapsed.as_secs_f64();
        println!(
            "{name}: {} requests in {:.1} s = {rps:.0} req/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} errors",
            self.requests,
            self.elapsed.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            self.errors,
        );
        rps
    }
}

/// Runs `clients` loops of `request` for `duration` after a one-second warm-up.
async fn phase<F, Fut>(clients: usize, duration: Duration, request: F) -> Phase
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut i) = (Vec::new(), 0usize, 0usize);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = request(client, i).await;
                i += 1;
                if sent >= measure_from {
                    latencies.push(sent.elapsed());
                    errors += usize::from(!ok);
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Phase { requests: 0, errors: 0, elapsed: duration, latencies: Vec::new() };
    for task in tasks {
        let (latencies, errors) = task.await.expect("client task");
        all.requests += latencies.len();
        all.errors += errors;
        all.latencies.extend(latencies);
    }
    all
}

async fn drive(
    addr: std::net::SocketAddr,
    clients: usize,
    duration: Duration,
    pool: u32,
    store: &Store,
) -> anyhow::Result<()> {
    let base = format!("http://{addr}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let tokens: Arc<Vec<String>> = Arc::new((0..clients).map(|_| token(uuid::Uuid::new_v4())).collect());
    println!("API bench: {clients} clients, {} s per phase, pool {pool} connections", duration.as_secs());

    let job_ids = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (h, b, t, j) = (http.clone(), base.clone(), tokens.clone(), job_ids.clone());
    let mut post = phase(clients, duration, move |client, i| {
        let (h, b, t, j) = (h.clone(), b.clone(), t.clone(), j.clone());
        async move {
            let body = json!({ "exchange": "binance", "api_key": format!("benchkey{client}x{i}"), "api_secret": "benchsecret" });
            let Ok(response) = h.post(format!("{b}/connections/test")).bearer_auth(&t[client]).json(&body).send().await else {
                return false;
            };
            if response.status() != 202 {
                return false;
            }
            let Ok(value) = response.json::<serde_json::Value>().await else { return false };
            if let Some(id) = value["job"]["id"].as_str() {
                j.lock().unwrap().push(format!("{client}:{id}"));
            }
            true
        }
    })
    .await;
    post.report("POST /connections/test");
    print_coalescing(store);

    let jobs: Vec<Vec<String>> = {
        let all = job_ids.lock().unwrap();
        (0..clients)
            .map(|c| all.iter().filter_map(|e| e.strip_prefix(&format!("{c}:")).map(str::to_owned)).collect())
            .collect()
    };
    let jobs = Arc::new(jobs);
    let (h, b, t) = (http.clone(), base.clone(), tokens.clone());
    let mut get = phase(clients, duration, move |client, i| {
        let (h, b, t, jobs) = (h.clone(), b.clone(), t.clone(), jobs.clone());
        async move {
            let mine = &jobs[client];
            if mine.is_empty() {
                return false;
            }
            let id = &mine[i % mine.len()];
            match h.get(format!("{b}/jobs/{id}")).bearer_auth(&t[client]).send().await {
                Ok(response) => response.status() == 200 && response.bytes().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    get.report("GET /jobs/{id}");
    print_coalescing(store);
    Ok(())
}

/// How many requests shared each statement (see `store::coalesce`), so far.
fn print_coalescing(store: &Store) {
    let shared: Vec<String> = store
        .coalesced_statements()
        .iter()
        .filter(|s| s.calls > 0)
        .map(|s| format!("{} calls in {} statements ({})", s.calls, s.statements, s.summary()))
        .collect();
    println!("  coalesced: {}", shared.join("; "));
}
