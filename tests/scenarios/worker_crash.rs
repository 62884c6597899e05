//! Scenario 2, worker crash: `kill -9` a worker while it runs `rotate`, `verify` and
//! `health_check` jobs. Every job it held completes on another worker within 60 s (the runtime's
//! heartbeat is 10 s and 3 missed ones hand its tickets over: ≤ 40 s after the kill), no
//! connection is left without valid keys, and no rotation is applied or audited twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tradeeon_shared::domain::Exchange;
use tradeeon_simulator::Fault;

use crate::support::{self, Creds, Figures, Scenario, User, wait_until};

/// The promise of issue 4: a killed worker's jobs restart elsewhere within this.
const HANDOVER_LIMIT: Duration = Duration::from_secs(60);

struct Connection {
    user: User,
    id: String,
    creds: Creds,
    rotated_to: Option<Creds>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_crash() {
    let _serial = support::exclusive().await;
    let s = Scenario::start("worker-crash").await;
    let mut figures = Figures::default();
    let (mut api_proc, api) = s.spawn_api("api", &[]).await;
    let sweeping = [("HEALTH_SWEEP_INTERVAL", "5s")];
    let mut worker_a = s.spawn_worker("worker-a", &sweeping).await;

    // Six verified connections, one user each.
    let mut connections = Vec::new();
    let mut verify_jobs = Vec::new();
    for _ in 0..6 {
        let user = s.user();
        let creds = s.binance_key();
        let (id, job) = api.connect(&user, &creds).await;
        verify_jobs.push(job);
        connections.push(Connection { user, id, creds, rotated_to: None });
    }
    figures.requests_sent += 6;
    let settled = s.wait_settled(&verify_jobs, Duration::from_secs(30)).await;
    assert!(settled.values().all(|j| j.code() == Some("ok")), "{settled:?}");

    // Slow exchange: everything worker A starts now stays in flight.
    s.sim.state.faults.inject(Exchange::Binance, Fault::Latency(Duration::from_secs(30)));
    let mut rotate_jobs = Vec::new();
    for connection in connections.iter_mut().take(3) {
        let new = s.binance_key();
        rotate_jobs.push(api.rotate(&connection.user, &connection.id, &new).await);
        connection.rotated_to = Some(new);
    }
    for _ in 0..3 {
        let user = s.user();
        let creds = s.binance_key();
        let (id, job) = api.connect(&user, &creds).await;
        verify_jobs.push(job);
        connections.push(Connection { user, id, creds, rotated_to: None });
    }
    figures.requests_sent += 6;

    let kinds_running = || async {
        let kinds: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT kind FROM public.tradeeon_jobs WHERE status = 'running'")
                .fetch_all(&s.db.pool)
                .await
                .expect("running kinds");
        let kinds: BTreeSet<String> = kinds.into_iter().collect();
        ["verify", "rotate", "health_check"].iter().all(|k| kinds.contains(*k)).then_some(kinds)
    };
    wait_until(
        "worker A running verify, rotate and health_check jobs",
        Duration::from_secs(30),
        Duration::from_millis(100),
        kinds_running,
    )
    .await;

    // Replacements are up (as ECS would have them) before A dies.
    let (worker_b, worker_c) =
        tokio::join!(s.spawn_worker("worker-b", &sweeping), s.spawn_worker("worker-c", &sweeping));
    let (mut worker_b, mut worker_c) = (worker_b, worker_c);

    let in_flight: Vec<(String, String)> =
        sqlx::query_as("SELECT id, kind FROM public.tradeeon_jobs WHERE status = 'running' ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .expect("in-flight jobs");
    let open: Vec<(String, String)> =
        sqlx::query_as("SELECT id, kind FROM public.tradeeon_jobs WHERE status IN ('queued', 'running') ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .expect("open jobs");
    worker_a.kill9();
    let killed_at = Instant::now();
    s.sim.state.faults.clear(Exchange::Binance);
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, kind) in &in_flight {
        *by_kind.entry(kind.as_str()).or_default() += 1;
    }
    for kind in ["verify", "rotate", "health_check"] {
        assert!(by_kind.get(kind).copied().unwrap_or(0) > 0, "a {kind} job was in flight at the kill: {by_kind:?}");
    }
    figures.note(format!(
        "killed worker A (pid {}) with {} jobs in flight {by_kind:?} and {} open in all",
        worker_a.pid(),
        in_flight.len(),
        open.len()
    ));

    // Every job open at the kill settles within the promised handover, on B or C.
    let open_ids: Vec<String> = open.iter().map(|(id, _)| id.clone()).collect();
    let mut settled_after: BTreeMap<String, Duration> = BTreeMap::new();
    while settled_after.len() < open_ids.len() {
        let rows = s.job_statuses(&open_ids).await;
        for row in rows.values().filter(|r| r.settled()) {
            settled_after.entry(row.id.clone()).or_insert_with(|| killed_at.elapsed());
        }
        if killed_at.elapsed() > HANDOVER_LIMIT {
            let late: Vec<_> = rows.values().filter(|r| !r.settled()).collect();
            panic!("{} job(s) of the killed worker not settled within {HANDOVER_LIMIT:?}: {late:?}", late.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_flight_ids: Vec<String> = in_flight.iter().map(|(id, _)| id.clone()).collect();
    let handover = in_flight_ids.iter().map(|id| settled_after[id]).max().unwrap_or_default();
    let slowest = settled_after.values().max().copied().unwrap_or_default();
    figures.note(format!(
        "handover: in-flight jobs settled on another worker at most {:.1} s after the kill (all open jobs: {:.1} s; \
         limit {} s; configured heartbeat 10 s x 3 missed)",
        handover.as_secs_f64(),
        slowest.as_secs_f64(),
        HANDOVER_LIMIT.as_secs()
    ));
    let rows = s.job_statuses(&in_flight_ids).await;
    for row in rows.values() {
        assert_eq!(row.attempts, 2, "claimed by A, then once by B or C: {row:?}");
        // A health check whose connection's keys were swapped meanwhile is rightly not applied.
        let superseded = row.kind == "health_check"
            && row.status == "failed"
            && row.error.as_deref().is_some_and(|e| e.starts_with("superseded"));
        assert!(row.status == "done" || superseded, "{row:?}");
    }
    // Tickets of A are all gone: the queue holds none locked by it that is not finished.
    let held_by_a: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE lock_by LIKE $1 AND status IN ('Queued', 'Running')",
    )
    .bind(format!("%-{}-%", worker_a.pid()))
    .fetch_one(&s.db.pool)
    .await
    .expect("tickets of A");
    assert_eq!(held_by_a, 0, "tickets still locked by the dead worker");

    // Every job of the scenario settled, every verify and rotation passed exactly once.
    let all_mine: Vec<String> = verify_jobs.iter().chain(&rotate_jobs).cloned().collect();
    let rows = s.wait_settled(&all_mine, Duration::from_secs(30)).await;
    figures.jobs_sent = all_mine.len() as u64;
    for row in rows.values() {
        match row.code() {
            Some("ok") => figures.completed += 1,
            other => figures.error(format!("{} {}", row.kind, other.unwrap_or(row.status.as_str()))),
        }
    }
    assert_eq!(figures.completed, all_mine.len() as u64, "every verify and rotate passed: {rows:?}");

    // No connection without valid keys: each holds the pair it should, and a check of it passes.
    let ids: Vec<String> = connections.iter().map(|c| c.id.clone()).collect();
    wait_until("every connection connected", Duration::from_secs(40), Duration::from_millis(200), || async {
        let statuses: Vec<String> =
            sqlx::query_scalar("SELECT status FROM public.exchange_keys WHERE id::text = ANY($1) AND is_active")
                .bind(&ids)
                .fetch_all(&s.db.pool)
                .await
                .expect("statuses");
        (statuses.len() == ids.len() && statuses.iter().all(|st| st == "connected")).then_some(())
    })
    .await;
    for connection in &connections {
        let (key, secret, version): (String, String, i32) = sqlx::query_as(
            "SELECT api_key_encrypted, api_secret_encrypted, credentials_version FROM public.exchange_keys
              WHERE id = $1::uuid",
        )
        .bind(&connection.id)
        .fetch_one(&s.db.pool)
        .await
        .expect("stored keys");
        let expected = connection.rotated_to.as_ref().unwrap_or(&connection.creds);
        assert_eq!(s.decrypt(&key), expected.api_key, "connection {} holds the key it should", connection.id);
        assert_eq!(s.decrypt(&secret), expected.api_secret, "connection {} holds the secret it should", connection.id);
        let audit = s.audit_actions(&connection.id).await;
        let connected = audit.get("connected").copied().unwrap_or(0);
        assert_eq!(connected, 1, "one `connected` row per verify: {audit:?}");
        assert_eq!(audit.get("connected:submitted"), Some(&1), "the API's row: {audit:?}");
        figures.duplicated += (connected - 1).max(0) as u64;
        if connection.rotated_to.is_some() {
            let rotated = audit.get("rotated").copied().unwrap_or(0);
            figures.duplicated += (rotated - 1).max(0) as u64;
            assert_eq!(version, 2, "the rotation was applied exactly once");
            assert_eq!(rotated, 1, "the rotation was audited exactly once: {audit:?}");
            assert_eq!(audit.get("rotate_failed"), None, "{audit:?}");
        } else {
            assert_eq!(version, 1);
        }
    }
    let health_checks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM public.tradeeon_jobs WHERE kind = 'health_check' AND status IN ('done', 'failed')",
    )
    .fetch_one(&s.db.pool)
    .await
    .expect("health checks");
    figures.note(format!("health checks settled during the scenario: {health_checks}"));
    figures.lost = 0;

    for worker in [&mut worker_b, &mut worker_c] {
        worker.sigterm();
        assert!(worker.wait_exit(Duration::from_secs(45)).await.success(), "{} stopped cleanly", worker.name);
    }
    api_proc.sigterm();
    assert!(api_proc.wait_exit(Duration::from_secs(20)).await.success());
    let scan = s.assert_no_leaks().await;
    figures.note(format!("secret scan: {scan}"));
    figures.print(&s);
}
