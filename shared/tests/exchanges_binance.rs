//! The Binance client against the simulator, over real HTTP; and the simulator's rate-limit
//! escalation (429 → 418) as a raw HTTP client sees it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tradeeon_shared::domain::{Exchange, Permissions};
use tradeeon_shared::exchanges::binance::{self, BinanceClient};
use tradeeon_shared::exchanges::{
    CheckCode, CheckResult, ClientContext, Credentials, ExchangeClient, LimitFeedback, LimitKey, RateGate, http_client,
};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::binance::{
    SEEDED_ELSEWHERE_KEY, SEEDED_ELSEWHERE_SECRET, SEEDED_FULL_KEY, SEEDED_FULL_SECRET, SEEDED_LOCAL_ONLY_KEY,
    SEEDED_LOCAL_ONLY_SECRET, SEEDED_NO_READ_KEY, SEEDED_NO_READ_SECRET, SEEDED_READ_ONLY_KEY, SEEDED_READ_ONLY_SECRET,
    SEEDED_REVOKED_KEY, SEEDED_REVOKED_SECRET, SEEDED_WITHDRAW_KEY, SEEDED_WITHDRAW_SECRET,
};
use tradeeon_simulator::{Fault, SimState, Simulator};

type AcquireHook = Box<dyn Fn(usize, &LimitKey) + Send + Sync>;

/// A gate that records what it was asked and told, can be paused, can hold each request before
/// letting it through, and can run a hook on every acquire (the n-th, from 1).
#[derive(Default)]
struct RecordingGate {
    paused_for: Mutex<Option<Duration>>,
    holds_for: Mutex<Option<Duration>>,
    acquired: Mutex<Vec<(LimitKey, u32)>>,
    reports: Mutex<Vec<(LimitKey, LimitFeedback)>>,
    on_acquire: Mutex<Option<AcquireHook>>,
}

impl RecordingGate {
    fn buckets_acquired(&self) -> Vec<(&'static str, u32)> {
        self.acquired.lock().unwrap().iter().map(|(k, cost)| (k.bucket, *cost)).collect()
    }

    fn reports(&self) -> Vec<(&'static str, LimitFeedback)> {
        self.reports.lock().unwrap().iter().map(|(k, f)| (k.bucket, f.clone())).collect()
    }
}

impl RateGate for RecordingGate {
    fn acquire<'a>(&'a self, key: &'a LimitKey, cost: u32) -> BoxFuture<'a, Result<(), Duration>> {
        let n = {
            let mut acquired = self.acquired.lock().unwrap();
            acquired.push((key.clone(), cost));
            acquired.len()
        };
        if let Some(hook) = self.on_acquire.lock().unwrap().as_ref() {
            hook(n, key);
        }
        let paused = *self.paused_for.lock().unwrap();
        let holds_for = *self.holds_for.lock().unwrap();
        Box::pin(async move {
            if let Some(hold) = holds_for {
                tokio::time::sleep(hold).await;
            }
            paused.map_or(Ok(()), Err)
        })
    }

    fn report(&self, key: &LimitKey, feedback: LimitFeedback) {
        self.reports.lock().unwrap().push((key.clone(), feedback));
    }
}

struct Harness {
    sim: Simulator,
    gate: Arc<RecordingGate>,
    client: BinanceClient,
}

impl Harness {
    async fn start() -> Harness {
        Self::with_timeout(Duration::from_secs(10)).await
    }

    async fn with_timeout(timeout: Duration) -> Harness {
        let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
        let gate = Arc::new(RecordingGate::default());
        let ctx = ClientContext { http: http_client(timeout).unwrap(), gate: gate.clone() };
        let client = BinanceClient::new(ctx, sim.urls.binance.clone());
        Harness { sim, gate, client }
    }

    fn state(&self) -> &SimState {
        &self.sim.state
    }

    async fn check(&self, credentials: &Credentials) -> CheckResult {
        let started = Instant::now();
        CheckResult::new(self.client.check(credentials).await, started.elapsed())
    }

    fn paths_requested(&self) -> Vec<String> {
        self.state().faults.requests(Exchange::Binance).into_iter().map(|r| r.path).collect()
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

/// Sets the simulated Binance clock to one second into a minute, so that a test finishing within
/// the minute never sees the weight counters reset under it. (Only for tests that send nothing
/// signed before they are limited: this also shifts the clock signatures are checked against.)
fn start_of_a_minute(state: &SimState) {
    let now = chrono::Utc::now().timestamp_millis();
    state.faults.set_clock_skew(Exchange::Binance, 1_000 - now.rem_euclid(60_000));
}

fn assert_code(result: &CheckResult, code: CheckCode) {
    assert_eq!(result.code, code, "unexpected result: {result:?}");
    assert_eq!(result.ok, code == CheckCode::Ok);
}

const SAPI: &str = "/sapi/v1/account/apiRestrictions";
const ACCOUNT: &str = "/api/v3/account";
const TIME: &str = "/api/v3/time";

// ---------------------------------------------------------------------------------------------
// Good keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn trading_key_without_ip_restriction_is_ok_and_warned() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );
    assert_eq!(result.warnings, ["no_ip_restriction"]);
    assert_eq!(h.paths_requested(), [SAPI]);
    // The /sapi endpoint spends weight 1 from the separate "sapi" bucket.
    assert_eq!(h.gate.buckets_acquired(), [("sapi", 1)]);
    assert_eq!(
        h.gate.reports(),
        [("sapi", LimitFeedback::UsedWeight { used: 1, limit_per_minute: binance::SAPI_IP_WEIGHT_LIMIT_PER_MINUTE })]
    );
}

#[tokio::test]
async fn withdrawal_key_is_ok_with_a_withdrawal_warning() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_WITHDRAW_KEY, SEEDED_WITHDRAW_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: true, ip_restricted: true }));
    assert_eq!(result.warnings, ["withdrawals_enabled"]);
}

#[tokio::test]
async fn ip_restricted_trading_key_has_no_warnings() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_LOCAL_ONLY_KEY, SEEDED_LOCAL_ONLY_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: true }));
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);
}

#[tokio::test]
async fn read_only_key_reports_no_trading() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_READ_ONLY_KEY, SEEDED_READ_ONLY_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: false, withdraw: false, ip_restricted: false })
    );
}

#[tokio::test]
async fn permission_changes_on_the_exchange_show_in_the_next_check() {
    let h = Harness::start().await;
    let key = creds(SEEDED_READ_ONLY_KEY, SEEDED_READ_ONLY_SECRET);
    assert!(!h.check(&key).await.permissions.unwrap().trade);
    h.state().binance.set_permissions(SEEDED_READ_ONLY_KEY, tradeeon_simulator::binance::BinancePermissions::ALL);
    let after = h.check(&key).await.permissions.unwrap();
    assert!(after.trade && after.withdraw);
}

// ---------------------------------------------------------------------------------------------
// Rejected keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_secret_is_invalid_signature() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_READ_ONLY_SECRET)).await;
    assert_code(&result, CheckCode::InvalidSignature);
}

#[tokio::test]
async fn unknown_revoked_and_malformed_keys_are_invalid_credentials() {
    let h = Harness::start().await;
    let unknown = "Z".repeat(64);
    assert_code(&h.check(&creds(&unknown, SEEDED_FULL_SECRET)).await, CheckCode::InvalidCredentials);
    assert_code(&h.check(&creds(SEEDED_REVOKED_KEY, SEEDED_REVOKED_SECRET)).await, CheckCode::InvalidCredentials);
    let malformed = h.check(&creds("not-a-binance-key", SEEDED_FULL_SECRET)).await;
    assert_code(&malformed, CheckCode::InvalidCredentials);
    assert!(malformed.message.contains("format"), "{}", malformed.message);
    let control = h.check(&creds("line\nbreak", SEEDED_FULL_SECRET)).await;
    assert_code(&control, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn key_restricted_to_other_ips_is_refused_with_a_whitelist_hint() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_ELSEWHERE_KEY, SEEDED_ELSEWHERE_SECRET)).await;
    // Binance answers -2015 for an unknown key, a foreign IP and a missing permission alike.
    assert_code(&result, CheckCode::InvalidCredentials);
    assert!(result.message.contains("IP whitelist"), "{}", result.message);

    // Allowing our address on the exchange fixes it.
    h.state()
        .binance
        .set_ip_allowlist(SEEDED_ELSEWHERE_KEY, vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]);
    assert_code(&h.check(&creds(SEEDED_ELSEWHERE_KEY, SEEDED_ELSEWHERE_SECRET)).await, CheckCode::Ok);
}

#[tokio::test]
async fn key_without_reading_is_permission_denied() {
    let h = Harness::start().await;
    let result = h.check(&creds(SEEDED_NO_READ_KEY, SEEDED_NO_READ_SECRET)).await;
    assert_code(&result, CheckCode::PermissionDenied);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: false, trade: true, withdraw: false, ip_restricted: false })
    );
}

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn clock_skew_is_corrected_from_server_time_and_remembered() {
    let h = Harness::start().await;
    // Binance 30 s behind us: our timestamps are "1000ms ahead of the server's time".
    h.state().faults.set_clock_skew(Exchange::Binance, -30_000);
    let key = creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET);
    let result = h.check(&key).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(h.paths_requested(), [SAPI, TIME, SAPI]);
    let offset = h.client.time_offset_ms();
    assert!((-32_000..=-28_000).contains(&offset), "offset {offset}");

    // The next check uses the learnt offset straight away.
    h.state().faults.clear_log();
    assert_code(&h.check(&key).await, CheckCode::Ok);
    assert_eq!(h.paths_requested(), [SAPI]);

    // Binance 30 s ahead: our timestamps are older than recvWindow.
    h.state().faults.set_clock_skew(Exchange::Binance, 30_000);
    h.state().faults.clear_log();
    assert_code(&h.check(&key).await, CheckCode::Ok);
    assert_eq!(h.paths_requested(), [SAPI, TIME, SAPI]);
    assert!((28_000..=32_000).contains(&h.client.time_offset_ms()));
}

/// A request the rate gate held back longer than Binance's 5-second receive window is signed
/// when it leaves, not when it queued: it passes at once, with no `-1021` and no time resync
/// spending the budget twice.
#[tokio::test]
async fn a_request_held_by_the_rate_gate_is_signed_when_it_leaves() {
    let h = Harness::start().await;
    *h.gate.holds_for.lock().unwrap() = Some(Duration::from_millis(5_300));
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(h.paths_requested(), vec![SAPI.to_string()], "one signed request, nothing else");
}

#[tokio::test]
async fn skew_the_retry_cannot_fix_is_clock_skew() {
    let h = Harness::start().await;
    h.state().faults.set_clock_skew(Exchange::Binance, -30_000);
    // The exchange's clock jumps an hour between our resynchronisation and the retry (the 3rd
    // request: apiRestrictions, time, apiRestrictions).
    let state = h.sim.state.clone();
    *h.gate.on_acquire.lock().unwrap() = Some(Box::new(move |n, _| {
        if n == 3 {
            state.faults.set_clock_skew(Exchange::Binance, 3_600_000);
        }
    }));
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::ClockSkew);
    // Exactly one retry.
    assert_eq!(h.paths_requested(), [SAPI, TIME, SAPI]);
}

// ---------------------------------------------------------------------------------------------
// Testnet (no /sapi)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn testnet_without_sapi_falls_back_to_the_account_endpoint() {
    let h = Harness::start().await;
    h.state().binance.set_testnet(true);
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );
    assert_eq!(result.warnings, ["permissions_unknown"]);
    assert_eq!(h.paths_requested(), [SAPI, ACCOUNT]);
    assert_eq!(h.gate.buckets_acquired(), [("sapi", 1), ("api", 20)]);

    let withdraw = h.check(&creds(SEEDED_WITHDRAW_KEY, SEEDED_WITHDRAW_SECRET)).await;
    assert_code(&withdraw, CheckCode::Ok);
    assert_eq!(withdraw.warnings, ["withdrawals_enabled", "permissions_unknown"]);
    // Errors still map on the fallback path.
    assert_code(&h.check(&creds(SEEDED_FULL_KEY, SEEDED_READ_ONLY_SECRET)).await, CheckCode::InvalidSignature);
}

#[tokio::test]
async fn used_weight_headers_are_reported_to_the_gate() {
    let h = Harness::start().await;
    h.state().binance.set_testnet(true);
    let key = creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET);
    h.check(&key).await;
    h.check(&key).await;
    let used: Vec<(&str, LimitFeedback)> = h.gate.reports();
    assert_eq!(
        used,
        [
            ("api", LimitFeedback::UsedWeight { used: 20, limit_per_minute: 6000 }),
            ("api", LimitFeedback::UsedWeight { used: 40, limit_per_minute: 6000 }),
        ]
    );
    assert_eq!(h.state().binance.used_weight("127.0.0.1".parse().unwrap()), 40);
}

// ---------------------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http_429_is_rate_limited_with_retry_after_and_the_gate_is_told() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Binance, Fault::RateLimit { retry_after: Duration::from_secs(1), count: 1 });
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(1000));
    assert_eq!(h.gate.reports(), [("sapi", LimitFeedback::RetryAfter(Duration::from_secs(1)))]);
}

#[tokio::test]
async fn exceeding_the_weight_limit_is_rate_limited_and_a_ban_is_reported() {
    let h = Harness::start().await;
    start_of_a_minute(h.state());
    h.state().binance.set_testnet(true);
    h.state().binance.set_weight_limit(10);
    let key = creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET);

    // The account endpoint (weight 20) is over the limit: 429, Retry-After until the minute ends.
    let limited = h.check(&key).await;
    assert_code(&limited, CheckCode::RateLimited);
    let retry = limited.retry_after_ms.unwrap();
    assert!((1_000..=60_000).contains(&retry), "{retry}");
    assert!(matches!(h.gate.reports().last(), Some(("api", LimitFeedback::RetryAfter(_)))), "{:?}", h.gate.reports());

    // A gate that did not honour it lets the next check through: the simulator bans the IP and
    // the client reports the ban instead of carrying on.
    let banned = h.check(&key).await;
    assert_code(&banned, CheckCode::RateLimited);
    assert!(banned.message.contains("banned"), "{}", banned.message);
    let ban = banned.retry_after_ms.unwrap();
    assert!((119_000..=120_000).contains(&ban), "{ban}");
    assert_eq!(h.gate.reports().last(), Some(&("api", LimitFeedback::Banned(Duration::from_millis(ban)))));
}

#[tokio::test]
async fn a_paused_gate_sends_nothing() {
    let h = Harness::start().await;
    *h.gate.paused_for.lock().unwrap() = Some(Duration::from_secs(7));
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(7_000));
    assert!(h.paths_requested().is_empty());
}

#[tokio::test]
async fn simulator_bans_an_ip_that_ignores_retry_after() {
    let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
    start_of_a_minute(&sim.state);
    sim.state.binance.set_weight_limit(2);
    let http = reqwest::Client::new();
    let time = sim.urls.binance.join("api/v3/time").unwrap();
    let get = || http.get(time.clone()).send();

    let first = get().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-mbx-used-weight-1m"], "1");
    assert_eq!(get().await.unwrap().headers()["x-mbx-used-weight-1m"], "2");

    let limited = get().await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["code"], -1003);

    // Sent while the Retry-After is still running: the IP is banned.
    let banned = get().await.unwrap();
    assert_eq!(banned.status(), 418);
    let ban: u64 = banned.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((119..=120).contains(&ban), "{ban}");
    assert!(banned.headers().contains_key("x-mbx-used-weight-1m"));
    // And it stays banned, on every /api endpoint.
    let ping = http.get(sim.urls.binance.join("api/v3/ping").unwrap()).send().await.unwrap();
    assert_eq!(ping.status(), 418);

    // The limit is per IP: a client from another address would not be affected; resetting
    // the counters lifts the ban.
    sim.state.binance.reset_rate_limits();
    assert_eq!(get().await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Exchange failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_errors_are_exchange_unavailable() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 1 });
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::ExchangeUnavailable);
    assert!(result.message.contains("503"));
    // The fault counted down: the next check passes.
    assert_code(&h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await, CheckCode::Ok);
}

#[tokio::test]
async fn a_hanging_exchange_is_a_timeout() {
    let h = Harness::with_timeout(Duration::from_millis(300)).await;
    h.state().faults.inject(Exchange::Binance, Fault::Hang);
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
    assert_code(&result, CheckCode::Timeout);
    assert!(result.latency_ms >= 300 && result.latency_ms < 5_000, "{}", result.latency_ms);
}

#[tokio::test]
async fn garbage_body_is_bad_response() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Binance, Fault::Malformed);
    let result = h.check(&creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET)).await;
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
    h.state().faults.set_clock_skew(Exchange::Binance, -30_000);
    let good = creds(SEEDED_FULL_KEY, SEEDED_FULL_SECRET);
    let wrong = creds(SEEDED_FULL_KEY, SEEDED_WITHDRAW_SECRET);
    let mut debug = vec![format!("{good:?}"), format!("{wrong:?}"), format!("{:?}", h.client)];
    for key in [&good, &wrong] {
        let result = h.check(key).await;
        debug.push(format!("{result:?}"));
        debug.push(serde_json::to_string(&result).unwrap());
    }
    h.state().binance.set_testnet(true);
    debug.push(format!("{:?}", h.check(&good).await));
    debug.push(format!("{:?}", h.gate.reports.lock().unwrap()));
    debug.push(format!("{:?}", h.gate.acquired.lock().unwrap()));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("binance credential check finished"), "the test must see the client's logs: {logs}");
    for text in debug.iter().chain([&logs]) {
        for secret in [SEEDED_FULL_SECRET, SEEDED_WITHDRAW_SECRET, SEEDED_FULL_KEY] {
            assert!(!text.contains(secret), "leaked in: {text}");
        }
    }
}
