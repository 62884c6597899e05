//! Health sweeps: exactly one sweep per slot across several worker processes, no replay of
//! missed slots, checks spread over the interval and completed once settled.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::store::{Store, sweep_job_key};
use tradeeon_simulator::binance as sim_binance;
use tradeeon_simulator::kraken as sim_kraken;
use tradeeon_worker::runtime;
use tradeeon_worker::scheduler::{self, SchedulerSettings, SweepObserver, SweepSchedule};

use crate::harness;
use crate::helpers::{Keys, spawn_app};

#[derive(Default)]
struct Counted {
    completed: AtomicUsize,
    stretched: AtomicUsize,
}

impl SweepObserver for Counted {
    fn sweep_stretched(&self, _: Exchange, _: Duration, _: Duration) {
        self.stretched.fetch_add(1, Ordering::SeqCst);
    }
    fn sweep_completed(&self) {
        self.completed.fetch_add(1, Ordering::SeqCst);
    }
}

fn settings(interval: &str) -> SchedulerSettings {
    SchedulerSettings {
        schedule: interval.parse().unwrap(),
        budgets: Default::default(),
        history_retention: Duration::from_secs(86_400),
        job_retention: Duration::from_secs(86_400),
        completion_poll: Duration::from_millis(50),
    }
}

async fn health_jobs(store: &Store) -> Vec<(String, String)> {
    let pool = store.pg_pool().unwrap();
    sqlx::query_as("SELECT idempotency_key, connection_id::text FROM tradeeon_jobs WHERE kind = 'health_check'")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Three scheduler "processes" (each with its own connection pool) on one PostgreSQL database.
async fn three_schedulers_sweep_each_slot_exactly_once(url: String) {
    let stores = [harness::connect(&url).await, harness::connect(&url).await, harness::connect(&url).await];
    let app = spawn_app(stores[0].clone()).await;
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let mut connections = Vec::new();
    for exchange in [Exchange::Binance, Exchange::Kraken, Exchange::Coinbase] {
        connections.push(app.connect(exchange, &keys).await.id);
    }

    let observer = Arc::new(Counted::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(scheduler::run_scheduler(
            store.clone(),
            settings("1s"),
            observer.clone(),
            format!("worker-{i}"),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    stop_tx.send(true).unwrap();
    for task in tasks {
        task.await.unwrap();
    }

    let pool = stores[0].pg_pool().unwrap();
    let slots: Vec<(DateTime<Utc>, String)> =
        sqlx::query_as("SELECT slot, owner FROM health_sweeps ORDER BY slot").fetch_all(pool).await.unwrap();
    assert!(slots.len() >= 3, "three or four one-second slots passed: {slots:?}");
    let owners: HashSet<_> = slots.iter().map(|(_, o)| o.clone()).collect();
    assert!(!owners.is_empty());

    // Every slot checked every connection once — no more, whoever owned it. A slot claimed just
    // before the stop is enqueued by a task of its own that may still be running: give it a moment.
    let mut jobs = health_jobs(&stores[0]).await;
    for _ in 0..60 {
        if jobs.len() >= slots.len() * connections.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        jobs = health_jobs(&stores[0]).await;
    }
    assert_eq!(jobs.len(), slots.len() * connections.len(), "{jobs:?}");
    for (slot, _) in &slots {
        for connection in &connections {
            let key = sweep_job_key(*slot, *connection);
            assert_eq!(jobs.iter().filter(|(k, _)| *k == key).count(), 1, "{key}");
        }
    }
}

async fn a_sweep_spreads_its_checks_and_completes_when_they_settle(store: Store) {
    let app = spawn_app(store.clone()).await;
    app.connect(Exchange::Binance, &Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET)).await;
    let kraken_secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    app.connect(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &kraken_secret)).await;
    let slot = Utc::now();
    assert!(store.claim_sweep(slot, "this-worker").await.unwrap());
    let observer = Counted::default();
    // The sweep gives up after two intervals plus its spread (here 4 + 4 + 3.2 s): long enough for
    // two checks on a CI machine running the whole suite at once (with "2s" it once gave up).
    let mut s = settings("4s");
    s.completion_poll = Duration::from_millis(20);

    // The worker runs until the sweep has returned (completed, or given up): stopping when
    // nothing is unsettled could stop before the sweep has enqueued anything, which a loaded
    // machine made happen.
    let swept = std::sync::atomic::AtomicBool::new(false);
    let sweeping = {
        let store = store.clone();
        let s = s.clone();
        let swept = &swept;
        async move {
            let result = scheduler::sweep(&store, &s, &observer, slot).await.map(|n| (n, observer));
            swept.store(true, Ordering::SeqCst);
            result
        }
    };
    let worker = async {
        // Run checks as they come due, like a worker would.
        while !swept.load(Ordering::SeqCst) {
            runtime::run_due_jobs(&app.env, None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let (swept, ()) = tokio::join!(sweeping, worker);
    let (enqueued, observer) = swept.unwrap();
    assert_eq!(enqueued, 2);
    // If it gave up, say why: a check re-checked or retried later cannot settle in time.
    let sql = "SELECT status || ' ' || coalesce(result ->> 'code', '-') || ' ' || coalesce(result ->> 'message', '-')
                      || ' attempts ' || attempts
                 FROM tradeeon_jobs WHERE kind = 'health_check'";
    let checks: Vec<String> = match (store.pg_pool(), store.sqlite_pool()) {
        (Some(pool), _) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
        (_, Some(pool)) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
        _ => Vec::new(),
    };
    assert_eq!(observer.completed.load(Ordering::SeqCst), 1, "the sweep did not complete; its checks: {checks:?}");
    assert_eq!(observer.stretched.load(Ordering::SeqCst), 0);
}

async fn claiming_a_slot_twice_fails_and_old_slots_are_not_replayed(store: Store) {
    let schedule: SweepSchedule = "5m".parse().unwrap();
    let slot = schedule.current_slot(Utc::now());
    assert!(store.claim_sweep(slot, "a").await.unwrap());
    assert!(!store.claim_sweep(slot, "b").await.unwrap());

    // A scheduler starting now considers only the current slot.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(scheduler::run_scheduler(
        store.clone(),
        settings("5m"),
        Arc::new(Counted::default()),
        "late".into(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(());
    task.await.unwrap();
    let earlier = slot - chrono::Duration::minutes(5);
    assert!(store.claim_sweep(earlier, "probe").await.unwrap(), "the missed slot was never swept");
}

postgres_url_only!(three_schedulers_sweep_each_slot_exactly_once);
both_backends!(
    a_sweep_spreads_its_checks_and_completes_when_they_settle,
    claiming_a_slot_twice_fails_and_old_slots_are_not_replayed,
);
