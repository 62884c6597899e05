//! Exchange rate limits: the [`RateGate`] every exchange client asks before each request.
//!
//! Two layers, shared by all jobs of one worker process:
//!
//! * **Our budgets** (governor GCRA limiters, from [`RateLimitConfig`]), one per exchange bucket
//!   ([`LimitKey::bucket`]): Binance `/api` request weight and `/sapi` weight per minute for our
//!   egress IP (one limiter each); Kraken's call counter per API key (burst = the tier's maximum,
//!   one call back per `1 / decay` seconds); Coinbase Advanced Trade, Coinbase Exchange and Kite
//!   requests per second per API key. Per-key buckets use governor's keyed limiters, keyed by the
//!   key's fingerprint; idle keys are pruned ([`RateLimits::prune`], also every
//!   [`PRUNE_EVERY`] acquisitions) so the maps do not grow with the number of keys ever seen. A
//!   request costing more than a whole budget (possible only with tiny test budgets) is charged
//!   the whole budget.
//! * **What the exchanges tell us** ([`RateGate::report`]), which also covers the other worker
//!   processes behind the same IP: a `Retry-After` pauses that bucket (that key's, for per-key
//!   buckets) until it ends; a Binance ban (418) pauses *every* Binance bucket of the IP until it
//!   ends; Binance's used-weight headers within [`slow_down_reserve`] of the minute's limit (or at
//!   our own budget for the minute, when that is smaller) pause the bucket until the next minute
//!   boundary (Binance counts weight per calendar minute, which our GCRA budget only
//!   approximates).
//!
//! [`RateGate::acquire`] waits out a pause no longer than `max_pause_wait` (default
//! [`DEFAULT_MAX_PAUSE_WAIT`]) and a budget wait no longer than `max_budget_wait` (default
//! [`DEFAULT_MAX_BUDGET_WAIT`]); longer ones return `Err(wait)` without sending anything, so the
//! check fails as `Failure::Unsent` with that wait, and the job is deferred to then
//! without spending an attempt (`jobs::defer`) instead of holding a worker. Nothing is ever sent into a pause, so a Binance 429 never escalates to a 418.
//!
//! `EXCHANGE_RATE_LIMITS=off` removes our budgets (benchmarks); pauses the exchanges ask for are
//! still honoured. Waits and refusals are counted per exchange ([`RateLimits::wait_totals`]), and
//! waits and the exchanges' 429s and bans go to the worker metrics once [`RateLimits::report_to`]
//! is called.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use tradeeon_shared::config::RateLimitConfig;
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::{LimitFeedback, LimitKey, RateGate, coinbase, kite, kraken};

use crate::metrics::WorkerMetrics;

/// Waits for a pause up to this long; longer pauses refuse with `Err(wait)`.
pub const DEFAULT_MAX_PAUSE_WAIT: Duration = Duration::from_secs(2);
/// Waits for our own budget up to this long; longer waits refuse with `Err(wait)`.
pub const DEFAULT_MAX_BUDGET_WAIT: Duration = Duration::from_secs(10);
/// Requests the slow-down holds weight back for: those already in flight, from every process
/// behind the IP, when Binance's used-weight header crosses the line (16 processes at the
/// default `WORKER_CONCURRENCY` of 16). Each is counted at the heaviest weight the bucket has
/// been asked for.
pub const IN_FLIGHT_RESERVE_REQUESTS: u64 = 256;
/// The slow-down never holds back more than this share of the minute's limit.
pub const MAX_RESERVE_PERCENT: u64 = 10;
/// Added to "the next minute boundary", as Binance's minute is on its clock, not ours.
const MINUTE_BOUNDARY_MARGIN: Duration = Duration::from_millis(250);
/// Idle per-key limiter state is pruned every this many acquisitions.
pub const PRUNE_EVERY: u64 = 1024;

/// Binance buckets (see `shared/src/exchanges/binance.rs`).
const BINANCE_API: &str = "api";
const BINANCE_SAPI: &str = "sapi";

enum Limiter {
    /// One budget for everything (per-IP limits).
    Shared(DefaultDirectRateLimiter),
    /// One budget per API key fingerprint.
    PerKey(DefaultKeyedRateLimiter<String>),
}

struct Budget {
    limiter: Limiter,
    /// The quota's burst: the most one request can be charged.
    capacity: NonZeroU32,
    /// The heaviest cost asked for in this bucket so far (sizes the slow-down's reserve).
    heaviest: AtomicU64,
}

impl Budget {
    fn shared(quota: Quota) -> Self {
        Self::new(quota, Limiter::Shared(DefaultDirectRateLimiter::direct(quota)))
    }

    fn per_key(quota: Quota) -> Self {
        Self::new(quota, Limiter::PerKey(DefaultKeyedRateLimiter::keyed(quota)))
    }

    fn new(quota: Quota, limiter: Limiter) -> Self {
        Self { capacity: quota.burst_size(), limiter, heaviest: AtomicU64::new(1) }
    }

    /// Takes `cost` now, or says how long until it could be taken (nothing is taken then).
    fn try_take(&self, key: &LimitKey, cost: NonZeroU32) -> Result<(), Duration> {
        let cost = cost.min(self.capacity);
        let decision = match &self.limiter {
            Limiter::Shared(limiter) => {
                limiter.check_n(cost).map(|d| d.map_err(|not_until| not_until.wait_time_from(limiter.clock().now())))
            }
            Limiter::PerKey(limiter) => {
                let fingerprint = key.key_fingerprint.clone().unwrap_or_default();
                limiter
                    .check_key_n(&fingerprint, cost)
                    .map(|d| d.map_err(|not_until| not_until.wait_time_from(limiter.clock().now())))
            }
        };
        // `cost` never exceeds the capacity, so the batch always fits eventually.
        decision.unwrap_or(Ok(()))
    }
}

/// Where a pause applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PauseScope {
    exchange: Exchange,
    /// `None`: every bucket of the exchange (an IP ban).
    bucket: Option<&'static str>,
    key_fingerprint: Option<String>,
}

/// How long one exchange's requests waited for the gate, and how often it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaitTotals {
    /// Acquisitions that had to wait (for a pause or for our budget).
    pub waits: u64,
    /// Total time waited.
    pub waited: Duration,
    /// Acquisitions refused with `Err(wait)` (nothing was sent).
    pub refused: u64,
}

/// The worker's [`RateGate`]. Share one per process (behind an `Arc`).
pub struct RateLimits {
    config: RateLimitConfig,
    budgets: HashMap<(Exchange, &'static str), Budget>,
    pauses: Mutex<HashMap<PauseScope, Instant>>,
    totals: Mutex<HashMap<Exchange, WaitTotals>>,
    acquisitions: AtomicU64,
    max_pause_wait: Duration,
    max_budget_wait: Duration,
    metrics: OnceLock<WorkerMetrics>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("config", &self.config)
            .field("max_pause_wait", &self.max_pause_wait)
            .field("max_budget_wait", &self.max_budget_wait)
            .finish_non_exhaustive()
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> Self {
        let mut budgets = HashMap::new();
        let per_minute = |n: u32| Quota::per_minute(nonzero(n));
        let per_second = |n: u32| Quota::per_second(nonzero(n));
        budgets.insert((Exchange::Binance, BINANCE_API), Budget::shared(per_minute(config.binance_weight_per_minute)));
        budgets.insert(
            (Exchange::Binance, BINANCE_SAPI),
            Budget::shared(per_minute(config.binance_sapi_weight_per_minute)),
        );
        let tier = config.kraken_tier;
        let kraken = Quota::with_period(tier.one_call_decay())
            .unwrap_or_else(|| per_second(1))
            .allow_burst(nonzero(tier.max_counter() as u32));
        budgets.insert((Exchange::Kraken, kraken::PRIVATE_BUCKET), Budget::per_key(kraken));
        budgets.insert(
            (Exchange::Coinbase, coinbase::ADVANCED_TRADE_RATE.bucket),
            Budget::per_key(per_second(config.coinbase_requests_per_second)),
        );
        let exchange_rate = config.coinbase_exchange_requests_per_second;
        budgets.insert(
            (Exchange::Coinbase, coinbase::EXCHANGE_RATE.bucket),
            Budget::per_key(per_second(exchange_rate).allow_burst(nonzero(exchange_rate.saturating_mul(2)))),
        );
        budgets.insert(
            (Exchange::Zerodha, kite::KITE_RATE.bucket),
            Budget::per_key(per_second(config.kite_requests_per_second)),
        );
        Self {
            config: config.clone(),
            budgets,
            pauses: Mutex::new(HashMap::new()),
            totals: Mutex::new(HashMap::new()),
            acquisitions: AtomicU64::new(0),
            max_pause_wait: DEFAULT_MAX_PAUSE_WAIT,
            max_budget_wait: DEFAULT_MAX_BUDGET_WAIT,
            metrics: OnceLock::new(),
        }
    }

    /// Also reports waits and the exchanges' rate limiting (429s, bans) to `metrics`. Only the
    /// first call takes effect.
    pub fn report_to(&self, metrics: WorkerMetrics) {
        let _ = self.metrics.set(metrics);
    }

    /// The longest pause (`Retry-After`, ban, slow-down) `acquire` waits out instead of refusing.
    pub fn with_max_pause_wait(mut self, wait: Duration) -> Self {
        self.max_pause_wait = wait;
        self
    }

    /// The longest wait for our own budget `acquire` accepts instead of refusing.
    pub fn with_max_budget_wait(mut self, wait: Duration) -> Self {
        self.max_budget_wait = wait;
        self
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Waits and refusals so far, per exchange (every exchange listed, in [`Exchange::ALL`] order).
    pub fn wait_totals(&self) -> Vec<(Exchange, WaitTotals)> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        Exchange::ALL.iter().map(|e| (*e, totals.get(e).copied().unwrap_or_default())).collect()
    }

    /// How long requests to `key` are paused from now (zero if they are not).
    pub fn paused_for(&self, key: &LimitKey) -> Duration {
        let now = Instant::now();
        let pauses = self.pauses.lock().unwrap_or_else(|p| p.into_inner());
        let scopes = [
            PauseScope {
                exchange: key.exchange,
                bucket: Some(key.bucket),
                key_fingerprint: key.key_fingerprint.clone(),
            },
            PauseScope { exchange: key.exchange, bucket: None, key_fingerprint: key.key_fingerprint.clone() },
            PauseScope { exchange: key.exchange, bucket: None, key_fingerprint: None },
        ];
        scopes
            .iter()
            .filter_map(|scope| pauses.get(scope))
            .map(|until| until.saturating_duration_since(now))
            .max()
            .unwrap_or_default()
    }

    /// Drops per-key limiter state that is indistinguishable from a fresh key, and expired pauses.
    pub fn prune(&self) {
        for budget in self.budgets.values() {
            if let Limiter::PerKey(limiter) = &budget.limiter {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        let now = Instant::now();
        self.pauses.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, until| *until > now);
    }

    /// API keys currently tracked by the per-key limiters (for tests and diagnostics).
    pub fn tracked_keys(&self) -> usize {
        self.budgets
            .values()
            .map(|b| match &b.limiter {
                Limiter::PerKey(limiter) => limiter.len(),
                Limiter::Shared(_) => 0,
            })
            .sum()
    }

    fn pause(&self, scope: PauseScope, wait: Duration) {
        let now = Instant::now();
        let until = now + wait;
        let mut pauses = self.pauses.lock().unwrap_or_else(|p| p.into_inner());
        pauses.retain(|_, until| *until > now);
        let entry = pauses.entry(scope).or_insert(until);
        *entry = (*entry).max(until);
    }

    fn record(&self, exchange: Exchange, waited: Option<Duration>, refused: bool) {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let entry = totals.entry(exchange).or_default();
        if let Some(waited) = waited {
            entry.waits += 1;
            entry.waited += waited;
            if let Some(metrics) = self.metrics.get() {
                metrics.rate_limit_wait(exchange, waited);
            }
        }
        if refused {
            entry.refused += 1;
        }
    }

    /// Waits out a short pause; `Err` for a long one.
    async fn wait_for_pause(&self, key: &LimitKey) -> Result<(), Duration> {
        let paused = self.paused_for(key);
        if paused.is_zero() {
            return Ok(());
        }
        if paused > self.max_pause_wait {
            self.record(key.exchange, None, true);
            tracing::debug!(exchange = %key.exchange, bucket = key.bucket, wait_ms = paused.as_millis() as u64, "bucket paused; refusing");
            return Err(paused);
        }
        self.record(key.exchange, Some(paused), false);
        tokio::time::sleep(paused).await;
        Ok(())
    }

    async fn acquire_inner(&self, key: &LimitKey, cost: u32) -> Result<(), Duration> {
        if self.acquisitions.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune();
        }
        self.wait_for_pause(key).await?;
        let budget = self.budgets.get(&(key.exchange, key.bucket));
        if let Some(budget) = budget {
            // Before the request is sent, so a heavy request already counts in the reserve.
            budget.heaviest.fetch_max(u64::from(cost), Ordering::Relaxed);
        }
        if self.config.enabled
            && let Some(budget) = budget
        {
            let started = Instant::now();
            let mut waited = false;
            loop {
                match budget.try_take(key, nonzero(cost)) {
                    Ok(()) => break,
                    Err(wait) if wait > self.max_budget_wait => {
                        self.record(key.exchange, waited.then(|| started.elapsed()), true);
                        tracing::debug!(exchange = %key.exchange, bucket = key.bucket, wait_ms = wait.as_millis() as u64, "budget exhausted; refusing");
                        return Err(wait);
                    }
                    Err(wait) => {
                        waited = true;
                        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                    }
                }
            }
            if waited {
                self.record(key.exchange, Some(started.elapsed()), false);
            }
            // A pause may have been reported while we waited for the budget.
            self.wait_for_pause(key).await?;
        }
        Ok(())
    }
}

/// The weight the slow-down leaves unspent in a minute whose limit is `limit_per_minute`, when the
/// bucket's heaviest request costs `heaviest`: enough for [`IN_FLIGHT_RESERVE_REQUESTS`] of them,
/// at most [`MAX_RESERVE_PERCENT`] of the limit. A fixed share would waste most of a large limit
/// on cheap requests: 10 % of Binance's `/sapi` 12,000 is 1,200 health checks a minute.
pub fn slow_down_reserve(limit_per_minute: u32, heaviest: u64) -> u64 {
    (IN_FLIGHT_RESERVE_REQUESTS * heaviest.max(1)).min(u64::from(limit_per_minute) * MAX_RESERVE_PERCENT / 100)
}

/// The next calendar-minute boundary of our clock, from now.
fn until_next_minute() -> Duration {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let into_minute = u64::try_from(now_ms.rem_euclid(60_000)).unwrap_or(0);
    Duration::from_millis(60_000 - into_minute) + MINUTE_BOUNDARY_MARGIN
}

impl RateGate for RateLimits {
    fn acquire<'a>(&'a self, key: &'a LimitKey, cost: u32) -> BoxFuture<'a, Result<(), Duration>> {
        Box::pin(self.acquire_inner(key, cost))
    }

    fn report(&self, key: &LimitKey, feedback: LimitFeedback) {
        let bucket_scope = PauseScope {
            exchange: key.exchange,
            bucket: Some(key.bucket),
            key_fingerprint: key.key_fingerprint.clone(),
        };
        if matches!(feedback, LimitFeedback::RetryAfter(_) | LimitFeedback::Banned(_))
            && let Some(metrics) = self.metrics.get()
        {
            metrics.rate_limited(key.exchange);
        }
        match feedback {
            LimitFeedback::RetryAfter(wait) => {
                tracing::info!(exchange = %key.exchange, bucket = key.bucket, wait_ms = wait.as_millis() as u64, "exchange asked us to retry later; pausing the bucket");
                self.pause(bucket_scope, wait);
            }
            LimitFeedback::Banned(wait) => {
                tracing::warn!(exchange = %key.exchange, wait_ms = wait.as_millis() as u64, "exchange banned our IP; pausing every bucket until the ban ends");
                let scope =
                    PauseScope { exchange: key.exchange, bucket: None, key_fingerprint: key.key_fingerprint.clone() };
                self.pause(scope, wait);
            }
            LimitFeedback::UsedWeight { used, limit_per_minute } => {
                let configured = match key.bucket {
                    BINANCE_API => Some(self.config.binance_weight_per_minute),
                    BINANCE_SAPI => Some(self.config.binance_sapi_weight_per_minute),
                    _ => None,
                };
                // The reported weight counts every process behind our IP. Against Binance's own
                // limit, stop short of it by what may still be in flight, so none of it meets a
                // 429; against a smaller budget of ours, stop only when the minute's budget is
                // spent (a margin there would only waste what the operator allowed).
                let heaviest =
                    self.budgets.get(&(key.exchange, key.bucket)).map_or(1, |b| b.heaviest.load(Ordering::Relaxed));
                let spent = match configured {
                    Some(ours) if self.config.enabled && ours < limit_per_minute => used >= ours,
                    _ => u64::from(used) + slow_down_reserve(limit_per_minute, heaviest) > u64::from(limit_per_minute),
                };
                let limit =
                    configured.filter(|_| self.config.enabled).map_or(limit_per_minute, |o| o.min(limit_per_minute));
                if spent {
                    let wait = until_next_minute();
                    tracing::info!(exchange = %key.exchange, bucket = key.bucket, used, limit, wait_ms = wait.as_millis() as u64, "weight nearly used up; pausing until the next minute");
                    self.pause(bucket_scope, wait);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RateLimitConfig {
        tradeeon_shared::config::WorkerConfig::default().rate_limits
    }

    fn key(exchange: Exchange, bucket: &'static str, fingerprint: Option<&str>) -> LimitKey {
        LimitKey { exchange, bucket, key_fingerprint: fingerprint.map(str::to_string) }
    }

    fn totals(gate: &RateLimits, exchange: Exchange) -> WaitTotals {
        gate.wait_totals().into_iter().find(|(e, _)| *e == exchange).unwrap().1
    }

    #[tokio::test]
    async fn a_long_pause_refuses_and_only_for_its_bucket_and_key() {
        let gate = RateLimits::new(&config());
        let paused = key(Exchange::Kraken, kraken::PRIVATE_BUCKET, Some("aaaa"));
        gate.report(&paused, LimitFeedback::RetryAfter(Duration::from_secs(30)));
        let wait = gate.acquire(&paused, 1).await.unwrap_err();
        assert!(wait > Duration::from_secs(29) && wait <= Duration::from_secs(30), "{wait:?}");
        // Another key of the same bucket, and other exchanges, are unaffected.
        gate.acquire(&key(Exchange::Kraken, kraken::PRIVATE_BUCKET, Some("bbbb")), 1).await.unwrap();
        gate.acquire(&key(Exchange::Binance, BINANCE_API, None), 1).await.unwrap();
        assert_eq!(totals(&gate, Exchange::Kraken).refused, 1);
    }

    #[tokio::test]
    async fn a_short_pause_is_waited_out_and_counted() {
        let gate = RateLimits::new(&config());
        let k = key(Exchange::Zerodha, kite::KITE_RATE.bucket, Some("k"));
        gate.report(&k, LimitFeedback::RetryAfter(Duration::from_millis(80)));
        let started = Instant::now();
        gate.acquire(&k, 1).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(70), "{:?}", started.elapsed());
        let t = totals(&gate, Exchange::Zerodha);
        assert_eq!((t.waits, t.refused), (1, 0));
        assert!(t.waited >= Duration::from_millis(70));
    }

    #[tokio::test]
    async fn a_ban_pauses_every_binance_bucket() {
        let gate = RateLimits::new(&config());
        gate.report(&key(Exchange::Binance, BINANCE_API, None), LimitFeedback::Banned(Duration::from_secs(120)));
        for bucket in [BINANCE_API, BINANCE_SAPI] {
            let wait = gate.acquire(&key(Exchange::Binance, bucket, None), 1).await.unwrap_err();
            assert!(wait > Duration::from_secs(119), "{bucket}: {wait:?}");
        }
        gate.acquire(&key(Exchange::Kraken, kraken::PRIVATE_BUCKET, Some("x")), 1).await.unwrap();
    }

    #[tokio::test]
    async fn used_weight_near_the_limit_pauses_until_the_next_minute() {
        let gate = RateLimits::new(&config()).with_max_pause_wait(Duration::ZERO);
        let api = key(Exchange::Binance, BINANCE_API, None);
        // Weight-1 requests only: the reserve is one per request that may be in flight.
        let reserve = IN_FLIGHT_RESERVE_REQUESTS as u32;
        gate.report(&api, LimitFeedback::UsedWeight { used: 6_000 - reserve, limit_per_minute: 6_000 });
        gate.acquire(&api, 1).await.expect("the reserve exactly left is still fine");
        gate.report(&api, LimitFeedback::UsedWeight { used: 6_001 - reserve, limit_per_minute: 6_000 });
        let wait = gate.acquire(&api, 1).await.unwrap_err();
        assert!(wait <= Duration::from_secs(60) + MINUTE_BOUNDARY_MARGIN, "{wait:?}");

        // Once a heavy request (an account read, weight 20) is asked for, the reserve grows, up to
        // a tenth of the limit.
        let gate = RateLimits::new(&config()).with_max_pause_wait(Duration::ZERO);
        gate.acquire(&api, 20).await.unwrap();
        gate.report(&api, LimitFeedback::UsedWeight { used: 5_400, limit_per_minute: 6_000 });
        gate.acquire(&api, 1).await.expect("90% exactly is still fine");
        gate.report(&api, LimitFeedback::UsedWeight { used: 5_401, limit_per_minute: 6_000 });
        assert!(gate.acquire(&api, 1).await.is_err(), "within a tenth of the limit after a heavy request");
        // The /sapi bucket is separate: its health checks (weight 1) keep the small reserve.
        let sapi = key(Exchange::Binance, BINANCE_SAPI, None);
        gate.report(&sapi, LimitFeedback::UsedWeight { used: 11_700, limit_per_minute: 12_000 });
        gate.acquire(&sapi, 1).await.expect("97.5% of /sapi is below its reserve");
        assert_eq!(slow_down_reserve(12_000, 1), 256);
        assert_eq!(slow_down_reserve(12_000, 20), 1_200);

        // Our own, smaller budget counts when it is lower than the exchange's limit.
        let gate = RateLimits::new(&RateLimitConfig { binance_sapi_weight_per_minute: 1_000, ..config() })
            .with_max_pause_wait(Duration::ZERO);
        let sapi = key(Exchange::Binance, BINANCE_SAPI, None);
        gate.report(&sapi, LimitFeedback::UsedWeight { used: 999, limit_per_minute: 12_000 });
        gate.acquire(&sapi, 1).await.expect("our budget is used to the last unit, no margin");
        gate.report(&sapi, LimitFeedback::UsedWeight { used: 1_000, limit_per_minute: 12_000 });
        assert!(gate.acquire(&sapi, 1).await.is_err(), "the minute's budget is spent");
    }

    #[tokio::test]
    async fn budgets_are_enforced_per_key() {
        let config = RateLimitConfig { coinbase_requests_per_second: 2, ..config() };
        let gate = RateLimits::new(&config).with_max_budget_wait(Duration::ZERO);
        let a = key(Exchange::Coinbase, coinbase::ADVANCED_TRADE_RATE.bucket, Some("a"));
        gate.acquire(&a, 1).await.unwrap();
        gate.acquire(&a, 1).await.unwrap();
        let wait = gate.acquire(&a, 1).await.unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        // Another key has its own budget.
        gate.acquire(&key(Exchange::Coinbase, coinbase::ADVANCED_TRADE_RATE.bucket, Some("b")), 1).await.unwrap();

        // With room to wait, the third request waits for the budget instead.
        let gate = RateLimits::new(&config);
        for _ in 0..2 {
            gate.acquire(&a, 1).await.unwrap();
        }
        let started = Instant::now();
        gate.acquire(&a, 1).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
        assert_eq!(totals(&gate, Exchange::Coinbase).waits, 1);
    }

    #[tokio::test]
    async fn binance_weight_is_spent_by_cost_and_capped_at_the_budget() {
        let config = RateLimitConfig { binance_weight_per_minute: 30, ..config() };
        let gate = RateLimits::new(&config).with_max_budget_wait(Duration::ZERO);
        let api = key(Exchange::Binance, BINANCE_API, None);
        gate.acquire(&api, 20).await.unwrap();
        assert!(gate.acquire(&api, 20).await.is_err(), "20 + 20 > 30");
        gate.acquire(&api, 10).await.unwrap();
        // A request heavier than the whole budget is charged the whole budget, not refused forever.
        let gate = RateLimits::new(&RateLimitConfig { binance_weight_per_minute: 10, ..config });
        gate.acquire(&api, 20).await.unwrap();
    }

    #[tokio::test]
    async fn off_disables_budgets_but_not_exchange_pauses() {
        let config = RateLimitConfig { enabled: false, kite_requests_per_second: 1, ..config() };
        let gate = RateLimits::new(&config).with_max_budget_wait(Duration::ZERO);
        let k = key(Exchange::Zerodha, kite::KITE_RATE.bucket, Some("k"));
        for _ in 0..50 {
            gate.acquire(&k, 1).await.unwrap();
        }
        gate.report(&k, LimitFeedback::RetryAfter(Duration::from_secs(60)));
        assert!(gate.acquire(&k, 1).await.is_err());
    }

    #[tokio::test]
    async fn idle_keys_are_pruned() {
        let gate = RateLimits::new(&config());
        for i in 0..100 {
            gate.acquire(&key(Exchange::Zerodha, kite::KITE_RATE.bucket, Some(&format!("key{i}"))), 1).await.unwrap();
        }
        assert_eq!(gate.tracked_keys(), 100);
        // Kite: 10/s, so one request is fully replenished after 100 ms; governor keeps a key for
        // one more replenishment interval.
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.prune();
        assert_eq!(gate.tracked_keys(), 0);
    }
}
