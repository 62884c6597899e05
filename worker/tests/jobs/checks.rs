//! `test` jobs against the simulator: every exchange's good keys, and each way a check can fail
//! with the code and retry decision it must lead to.

use std::time::Duration;

use tradeeon_shared::domain::{Exchange, Permissions};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::{JobStatus, MAX_ATTEMPTS};
use tradeeon_shared::store::Store;
use tradeeon_simulator::Fault;

use crate::helpers::*;

async fn binance_good_keys_pass_with_permissions(store: Store) {
    let app = spawn_app(store).await;
    let id = app
        .enqueue_test(Exchange::Binance, &Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET))
        .await;
    let step = app.run_once(id).await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert_eq!(result.code, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );
    assert_eq!(result.warnings, ["no_ip_restriction"]);
    let job = app.job(id).await;
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.result.as_ref(), Some(result));

    let keys = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    let result = done(&step);
    assert!(result.ok && result.warnings.is_empty(), "{result:?}");
    assert!(result.permissions.unwrap().ip_restricted);

    // A test stores nothing else: no connection, no audit row.
    assert!(app.store.list_connections(&app.user).await.unwrap().is_empty());
    assert!(app.audit().await.is_empty());
}

async fn coinbase_good_keys_pass_with_permissions(store: Store) {
    let app = spawn_app(store).await;
    let pem = sim_coinbase::seeded_es256_pem();
    let step = app
        .run_once(app.enqueue_test(Exchange::Coinbase, &Keys::new(sim_coinbase::SEEDED_ES256_KEY_NAME, &pem)).await)
        .await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );

    let secret = sim_coinbase::seeded_ed25519_secret();
    let step = app
        .run_once(
            app.enqueue_test(Exchange::Coinbase, &Keys::new(sim_coinbase::SEEDED_ED25519_KEY_NAME, &secret)).await,
        )
        .await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert!(result.permissions.unwrap().withdraw);
    assert_eq!(result.warnings, ["withdrawals_enabled"]);

    // A passphrase selects Coinbase Exchange.
    let secret = sim_coinbase::seeded_exchange_secret();
    let keys =
        Keys::new(sim_coinbase::SEEDED_EXCHANGE_KEY, &secret).with_passphrase(sim_coinbase::SEEDED_EXCHANGE_PASSPHRASE);
    let step = app.run_once(app.enqueue_test(Exchange::Coinbase, &keys).await).await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert_eq!(result.warnings, ["permissions_unknown"]);
}

async fn kraken_good_keys_pass_with_permissions(store: Store) {
    let app = spawn_app(store).await;
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let step =
        app.run_once(app.enqueue_test(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret)).await).await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );

    // Two-factor password travels as the passphrase.
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_OTP_KEY);
    let keys = Keys::new(sim_kraken::SEEDED_OTP_KEY, &secret).with_passphrase(sim_kraken::SEEDED_OTP);
    let step = app.run_once(app.enqueue_test(Exchange::Kraken, &keys).await).await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");
    assert!(result.permissions.unwrap().ip_restricted);

    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_WITHDRAW_KEY);
    let step = app
        .run_once(app.enqueue_test(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_WITHDRAW_KEY, &secret)).await)
        .await;
    assert_eq!(done(&step).warnings, ["withdrawals_enabled"]);
}

/// Runs a `test` job that must settle at once (a definitive verdict) with `code`.
async fn expect_verdict(app: &TestApp, exchange: Exchange, keys: &Keys<'_>, code: CheckCode) {
    let step = app.run_once(app.enqueue_test(exchange, keys).await).await;
    let result = done(&step);
    assert_eq!(result.code, code, "{exchange}: {result:?}");
    assert!(!result.ok);
    assert!(!result.message.is_empty());
}

async fn wrong_secret_is_invalid_signature_and_not_retried(store: Store) {
    let app = spawn_app(store).await;
    let wrong = "00000000000000000000000000000000000000000000000000000000deadbeef";
    expect_verdict(
        &app,
        Exchange::Binance,
        &Keys::new(sim_binance::SEEDED_FULL_KEY, wrong),
        CheckCode::InvalidSignature,
    )
    .await;
    let wrong_kraken = sim_kraken::seeded_secret(sim_kraken::SEEDED_READ_ONLY_KEY);
    expect_verdict(
        &app,
        Exchange::Kraken,
        &Keys::new(sim_kraken::SEEDED_FULL_KEY, &wrong_kraken),
        CheckCode::InvalidSignature,
    )
    .await;
    let wrong_cb = sim_kraken::seeded_secret("not coinbase");
    let keys = Keys::new(sim_coinbase::SEEDED_EXCHANGE_KEY, &wrong_cb)
        .with_passphrase(sim_coinbase::SEEDED_EXCHANGE_PASSPHRASE);
    expect_verdict(&app, Exchange::Coinbase, &keys, CheckCode::InvalidSignature).await;
}

async fn unknown_key_is_invalid_credentials(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_binance::SEEDED_REVOKED_KEY, sim_binance::SEEDED_REVOKED_SECRET);
    expect_verdict(&app, Exchange::Binance, &keys, CheckCode::InvalidCredentials).await;
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_REVOKED_KEY);
    expect_verdict(
        &app,
        Exchange::Kraken,
        &Keys::new(sim_kraken::SEEDED_REVOKED_KEY, &secret),
        CheckCode::InvalidCredentials,
    )
    .await;
    let pem = sim_coinbase::seeded_es256_pem();
    let keys = Keys::new("organizations/00000000-0000-0000-0000-000000000000/apiKeys/unknown", &pem);
    expect_verdict(&app, Exchange::Coinbase, &keys, CheckCode::InvalidCredentials).await;
}

async fn ip_not_allowed_is_reported(store: Store) {
    let app = spawn_app(store).await;
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_ELSEWHERE_KEY);
    expect_verdict(
        &app,
        Exchange::Kraken,
        &Keys::new(sim_kraken::SEEDED_ELSEWHERE_KEY, &secret),
        CheckCode::IpNotAllowed,
    )
    .await;
    // Binance answers an IP outside the whitelist like an unknown key; the message names the IP.
    let keys = Keys::new(sim_binance::SEEDED_ELSEWHERE_KEY, sim_binance::SEEDED_ELSEWHERE_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    let result = done(&step);
    assert_eq!(result.code, CheckCode::InvalidCredentials);
    assert!(result.message.contains("IP"), "{}", result.message);
}

async fn missing_permission_is_permission_denied(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_binance::SEEDED_NO_READ_KEY, sim_binance::SEEDED_NO_READ_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    let result = done(&step);
    assert_eq!(result.code, CheckCode::PermissionDenied);
    assert_eq!(result.permissions.map(|p| p.read), Some(false), "what the key can do is still reported");
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_NO_FUNDS_KEY);
    expect_verdict(
        &app,
        Exchange::Kraken,
        &Keys::new(sim_kraken::SEEDED_NO_FUNDS_KEY, &secret),
        CheckCode::PermissionDenied,
    )
    .await;
}

async fn clock_skew_is_reported_unless_the_client_can_correct_it(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.set_clock_skew(Exchange::Coinbase, 300_000);
    let pem = sim_coinbase::seeded_es256_pem();
    expect_verdict(
        &app,
        Exchange::Coinbase,
        &Keys::new(sim_coinbase::SEEDED_ES256_KEY_NAME, &pem),
        CheckCode::ClockSkew,
    )
    .await;
    let secret = sim_coinbase::seeded_exchange_secret();
    let keys =
        Keys::new(sim_coinbase::SEEDED_EXCHANGE_KEY, &secret).with_passphrase(sim_coinbase::SEEDED_EXCHANGE_PASSPHRASE);
    expect_verdict(&app, Exchange::Coinbase, &keys, CheckCode::ClockSkew).await;
    // Binance publishes its time: the client resynchronises and the check passes.
    app.sim.state.faults.set_clock_skew(Exchange::Binance, 30_000);
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    assert!(done(&step).ok, "{step:?}");
}

async fn stale_nonce_is_invalid_nonce_and_not_retried(store: Store) {
    let app = spawn_app(store).await;
    // Another application used the key with nonces far in our future.
    app.sim.state.kraken.set_last_nonce(sim_kraken::SEEDED_FULL_KEY, u64::MAX / 2);
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    expect_verdict(&app, Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret), CheckCode::InvalidNonce)
        .await;
}

async fn rate_limited_is_retried_after_retry_after(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Kraken, Fault::RateLimit { retry_after: Duration::from_secs(30), count: 1 });
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let id = app.enqueue_test(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret)).await;
    let step = app.run_once(id).await;
    let (after, result) = retried(&step);
    assert_eq!(result.code, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(30_000));
    assert!(after >= Duration::from_secs(30), "{after:?}");
    assert_eq!(app.job(id).await.status, JobStatus::Queued);
}

async fn server_errors_are_retried_until_the_exchange_recovers(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 1 });
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let id = app.enqueue_test(Exchange::Binance, &keys).await;
    let steps = app.run_to_end(id).await;
    assert_eq!(steps.len(), 2, "{steps:?}");
    let (after, first) = retried(&steps[0]);
    assert_eq!(first.code, CheckCode::ExchangeUnavailable);
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_millis(2500),
        "first retry ~2 s: {after:?}"
    );
    assert!(done(&steps[1]).ok);
    let job = app.job(id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Done, 2));
}

async fn transient_failures_settle_after_the_last_attempt(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Coinbase, Fault::ServerErrors { status: 502, count: 100 });
    let pem = sim_coinbase::seeded_es256_pem();
    let id = app.enqueue_test(Exchange::Coinbase, &Keys::new(sim_coinbase::SEEDED_ES256_KEY_NAME, &pem)).await;
    let steps = app.run_to_end(id).await;
    assert_eq!(steps.len(), MAX_ATTEMPTS as usize);
    let result = done(steps.last().unwrap());
    assert_eq!(result.code, CheckCode::ExchangeUnavailable);
    let job = app.job(id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Done, MAX_ATTEMPTS));
}

async fn timeout_is_retried(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::Hang);
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    let (_, result) = retried(&step);
    assert_eq!(result.code, CheckCode::Timeout);
}

async fn garbage_body_is_bad_response_and_not_retried(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Kraken, Fault::Malformed);
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    expect_verdict(&app, Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret), CheckCode::BadResponse)
        .await;
}

async fn reject_withdrawal_keys_fails_keys_that_can_withdraw(store: Store) {
    let config = tradeeon_shared::config::WorkerConfig { reject_withdrawal_keys: true, ..test_config() };
    let app = spawn_app_with(store, config).await;
    let keys = Keys::new(sim_binance::SEEDED_WITHDRAW_KEY, sim_binance::SEEDED_WITHDRAW_SECRET);
    let step = app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await;
    let result = done(&step);
    assert_eq!((result.ok, result.code), (false, CheckCode::PermissionDenied));
    assert!(result.message.contains("withdraw"), "{}", result.message);
    assert_eq!(result.warnings, ["withdrawals_enabled"]);
    // Keys without withdrawals still pass.
    let keys = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    assert!(done(&app.run_once(app.enqueue_test(Exchange::Binance, &keys).await).await).ok);
    // And a verify applies the verdict to the connection.
    let conn = app
        .connect(Exchange::Binance, &Keys::new(sim_binance::SEEDED_WITHDRAW_KEY, sim_binance::SEEDED_WITHDRAW_SECRET))
        .await;
    let payload = tradeeon_shared::jobs::JobPayload::Verify {
        connection_id: conn.id,
        credentials_version: conn.credentials_version,
    };
    app.run_once(app.enqueue(Exchange::Binance, payload).await).await;
    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, tradeeon_shared::domain::ConnectionStatus::Error);
    assert!(conn.status_message.unwrap().contains("REJECT_WITHDRAWAL_KEYS"));
}

async fn zerodha_test_without_a_session_asks_for_a_login(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_kite::SEEDED_API_KEY, sim_kite::SEEDED_API_SECRET);
    expect_verdict(&app, Exchange::Zerodha, &keys, CheckCode::SessionExpired).await;
    assert_eq!(app.requests(Exchange::Zerodha), 0);
}

both_backends!(
    binance_good_keys_pass_with_permissions,
    coinbase_good_keys_pass_with_permissions,
    kraken_good_keys_pass_with_permissions,
    wrong_secret_is_invalid_signature_and_not_retried,
    unknown_key_is_invalid_credentials,
    ip_not_allowed_is_reported,
    missing_permission_is_permission_denied,
    clock_skew_is_reported_unless_the_client_can_correct_it,
    stale_nonce_is_invalid_nonce_and_not_retried,
    rate_limited_is_retried_after_retry_after,
    server_errors_are_retried_until_the_exchange_recovers,
    transient_failures_settle_after_the_last_attempt,
    timeout_is_retried,
    garbage_body_is_bad_response_and_not_retried,
    reject_withdrawal_keys_fails_keys_that_can_withdraw,
    zerodha_test_without_a_session_asks_for_a_login,
);
