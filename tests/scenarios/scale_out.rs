//! Scenario 1, scale-out (documented, run on demand): 2 `tradeeon api` + 3 `tradeeon worker`
//! processes on one PostgreSQL database take 5,000 mixed requests (create, test, rotate — good and
//! bad keys —, revoke, poll, list, audit) from 50 users, half on Binance and half on Kraken. Every
//! job reaches `done`/`failed` exactly once, and every connection ends in the state its last
//! accepted request implies (active or revoked, with exactly the keys last accepted, `connected`).
//!
//! ```sh
//! cargo test --release --test scenarios -- --ignored --nocapture scale_out
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use tradeeon_shared::domain::Exchange;

use crate::support::{self, ApiClient, Creds, Figures, Scenario, User, percentile};

const USERS: usize = 50;
const REQUESTS_PER_USER: usize = 100;

/// What one user's requests left behind, for the final checks.
struct Outcome {
    user: User,
    exchange: Exchange,
    /// The keys the connection must hold (`None`: revoked or never created).
    expected: Option<Creds>,
    /// Accepted jobs with the verdict they must reach: `Some(true)` ok, `Some(false)` a refused
    /// key, `None` either (a change overtaken by a revoke).
    jobs: Vec<(String, Option<bool>)>,
    /// (request kind, status, latency)
    requests: Vec<(&'static str, u16, Duration)>,
    /// What the user did, for the diagnosis of a failed check.
    log: Vec<String>,
}

/// A small deterministic generator (xorshift64*), so every run sends the same mix.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % sides
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale-out run (minutes): cargo test --release --test scenarios -- --ignored --nocapture scale_out"]
async fn scale_out() {
    let _serial = support::exclusive().await;
    let s = Arc::new(Scenario::start("scale-out").await);
    let mut figures = Figures::default();
    let ((mut api_a, client_a), (mut api_b, client_b)) =
        tokio::join!(s.spawn_api("api-a", &[]), s.spawn_api("api-b", &[]));
    let (w0, w1, w2) =
        tokio::join!(s.spawn_worker("worker-0", &[]), s.spawn_worker("worker-1", &[]), s.spawn_worker("worker-2", &[]));
    let mut workers = [w0, w1, w2];
    let apis = [client_a, client_b];

    let started = Instant::now();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut users = tokio::task::JoinSet::new();
    for index in 0..USERS {
        let (s, apis, outcomes) = (s.clone(), apis.clone(), outcomes.clone());
        users.spawn(async move {
            let outcome = run_user(&s, &apis, index).await;
            outcomes.lock().unwrap().push(outcome);
        });
    }
    while let Some(joined) = users.join_next().await {
        joined.expect("user task");
    }
    let load_time = started.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    // Every accepted job settles exactly once, with the verdict its keys imply.
    let all_jobs: Vec<String> = outcomes.iter().flat_map(|o| o.jobs.iter().map(|(id, _)| id.clone())).collect();
    let rows = s.wait_settled(&all_jobs, Duration::from_secs(600)).await;
    let drained = started.elapsed();
    // Every discrepancy is collected (with what to read to diagnose it) and reported at the end.
    let mut problems: Vec<String> = Vec::new();
    let mut retried = 0;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for outcome in &outcomes {
        for (id, expect) in &outcome.jobs {
            let row = &rows[id];
            *by_kind.entry(format!("{} {} {}", row.kind, row.status, row.code().unwrap_or("-"))).or_default() += 1;
            if row.attempts > 1 {
                retried += 1;
            }
            let ok = row.code() == Some("ok");
            let as_expected = match expect {
                Some(true) => ok,
                Some(false) => row.status == "done" && !ok,
                None => true,
            };
            if !as_expected {
                let want = if *expect == Some(true) { "ok" } else { "with a refused check" };
                problems.push(format!(
                    "job {id} should have ended {want}: {row:?}\nthe connection's jobs:\n{}",
                    connection_history(&s, id).await
                ));
            }
        }
    }
    figures.jobs_sent = all_jobs.len() as u64;
    figures.completed = rows.values().filter(|r| r.settled()).count() as u64;
    figures.lost = all_jobs.len() as u64 - figures.completed;

    // Every connection ends as its last accepted request implies.
    for outcome in &outcomes {
        let row: Option<(String, bool, String, String, String)> = sqlx::query_as(
            "SELECT id::text, is_active, status, api_key_encrypted, api_secret_encrypted FROM public.exchange_keys
              WHERE user_id = $1::uuid AND exchange = $2",
        )
        .bind(&outcome.user.id)
        .bind(outcome.exchange.as_str())
        .fetch_optional(&s.db.pool)
        .await
        .expect("connection row");
        let first_job = outcome.jobs.first().map(|(job, _)| job.clone()).unwrap_or_default();
        let explain = || async {
            format!("requests:\n{}\njobs:\n{}", outcome.log.join("\n"), connection_history(&s, &first_job).await)
        };
        match (&outcome.expected, row) {
            (None, None) => {}
            (None, Some((id, active, ..))) => {
                if active {
                    problems.push(format!("connection {id} should be revoked\n{}", explain().await));
                }
            }
            (Some(_), None) => problems.push(format!("user {} has no connection", outcome.user.id)),
            (Some(creds), Some((id, active, status, key, secret))) => {
                let (stored_key, stored_secret) =
                    if active { (s.decrypt(&key), s.decrypt(&secret)) } else { (String::new(), String::new()) };
                if !active || stored_key != creds.api_key || stored_secret != creds.api_secret || status != "connected"
                {
                    problems.push(format!(
                        "connection {id} (active {active}, {status}) holds ..{} instead of its last accepted key ..{}\n{}",
                        &stored_key[stored_key.len().saturating_sub(6)..],
                        &creds.api_key[creds.api_key.len() - 6..],
                        explain().await
                    ));
                }
                // Audited once per applied rotation: every rotation that passed has its row; one
                // overtaken by a revoke after its swap has one too (its job then fails as revoked);
                // and no swap (one credentials_version) is audited twice.
                let audit = s.audit_actions(&id).await;
                let rotations = outcome.jobs.iter().filter(|(job, _)| rows[job].kind == "rotate");
                let passed = rotations.clone().filter(|(job, _)| rows[job].code() == Some("ok")).count() as i64;
                let overtaken =
                    rotations.filter(|(job, expect)| expect.is_none() && rows[job].status == "failed").count() as i64;
                let rotated = audit.get("rotated").copied().unwrap_or(0);
                if !(passed <= rotated && rotated <= passed + overtaken) {
                    problems.push(format!(
                        "`rotated` rows of {id}: {rotated}, rotations passed {passed}, overtaken {overtaken}: {audit:?}"
                    ));
                }
                let versions: Vec<Option<i64>> = sqlx::query_scalar(
                    "SELECT (details ->> 'credentials_version')::bigint FROM public.connection_audit_log
                      WHERE connection_id = $1::uuid AND action = 'rotated'",
                )
                .bind(&id)
                .fetch_all(&s.db.pool)
                .await
                .expect("rotated rows");
                let distinct: std::collections::BTreeSet<_> = versions.iter().collect();
                if distinct.len() != versions.len() {
                    figures.duplicated += (versions.len() - distinct.len()) as u64;
                    problems.push(format!("a swap of {id} audited twice: {versions:?}"));
                }
            }
        }
    }

    let mut latencies: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for outcome in &outcomes {
        for (kind, status, latency) in &outcome.requests {
            latencies.entry(kind).or_default().push(*latency);
            *statuses.entry(format!("{kind} {status}")).or_default() += 1;
            if *status >= 500 || *status == 409 {
                figures.error(format!("{kind} {status}"));
            }
        }
    }
    figures.requests_sent = latencies.values().map(|v| v.len() as u64).sum();
    figures.note(format!(
        "{} requests in {:.1} s ({:.0}/s); all jobs settled {:.1} s after the start",
        figures.requests_sent,
        load_time.as_secs_f64(),
        figures.requests_sent as f64 / load_time.as_secs_f64(),
        drained.as_secs_f64()
    ));
    for (kind, mut values) in latencies {
        values.sort();
        figures.note(format!(
            "{kind}: {} requests, p50 {:.1} ms, p99 {:.1} ms",
            values.len(),
            percentile(&values, 50.0).as_secs_f64() * 1e3,
            percentile(&values, 99.0).as_secs_f64() * 1e3
        ));
    }
    figures.note(format!("answers: {statuses:?}"));
    figures.note(format!("jobs: {by_kind:?}"));
    figures.note(format!("jobs that needed more than one attempt (rate limits): {retried}"));
    figures.note("duplicated = swaps audited more than once");
    figures.note(format!("discrepancies: {}", problems.len()));
    figures.print(&s);
    assert!(problems.is_empty(), "{} discrepancies:\n{}", problems.len(), problems.join("\n\n"));
    assert_eq!(figures.lost, 0);
    let server_errors: Vec<_> = figures.errors.keys().filter(|k| k.ends_with(" 500")).collect();
    assert!(server_errors.is_empty(), "500 answers: {:?}", figures.errors);
    assert_eq!(figures.requests_sent, (USERS * REQUESTS_PER_USER) as u64);

    for worker in &mut workers {
        worker.sigterm();
        assert!(worker.wait_exit(Duration::from_secs(30)).await.success());
    }
    for api in [&mut api_a, &mut api_b] {
        api.sigterm();
        assert!(api.wait_exit(Duration::from_secs(20)).await.success());
    }
    let scan = s.assert_no_leaks().await;
    println!("  secret scan: {scan}");
}

async fn run_user(s: &Scenario, apis: &[ApiClient; 2], index: usize) -> Outcome {
    let exchange = if index.is_multiple_of(2) { Exchange::Binance } else { Exchange::Kraken };
    let fresh = || if exchange == Exchange::Binance { s.binance_key() } else { s.kraken_key() };
    let wrong = |creds: &Creds| {
        let mut bad = fresh();
        bad.api_key = creds.api_key.clone();
        bad
    };
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let user = User::new();
    let mut outcome = Outcome {
        user: user.clone(),
        exchange,
        expected: None,
        jobs: Vec::new(),
        requests: Vec::new(),
        log: Vec::new(),
    };
    let mut connection: Option<String> = None;
    // The last accepted verify/rotate: a revoke overtakes it (its verdict is then open).
    let mut last_change: Option<usize> = None;
    for step in 0..REQUESTS_PER_USER {
        let api = &apis[step % 2];
        let roll = dice.roll(100);
        let (kind, reply) = if outcome.expected.is_none() || connection.is_none() {
            let creds = fresh();
            let reply = call(api, Method::POST, "/connections", &user, Some(creds.body())).await;
            assert!(matches!(reply.status, 202 | 409 | 503), "create: {} {}", reply.status, reply.text);
            if reply.status == 202 {
                connection = reply.body["connection"]["id"].as_str().map(str::to_string);
                last_change = Some(outcome.jobs.len());
                outcome.jobs.push((reply.job_id().expect("job"), Some(true)));
                outcome.expected = Some(creds);
            }
            ("create", reply)
        } else {
            let id = connection.clone().expect("connection");
            let current = outcome.expected.clone().expect("keys");
            match roll {
                0..30 => {
                    let good = dice.roll(5) != 0;
                    let creds = if good { current.clone() } else { wrong(&current) };
                    let reply = call(api, Method::POST, "/connections/test", &user, Some(creds.body())).await;
                    if reply.status == 202 {
                        outcome.jobs.push((reply.job_id().expect("job"), Some(good)));
                    }
                    ("test", reply)
                }
                30..50 => {
                    let path = match outcome.jobs.last() {
                        Some((job, _)) => format!("/jobs/{job}"),
                        None => "/connections".to_string(),
                    };
                    ("poll", call(api, Method::GET, &path, &user, None).await)
                }
                50..60 => ("list", call(api, Method::GET, "/connections", &user, None).await),
                60..82 => {
                    let good = roll < 75;
                    let creds = if good { fresh() } else { wrong(&current) };
                    let path = format!("/connections/{id}/rotate");
                    let reply = call(api, Method::POST, &path, &user, Some(creds.rotate_body())).await;
                    if reply.status == 202 {
                        // (Accepted only once the previous change settled: it overtakes nothing.)
                        last_change = Some(outcome.jobs.len());
                        outcome.jobs.push((reply.job_id().expect("job"), Some(good)));
                        if good {
                            outcome.expected = Some(creds);
                        }
                    } else {
                        // 409: a verify or rotation is still in progress; 503: shed, nothing written.
                        assert!(matches!(reply.status, 409 | 503), "rotate: {} {}", reply.status, reply.text);
                    }
                    ("rotate", reply)
                }
                82..90 => {
                    let reply = call(api, Method::DELETE, &format!("/connections/{id}"), &user, None).await;
                    assert!(matches!(reply.status, 200 | 503), "revoke: {} {}", reply.status, reply.text);
                    if reply.status == 200 {
                        overtake(&mut outcome, last_change);
                        last_change = None;
                        outcome.expected = None;
                        connection = None;
                    }
                    ("revoke", reply)
                }
                _ => ("audit", call(api, Method::GET, "/connections/audit?limit=20", &user, None).await),
            }
        };
        outcome.requests.push((kind, reply.status, reply.elapsed));
        let key = outcome.expected.as_ref().map_or("-", |c| &c.api_key[c.api_key.len() - 6..]).to_string();
        outcome.log.push(format!(
            "{step} {kind} {} job {} -> expected key ..{key}",
            reply.status,
            reply.job_id().unwrap_or_default()
        ));
    }
    outcome
}

/// The jobs of the connection `job` belongs to, oldest first (what to read when a verdict is off).
async fn connection_history(s: &Scenario, job: &str) -> String {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        kind: String,
        status: String,
        created: String,
        started: Option<String>,
        finished: Option<String>,
        error: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, kind, status, created_at::text AS created, started_at::text AS started,
                finished_at::text AS finished, error
           FROM public.tradeeon_jobs
          WHERE connection_id = (SELECT connection_id FROM public.tradeeon_jobs WHERE id = $1)
          ORDER BY created_at",
    )
    .bind(job)
    .fetch_all(&s.db.pool)
    .await
    .expect("connection history");
    rows.iter()
        .map(|Row { id, kind, status, created, started, finished, error }| {
            format!(
                "  {id} {kind} {status} created {created} started {} finished {} {}",
                started.as_deref().unwrap_or("-"),
                finished.as_deref().unwrap_or("-"),
                error.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A change followed by a revoke may be cancelled or fail as revoked: its verdict is no longer
/// predictable (only that it settles).
fn overtake(outcome: &mut Outcome, last_change: Option<usize>) {
    if let Some(index) = last_change {
        outcome.jobs[index].1 = None;
    }
}

async fn call(
    api: &ApiClient,
    method: Method,
    path: &str,
    user: &User,
    body: Option<serde_json::Value>,
) -> support::Reply {
    api.send(method.clone(), path, Some(user), body.as_ref()).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
