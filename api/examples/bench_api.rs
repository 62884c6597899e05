//! Load generator for `bench/api.sh` (not a test): runs the API in-process on PostgreSQL and
//! drives it over real HTTP on loopback with N concurrent clients.
//!
//! Phase 1: `POST /connections/test` (authenticate, validate, encrypt, audit row + job record +
//! apalis ticket in one transaction) — throughput and p50/p99 latency.
//! Phase 2: `GET /jobs/{id}` on the jobs phase 1 created — throughput and p50/p99.
//!
//! `cargo run --release -p tradeeon-api --example bench_api -- DATABASE_URL [CLIENTS] [SECONDS] [POOL] [all|post]`
//! The database must exist; it is migrated here. No worker runs, so the jobs stay queued.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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
        .ok_or_else(|| anyhow::anyhow!("usage: bench_api DATABASE_URL [CLIENTS] [SECONDS] [POOL] [all|post]"))?;
    let clients: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let seconds: u64 = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let pool: u32 = args.get(4).map_or(Ok(10), |s| s.parse())?;
    // `post`: the first phase only (the script's rounds); `all` (default): both phases.
    let with_get = match args.get(5).map(String::as_str) {
        None | Some("all") => true,
        Some("post") => false,
        Some(other) => anyhow::bail!("unknown phases {other:?}: `all` or `post`"),
    };

    // The server gets a runtime of its own, as it would in its own process.
    let server_rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("api-server").enable_all().build()?;
    let (addr, store) = server_rt.block_on(start_server(&database_url, pool))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-client")
        .enable_all()
        .build()?;
    client_rt.block_on(drive(addr, clients, Duration::from_secs(seconds), pool, with_get, &store))?;
    server_rt.block_on(store.close());
    Ok(())
}

async fn start_server(database_url: &str, pool: u32) -> anyhow::Result<(SocketAddr, Store)> {
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
    let config: Config = tradeeon_shared::config::from_vars(&vars)?;
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

/// One keep-alive HTTP/1.1 connection of a client, as lean as a load generator can be (as wrk
/// is): the request goes out as prepared bytes and the response is parsed in place. The
/// generator shares the two cores with the server and PostgreSQL, so every microsecond it spends
/// per request is taken from what is measured; pgbench's own client is as lean.
struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buffer: Vec::with_capacity(8192) })
    }

    /// Sends one request and reads its response: the status and the body. The server always
    /// answers with a `Content-Length` (axum's JSON bodies are whole).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, &[u8])> {
        use std::io::{Error, ErrorKind};
        self.stream.write_all(request).await?;
        self.buffer.clear();
        loop {
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "the server closed the connection"));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(head) =
                response.parse(&self.buffer).map_err(|e| Error::new(ErrorKind::InvalidData, e))?
            else {
                continue;
            };
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "a response without Content-Length"))?;
            let status = response.code.unwrap_or_default();
            if self.buffer.len() >= head + length {
                return Ok((status, &self.buffer[head..head + length]));
            }
        }
    }
}

/// The request line and headers of a request with `body` (empty for a GET).
fn request_bytes(method: &str, path: &str, token: &str, body: &str) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n");
    if !body.is_empty() {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request.into_bytes()
}

/// Runs one connection per client, each sending `request(client, i)` after the previous answer,
/// for `duration` after a one-second warm-up. `request` returns the bytes to send and what to do
/// with the answer (`true`: as expected).
async fn phase<R, C>(addr: SocketAddr, clients: usize, duration: Duration, request: R, check: C) -> Phase
where
    R: Fn(usize, usize) -> Vec<u8> + Send + Sync + 'static,
    C: Fn(usize, u16, &[u8]) -> bool + Send + Sync + 'static,
{
    let (request, check) = (Arc::new(request), Arc::new(check));
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (request, check) = (request.clone(), check.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut i) = (Vec::new(), 0usize, 0usize);
            let mut connection = Connection::open(addr).await.expect("connect to the API");
            loop {
                let bytes = request(client, i);
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = match connection.exchange(&bytes).await {
                    Ok((status, body)) => check(client, status, body),
                    Err(err) => {
                        eprintln!("client {client}: {err}; reconnecting");
                        connection = Connection::open(addr).await.expect("reconnect to the API");
                        false
                    }
                };
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

/// The part of `POST /connections/test`'s answer the second phase needs.
#[derive(serde::Deserialize)]
struct Accepted {
    job: AcceptedJob,
}

#[derive(serde::Deserialize)]
struct AcceptedJob {
    id: String,
}

async fn drive(
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    pool: u32,
    with_get: bool,
    store: &Store,
) -> anyhow::Result<()> {
    let tokens: Arc<Vec<String>> = Arc::new((0..clients).map(|_| token(uuid::Uuid::new_v4())).collect());
    println!("API bench: {clients} clients, {} s per phase, pool {pool} connections", duration.as_secs());

    // Each client's jobs, for the second phase.
    let job_ids: Arc<Vec<Mutex<Vec<String>>>> = Arc::new((0..clients).map(|_| Mutex::new(Vec::new())).collect());
    let (t, j) = (tokens.clone(), job_ids.clone());
    let mut post = phase(
        addr,
        clients,
        duration,
        move |client, i| {
            let body =
                format!(r#"{{"exchange":"binance","api_key":"benchkey{client}x{i}","api_secret":"benchsecret"}}"#);
            request_bytes("POST", "/connections/test", &t[client], &body)
        },
        move |client, status, body| {
            let Ok(accepted) = serde_json::from_slice::<Accepted>(body) else { return false };
            j[client].lock().unwrap().push(accepted.job.id);
            status == 202
        },
    )
    .await;
    post.report("POST /connections/test");
    print_coalescing(store);
    if !with_get {
        return Ok(());
    }

    let jobs: Arc<Vec<Vec<String>>> =
        Arc::new(job_ids.iter().map(|ids| std::mem::take(&mut *ids.lock().unwrap())).collect());
    if jobs.iter().any(Vec::is_empty) {
        anyhow::bail!("a client created no job in the first phase: nothing to read");
    }
    let t = tokens.clone();
    let mut get = phase(
        addr,
        clients,
        duration,
        move |client, i| {
            let mine = &jobs[client];
            request_bytes("GET", &format!("/jobs/{}", mine[i % mine.len()]), &t[client], "")
        },
        |_, status, _| status == 200,
    )
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
