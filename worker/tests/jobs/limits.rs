//! The rate gate with real clients against the simulator: nothing is sent into a pause, a 429's
//! `Retry-After` is respected (so Binance never escalates to a 418), budgets hold.

use std::time::Duration;

use tradeeon_shared::config::RateLimitConfig;
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::kraken::PRIVATE_BUCKET;
use tradeeon_shared::exchanges::{CheckCode, LimitFeedback, LimitKey, RateGate, key_fingerprint};
use tradeeon_shared::store::Store;
use tradeeon_simulator::Fault;
use tradeeon_worker::limits::RateLimits;

use crate::helpers::*;

async fn a_paused_bucket_sends_nothing(store: Store) {
    let app = spawn_app(store).await;
    let key = LimitKey {
        exchange: Exchange::Kraken,
        bucket: PRIVATE_BUCKET,
        key_fingerprint: Some(key_fingerprint(sim_kraken::SEEDED_FULL_KEY)),
    };
    app.env.exchanges.limits().report(&key, LimitFeedback::RetryAfter(Duration::from_secs(60)));
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let step =
        app.run_once(app.enqueue_test(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret)).await).await;
    let after = deferred(&step);
    assert!(
        after > Duration::from_secs(59) && after < Duration::from_secs(67),
        "deferred until the pause ends: {after:?}"
    );
    assert_eq!(app.requests(Exchange::Kraken), 0, "nothing was sent");
    // Another key is not paused.
    let other = sim_kraken::seeded_secret(sim_kraken::SEEDED_READ_ONLY_KEY);
    let step = app
        .run_once(app.enqueue_test(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_READ_ONLY_KEY, &other)).await)
        .await;
    assert!(done(&step).ok);
    let kraken = app.env.exchanges.limits().wait_totals().into_iter().find(|(e, _)| *e == Exchange::Kraken).unwrap().1;
    assert_eq!(kraken.refused, 1);
}

async fn binance_retry_after_is_respected_and_never_escalates_to_a_ban(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::RateLimit { retry_after: Duration::from_secs(30), count: 1 });
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let id = app.enqueue_test(Exchange::Binance, &keys).await;
    let first = app.run_once(id).await;
    let (after, result) = retried(&first);
    assert_eq!(result.code, CheckCode::RateLimited);
    assert!(after >= Duration::from_secs(30));
    assert_eq!(app.requests(Exchange::Binance), 1);
    // Retried (and new checks started) before Retry-After ends: held back locally, nothing
    // sent, deferred to when the pause ends.
    let second = app.run_once(id).await;
    assert!(deferred(&second) >= Duration::from_secs(28), "{second:?}");
    let other = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    assert!(deferred(&other) >= Duration::from_secs(28), "{other:?}");
    let requests = app.sim.state.faults.requests(Exchange::Binance);
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests.iter().all(|r| r.status != 418));
}

async fn after_a_binance_429_no_api_request_is_sent_until_retry_after(store: Store) {
    // Refuse even a 1 s pause, so the test does not depend on where in the minute it runs.
    let limits = RateLimits::new(&test_config().rate_limits).with_max_pause_wait(Duration::ZERO);
    let app = spawn_app_with_limits(store, test_config(), limits).await;
    app.sim.state.binance.set_testnet(true); // the check spends /api weight (account, 20)
    app.sim.state.binance.set_weight_limit(25);
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    // The second check in a minute exceeds 25 → 429 with Retry-After until the minute ends.
    let mut checks = 0;
    loop {
        checks += 1;
        assert!(checks <= 4, "no 429 came");
        let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
        if let tradeeon_worker::jobs::Step::Retry { last: Some(result), .. } = &step {
            assert_eq!(result.code, CheckCode::RateLimited);
            break;
        }
        assert!(done(&step).ok, "{step:?}");
    }
    for _ in 0..3 {
        let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
        deferred(&step);
    }
    // Each check probes /sapi first (404 on the testnet, its own bucket), then needs /api, which
    // is paused after the 429: no /api request follows it, so Binance never bans us.
    let requests = app.sim.state.faults.requests(Exchange::Binance);
    assert!(requests.iter().all(|r| r.status != 418), "never continued into a ban: {requests:?}");
    let api: Vec<_> = requests.iter().filter(|r| r.path.starts_with("/api/")).collect();
    assert_eq!(api.last().map(|r| r.status), Some(429), "{api:?}");
    assert_eq!(api.iter().filter(|r| r.status == 429).count(), 1, "{api:?}");
}

async fn budgets_are_enforced_with_small_budgets(store: Store) {
    let config = RateLimitConfig { coinbase_requests_per_second: 2, ..test_config().rate_limits };
    let limits = RateLimits::new(&config).with_max_budget_wait(Duration::ZERO);
    let app = spawn_app_with_limits(store, test_config(), limits).await;
    let pem = sim_coinbase::seeded_es256_pem();
    let keys = Keys::new(sim_coinbase::SEEDED_ES256_KEY_NAME, &pem);
    for _ in 0..2 {
        assert!(done(&app.run_once(app.enqueue_test(Exchange::Coinbase, &keys).await).await).ok);
    }
    let id = app.enqueue_test(Exchange::Coinbase, &keys).await;
    let step = app.run_once(id).await;
    let wait = deferred(&step);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(550),
        "one request comes back every 500 ms: {wait:?}"
    );
    assert_eq!(app.requests(Exchange::Coinbase), 2, "the third check sent nothing");
    // Waiting for the budget is not a failed attempt: deferred more often than a job may retry,
    // it still runs once the budget frees, and only the attempt that ran counts.
    for _ in 0..tradeeon_shared::jobs::MAX_ATTEMPTS + 2 {
        let job = app.store.claim_job(id).await.unwrap().expect("claimable");
        assert_eq!(job.record.attempts, 1, "a deferral refunds its attempt");
        assert!(app.store.defer_job(id, chrono::Utc::now(), None).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(done(&app.run_once(id).await).ok);
    assert_eq!(app.job(id).await.attempts, 1);
}

both_backends!(
    a_paused_bucket_sends_nothing,
    binance_retry_after_is_respected_and_never_escalates_to_a_ban,
    after_a_binance_429_no_api_request_is_sent_until_retry_after,
    budgets_are_enforced_with_small_budgets,
);
