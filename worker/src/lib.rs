//! Tradeeon Connect workers: the only part of the system that decrypts credentials and talks to
//! exchanges (from behind the NAT gateway's static IP in production).
//!
//! A worker process runs four things side by side: the job runner ([`runtime`]) consuming the
//! shared apalis queue, the health-sweep [`scheduler`], a collector that samples the queue and
//! the connections for the [`metrics`], and the CloudWatch publisher ([`cloudwatch`]). Storage
//! goes through `tradeeon_shared::store`; exchange calls through [`exchanges`], behind the
//! per-exchange rate [`limits`].

pub mod cloudwatch;
pub mod exchanges;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod metrics_server;
pub mod runtime;
pub mod scheduler;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::FutureExt;
use prometheus::Registry;
use tokio::net::TcpListener;
use tradeeon_shared::config::{Config, RateLimitConfig};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;

use crate::jobs::JobEnv;
use crate::metrics::WorkerMetrics;
use crate::runtime::RuntimeSettings;
use crate::scheduler::{SchedulerSettings, SweepObserver};

/// What the workers need from the process that starts them.
pub struct WorkerContext {
    pub store: Store,
    pub keyring: Arc<Keyring>,
    pub config: Config,
    /// The one Prometheus registry of the process (`tradeeon serve` shares it with the API).
    pub registry: Registry,
    /// Where to serve `/metrics` of this process; `None` when the API's metrics listener already
    /// does (`serve`).
    pub metrics_listener: Option<TcpListener>,
}

/// How often the collector samples the queue and the connection counts.
const COLLECT_INTERVAL: Duration = Duration::from_secs(15);

/// Runs the workers until `shutdown` resolves, then drains: running jobs finish, nothing new is
/// taken, the last metrics are published.
pub async fn run(ctx: WorkerContext, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let WorkerContext { store, keyring, config, registry, metrics_listener } = ctx;
    let metrics = WorkerMetrics::register(&registry).context("could not register the worker metrics")?;
    let env = Arc::new(
        JobEnv::from_config(store.clone(), keyring, &config.exchanges, &config.worker)?.with_metrics(metrics.clone()),
    );
    let shutdown = shutdown.boxed().shared();
    let owner = runtime::worker_name();

    let mut tasks = tokio::task::JoinSet::new();
    let runtime_settings = RuntimeSettings { concurrency: config.scheduler.concurrency, ..RuntimeSettings::default() };
    tasks.spawn(runtime::run_queue(env.clone(), Some(metrics.clone()), runtime_settings, shutdown.clone()));

    let scheduler_settings = SchedulerSettings {
        schedule: config.scheduler.sweep_schedule.clone(),
        budgets: sweep_budgets(&config.worker.rate_limits),
        history_retention: config.scheduler.history_retention,
        job_retention: config.scheduler.job_retention,
        completion_poll: Duration::from_secs(5),
    };
    let observer: Arc<dyn SweepObserver> = Arc::new(metrics.clone());
    tasks.spawn(scheduler::run_scheduler(store.clone(), scheduler_settings, observer, owner, shutdown.clone()).map(Ok));
    tasks.spawn(collect(store.clone(), metrics.clone(), shutdown.clone()).map(Ok));
    tasks.spawn(cloudwatch::run_publisher(config.metrics.clone(), metrics, shutdown.clone()).map(Ok));
    if let Some(listener) = metrics_listener {
        let stop = shutdown.clone();
        tasks.spawn(async move {
            metrics_server::serve_metrics(listener, registry, stop).await.context("worker metrics listener failed")
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("a worker task panicked")??;
    }
    Ok(())
}

/// Checks per second a sweep may spend of each exchange's budget shared by everyone behind our
/// egress IP. A Binance check costs 1 `/sapi` weight; the other exchanges limit per key, so a
/// sweep (one check per key) has no shared budget to respect there.
pub fn sweep_budgets(limits: &RateLimitConfig) -> HashMap<Exchange, f64> {
    if !limits.enabled {
        return HashMap::new();
    }
    HashMap::from([(Exchange::Binance, f64::from(limits.binance_sapi_weight_per_minute) / 60.0)])
}

/// Samples the queue and the connection counts for the gauges (and CloudWatch).
async fn collect(store: Store, metrics: WorkerMetrics, shutdown: impl Future<Output = ()> + Send) {
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(COLLECT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => return,
        }
        match store.queue_stats().await {
            Ok(stats) => metrics.set_queue(&stats),
            Err(err) => tracing::warn!(error = %err, "could not sample the queue"),
        }
        match store.connection_counts().await {
            Ok(counts) => metrics.set_connections(&counts),
            Err(err) => tracing::warn!(error = %err, "could not count connections"),
        }
    }
}

impl SweepObserver for WorkerMetrics {
    fn sweep_stretched(&self, exchange: Exchange, _spread: Duration, _interval: Duration) {
        WorkerMetrics::sweep_stretched(self, exchange);
    }

    fn sweep_completed(&self) {
        WorkerMetrics::sweep_completed(self);
    }
}
