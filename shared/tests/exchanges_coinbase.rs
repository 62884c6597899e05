//! The Coinbase client (Advanced Trade and Exchange) against the simulator, over real HTTP.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::future::BoxFuture;
use tradeeon_shared::domain::{Exchange, Permissions};
use tradeeon_shared::exchanges::coinbase::{self, CdpKey, CoinbaseClient, build_cdp_jwt, jwt_uri};
use tradeeon_shared::exchanges::{
    CheckCode, CheckResult, ClientContext, Credentials, ExchangeClient, LimitFeedback, LimitKey, RateGate, http_client,
    key_fingerprint,
};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::coinbase::{
    CdpPermissions, ExchangePermissions, SEEDED_ED25519_KEY_NAME, SEEDED_ES256_KEY_NAME, SEEDED_EXCHANGE_KEY,
    SEEDED_EXCHANGE_PASSPHRASE, seeded_ed25519_secret, seeded_es256_pem, seeded_exchange_secret,
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
    client: CoinbaseClient,
}

impl Harness {
    async fn start() -> Harness {
        Self::with_timeout(Duration::from_secs(10)).await
    }

    async fn with_timeout(timeout: Duration) -> Harness {
        let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
        let gate = Arc::new(RecordingGate::default());
        let ctx = ClientContext { http: http_client(timeout).unwrap(), gate: gate.clone() };
        let client = CoinbaseClient::new(ctx, sim.urls.coinbase.clone(), sim.urls.coinbase_exchange.clone());
        Harness { sim, gate, client }
    }

    fn state(&self) -> &SimState {
        &self.sim.state
    }

    async fn check(&self, credentials: &Credentials) -> CheckResult {
        let started = Instant::now();
        CheckResult::new(self.client.check(credentials).await, started.elapsed())
    }

    fn coinbase_requests(&self) -> usize {
        self.state().faults.requests(Exchange::Coinbase).len()
    }
}

fn cdp(name: &str, secret: &str) -> Credentials {
    Credentials {
        api_key: SecretValue::new(name.to_string()),
        api_secret: SecretValue::new(secret.to_string()),
        passphrase: None,
        access_token: None,
    }
}

fn exchange(key: &str, secret: &str, passphrase: &str) -> Credentials {
    Credentials {
        api_key: SecretValue::new(key.to_string()),
        api_secret: SecretValue::new(secret.to_string()),
        passphrase: Some(SecretValue::new(passphrase.to_string())),
        access_token: None,
    }
}

fn seeded_es256() -> Credentials {
    cdp(SEEDED_ES256_KEY_NAME, &seeded_es256_pem())
}

fn seeded_exchange() -> Credentials {
    exchange(SEEDED_EXCHANGE_KEY, &seeded_exchange_secret(), SEEDED_EXCHANGE_PASSPHRASE)
}

fn other_es256_pem() -> String {
    let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    p256::SecretKey::from(&key).to_sec1_pem(p256::pkcs8::LineEnding::LF).unwrap().to_string()
}

fn assert_code(result: &CheckResult, code: CheckCode) {
    assert_eq!(result.code, code, "unexpected result: {result:?}");
    assert_eq!(result.ok, code == CheckCode::Ok);
}

// ---------------------------------------------------------------------------------------------
// Advanced Trade
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn es256_key_checks_ok_with_its_permissions() {
    let h = Harness::start().await;
    let result = h.check(&seeded_es256()).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: false })
    );
    // key_permissions cannot tell whether an IP allowlist is set: no claim either way.
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);
    let acquired = h.gate.acquired.lock().unwrap().clone();
    assert_eq!(
        acquired,
        [LimitKey {
            exchange: Exchange::Coinbase,
            bucket: "private",
            key_fingerprint: Some(key_fingerprint(SEEDED_ES256_KEY_NAME))
        }]
    );
    let requests = h.state().faults.requests(Exchange::Coinbase);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, coinbase::KEY_PERMISSIONS_PATH);
    assert_eq!(requests[0].status, 200);
}

#[tokio::test]
async fn ed25519_key_checks_ok_and_warns_about_transfers() {
    let h = Harness::start().await;
    let result = h.check(&cdp(SEEDED_ED25519_KEY_NAME, &seeded_ed25519_secret())).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: true, ip_restricted: false }));
    assert_eq!(result.warnings, ["withdrawals_enabled"]);
}

#[tokio::test]
async fn new_keys_of_both_types_work_and_a_pem_with_escaped_newlines_is_accepted() {
    let h = Harness::start().await;
    let perms = CdpPermissions { can_view: true, can_trade: false, can_transfer: false };
    let pem = h.state().coinbase.add_es256_key("organizations/o/apiKeys/new-ec", perms);
    let result = h.check(&cdp("organizations/o/apiKeys/new-ec", &pem.replace('\n', "\\n"))).await;
    assert_code(&result, CheckCode::Ok);
    assert!(!result.permissions.unwrap().trade);
    let secret = h.state().coinbase.add_ed25519_key("new-ed-key-id", perms);
    assert_code(&h.check(&cdp("new-ed-key-id", &secret)).await, CheckCode::Ok);
}

#[tokio::test]
async fn wrong_private_key_is_rejected_as_invalid_credentials() {
    // Advanced Trade answers a bad signature and an unknown key with the same bare 401, so the
    // documented equivalent of invalid_signature here is invalid_credentials.
    let h = Harness::start().await;
    let result = h.check(&cdp(SEEDED_ES256_KEY_NAME, &other_es256_pem())).await;
    assert_code(&result, CheckCode::InvalidCredentials);
    assert_eq!(h.state().faults.requests(Exchange::Coinbase)[0].status, 401);

    // An Ed25519 secret for an ES256 key name: wrong alg for the key.
    let result = h.check(&cdp(SEEDED_ES256_KEY_NAME, &seeded_ed25519_secret())).await;
    assert_code(&result, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn unknown_and_revoked_keys_are_invalid_credentials() {
    let h = Harness::start().await;
    let result = h.check(&cdp("organizations/o/apiKeys/nobody", &seeded_es256_pem())).await;
    assert_code(&result, CheckCode::InvalidCredentials);

    assert!(h.state().coinbase.revoke_cdp_key(SEEDED_ES256_KEY_NAME));
    assert_code(&h.check(&seeded_es256()).await, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn malformed_secrets_fail_locally_without_echoing_them() {
    let h = Harness::start().await;
    let secrets = [
        "-----BEGIN EC PRIVATE KEY-----\nSUPERSECRETBUTBROKEN\n-----END EC PRIVATE KEY-----\n",
        "SUPERSECRET not base64 at all",
        &STANDARD.encode(b"SUPERSECRET-but-only-32-bytes-xx"),
    ];
    for secret in secrets {
        let result = h.check(&cdp(SEEDED_ES256_KEY_NAME, secret)).await;
        assert_code(&result, CheckCode::InvalidCredentials);
        assert!(!result.message.contains("SUPERSECRET"), "{}", result.message);
        assert!(!format!("{result:?}").contains("SUPERSECRET"));
    }
    assert_eq!(h.coinbase_requests(), 0, "nothing is sent with an unusable secret");
    assert!(h.gate.acquired.lock().unwrap().is_empty());
}

#[tokio::test]
async fn key_without_view_is_permission_denied_with_its_permissions() {
    let h = Harness::start().await;
    let perms = CdpPermissions { can_view: false, can_trade: true, can_transfer: false };
    assert!(h.state().coinbase.set_cdp_permissions(SEEDED_ES256_KEY_NAME, perms));
    let result = h.check(&seeded_es256()).await;
    assert_code(&result, CheckCode::PermissionDenied);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: false, trade: true, withdraw: false, ip_restricted: false })
    );
}

#[tokio::test]
async fn clock_skew_is_recognised_from_the_date_header() {
    let h = Harness::start().await;
    // Coinbase five minutes behind us: our nbf is in its future.
    h.state().faults.set_clock_skew(Exchange::Coinbase, -300_000);
    let result = h.check(&seeded_es256()).await;
    assert_code(&result, CheckCode::ClockSkew);
    // Five minutes ahead: our exp is in its past.
    h.state().faults.set_clock_skew(Exchange::Coinbase, 300_000);
    assert_code(&h.check(&seeded_es256()).await, CheckCode::ClockSkew);
    // A few seconds is fine.
    h.state().faults.set_clock_skew(Exchange::Coinbase, 2_000);
    assert_code(&h.check(&seeded_es256()).await, CheckCode::Ok);
}

#[tokio::test]
async fn rate_limit_answer_is_reported_to_the_gate() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Coinbase, Fault::RateLimit { retry_after: Duration::from_secs(7), count: 1 });
    let result = h.check(&seeded_es256()).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(7_000));
    let reports = h.gate.reports.lock().unwrap().clone();
    let key = LimitKey {
        exchange: Exchange::Coinbase,
        bucket: "private",
        key_fingerprint: Some(key_fingerprint(SEEDED_ES256_KEY_NAME)),
    };
    assert_eq!(reports, [(key, LimitFeedback::RetryAfter(Duration::from_secs(7)))]);
    // The fault counted down: the next check goes through.
    assert_code(&h.check(&seeded_es256()).await, CheckCode::Ok);
}

#[tokio::test]
async fn paused_gate_means_nothing_is_sent() {
    let h = Harness::start().await;
    *h.gate.paused_for.lock().unwrap() = Some(Duration::from_secs(12));
    for credentials in [seeded_es256(), seeded_exchange()] {
        let result = h.check(&credentials).await;
        assert_code(&result, CheckCode::RateLimited);
        assert_eq!(result.retry_after_ms, Some(12_000));
    }
    assert_eq!(h.coinbase_requests(), 0);
}

#[tokio::test]
async fn the_simulator_enforces_the_documented_per_key_budget() {
    let h = Harness::start().await;
    // Exchange: 15/s with bursts of 30. 100 checks cannot all fit unless they take over 4.6 s.
    let mut limited = None;
    for _ in 0..100 {
        let result = h.check(&seeded_exchange()).await;
        if result.code == CheckCode::RateLimited {
            limited = Some(result);
            break;
        }
        assert_code(&result, CheckCode::Ok);
    }
    let limited = limited.expect("the simulator never rate-limited");
    assert_eq!(limited.retry_after_ms, Some(1_000));
    let reports = h.gate.reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0.bucket, "exchange_private");
}

#[tokio::test]
async fn server_errors_are_exchange_unavailable() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Coinbase, Fault::ServerErrors { status: 503, count: 2 });
    assert_code(&h.check(&seeded_es256()).await, CheckCode::ExchangeUnavailable);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::ExchangeUnavailable);
    assert_code(&h.check(&seeded_es256()).await, CheckCode::Ok);
}

#[tokio::test]
async fn a_hanging_exchange_is_a_timeout() {
    let h = Harness::with_timeout(Duration::from_millis(300)).await;
    h.state().faults.inject(Exchange::Coinbase, Fault::Hang);
    assert_code(&h.check(&seeded_es256()).await, CheckCode::Timeout);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::Timeout);
}

#[tokio::test]
async fn garbage_bodies_are_bad_response() {
    let h = Harness::start().await;
    h.state().faults.inject(Exchange::Coinbase, Fault::Malformed);
    assert_code(&h.check(&seeded_es256()).await, CheckCode::BadResponse);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::BadResponse);
}

// ---------------------------------------------------------------------------------------------
// The simulator's JWT verification
// ---------------------------------------------------------------------------------------------

/// Signs arbitrary header and claims with the seeded ES256 key.
fn es256_token(header: serde_json::Value, claims: serde_json::Value) -> String {
    use p256::ecdsa::signature::Signer as _;
    let CdpKey::Es256(key) = CdpKey::parse(&seeded_es256_pem()).unwrap() else { unreachable!() };
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature: p256::ecdsa::Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

async fn send_bearer(sim: &Simulator, token: &str) -> (u16, String) {
    let url = sim.urls.coinbase.join("api/v3/brokerage/key_permissions").unwrap();
    let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap();
    let reason =
        response.headers().get("x-simulator-reason").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (response.status().as_u16(), reason)
}

#[tokio::test]
async fn the_simulator_rejects_a_jwt_signed_for_another_uri() {
    let h = Harness::start().await;
    let key = CdpKey::parse(&seeded_es256_pem()).unwrap();
    let target = h.sim.urls.coinbase.join("api/v3/brokerage/key_permissions").unwrap();
    let now = chrono::Utc::now().timestamp();

    // Control: the right uri is accepted.
    let good = build_cdp_jwt(SEEDED_ES256_KEY_NAME, &key, &jwt_uri("GET", &target), now);
    assert_eq!(send_bearer(&h.sim, &good).await.0, 200);

    let other_path = h.sim.urls.coinbase.join("api/v3/brokerage/accounts").unwrap();
    let wrong = [
        jwt_uri("GET", &other_path),
        jwt_uri("POST", &target),
        "GET api.coinbase.com/api/v3/brokerage/key_permissions".to_string(),
        format!("GET {}/api/v3/brokerage/key_permissions", target.host_str().unwrap()), // port missing
    ];
    for uri in wrong {
        let token = build_cdp_jwt(SEEDED_ES256_KEY_NAME, &key, &uri, now);
        assert_eq!(send_bearer(&h.sim, &token).await, (401, "uri does not match the request".to_string()), "{uri}");
    }
}

#[tokio::test]
async fn the_simulator_verifies_every_documented_jwt_rule() {
    let h = Harness::start().await;
    let target = h.sim.urls.coinbase.join("api/v3/brokerage/key_permissions").unwrap();
    let uri = jwt_uri("GET", &target);
    let now = chrono::Utc::now().timestamp();
    let header =
        || serde_json::json!({"alg": "ES256", "kid": SEEDED_ES256_KEY_NAME, "nonce": "0123abcd", "typ": "JWT"});
    let claims =
        || serde_json::json!({"sub": SEEDED_ES256_KEY_NAME, "iss": "cdp", "nbf": now, "exp": now + 120, "uri": uri});
    assert_eq!(send_bearer(&h.sim, &es256_token(header(), claims())).await.0, 200, "control");

    let with = |mut value: serde_json::Value, field: &str, new: serde_json::Value| {
        if new.is_null() {
            value.as_object_mut().unwrap().remove(field);
        } else {
            value[field] = new;
        }
        value
    };
    let cases = [
        (with(header(), "typ", "JOSE".into()), claims(), "typ is not JWT"),
        (with(header(), "nonce", serde_json::Value::Null), claims(), "nonce missing"),
        (with(header(), "nonce", "".into()), claims(), "nonce missing"),
        (with(header(), "alg", "EdDSA".into()), claims(), "alg does not match the key type"),
        (header(), with(claims(), "sub", "organizations/o/apiKeys/someone-else".into()), "sub does not equal kid"),
        (header(), with(claims(), "iss", "coinbase-cloud".into()), "iss is not cdp"),
        (header(), with(claims(), "exp", (now + 300).into()), "exp must be after nbf and at most 120 s later"),
        (header(), with(with(claims(), "nbf", (now - 200).into()), "exp", (now - 80).into()), "expired (exp)"),
        (header(), with(with(claims(), "nbf", (now + 60).into()), "exp", (now + 180).into()), "not yet valid (nbf)"),
        (
            with(header(), "kid", "organizations/o/apiKeys/nobody".into()),
            with(claims(), "sub", "organizations/o/apiKeys/nobody".into()),
            "unknown key",
        ),
    ];
    for (header, claims, reason) in cases {
        assert_eq!(send_bearer(&h.sim, &es256_token(header, claims)).await, (401, reason.to_string()));
    }

    // A valid token with a tampered signature.
    let token = es256_token(header(), claims());
    let (rest, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[10] ^= 1;
    let tampered = format!("{rest}.{}", URL_SAFE_NO_PAD.encode(bytes));
    assert_eq!(send_bearer(&h.sim, &tampered).await, (401, "bad signature".to_string()));
    // A DER signature is not what JWS ES256 wants.
    let der = {
        use p256::ecdsa::signature::Signer as _;
        let CdpKey::Es256(key) = CdpKey::parse(&seeded_es256_pem()).unwrap() else { unreachable!() };
        let signature: p256::ecdsa::Signature = key.sign(rest.as_bytes());
        format!("{rest}.{}", URL_SAFE_NO_PAD.encode(signature.to_der().as_bytes()))
    };
    assert_eq!(send_bearer(&h.sim, &der).await, (401, "bad signature".to_string()));
}

// ---------------------------------------------------------------------------------------------
// Coinbase Exchange
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn exchange_key_checks_ok_with_view_proven_and_the_rest_unknown() {
    let h = Harness::start().await;
    let result = h.check(&seeded_exchange()).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(
        result.permissions,
        Some(Permissions { read: true, trade: false, withdraw: false, ip_restricted: false })
    );
    assert_eq!(result.warnings, ["permissions_unknown"]);
    let acquired = h.gate.acquired.lock().unwrap().clone();
    assert_eq!(
        acquired,
        [LimitKey {
            exchange: Exchange::Coinbase,
            bucket: "exchange_private",
            key_fingerprint: Some(key_fingerprint(SEEDED_EXCHANGE_KEY))
        }]
    );
    let requests = h.state().faults.requests(Exchange::Coinbase);
    assert_eq!((requests[0].path.as_str(), requests[0].status), (coinbase::ACCOUNTS_PATH, 200));
}

#[tokio::test]
async fn exchange_wrong_secret_is_invalid_signature() {
    let h = Harness::start().await;
    let wrong = STANDARD.encode([7u8; 64]);
    let result = h.check(&exchange(SEEDED_EXCHANGE_KEY, &wrong, SEEDED_EXCHANGE_PASSPHRASE)).await;
    assert_code(&result, CheckCode::InvalidSignature);
}

#[tokio::test]
async fn exchange_unknown_key_and_wrong_passphrase_are_invalid_credentials() {
    let h = Harness::start().await;
    let result = h
        .check(&exchange("0000000000000000000000000000dead", &seeded_exchange_secret(), SEEDED_EXCHANGE_PASSPHRASE))
        .await;
    assert_code(&result, CheckCode::InvalidCredentials);
    assert!(result.message.contains("does not know"), "{}", result.message);

    let result = h.check(&exchange(SEEDED_EXCHANGE_KEY, &seeded_exchange_secret(), "not-the-passphrase")).await;
    assert_code(&result, CheckCode::InvalidCredentials);
    assert!(result.message.contains("passphrase"), "{}", result.message);

    assert!(h.state().coinbase.revoke_exchange_key(SEEDED_EXCHANGE_KEY));
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn exchange_secret_that_is_not_base64_fails_locally() {
    let h = Harness::start().await;
    let result = h.check(&exchange(SEEDED_EXCHANGE_KEY, "SUPERSECRET%%%", SEEDED_EXCHANGE_PASSPHRASE)).await;
    assert_code(&result, CheckCode::InvalidCredentials);
    assert!(!format!("{result:?}").contains("SUPERSECRET"));
    assert_eq!(h.coinbase_requests(), 0);
}

#[tokio::test]
async fn exchange_expired_timestamp_is_clock_skew() {
    let h = Harness::start().await;
    h.state().faults.set_clock_skew(Exchange::Coinbase, 45_000);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::ClockSkew);
    h.state().faults.set_clock_skew(Exchange::Coinbase, -45_000);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::ClockSkew);
    // Inside the 30 s window.
    h.state().faults.set_clock_skew(Exchange::Coinbase, 20_000);
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::Ok);
}

#[tokio::test]
async fn exchange_key_without_view_is_permission_denied() {
    let h = Harness::start().await;
    let perms = ExchangePermissions { view: false, trade: true, transfer: false };
    assert!(h.state().coinbase.set_exchange_permissions(SEEDED_EXCHANGE_KEY, perms));
    assert_code(&h.check(&seeded_exchange()).await, CheckCode::PermissionDenied);
}

#[tokio::test]
async fn a_blank_passphrase_means_advanced_trade() {
    let h = Harness::start().await;
    let mut credentials = seeded_es256();
    credentials.passphrase = Some(SecretValue::new("  ".to_string()));
    assert_code(&h.check(&credentials).await, CheckCode::Ok);
    assert_eq!(h.state().faults.requests(Exchange::Coinbase)[0].path, coinbase::KEY_PERMISSIONS_PATH);
}

#[tokio::test]
async fn debug_output_never_contains_secrets() {
    let h = Harness::start().await;
    let pem = seeded_es256_pem();
    let pem_body = pem.lines().nth(1).unwrap().to_string();
    let ed = seeded_ed25519_secret();
    let exchange_secret = seeded_exchange_secret();
    let mut rendered = Vec::new();
    for credentials in [
        seeded_es256(),
        cdp(SEEDED_ED25519_KEY_NAME, &ed),
        seeded_exchange(),
        exchange(SEEDED_EXCHANGE_KEY, &STANDARD.encode([7u8; 64]), SEEDED_EXCHANGE_PASSPHRASE),
        cdp(SEEDED_ES256_KEY_NAME, &other_es256_pem()),
    ] {
        rendered.push(format!("{credentials:?}"));
        rendered.push(format!("{:?}", h.check(&credentials).await));
    }
    rendered.push(format!("{:?}", h.client));
    rendered.push(format!("{:?}", CdpKey::parse(&pem).unwrap()));
    rendered.push(format!("{:?}", CdpKey::parse(&ed).unwrap()));
    for text in rendered {
        for secret in [pem_body.as_str(), ed.as_str(), exchange_secret.as_str(), SEEDED_EXCHANGE_PASSPHRASE] {
            assert!(!text.contains(secret), "a secret leaked into {text}");
        }
    }
}
