//! The Zerodha Kite Connect client against the simulator, over real HTTP.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tradeeon_shared::domain::{Exchange, Permissions};
use tradeeon_shared::exchanges::kite::{KiteClient, KiteSession, session_expiry};
use tradeeon_shared::exchanges::{
    CheckCode, CheckResult, ClientContext, Credentials, ExchangeClient, LimitFeedback, LimitKey, RateGate, http_client,
    key_fingerprint,
};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::kite::{SEEDED_API_KEY, SEEDED_API_SECRET, SEEDED_USER_ID};
use tradeeon_simulator::{Fault, SimState, Simulator};

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
    client: KiteClient,
    /// A browser that does not follow redirects, to read where the login page sends the user.
    browser: reqwest::Client,
}

impl Harness {
    async fn start() -> Harness {
        Self::with_timeout(Duration::from_secs(10)).await
    }

    async fn with_timeout(timeout: Duration) -> Harness {
        let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
        let gate = Arc::new(RecordingGate::default());
        let ctx = ClientContext { http: http_client(timeout).unwrap(), gate: gate.clone() };
        let client = KiteClient::new(ctx, sim.urls.kite.clone(), sim.urls.kite_login.clone());
        let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Harness { sim, gate, client, browser }
    }

    fn state(&self) -> &SimState {
        &self.sim.state
    }

    /// Walks the login page the way a user's browser would and returns the request token from
    /// the redirect back to the app.
    async fn log_in(&self) -> String {
        let mut url = self.client.login_url(SEEDED_API_KEY);
        url.query_pairs_mut().append_pair("redirect_url", "https://app.example/kite/callback?from=tradeeon");
        let response = self.browser.get(url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 302, "the login page redirects back to the app");
        let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
        assert_eq!((location.host_str(), location.path()), (Some("app.example"), "/kite/callback"));
        let query: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
        assert_eq!(query["status"], "success");
        assert_eq!(query["from"], "tradeeon");
        query["request_token"].clone()
    }

    async fn create_session(&self, request_token: &str) -> Result<KiteSession, CheckResult> {
        self.create_session_with(&secret(SEEDED_API_KEY), &secret(SEEDED_API_SECRET), request_token).await
    }

    async fn create_session_with(
        &self,
        api_key: &SecretValue,
        api_secret: &SecretValue,
        request_token: &str,
    ) -> Result<KiteSession, CheckResult> {
        let started = Instant::now();
        let created = self.client.create_session(api_key, api_secret, request_token).await;
        created.map_err(|failure| CheckResult::new(Err(failure), started.elapsed()))
    }

    async fn session(&self) -> KiteSession {
        let token = self.log_in().await;
        self.create_session(&token).await.expect("a fresh request token makes a session")
    }

    async fn check(&self, credentials: &Credentials) -> CheckResult {
        let started = Instant::now();
        CheckResult::new(self.client.check(credentials).await, started.elapsed())
    }

    fn kite_requests(&self) -> usize {
        self.state().faults.requests(Exchange::Zerodha).len()
    }
}

fn secret(value: &str) -> SecretValue {
    SecretValue::new(value.to_string())
}

fn credentials(access_token: Option<&SecretValue>) -> Credentials {
    Credentials {
        api_key: secret(SEEDED_API_KEY),
        api_secret: secret(SEEDED_API_SECRET),
        passphrase: None,
        access_token: access_token.cloned(),
    }
}

fn assert_code(result: &CheckResult, code: CheckCode) {
    assert_eq!(result.code, code, "unexpected result: {result:?}");
    assert_eq!(result.ok, code == CheckCode::Ok);
}

fn session_limit_key() -> LimitKey {
    LimitKey { exchange: Exchange::Zerodha, bucket: "private", key_fingerprint: Some(key_fingerprint(SEEDED_API_KEY)) }
}

#[tokio::test]
async fn login_url_points_at_kite_login_with_version_and_key() {
    let h = Harness::start().await;
    let url = h.client.login_url(SEEDED_API_KEY);
    assert_eq!(url.as_str(), format!("{}?v=3&api_key={SEEDED_API_KEY}", h.sim.urls.kite_login));
}

#[tokio::test]
async fn full_login_flow_then_check_ok() {
    let h = Harness::start().await;
    let before = Utc::now();
    let token = h.log_in().await;
    let session = h.create_session(&token).await.unwrap();
    let after = Utc::now();
    assert_eq!(session.user_id, SEEDED_USER_ID);
    assert!(session.expires_at == session_expiry(before) || session.expires_at == session_expiry(after));
    // The simulator ends the session at the same moment (it computes 06:00 IST on its own).
    let sim_expiry = h.state().kite.session_expires_ms(session.access_token.expose()).unwrap();
    assert_eq!(DateTime::<Utc>::from_timestamp_millis(sim_expiry).unwrap(), session.expires_at);

    let result = h.check(&credentials(Some(&session.access_token))).await;
    assert_code(&result, CheckCode::Ok);
    assert_eq!(result.permissions, Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: true }));
    assert!(result.warnings.is_empty(), "{:?}", result.warnings);
    let acquired = h.gate.acquired.lock().unwrap().clone();
    assert_eq!(acquired, [session_limit_key(), session_limit_key()], "one for the session, one for the check");
}

#[tokio::test]
async fn login_page_without_a_redirect_shows_the_token() {
    let h = Harness::start().await;
    let page = h.browser.get(h.client.login_url(SEEDED_API_KEY)).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    let token = html.split("<code id=\"request_token\">").nth(1).unwrap().split('<').next().unwrap().to_string();
    assert_eq!(token.len(), 32);
    assert!(h.create_session(&token).await.is_ok());
}

#[tokio::test]
async fn the_registered_redirect_url_is_used() {
    let h = Harness::start().await;
    assert!(h.state().kite.set_redirect_url(SEEDED_API_KEY, Some("http://127.0.0.1:9/callback")));
    let response = h.browser.get(h.client.login_url(SEEDED_API_KEY)).send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("http://127.0.0.1:9/callback?"), "{location}");
    assert!(location.contains("status=success") && location.contains("request_token="));
}

#[tokio::test]
async fn a_request_token_works_once() {
    let h = Harness::start().await;
    let token = h.log_in().await;
    assert!(h.create_session(&token).await.is_ok());
    let again = h.create_session(&token).await.unwrap_err();
    assert_code(&again, CheckCode::SessionExpired);
    assert!(again.message.contains("log in with Kite again"), "{}", again.message);
}

#[tokio::test]
async fn an_expired_request_token_is_session_expired() {
    let h = Harness::start().await;
    let token = h.log_in().await;
    assert!(h.state().kite.expire_request_token(&token));
    assert_code(&h.create_session(&token).await.unwrap_err(), CheckCode::SessionExpired);
    assert_code(&h.create_session("never-issued-token").await.unwrap_err(), CheckCode::SessionExpired);
}

#[tokio::test]
async fn a_wrong_api_secret_fails_the_checksum() {
    let h = Harness::start().await;
    let token = h.log_in().await;
    let result = h
        .create_session_with(&secret(SEEDED_API_KEY), &secret("definitely-not-the-secret-000000"), &token)
        .await
        .unwrap_err();
    assert_code(&result, CheckCode::InvalidSignature);
    assert!(!format!("{result:?}").contains("definitely-not-the-secret"));
    // A failed checksum does not burn the token: the right secret still works.
    assert!(h.create_session(&token).await.is_ok());
}

#[tokio::test]
async fn an_unknown_api_key_is_invalid_credentials() {
    let h = Harness::start().await;
    let token = h.log_in().await;
    let result =
        h.create_session_with(&secret("unknownapikey000"), &secret(SEEDED_API_SECRET), &token).await.unwrap_err();
    assert_code(&result, CheckCode::InvalidCredentials);
}

#[tokio::test]
async fn an_expired_or_revoked_session_is_session_expired() {
    let h = Harness::start().await;
    let session = h.session().await;
    let creds = credentials(Some(&session.access_token));
    assert_code(&h.check(&creds).await, CheckCode::Ok);
    assert!(h.state().kite.expire_session(session.access_token.expose()));
    let result = h.check(&creds).await;
    assert_code(&result, CheckCode::SessionExpired);
    assert!(result.message.contains("log in with Kite again"), "{}", result.message);

    let other = h.session().await;
    assert!(h.state().kite.revoke_session(other.access_token.expose()));
    assert_code(&h.check(&credentials(Some(&other.access_token))).await, CheckCode::SessionExpired);

    // A made-up token, and a real token presented with another API key.
    assert_code(&h.check(&credentials(Some(&secret("not-a-real-access-token")))).await, CheckCode::SessionExpired);
    let third = h.session().await;
    let mut mismatched = credentials(Some(&third.access_token));
    mismatched.api_key = secret("someoneelseskey0");
    assert_code(&h.check(&mismatched).await, CheckCode::SessionExpired);
}

#[tokio::test]
async fn the_session_ends_at_six_am_ist_on_the_kite_clock() {
    let h = Harness::start().await;
    let session = h.session().await;
    let creds = credentials(Some(&session.access_token));
    let until_expiry = session.expires_at.signed_duration_since(Utc::now()).num_milliseconds();
    // Kite's clock one second before the expiry: still fine; at the expiry: gone.
    h.state().faults.set_clock_skew(Exchange::Zerodha, until_expiry - 1_000);
    assert_code(&h.check(&creds).await, CheckCode::Ok);
    h.state().faults.set_clock_skew(Exchange::Zerodha, until_expiry + 1_000);
    assert_code(&h.check(&creds).await, CheckCode::SessionExpired);
}

#[tokio::test]
async fn no_access_token_means_log_in_first_and_nothing_is_sent() {
    let h = Harness::start().await;
    for token in [None, Some(secret("   "))] {
        let result = h.check(&credentials(token.as_ref())).await;
        assert_code(&result, CheckCode::SessionExpired);
        assert!(result.message.contains("log in with Kite"), "{}", result.message);
    }
    assert_eq!(h.kite_requests(), 0);
}

#[tokio::test]
async fn a_user_without_products_cannot_trade() {
    let h = Harness::start().await;
    let session = h.session().await;
    assert!(h.state().kite.set_products(SEEDED_API_KEY, &[]));
    let result = h.check(&credentials(Some(&session.access_token))).await;
    assert_code(&result, CheckCode::Ok);
    assert!(!result.permissions.unwrap().trade);
}

#[tokio::test]
async fn permission_exception_is_permission_denied() {
    let h = Harness::start().await;
    let session = h.session().await;
    assert!(h.state().kite.deny_profile(SEEDED_API_KEY, true));
    assert_code(&h.check(&credentials(Some(&session.access_token))).await, CheckCode::PermissionDenied);
}

#[tokio::test]
async fn rate_limit_answer_is_reported_to_the_gate() {
    let h = Harness::start().await;
    let session = h.session().await;
    h.state().faults.inject(Exchange::Zerodha, Fault::RateLimit { retry_after: Duration::from_secs(3), count: 1 });
    let result = h.check(&credentials(Some(&session.access_token))).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(3_000));
    assert_eq!(
        h.gate.reports.lock().unwrap().clone(),
        [(session_limit_key(), LimitFeedback::RetryAfter(Duration::from_secs(3)))]
    );
}

#[tokio::test]
async fn the_simulator_enforces_ten_requests_per_second_per_key() {
    let h = Harness::start().await;
    let session = h.session().await;
    let creds = credentials(Some(&session.access_token));
    // 10/s with a burst of 10 (one already spent on the session): 50 checks would need > 4 s.
    let mut limited = false;
    for _ in 0..50 {
        let result = h.check(&creds).await;
        if result.code == CheckCode::RateLimited {
            limited = true;
            break;
        }
        assert_code(&result, CheckCode::Ok);
    }
    assert!(limited, "the simulator never rate-limited");
    assert_eq!(h.gate.reports.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn paused_gate_means_nothing_is_sent() {
    let h = Harness::start().await;
    let token = h.log_in().await;
    let before = h.kite_requests();
    *h.gate.paused_for.lock().unwrap() = Some(Duration::from_secs(9));
    let result = h.create_session(&token).await.unwrap_err();
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(result.retry_after_ms, Some(9_000));
    let result = h.check(&credentials(Some(&secret("whatever")))).await;
    assert_code(&result, CheckCode::RateLimited);
    assert_eq!(h.kite_requests(), before);
}

#[tokio::test]
async fn server_errors_are_exchange_unavailable() {
    let h = Harness::start().await;
    let session = h.session().await;
    h.state().faults.inject(Exchange::Zerodha, Fault::ServerErrors { status: 502, count: 1 });
    assert_code(&h.check(&credentials(Some(&session.access_token))).await, CheckCode::ExchangeUnavailable);
    let token = h.log_in().await;
    h.state().faults.inject(Exchange::Zerodha, Fault::ServerErrors { status: 503, count: 1 });
    assert_code(&h.create_session(&token).await.unwrap_err(), CheckCode::ExchangeUnavailable);
    // The token was never reached, so it still works.
    assert!(h.create_session(&token).await.is_ok());
}

#[tokio::test]
async fn a_hanging_exchange_is_a_timeout() {
    let h = Harness::with_timeout(Duration::from_millis(300)).await;
    let session = h.session().await;
    h.state().faults.inject(Exchange::Zerodha, Fault::Hang);
    assert_code(&h.check(&credentials(Some(&session.access_token))).await, CheckCode::Timeout);
    assert_code(&h.create_session("some-request-token").await.unwrap_err(), CheckCode::Timeout);
}

#[tokio::test]
async fn garbage_bodies_are_bad_response() {
    let h = Harness::start().await;
    let session = h.session().await;
    let token = h.log_in().await;
    h.state().faults.inject(Exchange::Zerodha, Fault::Malformed);
    assert_code(&h.check(&credentials(Some(&session.access_token))).await, CheckCode::BadResponse);
    assert_code(&h.create_session(&token).await.unwrap_err(), CheckCode::BadResponse);
}

#[tokio::test]
async fn the_simulator_requires_the_version_header() {
    let h = Harness::start().await;
    let session = h.session().await;
    let url = h.sim.urls.kite.join("user/profile").unwrap();
    let authorization = format!("token {SEEDED_API_KEY}:{}", session.access_token.expose());
    let response =
        reqwest::Client::new().get(url.clone()).header("authorization", &authorization).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!((body["status"].as_str(), body["error_type"].as_str()), (Some("error"), Some("InputException")));
    let response = reqwest::Client::new()
        .get(url)
        .header("authorization", &authorization)
        .header("x-kite-version", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn debug_output_never_contains_secrets() {
    let h = Harness::start().await;
    let session = h.session().await;
    let access_token = session.access_token.expose().to_string();
    let mut rendered = vec![format!("{session:?}"), format!("{:?}", h.client)];
    let creds = credentials(Some(&session.access_token));
    rendered.push(format!("{creds:?}"));
    rendered.push(format!("{:?}", h.check(&creds).await));
    let token = h.log_in().await;
    rendered
        .push(format!("{:?}", h.client.create_session(&secret(SEEDED_API_KEY), &secret("wrong-secret"), &token).await));
    for text in rendered {
        assert!(!text.contains(&access_token), "the access token leaked into {text}");
        assert!(!text.contains(SEEDED_API_SECRET), "the api secret leaked into {text}");
    }
}
