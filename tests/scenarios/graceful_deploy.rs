//! Scenario 3, graceful deploy: under a steady load, every worker is replaced one after another
//! the way ECS deploys (start the new task, SIGTERM the old one). Each old worker is stopped while
//! it runs jobs: those finish on it, on their first attempt; nothing is lost and nothing is
//! retried (every job settles with `attempts = 1`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tradeeon_shared::domain::Exchange;
use tradeeon_simulator::Fault;

use crate::support::{self, ApiClient, Figures, Scenario, wait_until};

/// How long every exchange call takes during the scenario: what keeps jobs in flight.
const EXCHANGE_LATENCY: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_deploy() {
    let _serial = support::exclusive().await;
    let s = Scenario::start("graceful-deploy").await;
    let mut figures = Figures::default();
    let (mut api_proc, api) = s.spawn_api("api", &[]).await;
    let env = [("WORKER_CONCURRENCY", "4")];
    let (w0, w1, w2) = tokio::join!(
        s.spawn_worker("worker-0", &env),
        s.spawn_worker("worker-1", &env),
        s.spawn_worker("worker-2", &env)
    );
    let mut workers = vec![w0, w1, w2];
    s.sim.state.faults.inject(Exchange::Binance, Fault::Latency(EXCHANGE_LATENCY));

    // Load: six users, each connecting an account and then testing keys every 0.7 s for the
    // whole deploy — about what the 12 job slots of three workers get through.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (api, user, creds) = (api.clone(), s.user(), s.binance_key());
        let (_, verify) = api.connect(&user, &s.binance_key()).await;
        accepted.lock().unwrap().push(verify);
        let (stop, accepted, refused) = (stop.clone(), accepted.clone(), refused.clone());
        load.spawn(async move { generate(api, user, creds, stop, accepted, refused).await });
    }
    wait_until("load under way", Duration::from_secs(20), Duration::from_millis(50), || async {
        (accepted.lock().unwrap().len() >= 8).then_some(())
    })
    .await;

    let mut drains = Vec::new();
    for generation in 0..3 {
        let mut old = workers.remove(0);
        let new = s.spawn_worker(&format!("worker-{}", generation + 3), &env).await;
        // Stop the old worker while it is running jobs.
        let pattern = format!("%-{}-%", old.pid());
        let running: Vec<String> = wait_until(
            &format!("{} running jobs", old.name),
            Duration::from_secs(20),
            Duration::from_millis(25),
            || {
                let pattern = pattern.clone();
                let pool = s.db.pool.clone();
                async move {
                    let ids: Vec<String> = sqlx::query_scalar(
                        "SELECT t.id FROM public.tradeeon_jobs t
                           JOIN apalis.jobs a ON convert_from(a.job, 'UTF8')::jsonb ->> 'job_id' = t.id
                          WHERE a.lock_by LIKE $1 AND a.status IN ('Queued', 'Running') AND t.status = 'running'",
                    )
                    .bind(pattern)
                    .fetch_all(&pool)
                    .await
                    .expect("jobs running on the old worker");
                    (!ids.is_empty()).then_some(ids)
                }
            },
        )
        .await;
        old.sigterm();
        let asked = Instant::now();
        let status = old.wait_exit(Duration::from_secs(30)).await;
        let drain = asked.elapsed();
        assert!(status.success(), "{} exited with {status:?}\n{}", old.name, old.log_tail(30));
        // What it was running finished there, on the first attempt.
        let rows = s.job_statuses(&running).await;
        for row in rows.values() {
            assert_eq!(row.status, "done", "in-flight job finished before {} exited: {row:?}", old.name);
            assert_eq!(row.attempts, 1, "in-flight job was not retried: {row:?}");
        }
        drains.push(format!("{} drained {} in-flight job(s) in {:.2} s", old.name, running.len(), drain.as_secs_f64()));
        workers.push(new);
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(joined) = load.join_next().await {
        joined.expect("load task");
    }

    let accepted = accepted.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(refused.is_empty(), "requests refused during the deploy: {refused:?}");
    figures.requests_sent = accepted.len() as u64;
    figures.jobs_sent = accepted.len() as u64;
    let rows = s.wait_settled(&accepted, Duration::from_secs(60)).await;
    for row in rows.values() {
        match (row.status.as_str(), row.code()) {
            ("done", Some("ok")) => figures.completed += 1,
            (status, code) => figures.error(format!("{status} {}", code.unwrap_or("-"))),
        }
        if row.attempts > 1 {
            figures.duplicated += 1;
        }
    }
    figures.lost = (accepted.len() - rows.len()) as u64;
    // A ticket a stopping worker had fetched but not started must go back to the queue at once,
    // not wait ~30 s for the orphan handover: no job waits anywhere near that long here.
    let waits: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM started_at - created_at)::float8 FROM public.tradeeon_jobs WHERE id = ANY($1)",
    )
    .bind(&accepted)
    .fetch_all(&s.db.pool)
    .await
    .expect("queue waits");
    let longest_wait = waits.iter().copied().fold(0.0, f64::max);
    figures.note(format!("longest wait in the queue {longest_wait:.2} s"));
    let retried: Vec<_> = rows.values().filter(|r| r.attempts != 1).collect();
    assert!(retried.is_empty(), "jobs retried needlessly: {retried:?}");
    assert_eq!(figures.completed, accepted.len() as u64, "every job done and ok");
    assert!(longest_wait < 20.0, "a job waited {longest_wait:.1} s: a stopped worker's fetched tickets were orphaned");
    figures.note("duplicated = jobs that ran more than once (attempts > 1)");
    for drain in drains {
        figures.note(drain);
    }

    for worker in &mut workers {
        worker.sigterm();
        assert!(worker.wait_exit(Duration::from_secs(30)).await.success(), "{} stopped cleanly", worker.name);
    }
    api_proc.sigterm();
    assert!(api_proc.wait_exit(Duration::from_secs(20)).await.success());
    let scan = s.assert_no_leaks().await;
    figures.note(format!("secret scan: {scan}"));
    figures.print(&s);
}

async fn generate(
    api: ApiClient,
    user: support::User,
    creds: support::Creds,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let reply = api.post("/connections/test", &user, &creds.body()).await;
        match reply.job_id() {
            Some(job) if reply.status == 202 => accepted.lock().unwrap().push(job),
            _ => refused.lock().unwrap().push(format!("{} {}", reply.status, reply.text)),
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
}
