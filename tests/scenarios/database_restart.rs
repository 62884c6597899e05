//! Scenario 4, database restart: a private PostgreSQL cluster (the machine's shared server keeps
//! serving the other tests) is stopped for ~10 s under load and started again. `/ready` turns 503
//! within a second, writes answer 503 promptly (never hang, never 500), the same API and worker
//! processes recover on their own, and no accepted job is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, ApiClient, Creds, Figures, PrivateCluster, Scenario, User, percentile, wait_until};

const OUTAGE: Duration = Duration::from_secs(10);
/// `/ready` must say 503 this soon after the database is gone.
const READY_FLIP_LIMIT: Duration = Duration::from_secs(1);
/// How often `/ready` is asked.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A write during the outage must be answered (503) within this: "not hang".
const WRITE_ANSWER_LIMIT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone)]
struct Sent {
    at: Instant,
    answered: Instant,
    /// `None`: no HTTP answer at all (refused, reset, client timeout).
    status: Option<u16>,
    code: Option<String>,
    job: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart() {
    let _serial = support::exclusive().await;
    let cluster = PrivateCluster::start();
    let s = Scenario::start_on("database-restart", &cluster.admin_url()).await;
    s.add_log_to_scan(cluster.log_path());
    let mut figures = Figures::default();
    let (mut api_proc, api) = s.spawn_api("api", &[]).await;
    let (w0, w1) = tokio::join!(s.spawn_worker("worker-0", &[]), s.spawn_worker("worker-1", &[]));
    let mut workers = [w0, w1];

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let probes = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (api, user, creds) = (api.clone(), s.user(), s.binance_key());
        let (stop, writes) = (stop.clone(), writes.clone());
        tasks.spawn(async move { write_load(api, user, creds, stop, writes).await });
    }
    {
        let (api, stop, probes) = (api.clone(), stop.clone(), probes.clone());
        tasks.spawn(async move { probe_ready(api, stop, probes).await });
    }
    // Under way: jobs are being accepted and run.
    wait_until("load under way", Duration::from_secs(30), Duration::from_millis(100), || async {
        let accepted: Vec<String> =
            writes.lock().unwrap().iter().filter(|w| w.status == Some(202)).filter_map(|w| w.job.clone()).collect();
        let done = s.job_statuses(&accepted).await.values().filter(|r| r.status == "done").count();
        (done >= 20).then_some(())
    })
    .await;

    let stopping = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_fast());
    let down = Instant::now();
    tokio::time::sleep(OUTAGE.saturating_sub(down - stopping)).await;
    let starting = Instant::now();
    tokio::task::block_in_place(|| cluster.start_again());
    let up = Instant::now();

    let ready_again = wait_until("/ready 200 after the restart", Duration::from_secs(30), Duration::from_millis(50), || {
        let probes = probes.clone();
        async move { probes.lock().unwrap().iter().find(|p| p.at >= up && p.status == Some(200)).map(|p| p.answered) }
    })
    .await;
    let writes_again = wait_until("a write accepted after the restart", Duration::from_secs(30), Duration::from_millis(50), || {
        let writes = writes.clone();
        async move { writes.lock().unwrap().iter().find(|w| w.at >= up && w.status == Some(202)).map(|w| w.answered) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(joined) = tasks.join_next().await {
        joined.expect("load task");
    }
    let writes = writes.lock().unwrap().clone();
    let probes = probes.lock().unwrap().clone();

    // Figures first, so a failing run still shows them.
    figures.requests_sent = (writes.len() + probes.len()) as u64;
    for w in &writes {
        match (w.status, w.code.as_deref()) {
            (Some(202), _) => {}
            (Some(status), code) => figures.error(format!("write {status} {}", code.unwrap_or("-"))),
            (None, _) => figures.error("write without an HTTP answer"),
        }
    }
    for p in &probes {
        match p.status {
            Some(200) => {}
            Some(status) => figures.error(format!("/ready {status}")),
            None => figures.error("/ready without an HTTP answer"),
        }
    }
    let flipped = probes.iter().filter(|p| p.status == Some(503)).map(|p| p.answered).min();
    let flip = flipped.map(|t| t.saturating_duration_since(down));
    let during: Vec<&Sent> = writes.iter().filter(|w| w.at >= down && w.at + WRITE_ANSWER_LIMIT < starting).collect();
    let mut answer_times: Vec<Duration> = during.iter().map(|w| w.answered - w.at).collect();
    answer_times.sort();
    figures.note(format!(
        "database stopped in {:.2} s, down {:.1} s, started in {:.2} s",
        (down - stopping).as_secs_f64(),
        (starting - down).as_secs_f64(),
        (up - starting).as_secs_f64()
    ));
    figures.note(format!(
        "/ready: first 503 {} after the server was gone (limit {:.1} s); 200 again {:.2} s after it was back",
        flip.map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        READY_FLIP_LIMIT.as_secs_f64(),
        ready_again.saturating_duration_since(up).as_secs_f64()
    ));
    figures.note(format!(
        "writes during the outage: {} answered in p50 {:.2} s, max {:.2} s (limit {:.1} s); first write accepted {:.2} s \
         after the restart",
        during.len(),
        percentile(&answer_times, 50.0).as_secs_f64(),
        answer_times.last().copied().unwrap_or_default().as_secs_f64(),
        WRITE_ANSWER_LIMIT.as_secs_f64(),
        writes_again.saturating_duration_since(up).as_secs_f64()
    ));

    // Every accepted job settles, on the same (never restarted) workers.
    let accepted: Vec<String> = writes.iter().filter(|w| w.status == Some(202)).filter_map(|w| w.job.clone()).collect();
    figures.jobs_sent = accepted.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = s.job_statuses(&accepted).await;
        let no_worker = workers.iter_mut().all(|w| !w.is_running());
        if rows.values().all(|r| r.settled()) || Instant::now() > deadline || no_worker {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // (A `test` job changes nothing and settles once, so nothing can be duplicated here; a job
    // whose attempt hit the outage is run again, which the retries figure counts.)
    let mut retried = 0;
    for row in rows.values() {
        match (row.status.as_str(), row.code()) {
            ("done", Some("ok")) => figures.completed += 1,
            (status, code) => figures.error(format!("job {status} {}", code.unwrap_or("-"))),
        }
        if row.attempts > 1 {
            retried += 1;
        }
    }
    figures.lost = rows.values().filter(|r| !r.settled()).count() as u64 + (accepted.len() - rows.len()) as u64;
    figures.note(format!("accepted jobs run again because an attempt hit the outage: {retried}"));
    figures.print(&s);

    // The API: readiness flips at once, writes are refused promptly and cleanly, it recovers.
    // Whoever asks `/ready` once the database is gone gets 503 within a second. (The first 503 can
    // come up to one probe interval later than that: the first probe after the stop may be sent
    // up to 100 ms after it.)
    let flip = flip.expect("/ready answered 503 while the database was down");
    assert!(flip <= READY_FLIP_LIMIT + PROBE_INTERVAL, "/ready turned 503 only {flip:?} after the database went down");
    // (A probe still waiting for a connection when the server comes back is rightly answered 200.)
    let outage_probes: Vec<&Sent> =
        probes.iter().filter(|p| p.at >= down && p.at + READY_FLIP_LIMIT < starting).collect();
    assert!(outage_probes.len() >= 50, "/ready was probed throughout the outage: {}", outage_probes.len());
    let stale_ready: Vec<&&Sent> =
        outage_probes.iter().filter(|p| p.status != Some(503) || p.answered - p.at > READY_FLIP_LIMIT).collect();
    assert!(stale_ready.is_empty(), "/ready during the outage answered other than 503 within 1 s: {stale_ready:?}");
    let wrong: Vec<&&Sent> =
        during.iter().filter(|w| w.status != Some(503) || w.code.as_deref() != Some("unavailable")).collect();
    assert!(wrong.is_empty(), "writes during the outage answered other than 503 unavailable: {wrong:?}");
    let slow = answer_times.last().copied().unwrap_or_default();
    assert!(slow <= WRITE_ANSWER_LIMIT, "a write during the outage took {slow:?} to be answered");
    let errors: Vec<&Sent> = writes.iter().filter(|w| w.status.is_none_or(|s| s >= 500 && s != 503)).collect();
    assert!(errors.is_empty(), "writes answered 5xx other than 503, or not at all: {errors:?}");
    assert!(api_proc.is_running(), "the API survived the restart\n{}", api_proc.log_tail(20));

    // The workers: still the same processes, and every accepted job ran.
    for worker in &mut workers {
        assert!(worker.is_running(), "{} survived the restart\n{}", worker.name, worker.log_tail(5));
    }
    let open: Vec<_> = rows.values().filter(|r| !r.settled()).collect();
    assert_eq!(figures.lost, 0, "accepted jobs lost: {open:?}");
    assert!(rows.values().all(|r| r.status == "done"), "{rows:?}");

    for worker in &mut workers {
        worker.sigterm();
        assert!(worker.wait_exit(Duration::from_secs(30)).await.success(), "{} stopped cleanly", worker.name);
    }
    api_proc.sigterm();
    assert!(api_proc.wait_exit(Duration::from_secs(20)).await.success());
    let scan = s.assert_no_leaks().await;
    println!("  secret scan: {scan}");
    drop(s);
    drop(cluster);
}

async fn write_load(api: ApiClient, user: User, creds: Creds, stop: Arc<AtomicBool>, writes: Arc<Mutex<Vec<Sent>>>) {
    while !stop.load(Ordering::SeqCst) {
        let at = Instant::now();
        let reply = api.send(reqwest::Method::POST, "/connections/test", Some(&user), Some(&creds.body())).await;
        let sent = match reply {
            Ok(reply) => Sent {
                at,
                answered: Instant::now(),
                status: Some(reply.status),
                code: reply.error_code().map(str::to_string),
                job: reply.job_id(),
            },
            Err(_) => Sent { at, answered: Instant::now(), status: None, code: None, job: None },
        };
        writes.lock().unwrap().push(sent);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks `/ready` every 100 ms, each probe on its own so a slow answer does not delay the next.
async fn probe_ready(api: ApiClient, stop: Arc<AtomicBool>, probes: Arc<Mutex<Vec<Sent>>>) {
    let mut inflight = tokio::task::JoinSet::new();
    while !stop.load(Ordering::SeqCst) {
        let (api, probes) = (api.clone(), probes.clone());
        inflight.spawn(async move {
            let at = Instant::now();
            let status = api.send(reqwest::Method::GET, "/ready", None, None).await.ok().map(|r| r.status);
            probes.lock().unwrap().push(Sent { at, answered: Instant::now(), status, code: None, job: None });
        });
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    while inflight.join_next().await.is_some() {}
}
