//! Scenario 5, exchange faults, through a real `tradeeon worker` process and the simulator:
//!
//! * timeouts, 5xx bursts and malformed bodies → health checks (which never retry) carry
//!   `timeout`, `exchange_unavailable` and `bad_response`, in the job result and the history;
//! * a latency spike → `ok` with the latency recorded;
//! * a 429 storm with `Retry-After` → nothing is sent to the exchange inside a window (checked on
//!   the simulator's request log), the jobs are rescheduled and end `ok`, never a 418;
//! * a 5xx burst on a `test` job → retried with exponential backoff, visible in the request log.
//!
//! The worker runs one job at a time (`WORKER_CONCURRENCY=1`), so its requests form one stream
//! and "nothing inside a `Retry-After` window" is exact: no request of another job can already
//! be on the wire when the 429 arrives. (Each process learns of a window from its own 429.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tradeeon_shared::domain::Exchange;
use tradeeon_simulator::Fault;
use tradeeon_simulator::faults::LoggedRequest;

use crate::support::{self, Figures, Scenario, wait_until};

const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(2000);
const RETRY_AFTER: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_faults() {
    let _serial = support::exclusive().await;
    let s = Scenario::start("exchange-faults").await;
    let mut figures = Figures::default();
    let faults = &s.sim.state.faults;
    let (mut api_proc, api) = s.spawn_api("api", &[]).await;
    let timeout_ms = EXCHANGE_TIMEOUT.as_millis().to_string();
    let mut worker = s
        .spawn_worker(
            "worker",
            &[
                ("WORKER_CONCURRENCY", "1"),
                ("EXCHANGE_TIMEOUT_MS", &timeout_ms),
                ("HEALTH_DEGRADED_LATENCY_MS", "1000"),
                ("HEALTH_SWEEP_INTERVAL", "2s"),
            ],
        )
        .await;

    // One connection per exchange, checked every 2 s by the sweeps.
    let mut connections = HashMap::new();
    let mut verify_jobs = Vec::new();
    for creds in [s.binance_key(), s.kraken_key(), s.coinbase_cdp_key()] {
        let user = s.user();
        let (id, job) = api.connect(&user, &creds).await;
        verify_jobs.push(job);
        connections.insert(creds.exchange, (user, id));
    }
    figures.requests_sent += 3;
    let rows = s.wait_settled(&verify_jobs, Duration::from_secs(30)).await;
    assert!(rows.values().all(|r| r.code() == Some("ok")), "{rows:?}");

    // Timeouts, 5xx, malformed bodies: one exchange each, at the same time.
    let since = db_now(&s).await;
    faults.inject(Exchange::Binance, Fault::Hang);
    faults.inject(Exchange::Kraken, Fault::ServerErrors { status: 502, count: 1_000 });
    faults.inject(Exchange::Coinbase, Fault::Malformed);
    for (exchange, expected) in [
        (Exchange::Binance, "timeout"),
        (Exchange::Kraken, "exchange_unavailable"),
        (Exchange::Coinbase, "bad_response"),
    ] {
        let connection = &connections[&exchange].1;
        let (code, duration) = health_check_after(&s, connection, since).await;
        assert_eq!(code, expected, "{exchange} health check under its fault");
        let history: Vec<Option<String>> = sqlx::query_scalar(
            "SELECT code FROM public.connection_health_history WHERE connection_id = $1::uuid AND checked_at > $2",
        )
        .bind(connection)
        .bind(since)
        .fetch_all(&s.db.pool)
        .await
        .expect("history");
        assert!(history.iter().any(|c| c.as_deref() == Some(expected)), "{exchange} history: {history:?}");
        if exchange == Exchange::Binance {
            assert!(
                duration >= EXCHANGE_TIMEOUT && duration < EXCHANGE_TIMEOUT + Duration::from_secs(3),
                "the timed-out check took {duration:?} (EXCHANGE_TIMEOUT_MS {EXCHANGE_TIMEOUT:?})"
            );
        }
        figures.note(format!("{exchange} fault -> health check `{code}` in {:.2} s", duration.as_secs_f64()));
    }
    for exchange in [Exchange::Binance, Exchange::Kraken, Exchange::Coinbase] {
        faults.clear(exchange);
    }

    // A latency spike: the check passes and says how slow it was.
    let spike = Duration::from_millis(1200);
    let since = db_now(&s).await;
    faults.inject(Exchange::Binance, Fault::Latency(spike));
    let (code, _) = health_check_after(&s, &connections[&Exchange::Binance].1, since).await;
    assert_eq!(code, "ok");
    let (user, _) = &connections[&Exchange::Binance];
    let spiked = s.binance_key();
    let spiked_job = api.test_credentials(user, &spiked).await;
    figures.requests_sent += 1;
    let row = s
        .wait_settled(std::slice::from_ref(&spiked_job), Duration::from_secs(30))
        .await
        .remove(&spiked_job)
        .expect("job");
    let latency = row.result.as_ref().and_then(|r| r["latency_ms"].as_u64()).unwrap_or(0);
    assert_eq!(row.code(), Some("ok"), "{row:?}");
    assert!(latency >= spike.as_millis() as u64, "latency {latency} ms recorded under a {spike:?} spike");
    figures.note(format!("latency spike {} ms -> `ok`, latency_ms {latency}", spike.as_millis()));
    faults.clear(Exchange::Binance);

    // Quiet the sweeps (revoked connections are not swept) so only the test jobs below talk to
    // the exchanges.
    for (user, id) in connections.values() {
        let reply = api.delete(&format!("/connections/{id}"), user).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    figures.requests_sent += 3;
    wait_until("no open job", Duration::from_secs(30), Duration::from_millis(100), || async {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM public.tradeeon_jobs WHERE status IN ('queued', 'running')")
                .fetch_one(&s.db.pool)
                .await
                .expect("open jobs");
        (open == 0).then_some(())
    })
    .await;

    // A 429 storm on Binance.
    faults.clear_log();
    let storm_started = Instant::now();
    faults.inject(Exchange::Binance, Fault::RateLimit { retry_after: RETRY_AFTER, count: 3 });
    let mut storm_jobs = Vec::new();
    for _ in 0..4 {
        let (user, creds) = (s.user(), s.binance_key());
        storm_jobs.push(api.test_credentials(&user, &creds).await);
    }
    figures.requests_sent += 4;
    let rows = s.wait_settled(&storm_jobs, Duration::from_secs(90)).await;
    let storm_time = storm_started.elapsed();
    let log = faults.requests(Exchange::Binance);
    let limited: Vec<&LoggedRequest> = log.iter().filter(|r| r.status == 429).collect();
    assert!(!log.iter().any(|r| r.status == 418), "a 418 (IP ban) was triggered: {log:?}");
    assert_eq!(limited.len(), 3, "the storm's three 429s were all met: {log:?}");
    let mut shortest_gap = Duration::MAX;
    for hit in &limited {
        let window_end = hit.at + RETRY_AFTER;
        let inside: Vec<&LoggedRequest> = log.iter().filter(|r| r.at > hit.at && r.at < window_end).collect();
        assert!(inside.is_empty(), "requests sent inside a Retry-After window: 429 at {:?}, then {inside:?}", hit.at);
        if let Some(next) = log.iter().find(|r| r.at > hit.at) {
            shortest_gap = shortest_gap.min(next.at - hit.at);
        }
    }
    let attempts: Vec<i32> = rows.values().map(|r| r.attempts).collect();
    for row in rows.values() {
        assert_eq!(row.code(), Some("ok"), "a job of the storm ended {row:?}");
    }
    figures.note(format!(
        "429 storm (3 x Retry-After {} s): {} Binance requests, {} answered 429, 0 x 418, none inside a window \
         (shortest gap after a 429 {:.2} s); 4 jobs ok after {attempts:?} attempts in {:.1} s",
        RETRY_AFTER.as_secs(),
        log.len(),
        limited.len(),
        shortest_gap.as_secs_f64(),
        storm_time.as_secs_f64()
    ));
    faults.clear(Exchange::Binance);

    // A 5xx burst on a test job: retried with backoff, then ok.
    faults.clear_log();
    faults.inject(Exchange::Kraken, Fault::ServerErrors { status: 503, count: 2 });
    let (user, creds) = (s.user(), s.kraken_key());
    let job = api.test_credentials(&user, &creds).await;
    figures.requests_sent += 1;
    let row = s.wait_settled(std::slice::from_ref(&job), Duration::from_secs(60)).await.remove(&job).expect("job");
    assert_eq!(row.code(), Some("ok"), "{row:?}");
    assert_eq!(row.attempts, 3, "two transient failures, then success: {row:?}");
    let log = faults.requests(Exchange::Kraken);
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200], "{log:?}");
    let (first, second) = (log[1].at - log[0].at, log[2].at - log[1].at);
    figures.note(format!(
        "5xx burst (2 x 503) on a test job: retried after {:.2} s, then {:.2} s (documented: 2 s then 4 s, +-25 %)",
        first.as_secs_f64(),
        second.as_secs_f64()
    ));
    // Backoff is real and grows: 2 s then 4 s, +-25 %. (The queue schedules tickets on whole
    // seconds, so a retry may start up to 1 s before its jittered delay: the lower bounds allow
    // for that.)
    assert!(first >= Duration::from_millis(500), "first retry after {first:?}");
    assert!(second >= Duration::from_millis(2000), "second retry after {second:?}");

    let all: Vec<String> = verify_jobs.iter().chain(&storm_jobs).chain([&spiked_job, &job]).cloned().collect();
    let rows = s.job_statuses(&all).await;
    figures.jobs_sent = all.len() as u64;
    figures.completed = rows.values().filter(|r| r.code() == Some("ok")).count() as u64;
    figures.lost = (all.len() - rows.values().filter(|r| r.settled()).count()) as u64;
    assert_eq!(figures.completed, figures.jobs_sent, "{rows:?}");
    worker.sigterm();
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());
    api_proc.sigterm();
    assert!(api_proc.wait_exit(Duration::from_secs(20)).await.success());
    let scan = s.assert_no_leaks().await;
    figures.note(format!("secret scan: {scan}"));
    figures.print(&s);
}

async fn db_now(s: &Scenario) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()").fetch_one(&s.db.pool).await.expect("now")
}

/// The code and duration of the first health check of `connection` claimed after `since`.
async fn health_check_after(s: &Scenario, connection: &str, since: DateTime<Utc>) -> (String, Duration) {
    wait_until(
        &format!("a health check of {connection}"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let row: Option<(Option<String>, f64)> = sqlx::query_as(
                "SELECT result ->> 'code', EXTRACT(EPOCH FROM finished_at - started_at)::float8
               FROM public.tradeeon_jobs
              WHERE kind = 'health_check' AND connection_id = $1::uuid AND started_at > $2 AND status = 'done'
              ORDER BY started_at LIMIT 1",
            )
            .bind(connection)
            .bind(since)
            .fetch_optional(&s.db.pool)
            .await
            .expect("health check");
            row.map(|(code, seconds)| (code.unwrap_or_default(), Duration::from_secs_f64(seconds.max(0.0))))
        },
    )
    .await
}
