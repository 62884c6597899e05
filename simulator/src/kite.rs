//! Fake Zerodha Kite Connect v3.
//!
//! * `GET /connect/login?v=3&api_key=…` stands in for the user logging in on Kite's page: it issues
//!   a fresh single-use `request_token` (valid [`REQUEST_TOKEN_TTL_MS`]) and redirects (302) to the
//!   app's redirect URL with `action=login&type=login&status=success&request_token=…` (plus the
//!   decoded `redirect_params`, as Kite does). Kite only redirects to the URL registered for the
//!   app; as a simulator convenience a `redirect_url` query parameter overrides it. With neither,
//!   the token is shown on an HTML page.
//! * `POST /session/token` (form `api_key`, `request_token`, `checksum`) verifies
//!   checksum = hex SHA-256(api_key + request_token + api_secret) (`TokenException: Invalid
//!   `checksum`.`), then that the request token is known, unused, unexpired and belongs to that
//!   app (`TokenException: Token is invalid or has expired.`); an unknown api_key is `InputException:
//!   Invalid `api_key`.` (Kite does not document this answer; the client treats either exception
//!   type mentioning `api_key` the same). It answers `{status: "success", data: {user_id,
//!   access_token, …}}`. `DELETE /session/token` logs out.
//! * `GET /user/profile` with `Authorization: token api_key:access_token`.
//!
//! Every endpoint requires `X-Kite-Version: 3` (`InputException` otherwise). Sessions expire at
//! the first 06:00 IST after their creation on the (skewable) simulator clock; bad, expired or
//! revoked tokens get `403 TokenException: Incorrect `api_key` or `access_token`.`. Each API key may
//! make 10 requests per second (429 `NetworkException: Too many requests` beyond).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{Datelike as _, Timelike as _};
use rand::Rng as _;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tradeeon_shared::domain::Exchange;

use crate::SimState;
use crate::coinbase::RateBuckets;

/// The seeded Kite Connect app.
pub const SEEDED_API_KEY: &str = "k1tes1mapikey0x7";
pub const SEEDED_API_SECRET: &str = "s3cr3tk1tes1m0a9b8c7d6e5f4g3h2i1";
pub const SEEDED_USER_ID: &str = "ZT4821";

/// How long a request token may wait before being exchanged (Kite: "a couple of minutes").
pub const REQUEST_TOKEN_TTL_MS: i64 = 5 * 60 * 1000;
/// 10 requests per second per API key.
const RATE: (f64, f64) = (10.0, 10.0);

/// The Kite user behind an app, as `/user/profile` reports them.
#[derive(Debug, Clone)]
pub struct KiteUser {
    pub user_id: String,
    pub user_name: String,
    pub email: String,
    pub exchanges: Vec<String>,
    pub products: Vec<String>,
    pub order_types: Vec<String>,
}

impl KiteUser {
    fn seeded() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        KiteUser {
            user_id: SEEDED_USER_ID.to_string(),
            user_name: "Asha Rao".to_string(),
            email: "asha.rao@example.com".to_string(),
            exchanges: strings(&["NSE", "BSE", "NFO", "MCX"]),
            products: strings(&["CNC", "NRML", "MIS"]),
            order_types: strings(&["MARKET", "LIMIT", "SL", "SL-M"]),
        }
    }
}

#[derive(Debug, Clone)]
struct App {
    secret: String,
    user: KiteUser,
    redirect_url: Option<String>,
    /// Test hook: `/user/profile` answers `PermissionException`.
    profile_denied: bool,
}

#[derive(Debug, Clone)]
struct RequestToken {
    api_key: String,
    issued_ms: i64,
    used: bool,
}

#[derive(Debug, Clone)]
struct Session {
    api_key: String,
    user_id: String,
    expires_ms: i64,
    revoked: bool,
}

#[derive(Default)]
struct Inner {
    apps: HashMap<String, App>,
    request_tokens: HashMap<String, RequestToken>,
    sessions: HashMap<String, Session>,
}

/// The fake Kite's apps, request tokens and sessions.
#[derive(Default)]
pub struct KiteState {
    inner: Mutex<Inner>,
    limits: RateBuckets,
}

impl KiteState {
    /// One app ([`SEEDED_API_KEY`] / [`SEEDED_API_SECRET`]) for user [`SEEDED_USER_ID`].
    pub fn seeded() -> Self {
        let state = Self::default();
        state.add_app(SEEDED_API_KEY, SEEDED_API_SECRET, KiteUser::seeded());
        state
    }

    pub fn add_app(&self, api_key: &str, api_secret: &str, user: KiteUser) {
        self.lock().apps.insert(
            api_key.to_string(),
            App { secret: api_secret.to_string(), user, redirect_url: None, profile_denied: false },
        );
    }

    /// Sets the redirect URL registered for the app.
    pub fn set_redirect_url(&self, api_key: &str, redirect_url: Option<&str>) -> bool {
        self.with_app(api_key, |app| app.redirect_url = redirect_url.map(str::to_string))
    }

    /// Changes the products (and so the trade permission) the app's user has.
    pub fn set_products(&self, api_key: &str, products: &[&str]) -> bool {
        self.with_app(api_key, |app| app.user.products = products.iter().map(|s| s.to_string()).collect())
    }

    /// Makes `/user/profile` answer `PermissionException` for this app.
    pub fn deny_profile(&self, api_key: &str, denied: bool) -> bool {
        self.with_app(api_key, |app| app.profile_denied = denied)
    }

    /// Simulates a user completing the login page: a fresh request token for the app.
    pub fn issue_request_token(&self, api_key: &str, now_ms: i64) -> Option<String> {
        let mut inner = self.lock();
        if !inner.apps.contains_key(api_key) {
            return None;
        }
        let token = random_token(32);
        inner
            .request_tokens
            .insert(token.clone(), RequestToken { api_key: api_key.to_string(), issued_ms: now_ms, used: false });
        Some(token)
    }

    /// Ages a request token past its lifetime.
    pub fn expire_request_token(&self, request_token: &str) -> bool {
        match self.lock().request_tokens.get_mut(request_token) {
            Some(token) => {
                token.issued_ms -= REQUEST_TOKEN_TTL_MS + 1;
                true
            }
            None => false,
        }
    }

    /// Makes the session end now (as at 06:00 IST).
    pub fn expire_session(&self, access_token: &str) -> bool {
        match self.lock().sessions.get_mut(access_token) {
            Some(session) => {
                session.expires_ms = i64::MIN;
                true
            }
            None => false,
        }
    }

    /// Invalidates the session (as a logout or a login elsewhere does).
    pub fn revoke_session(&self, access_token: &str) -> bool {
        match self.lock().sessions.get_mut(access_token) {
            Some(session) => {
                session.revoked = true;
                true
            }
            None => false,
        }
    }

    /// When the session ends, in Unix milliseconds.
    pub fn session_expires_ms(&self, access_token: &str) -> Option<i64> {
        self.lock().sessions.get(access_token).map(|s| s.expires_ms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("kite lock")
    }

    fn with_app(&self, api_key: &str, f: impl FnOnce(&mut App)) -> bool {
        match self.lock().apps.get_mut(api_key) {
            Some(app) => {
                f(app);
                true
            }
            None => false,
        }
    }
}

fn random_token(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..len).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// The first 06:00 IST strictly after `created_ms` (IST is a fixed UTC+05:30), in Unix ms.
fn next_six_am_ist(created_ms: i64) -> i64 {
    const IST_OFFSET_MS: i64 = (5 * 3600 + 30 * 60) * 1000;
    const DAY_MS: i64 = 24 * 3600 * 1000;
    const SIX_MS: i64 = 6 * 3600 * 1000;
    let local = created_ms + IST_OFFSET_MS;
    let midnight = local.div_euclid(DAY_MS) * DAY_MS;
    let six = if local - midnight < SIX_MS { midnight + SIX_MS } else { midnight + DAY_MS + SIX_MS };
    six - IST_OFFSET_MS
}

/// The seeded Kite app, for `tradeeon simulate`.
pub fn seeded_keys_summary() -> String {
    format!(
        "Zerodha Kite Connect (log in through the login URL; the simulator logs the user in at once):\n\
         \x20   api_key:    {SEEDED_API_KEY}\n\
         \x20   api_secret: {SEEDED_API_SECRET}\n\
         \x20   user:       {SEEDED_USER_ID}\n"
    )
}

/// The fake Kite Connect API and login page.
pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/connect/login", get(login))
        .route("/session/token", post(create_session).delete(delete_session))
        .route("/user/profile", get(profile))
        .layer(axum::middleware::from_fn_with_state((state.clone(), Exchange::Zerodha), crate::faults::apply))
        .with_state(state)
}

fn kite_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "status": "error", "message": message, "data": null, "error_type": error_type })))
        .into_response()
}

fn version_error() -> Response {
    kite_error(StatusCode::BAD_REQUEST, "InputException", "Invalid or missing `X-Kite-Version` header.")
}

fn has_version(headers: &HeaderMap) -> bool {
    headers.get("x-kite-version").and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() == "3")
}

fn rate_limited() -> Response {
    let mut response = kite_error(StatusCode::TOO_MANY_REQUESTS, "NetworkException", "Too many requests");
    response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
    response
}

fn ist_timestamp(ms: i64) -> String {
    let ist = chrono::FixedOffset::east_opt(5 * 3600 + 30 * 60).expect("valid offset");
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().with_timezone(&ist);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", t.year(), t.month(), t.day(), t.hour(), t.minute(), t.second())
}

async fn login(State(state): State<Arc<SimState>>, Query(query): Query<HashMap<String, String>>) -> Response {
    if query.get("v").map(String::as_str) != Some("3") {
        return (StatusCode::BAD_REQUEST, Html("<h1>Invalid request: v=3 is required</h1>")).into_response();
    }
    let Some(api_key) = query.get("api_key") else {
        return (StatusCode::BAD_REQUEST, Html("<h1>Invalid request: api_key is required</h1>")).into_response();
    };
    let now_ms = state.faults.now_ms(Exchange::Zerodha);
    let Some(token) = state.kite.issue_request_token(api_key, now_ms) else {
        return (StatusCode::BAD_REQUEST, Html("<h1>Invalid `api_key`.</h1>")).into_response();
    };
    let (registered, user_id) = {
        let inner = state.kite.lock();
        let app = inner.apps.get(api_key);
        (app.and_then(|a| a.redirect_url.clone()), app.map(|a| a.user.user_id.clone()).unwrap_or_default())
    };
    let redirect = query.get("redirect_url").cloned().or(registered);
    match redirect.and_then(|r| url::Url::parse(&r).ok()) {
        Some(mut url) => {
            {
                let mut pairs = url.query_pairs_mut();
                if let Some(params) = query.get("redirect_params") {
                    for (k, v) in url::form_urlencoded::parse(params.as_bytes()) {
                        pairs.append_pair(&k, &v);
                    }
                }
                pairs
                    .append_pair("action", "login")
                    .append_pair("type", "login")
                    .append_pair("status", "success")
                    .append_pair("request_token", &token);
            }
            (StatusCode::FOUND, [(axum::http::header::LOCATION, url.to_string())]).into_response()
        }
        None => Html(format!(
            "<!doctype html><title>Kite Connect (simulator)</title>\
             <h1>Logged in as {user_id}</h1>\
             <p>status: success</p><p>request_token: <code id=\"request_token\">{token}</code></p>"
        ))
        .into_response(),
    }
}

#[derive(Deserialize)]
struct SessionForm {
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    request_token: String,
    #[serde(default)]
    checksum: String,
}

async fn create_session(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<SessionForm>,
) -> Response {
    if !has_version(&headers) {
        return version_error();
    }
    if form.api_key.is_empty() || form.request_token.is_empty() || form.checksum.is_empty() {
        return kite_error(
            StatusCode::BAD_REQUEST,
            "InputException",
            "Missing `api_key`, `request_token` or `checksum`.",
        );
    }
    if !state.kite.limits.take(&form.api_key, RATE) {
        return rate_limited();
    }
    let now_ms = state.faults.now_ms(Exchange::Zerodha);
    let mut inner = state.kite.lock();
    let Some(app) = inner.apps.get(&form.api_key).cloned() else {
        return kite_error(StatusCode::BAD_REQUEST, "InputException", "Invalid `api_key`.");
    };
    let expected = hex::encode(Sha256::digest(format!("{}{}{}", form.api_key, form.request_token, app.secret)));
    if !expected.eq_ignore_ascii_case(form.checksum.trim()) {
        return kite_error(StatusCode::FORBIDDEN, "TokenException", "Invalid `checksum`.");
    }
    let fresh = inner
        .request_tokens
        .get_mut(&form.request_token)
        .filter(|t| t.api_key == form.api_key && !t.used && now_ms - t.issued_ms <= REQUEST_TOKEN_TTL_MS);
    let Some(token) = fresh else {
        return kite_error(StatusCode::FORBIDDEN, "TokenException", "Token is invalid or has expired.");
    };
    token.used = true;
    let access_token = random_token(32);
    inner.sessions.insert(
        access_token.clone(),
        Session {
            api_key: form.api_key.clone(),
            user_id: app.user.user_id.clone(),
            expires_ms: next_six_am_ist(now_ms),
            revoked: false,
        },
    );
    let user = &app.user;
    axum::Json(json!({
        "status": "success",
        "data": {
            "user_type": "individual",
            "email": user.email,
            "user_name": user.user_name,
            "user_shortname": user.user_name.split_whitespace().next().unwrap_or_default(),
            "broker": "ZERODHA",
            "exchanges": user.exchanges,
            "products": user.products,
            "order_types": user.order_types,
            "avatar_url": null,
            "user_id": user.user_id,
            "api_key": form.api_key,
            "access_token": access_token,
            "public_token": random_token(32),
            "refresh_token": "",
            "enctoken": random_token(24),
            "login_time": ist_timestamp(now_ms),
            "meta": { "demat_consent": "consent" },
        }
    }))
    .into_response()
}

/// The API key and app of the session an `Authorization: token api_key:access_token` header
/// names, if that session is live.
fn live_session(state: &SimState, headers: &HeaderMap) -> Option<(String, App)> {
    let value = headers.get("authorization").and_then(|v| v.to_str().ok())?;
    let (api_key, access_token) = value.strip_prefix("token ").and_then(|v| v.trim().split_once(':'))?;
    let now_ms = state.faults.now_ms(Exchange::Zerodha);
    let inner = state.kite.lock();
    let session = inner.sessions.get(access_token)?;
    if session.api_key != api_key || session.revoked || now_ms >= session.expires_ms {
        return None;
    }
    let app = inner.apps.get(api_key).filter(|app| app.user.user_id == session.user_id)?.clone();
    Some((api_key.to_string(), app))
}

async fn profile(State(state): State<Arc<SimState>>, headers: HeaderMap) -> Response {
    if !has_version(&headers) {
        return version_error();
    }
    let Some((api_key, app)) = live_session(&state, &headers) else {
        return kite_error(StatusCode::FORBIDDEN, "TokenException", "Incorrect `api_key` or `access_token`.");
    };
    if !state.kite.limits.take(&api_key, RATE) {
        return rate_limited();
    }
    if app.profile_denied {
        return kite_error(StatusCode::FORBIDDEN, "PermissionException", "Insufficient permission for that call.");
    }
    let user = &app.user;
    axum::Json(json!({
        "status": "success",
        "data": {
            "user_id": user.user_id,
            "user_type": "individual",
            "email": user.email,
            "user_name": user.user_name,
            "user_shortname": user.user_name.split_whitespace().next().unwrap_or_default(),
            "broker": "ZERODHA",
            "exchanges": user.exchanges,
            "products": user.products,
            "order_types": user.order_types,
            "avatar_url": null,
            "meta": { "demat_consent": "consent" },
        }
    }))
    .into_response()
}

#[derive(Deserialize)]
struct LogoutQuery {
    #[serde(default)]
    api_key: String,
    #[serde(default)]
    access_token: String,
}

async fn delete_session(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    Query(query): Query<LogoutQuery>,
) -> Response {
    if !has_version(&headers) {
        return version_error();
    }
    let mut inner = state.kite.lock();
    match inner.sessions.get_mut(&query.access_token).filter(|s| s.api_key == query.api_key && !s.revoked) {
        Some(session) => {
            session.revoked = true;
            axum::Json(json!({ "status": "success", "data": true })).into_response()
        }
        None => kite_error(StatusCode::FORBIDDEN, "TokenException", "Incorrect `api_key` or `access_token`."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_at_the_next_six_am_ist() {
        let ms = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        assert_eq!(next_six_am_ist(ms("2025-03-10T00:29:59Z")), ms("2025-03-10T00:30:00Z"));
        assert_eq!(next_six_am_ist(ms("2025-03-10T00:30:00Z")), ms("2025-03-11T00:30:00Z"));
        assert_eq!(next_six_am_ist(ms("2025-03-10T18:30:00Z")), ms("2025-03-11T00:30:00Z"));
    }
}
