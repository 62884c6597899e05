//! The Kraken client against the simulator, over real HTTP.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::future::BoxFuture;
use tradeeon_shared::domain::{Exchange, Permissions};
use tradeeon_shared::exchanges::kraken::{KrakenClient, KrakenTier, LocalNonces, NonceSource};
use tradeeon_shared::exchanges::{
    CheckCode, CheckResult, ClientContext, Credentials, ExchangeClient, LimitFeedback, LimitKey, RateGate, http_client,
    key_fingerprint,
};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::kraken::{
    SEEDED_ELSEWHERE_KEY, SEEDED_FULL_KEY, SEEDED_NO_FUNDS_KEY, SEEDED_OTP, SEEDED_OTP_KEY, SEEDED_READ_ONLY_KEY,
    SEEDED_REVOKED_KEY, SEEDED_WITHDRAW_KEY, seeded_secret,
};
use tradeeon_simulator::{Fault, SimState, Simulator};

/// A gate that records what it was asked and told, and can be paused.
#[derive(Default)]
struct RecordingGate {
    paused_for: Mutex<Option<Duration>>,
    acquired: Mutex<Vec<LimitKey>>,
    reports: Mutex<Vec<(LimitKey, LimitFeedback)>>,
}

impl RateGate for RecordingGate {
    fn acquire<'a>(&'a self, key: &'a LimitKey, _cost: u32) -> BoxFuture<'a, Result<(), Duration>> {
        self.acquired.lock().unwrap().push(key.clone());
        let paused = *self.paused_for.lock().unwrap();
        Box::pin(async move { paused.map_or(Ok(()), Err) })
    }

    fn report(&self, key: &LimitKey, feedback: LimitFeedback) {
        self.reports.lock().unwrap().push((key.clone(), feedback));
    }
}

struct Harness {
    sim: Simulator,
    gate: Arc<RecordingGate>,
    client: Arc<KrakenClient>,
}

impl Harness {
    async fn start() -> Harness {
        Self::with_timeout(Duration::from_secs(10)).await
    }

    async fn with_timeout(timeout: Duration) -> Harness {
        let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
        let gate = Arc::new(RecordingGate::default());
        let ctx = ClientContext { http: http_client(timeout).unwrap(), gate: gate.clone() };
        let nonces: Arc<dyn NonceSource> = Arc::new(LocalNonces::new());
        let client = Arc::new(KrakenClient::new(ctx, sim.urls.kraken.clone(), nonces));
        Harness { sim, gate, client }
    }

    fn state(&self) -> &SimState {
        &self.sim.state
    }

    async fn check(&self, credentials: &Credentials) -> CheckResult {
        let started = Instant::now();
        CheckResult::new(self.client.check(credentials).await, started.elapsed())
    }

    fn requests(&self) -> usize {
        self.state().faults.requests(Exchange::Kraken).len()
    }
}

fn creds(key: &str, secret: &str) -> Credentials {
    Credentials {
        api_key: SecretValue::new(key.to_string()),
        api_secret: SecretValue::new(secret.to_string()),
        passphrase: None,
        access_token: None,
    }
}

fn seeded(key: &str) -> Credentials {
    creds(key, &seeded_secret(key))
}

fn with_otp(mut credentials: Credentials, otp: &str) -> Credentials {
    credentials.passphrase = Some(SecretValue::new(otp.to_string()));
    credentials
}

fn private_key(fingerprint: &str) -> LimitKey {
    LimitKey { exchange: Exchange::Kraken, bucket: "private", key_fingerprint: Some(fingerprint.to_string()) }
}

fn assert_code(result: &CheckResult, code: CheckCode) {
    assert_eq!(result.code, code, "unexpected result: {result:?}");
    assert_eq!(result.ok, code == CheckCode::Ok);
}

// ---------------------------------------------------------------------------------------------
// Good keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn trading_key_without_ip_allowlist_is_ok_and_warned() {
    let h = Harness::start().await;
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );
    assert_eq!(result.warnings, ["no_ip_restriction"]);
    // One request, spent from this key's own bucket (named by fingerprint, never the key).
    assert_eq!(h.requests(), 1);
    assert_eq!(*h.gate.acquired.lock().unwrap(), [private_key(&key_fingerprint(SEEDED_FULL_KEY))]);
    let paths: Vec<String> = h.state().faults.requests(Exchange::Kraken).into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/0/private/GetApiKeyInfo"]);
}

#[tokio::test]
async fn withdrawal_key_is_ok_with_a_withdrawal_warning() {
    let h = Harness::start().await;
    let result = h.check(&seeded(SEEDED_WITHDRAW_KEY)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: true, ip_restricted: true }));
    assert_eq!(result.warnings, ["withdrawals_enabled"]);
}

#[tokio::test]
async fn read_only_key_reports_no_trading() {
    let h = Harness::start().await;
    let result = h.check(&seeded(SEEDED_READ_ONLY_KEY)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: false, withdraw: false, ip_restricted: false })
    );
}

#[tokio::test]
async fn two_factor_key_needs_its_password() {
    let h = Harness::start().await;
    let result = h.check(&with_otp(seeded(SEEDED_OTP_KEY), SEEDED_OTP)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: true }));
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);

    for refused in [seeded(SEEDED_OTP_KEY), with_otp(seeded(SEEDED_OTP_KEY), "wrong")] {
        let result = h.check(&refused).await;
        assert_code(&result, CheckCode::IpNotAllowed);
        assert!(result.message.contains("two-factor"), "{}", result.message);
    }
}

// ---------------------------------------------------------------------------------------------
// Rejected keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_secret_is_invalid_signature() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_FULL_KEY, &seeded_secret(SEEDED_READ_ONLY_KEY))).await;
    assert_code(&result, CheckCode::InvalidSignature);
}

#[tokio::test]
async fn a_secret_that_is_not_base64_is_refused_without_a_request() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_FULL_KEY, "not base64!")).await;
    assert_code(&result, CheckCode::InvalidSignature);
    assert_eq!(h.requests(), 0);
}

#[tokio::test]
async fn unknown_and_revoked_keys_are_invalid_credentials() {
    let h = Harness::start().await;
    let unknown = creds("NoSuchKrakenKey", &STANDARD.encode([7u8; 64]));
    assert_code(&h.check(&unknown).await, CheckCode::InvalidCredentials);
    assert_code(&h.check(&seeded(SEEDED_REVOKED_KEY)).await, CheckCode::InvalidCredentials);
    // A key revoked on the exchange after it was connected.
    h.state().kraken.revoke_key(SEEDED_FULL_KEY);
    assert_code(&h.check(&seeded(SEEDED_FULL_KEY)).await, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn key_whose_allowlist_excludes_us_is_ip_not_allowed() {
    let h = Harness::start().await;
    let result = h.check(&seeded(SEEDED_ELSEWHERE_KEY)).await;
    assert_code(&result, CheckCode::IpNotAllowed);
    assert!(result.message.contains("allowlist"), "{}", result.message);

    h.state().kraken.set_ip_allowlist(SEEDED_ELSEWHERE_KEY, vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]);
    let result = h.check(&seeded(SEEDED_ELSEWHERE_KEY)).await;
    assert_code(&result, CheckCode::Ok);
    assert!(result.permissions.unwrap().ip_restricted);
}

#[tokio::test]
async fn key_without_query_funds_is_permission_denied() {
    let h = Harness::start().await;
    let result = h.check(&seeded(SEEDED_NO_FUNDS_KEY)).await;
    assert_code(&result, CheckCode::PermissionDenied);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: false, trade: true, withdraw: false, ip_restricted: false })
    );

    h.state().kraken.set_permissions(SEEDED_NO_FUNDS_KEY, &["query-funds"]);
    assert_code(&h.check(&seeded(SEEDED_NO_FUNDS_KEY)).await, CheckCode::Ok);
}

// ---------------------------------------------------------------------------------------------
// Nonces
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn our_nonces_increase_and_a_stale_one_is_invalid_nonce() {
    let h = Harness::start().await;
    let key = seeded(SEEDED_FULL_KEY);
    assert_code(&h.check(&key).await, CheckCode::Ok);
    let first = h.state().kraken.last_nonce(SEEDED_FULL_KEY).unwrap();
    assert_code(&h.check(&key).await, CheckCode::Ok);
    let second = h.state().kraken.last_nonce(SEEDED_FULL_KEY).unwrap();
    assert!(second > first);

    // Another application used the key with far larger nonces.
    h.state().kraken.set_last_nonce(SEEDED_FULL_KEY, u64::MAX - 1);
    let result = h.check(&key).await;
    assert_code(&result, CheckCode::InvalidNonce);
    assert_eq!(h.state().kraken.invalid_nonce_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_checks_with_one_key_all_pass() {
    let h = Harness::start().await;
    h.state().kraken.set_rate_limit(100.0, 1.0);
    // Each request takes 20 ms at the exchange, so requests that were not serialized per key
    // would overlap on the wire.
    h.state().faults.inject(Exchange::Kraken, Fault::Latency(Duration::from_millis(20)));
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { client.check(&seeded(SEEDED_FULL_KEY)).await })
        })
        .collect();
    for task in tasks {
        assert_code(&CheckResult::new(task.await.unwrap(), Duration::ZERO), CheckCode::Ok);
    }
    assert_eq!(h.state().kraken.invalid_nonce_count(), 0);
    assert_eq!(h.requests(), 20);
    // One at a time: at least 20 × 20 ms.
    assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_call_counter_is_rate_limited_and_the_gate_is_told() {
    let h = Harness::start().await;
    // Starter tier's decay, but room for a single call.
    h.state().kraken.set_rate_limit(1.0, KrakenTier::Starter.decay_per_second());
    let key = seeded(SEEDED_FULL_KEY);
    assert_code(&h.check(&key).await, CheckCode::Ok);
    let result = h.check(&key).await;
    assert_code(&result, CheckCode::RateLimited);
    let wait = KrakenTier::Starter.one_call_decay();
    assert_eq!(result.retry_after_ms, Some(wait.as_millis() as u64));
    let reports = h.gate.reports.lock().unwrap().clone();
    assert_eq!(reports, [(private_key(&key_fingerprint(SEEDED_FULL_KEY)), LimitFeedback::RetryAfter(wait))]);
}

#[tokio::test]
async fn the_starter_tier_allows_fifteen_calls() {
    let h = Harness::start().await;
    let key = seeded(SEEDED_READ_ONLY_KEY);
    for _ in 0..15 {
        assert_code(&h.check(&key).await, CheckCode::Ok);
    }
    assert_code(&h.check(&key).await, CheckCode::RateLimited);
    // Other keys have their own counters.
    assert_code(&h.check(&seeded(SEEDED_FULL_KEY)).await, CheckCode::Ok);
}

#[tokio::test]
async fn http_429_is_rate_limited_with_retry_after() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Kraken, Fault::RateLimit { retry_after: Duration::from_secs(1), count: 1 });
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(1000));
    let reports = h.gate.reports.lock().unwrap().clone();
    assert_eq!(
        reports,
        [(private_key(&key_fingerprint(SEEDED_FULL_KEY)), LimitFeedback::RetryAfter(Duration::from_secs(1)))]
    );
}

#[tokio::test]
async fn a_paused_gate_sends_nothing() {
    let h = Harness::start().await;
    *h.gate.paused_for.lock().unwrap() = Some(Duration::from_secs(4));
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(4_000));
    assert_eq!(h.requests(), 0);
}

// ---------------------------------------------------------------------------------------------
// Exchange failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_errors_are_exchange_unavailable() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Kraken, Fault::ServerErrors { status: 502, count: 1 });
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::ExchangeUnavailable);
    assert_code(&h.check(&seeded(SEEDED_FULL_KEY)).await, CheckCode::Ok);
}

#[tokio::test]
async fn a_hanging_exchange_is_a_timeout() {
    let h = Harness::with_timeout(Duration::from_millis(300)).await;
    h.state().faults.inject(Exchange::Kraken, Fault::Hang);
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::Timeout);
    assert!(result.latency_ms >= 300 && result.latency_ms < 5_000, "{}", result.latency_ms);
    // The lease was released: the key is usable again at once.
    h.state().faults.clear(Exchange::Kraken);
    assert_code(&h.check(&seeded(SEEDED_FULL_KEY)).await, CheckCode::Ok);
}

#[tokio::test]
async fn garbage_body_is_bad_response() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Kraken, Fault::Malformed);
    let result = h.check(&seeded(SEEDED_FULL_KEY)).await;
    assert_code(&result, CheckCode::BadResponse);
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_appear_in_logs_or_debug_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let h = Harness::start().await;
    let secret = seeded_secret(SEEDED_OTP_KEY);
    let good = with_otp(seeded(SEEDED_OTP_KEY), SEEDED_OTP);
    let wrong = with_otp(creds(SEEDED_OTP_KEY, &seeded_secret(SEEDED_FULL_KEY)), SEEDED_OTP);
    let mut debug = vec![format!("{good:?}"), format!("{wrong:?}"), format!("{:?}", h.client)];
    for key in [&good, &wrong, &seeded(SEEDED_OTP_KEY)] {
        let result = h.check(key).await;
        debug.push(format!("{result:?}"));
        debug.push(serde_json::to_string(&result).unwrap());
    }
    let nonces = LocalNonces::new();
    debug.push(format!("{:?}", nonces.next(&key_fingerprint(SEEDED_OTP_KEY)).await));
    debug.push(format!("{nonces:?}"));
    debug.push(format!("{:?}", h.gate.acquired.lock().unwrap()));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("kraken credential check finished"), "the test must see the client's logs: {logs}");
    for text in debug.iter().chain([&logs]) {
        for leaked in [secret.as_str(), SEEDED_OTP, SEEDED_OTP_KEY, seeded_secret(SEEDED_FULL_KEY).as_str()] {
            assert!(!text.contains(leaked), "leaked in: {text}");
        }
    }
}
