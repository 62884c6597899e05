//! Scheduled health sweeps: every `HEALTH_SWEEP_INTERVAL`, one `health_check` job per active
//! connection — exactly once per schedule slot however many worker processes run.
//!
//! Every process runs this scheduler (so losing one loses nothing), and every process sees each
//! slot arrive. The first to claim the slot's row in `health_sweeps` owns the sweep; each check
//! also carries an idempotency key per (slot, connection), so nothing is enqueued twice even if a
//! sweep is taken over. Only the current slot is ever considered: a process that was down does
//! not replay the slots it missed.
//!
//! Checks are spread over the interval rather than fired as a burst. When an exchange's rate
//! budget cannot fit all of its checks into the interval, that exchange's part of the sweep is
//! stretched to what the budget allows, and the stretch is reported (log and metric) — a sweep
//! that outruns the budget would only collect 429s.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::jobs::{JobPayload, NewJob};
use tradeeon_shared::store::{Store, sweep_job_key};

pub use tradeeon_shared::schedule::SweepSchedule;

/// Share of the interval a sweep spreads its checks over; the rest is slack so one sweep's last
/// checks finish before the next sweep starts.
const SPREAD_FRACTION: f64 = 0.8;

/// How one exchange's checks are laid out in time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExchangePlan {
    pub checks: usize,
    /// Time from the sweep's start over which the checks are spread.
    pub spread: Duration,
    /// The budget could not fit the checks into the interval's spread.
    pub stretched: bool,
}

/// Lays out a sweep: `checks` per exchange, each exchange's budget in checks per second (`None`:
/// no shared budget — per-key limits only), over `interval`.
pub fn plan_sweep(
    checks: &HashMap<Exchange, usize>,
    budgets: &HashMap<Exchange, f64>,
    interval: Duration,
) -> HashMap<Exchange, ExchangePlan> {
    let spread = interval.mul_f64(SPREAD_FRACTION);
    checks
        .iter()
        .map(|(&exchange, &count)| {
            let needed = budgets
                .get(&exchange)
                .filter(|rate| **rate > 0.0)
                .map(|rate| Duration::from_secs_f64(count as f64 / rate))
                .unwrap_or_default();
            let stretched = needed > spread;
            (exchange, ExchangePlan { checks: count, spread: if stretched { needed } else { spread }, stretched })
        })
        .collect()
}

/// Offset of check number `index` of `plan`: evenly spaced, each shifted randomly within its own
/// step so that sweeps do not hit an exchange on a fixed beat.
fn offset(plan: &ExchangePlan, index: usize) -> Duration {
    if plan.checks == 0 {
        return Duration::ZERO;
    }
    let step = plan.spread.as_secs_f64() / plan.checks as f64;
    let jitter: f64 = rand::thread_rng().gen_range(0.0..1.0);
    Duration::from_secs_f64(step * (index as f64 + jitter))
}

/// What the scheduler needs.
#[derive(Clone)]
pub struct SchedulerSettings {
    pub schedule: SweepSchedule,
    /// Checks per second each exchange's shared (per-IP) budget allows.
    pub budgets: HashMap<Exchange, f64>,
    /// Health history older than this is pruned after each sweep.
    pub history_retention: Duration,
    /// Settled jobs older than this are pruned after each sweep.
    pub job_retention: Duration,
    /// How often the sweep owner looks whether all checks have settled.
    pub completion_poll: Duration,
}

/// Reports what sweeps do (metrics are wired by the caller).
pub trait SweepObserver: Send + Sync {
    fn sweep_stretched(&self, exchange: Exchange, spread: Duration, interval: Duration);
    fn sweep_completed(&self);
}

/// Rows enqueued per transaction.
const PAGE: u32 = 500;

/// Runs the scheduler until `shutdown` resolves.
pub async fn run_scheduler(
    store: Store,
    settings: SchedulerSettings,
    observer: std::sync::Arc<dyn SweepObserver>,
    owner: String,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut handled: Option<DateTime<Utc>> = None;
    loop {
        let now = Utc::now();
        let slot = settings.schedule.current_slot(now);
        let mut wake_at = settings.schedule.next_slot(now);
        if handled != Some(slot) {
            match store.claim_sweep(slot, &owner).await {
                Ok(true) => {
                    handled = Some(slot);
                    // The checks are enqueued before shutdown is looked at again: every other
                    // process sees the slot owned, so a slot claimed and then dropped by a
                    // stopping process would go unswept. Only the wait for them to settle runs
                    // on its own.
                    match enqueue_sweep(&store, &settings, observer.as_ref(), slot).await {
                        Ok(enqueued) => {
                            let (store, settings, observer) = (store.clone(), settings.clone(), observer.clone());
                            tokio::spawn(async move {
                                if let Err(err) = watch_sweep(&store, &settings, observer.as_ref(), &enqueued).await {
                                    tracing::error!(%slot, error = format!("{err:#}"), "health sweep failed");
                                }
                            });
                        }
                        Err(err) => tracing::error!(%slot, error = format!("{err:#}"), "health sweep failed"),
                    }
                }
                Ok(false) => {
                    tracing::debug!(%slot, "another worker owns this sweep");
                    handled = Some(slot);
                }
                Err(err) => {
                    // The database is unreachable: try this slot again shortly.
                    tracing::warn!(%slot, error = %err, "could not claim the health sweep; retrying");
                    wake_at = wake_at.min(now + chrono::Duration::seconds(5));
                }
            }
        }
        let sleep = (wake_at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = &mut shutdown => return,
        }
    }
}

/// One sweep: enqueue a spread-out check per active connection, then wait for them to settle.
pub async fn sweep(
    store: &Store,
    settings: &SchedulerSettings,
    observer: &dyn SweepObserver,
    slot: DateTime<Utc>,
) -> anyhow::Result<usize> {
    let enqueued = enqueue_sweep(store, settings, observer, slot).await?;
    watch_sweep(store, settings, observer, &enqueued).await
}

/// A sweep whose checks are enqueued.
#[derive(Clone, Copy)]
struct EnqueuedSweep {
    slot: DateTime<Utc>,
    checks: usize,
    /// When its spread started, and how long the longest exchange's part of it is.
    start: DateTime<Utc>,
    longest: Duration,
}

/// Enqueues a spread-out check per active connection for `slot`.
async fn enqueue_sweep(
    store: &Store,
    settings: &SchedulerSettings,
    observer: &dyn SweepObserver,
    slot: DateTime<Utc>,
) -> anyhow::Result<EnqueuedSweep> {
    let interval = settings.schedule.interval_at(slot);
    let mut per_exchange: HashMap<Exchange, usize> = HashMap::new();
    for (exchange, _status, count) in store.connection_counts().await? {
        *per_exchange.entry(exchange).or_default() += usize::try_from(count).unwrap_or(0);
    }
    let plan = plan_sweep(&per_exchange, &settings.budgets, interval);
    for (exchange, p) in &plan {
        if p.stretched {
            tracing::warn!(
                exchange = exchange.as_str(),
                checks = p.checks,
                spread_s = p.spread.as_secs_f64(),
                interval_s = interval.as_secs_f64(),
                "health sweep stretched past its interval to stay within the exchange's rate budget"
            );
            observer.sweep_stretched(*exchange, p.spread, interval);
        }
    }

    // Spread from when the sweep really starts (a late claim must not bunch its checks up).
    let start = Utc::now().max(slot);
    let mut index: HashMap<Exchange, usize> = HashMap::new();
    let mut enqueued = 0;
    let mut after = None;
    loop {
        let targets = store.sweep_targets(after, PAGE).await?;
        let Some(last) = targets.last() else { break };
        after = Some(last.id);
        let jobs: Vec<NewJob> = targets
            .iter()
            .map(|target| {
                let i = index.entry(target.exchange).or_default();
                let at = plan
                    .get(&target.exchange)
                    .map(|p| offset(p, (*i).min(p.checks.saturating_sub(1))))
                    .unwrap_or_default();
                *i += 1;
                let mut job =
                    NewJob::new(target.user_id, target.exchange, JobPayload::HealthCheck { connection_id: target.id });
                job.idempotency_key = Some(sweep_job_key(slot, target.id));
                job.run_at = Some(start + chrono::Duration::from_std(at).unwrap_or_default());
                job
            })
            .collect();
        enqueued += store.enqueue_jobs(&jobs).await?;
        if targets.len() < PAGE as usize {
            break;
        }
    }
    let longest = plan.values().map(|p| p.spread).max().unwrap_or_default();
    let spread_until = start + chrono::Duration::from_std(longest).unwrap_or_default();
    store.record_sweep_enqueued(slot, i64::try_from(enqueued).unwrap_or(i64::MAX), spread_until).await?;
    tracing::info!(%slot, enqueued, spread_s = longest.as_secs_f64(), "health sweep enqueued");
    Ok(EnqueuedSweep { slot, checks: enqueued, start, longest })
}

/// Waits for an enqueued sweep's checks to settle and marks it completed; returns its checks.
async fn watch_sweep(
    store: &Store,
    settings: &SchedulerSettings,
    observer: &dyn SweepObserver,
    sweep: &EnqueuedSweep,
) -> anyhow::Result<usize> {
    let EnqueuedSweep { slot, checks: enqueued, start, longest } = *sweep;
    let interval = settings.schedule.interval_at(slot);
    // Completed once every check has settled; given up (and left incomplete, which the
    // "no completed sweep" alarm sees) if that takes more than two intervals.
    let give_up = start + chrono::Duration::from_std(interval * 2 + longest).unwrap_or_default();
    loop {
        if store.sweep_unsettled(slot).await? == 0 {
            if store.complete_sweep(slot).await? {
                observer.sweep_completed();
                tracing::info!(%slot, "health sweep completed");
            }
            break;
        }
        if Utc::now() > give_up {
            tracing::warn!(%slot, "health sweep did not complete within two intervals");
            break;
        }
        tokio::time::sleep(settings.completion_poll).await;
    }

    let now = Utc::now();
    let history = store.prune_health_history(now - chrono::Duration::from_std(settings.history_retention)?).await?;
    let jobs = store.prune_jobs(now - chrono::Duration::from_std(settings.job_retention)?).await?;
    if history + jobs > 0 {
        tracing::info!(history, jobs, "pruned old health history and settled jobs");
    }
    Ok(enqueued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_spread_over_the_interval_and_stretch_for_budgets() {
        let interval = Duration::from_secs(300);
        let checks = HashMap::from([(Exchange::Binance, 120_000), (Exchange::Kraken, 10)]);
        // Binance: 200 checks/s → 120,000 checks need 600 s, more than the 240 s spread.
        let budgets = HashMap::from([(Exchange::Binance, 200.0)]);
        let plan = plan_sweep(&checks, &budgets, interval);
        let binance = plan[&Exchange::Binance];
        assert!(binance.stretched);
        assert_eq!(binance.spread, Duration::from_secs(600));
        let kraken = plan[&Exchange::Kraken];
        assert!(!kraken.stretched);
        assert_eq!(kraken.spread, Duration::from_secs(240));

        // Offsets stay in order and inside the spread, one step apart on average.
        let offsets: Vec<_> = (0..10).map(|i| offset(&kraken, i)).collect();
        for (i, o) in offsets.iter().enumerate() {
            assert!(
                *o >= Duration::from_secs(24 * i as u64) && *o < Duration::from_secs(24 * (i as u64 + 1)),
                "{i}: {o:?}"
            );
        }
    }

    #[test]
    fn small_sweeps_within_budget_are_not_stretched() {
        let plan = plan_sweep(
            &HashMap::from([(Exchange::Binance, 100)]),
            &HashMap::from([(Exchange::Binance, 200.0)]),
            Duration::from_secs(60),
        );
        assert!(!plan[&Exchange::Binance].stretched);
        assert_eq!(plan[&Exchange::Binance].spread, Duration::from_secs(48));
    }
}
