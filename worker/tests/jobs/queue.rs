//! The job runner on the real apalis queue: tickets reach a worker and are acknowledged with the
//! job's outcome, transient failures come back later (real backoff, not apalis's immediate
//! retry), duplicate tickets run nothing twice, and a ticket whose job the worker cannot carry
//! through goes back to the queue for later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::{JobId, JobRecord, JobStatus};
use tradeeon_shared::store::{Store, TicketState};
use tradeeon_simulator::binance as sim_binance;
use tradeeon_simulator::{Fault, SimState};
use tradeeon_worker::runtime::{self, RuntimeSettings};

use crate::helpers::{Keys, spawn_app};

/// Polls the job record until it settles (the runner works in the background).
async fn settled(store: &Store, app_user: &tradeeon_shared::store::UserContext, id: JobId) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = store.get_job(app_user, id).await.unwrap().unwrap();
        if matches!(job.status, JobStatus::Done | JobStatus::Failed) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not settle: {job:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn fast() -> RuntimeSettings {
    RuntimeSettings { concurrency: 4, poll_interval: Duration::from_millis(100), ..RuntimeSettings::default() }
}

async fn the_queue_runner_picks_up_and_settles_jobs(store: Store) {
    let app = spawn_app(store.clone()).await;
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let ids = [app.enqueue_test(Exchange::Binance, &keys).await, app.enqueue_test(Exchange::Binance, &keys).await];

    let env = Arc::new(app.env);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(runtime::run_queue(env.clone(), None, fast(), async move {
        let _ = stop_rx.await;
    }));
    for id in ids {
        let job = settled(&store, &app.user, id).await;
        assert_eq!(job.status, JobStatus::Done, "{job:?}");
        let result = job.result.unwrap();
        assert!(result.ok, "{result:?}");
        assert_eq!(job.attempts, 1);
        // Settled and acknowledged in one statement: the ticket is gone with it.
        assert_eq!(tickets_of(&store, id).await, vec![], "job {id}'s ticket outlived its job");
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(20), runner).await.expect("runner stops on shutdown").unwrap().unwrap();
}

async fn transient_failures_come_back_later_not_at_once(store: Store) {
    let app = spawn_app(store.clone()).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 1 });
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let id = app.enqueue_test(Exchange::Binance, &keys).await;

    // One pass over what is due: the 503 reschedules the job into the future.
    let before = Utc::now();
    assert_eq!(runtime::run_due_jobs(&app.env, None).await.unwrap(), 1);
    let job = store.get_job(&app.user, id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempts, 1);
    assert!(store.due_jobs(10).await.unwrap().is_empty(), "the retry is not due yet");
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.scheduled, 1);

    // A second ticket (the retry's) exists, due no sooner than the backoff (≥ 1.5 s).
    let run_at = scheduled_run_at(&store, id).await;
    assert!(run_at - before >= chrono::Duration::milliseconds(1_400), "backoff too short: {run_at} vs {before}");

    // Once due, it runs again and passes (the fault was a one-off).
    make_due(&store, id).await;
    assert_eq!(runtime::run_due_jobs(&app.env, None).await.unwrap(), 1);
    let job = store.get_job(&app.user, id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.attempts, 2);
    assert_eq!(job.result.unwrap().code, CheckCode::Ok);
    let binance_calls = app.sim.state.faults.requests(Exchange::Binance).len();
    assert_eq!(binance_calls, 2, "one failed call, one good call; nothing in between");
}

async fn a_duplicate_ticket_runs_nothing_twice(store: Store) {
    let app = spawn_app(store.clone()).await;
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let id = app.enqueue_test(Exchange::Binance, &keys).await;
    runtime::process(&app.env, None, id, None).await.unwrap();
    runtime::process(&app.env, None, id, None).await.unwrap();
    assert_eq!(store.get_job(&app.user, id).await.unwrap().unwrap().attempts, 1);
    assert_eq!(app.sim.state.faults.requests(Exchange::Binance).len(), 1);
}

/// The runner cannot claim a job whose record it cannot read (here: a payload of an unknown
/// kind). Its ticket is not lost and not retried at once: it goes back to the queue, failed once
/// and no one's, and comes back after a delay — to fail again, as nothing changed, with the next
/// delay twice as long. The job record stays unsettled for an operator to see.
async fn a_ticket_that_cannot_be_carried_through_comes_back_later(store: Store) {
    let app = spawn_app(store.clone()).await;
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let id = app.enqueue_test(Exchange::Binance, &keys).await;
    let unreadable = r#"{"kind":"from_a_future_release"}"#;
    if let Some(pool) = store.pg_pool() {
        sqlx::query("UPDATE tradeeon_jobs SET payload = $2::jsonb WHERE id = $1")
            .bind(id.to_string())
            .bind(unreadable)
            .execute(pool)
            .await
            .unwrap();
    } else {
        sqlx::query("UPDATE tradeeon_jobs SET payload = ?2 WHERE id = ?1")
            .bind(id.to_string())
            .bind(unreadable)
            .execute(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    }

    let env = Arc::new(app.env);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(runtime::run_queue(env.clone(), None, fast(), async move {
        let _ = stop_rx.await;
    }));
    let handed_back = Instant::now();
    let first = wait_for_ticket(&store, id, |t| t.attempts >= 1).await;
    assert_eq!((first.status.as_str(), first.attempts, first.lock_by.as_deref()), ("Failed", 1, None), "{first:?}");
    assert!(first.due_in_seconds > 0.5, "handed back to run at once: {first:?}");
    // Fetched again once due (apalis takes failed tickets with attempts left), and handed back
    // with twice the delay.
    let second = wait_for_ticket(&store, id, |t| t.attempts >= 2).await;
    assert!(handed_back.elapsed() >= Duration::from_secs(1), "came back after {:?}", handed_back.elapsed());
    assert_eq!((second.status.as_str(), second.attempts), ("Failed", 2), "{second:?}");
    assert!(second.due_in_seconds > 2.0, "{second:?}");
    // Claimed (the record reads `running`), never run, never settled.
    assert_eq!(store.get_job(&app.user, id).await.unwrap().unwrap().status, JobStatus::Running);
    assert!(app.sim.state.faults.requests(Exchange::Binance).is_empty());
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(20), runner).await.expect("runner stops on shutdown").unwrap().unwrap();
}

async fn tickets_of(store: &Store, job: JobId) -> Vec<TicketState> {
    store.tickets_of_job(job).await.unwrap()
}

/// Polls `job`'s one ticket until `ready` holds (for at most 15 s).
async fn wait_for_ticket(store: &Store, job: JobId, ready: impl Fn(&TicketState) -> bool) -> TicketState {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut tickets = tickets_of(store, job).await;
        assert_eq!(tickets.len(), 1, "job {job}: {tickets:?}");
        if ready(&tickets[0]) {
            return tickets.remove(0);
        }
        assert!(Instant::now() < deadline, "job {job}'s ticket: {tickets:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn scheduled_run_at(store: &Store, id: JobId) -> chrono::DateTime<Utc> {
    if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar("SELECT run_at FROM tradeeon_jobs WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(pool)
            .await
            .unwrap()
    } else {
        let raw: String = sqlx::query_scalar("SELECT run_at FROM tradeeon_jobs WHERE id = ?1")
            .bind(id.to_string())
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
        chrono::DateTime::parse_from_rfc3339(&raw).unwrap().with_timezone(&Utc)
    }
}

/// Moves a scheduled retry to now (instead of sleeping through the backoff).
async fn make_due(store: &Store, id: JobId) {
    let past = Utc::now() - chrono::Duration::seconds(1);
    if let Some(pool) = store.pg_pool() {
        sqlx::query("UPDATE tradeeon_jobs SET run_at = $2 WHERE id = $1")
            .bind(id.to_string())
            .bind(past)
            .execute(pool)
            .await
            .unwrap();
    } else {
        sqlx::query("UPDATE tradeeon_jobs SET run_at = ?2 WHERE id = ?1")
            .bind(id.to_string())
            .bind(past.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .execute(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    }
}

#[allow(dead_code)]
fn _uses(_: SimState) {}

both_backends!(
    the_queue_runner_picks_up_and_settles_jobs,
    transient_failures_come_back_later_not_at_once,
    a_duplicate_ticket_runs_nothing_twice,
    a_ticket_that_cannot_be_carried_through_comes_back_later,
);
