//! Fake Binance spot API, following `binance-spot-api-docs` (`rest-api.md`, `errors.md`,
//! `testnet/general-info.md`) and the wallet docs' "Get API Key Permission".
//!
//! Endpoints: `GET /api/v3/ping`, `GET /api/v3/time` (weight 1), SIGNED `GET /api/v3/account`
//! (weight 20) and SIGNED `GET /sapi/v1/account/apiRestrictions` (sapi weight 1).
//!
//! SIGNED requests: `X-MBX-APIKEY` must be a 64-character alphanumeric key (`-2014` otherwise)
//! that exists and is not revoked (`-2015`); `signature` must be the hex HMAC-SHA256 (any case)
//! of the query string exactly as received minus its `signature=` parameter, concatenated with the
//! body (`-1022`); `timestamp` (ms, or µs) must satisfy Binance's rule `timestamp < serverTime +
//! 1000 && serverTime - timestamp <= recvWindow` (default 5000, at most 60000) on the (skewable)
//! server clock (`-1021`); a key restricted to trusted IPs must be called from one of them
//! (`-2015`, the same answer as an unknown key, as on Binance). `/api/v3/account` needs "Enable
//! Reading" (`-2015`); `apiRestrictions` describes the key itself and answers for any valid key.
//!
//! Limits, per client IP and per minute of the server clock: `/api/*` spends the request weight
//! (limit 6000 by default, [`BinanceState::set_weight_limit`]) and every response carries
//! `X-MBX-USED-WEIGHT-1M`; past the limit the answer is 429 with `Retry-After` (seconds until the
//! minute ends) and `-1003`; a request sent while that `Retry-After` is still running gets the IP
//! banned: 418 with `Retry-After` until the ban ends (2 minutes by default,
//! [`BinanceState::set_ban_duration`]). `/sapi/*` IP-limited endpoints each have an independent
//! 12,000 per minute, report `X-SAPI-USED-IP-WEIGHT-1M`, and answer 429 past it (no 418 escalation
//! on `/sapi`).
//!
//! Testnet mode ([`BinanceState::set_testnet`]): the Spot Test Network has no `/sapi` endpoints,
//! so every `/sapi` path answers 404.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tradeeon_shared::domain::Exchange;

use crate::SimState;

/// Read + spot trading, no withdrawals, IP-unrestricted.
pub const SEEDED_FULL_KEY: &str = "SimFull06fa2aa7176e28ac47dc00fb71387dee2d1043dd3e5355c68e6d331de";
pub const SEEDED_FULL_SECRET: &str = "5424c0ec6bd7e1cc8b6b822d7063a3130a9928e1a4cd2f165f854a8d53655b5c";
/// Read only, IP-unrestricted.
pub const SEEDED_READ_ONLY_KEY: &str = "SimReadonlyd619a41302da5bcea65da3b0d7840788a4f7e223fd69201e2667e";
pub const SEEDED_READ_ONLY_SECRET: &str = "c0cb15961877f3fe456bfeb46904d3f3f24d2f9f9d3efcfc54972252e67ba248";
/// Read, trade and withdrawals; restricted to 127.0.0.1 (Binance requires an IP restriction for
/// withdrawals).
pub const SEEDED_WITHDRAW_KEY: &str = "SimWithdraw75d02aff1a19a6ae1bc31b5750beb80cf0925d7d3df6f60221c79";
pub const SEEDED_WITHDRAW_SECRET: &str = "295425a99f3406e0a238c7faca57fb27b15188c3382dd44dae571ede19cc44dc";
/// Read + trade, restricted to 127.0.0.1 and ::1: the recommended setup.
pub const SEEDED_LOCAL_ONLY_KEY: &str = "SimLocalde51b859ff7299cee3ce9497e46375935e6b6ca19f38a149f8db1d27";
pub const SEEDED_LOCAL_ONLY_SECRET: &str = "4f9ed43fd3b241b1729c5f9dc988f7e8e53ee46f3b010005605bebb1962db0f2";
/// Read + trade, restricted to 203.0.113.7 (a documentation address): always `-2015` from here.
pub const SEEDED_ELSEWHERE_KEY: &str = "SimElsewheredf41ede9b267f77d269d164a7349c8030a20b974e5cebbc232fb";
pub const SEEDED_ELSEWHERE_SECRET: &str = "c5adbfeafa7d94460ebffdc95db3758df2ec2202ddf7a95f4d417a34b01a84f7";
/// Deleted on the exchange: `-2015`.
pub const SEEDED_REVOKED_KEY: &str = "SimRevoked2a9c2e75890a6e834c9e9c22a7146fa0a6ef6e8c3ba305d8c41fc5";
pub const SEEDED_REVOKED_SECRET: &str = "7263f4bf2d5a58bfe2390c59d63bdb1ba5da890ae6ac1eeae4a95fc0988586d9";
/// Valid but without "Enable Reading" (which real Binance keys always have; for the
/// `permission_denied` path).
pub const SEEDED_NO_READ_KEY: &str = "SimNoreada6b3d484c369b26a54fd1a98b5e6b74bfb450844d54f397a24012e8";
pub const SEEDED_NO_READ_SECRET: &str = "e83fc517dab8e0ace63ddb9d5763e7ba7143d6e90ba01c20e46d36e85814cb88";

/// The address the "elsewhere" key is restricted to.
pub const ELSEWHERE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

pub const DEFAULT_WEIGHT_LIMIT: u32 = 6_000;
pub const DEFAULT_SAPI_WEIGHT_LIMIT: u32 = 12_000;
pub const DEFAULT_BAN: Duration = Duration::from_secs(120);
const MAX_RECV_WINDOW_MS: f64 = 60_000.0;

/// A key's switches, as `apiRestrictions` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinancePermissions {
    pub enable_reading: bool,
    pub enable_spot_and_margin_trading: bool,
    pub enable_withdrawals: bool,
}

impl BinancePermissions {
    pub const READ_ONLY: Self =
        Self { enable_reading: true, enable_spot_and_margin_trading: false, enable_withdrawals: false };
    pub const READ_TRADE: Self =
        Self { enable_reading: true, enable_spot_and_margin_trading: true, enable_withdrawals: false };
    pub const ALL: Self = Self { enable_reading: true, enable_spot_and_margin_trading: true, enable_withdrawals: true };
}

#[derive(Clone)]
struct KeyEntry {
    secret: String,
    permissions: BinancePermissions,
    /// Empty: unrestricted.
    ip_allowlist: Vec<IpAddr>,
    revoked: bool,
    create_time: i64,
}

/// One client IP's counters in the current minute.
#[derive(Default)]
struct IpUsage {
    minute: i64,
    api_used: u32,
    sapi_used: HashMap<&'static str, u32>,
    /// End of the `Retry-After` of the last 429 on `/api` (server ms).
    retry_until_ms: Option<i64>,
    banned_until_ms: Option<i64>,
}

struct Limits {
    weight_limit: u32,
    sapi_weight_limit: u32,
    ban: Duration,
    ips: HashMap<IpAddr, IpUsage>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            weight_limit: DEFAULT_WEIGHT_LIMIT,
            sapi_weight_limit: DEFAULT_SAPI_WEIGHT_LIMIT,
            ban: DEFAULT_BAN,
            ips: HashMap::new(),
        }
    }
}

/// The fake Binance's keys, counters and switches. All methods are test hooks.
#[derive(Default)]
pub struct BinanceState {
    keys: Mutex<HashMap<String, KeyEntry>>,
    limits: Mutex<Limits>,
    testnet: AtomicBool,
}

impl BinanceState {
    /// The keys documented in [`seeded_keys_summary`].
    pub fn seeded() -> Self {
        let state = Self::default();
        let local = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)];
        state.add_key(SEEDED_FULL_KEY, SEEDED_FULL_SECRET, BinancePermissions::READ_TRADE, vec![]);
        state.add_key(SEEDED_READ_ONLY_KEY, SEEDED_READ_ONLY_SECRET, BinancePermissions::READ_ONLY, vec![]);
        state.add_key(SEEDED_WITHDRAW_KEY, SEEDED_WITHDRAW_SECRET, BinancePermissions::ALL, local.clone());
        state.add_key(SEEDED_LOCAL_ONLY_KEY, SEEDED_LOCAL_ONLY_SECRET, BinancePermissions::READ_TRADE, local);
        state.add_key(
            SEEDED_ELSEWHERE_KEY,
            SEEDED_ELSEWHERE_SECRET,
            BinancePermissions::READ_TRADE,
            vec![ELSEWHERE_IP],
        );
        state.add_key(SEEDED_REVOKED_KEY, SEEDED_REVOKED_SECRET, BinancePermissions::READ_TRADE, vec![]);
        state.revoke_key(SEEDED_REVOKED_KEY);
        let no_read = BinancePermissions { enable_reading: false, ..BinancePermissions::READ_TRADE };
        state.add_key(SEEDED_NO_READ_KEY, SEEDED_NO_READ_SECRET, no_read, vec![]);
        state
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyEntry>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a key. `ip_allowlist` empty = unrestricted. Binance keys are 64
    /// alphanumeric characters; others are answered with `-2014`.
    pub fn add_key(&self, api_key: &str, secret: &str, permissions: BinancePermissions, ip_allowlist: Vec<IpAddr>) {
        let entry = KeyEntry {
            secret: secret.to_string(),
            permissions,
            ip_allowlist,
            revoked: false,
            create_time: chrono::Utc::now().timestamp_millis(),
        };
        self.keys().insert(api_key.to_string(), entry);
    }

    /// Deletes the key on the exchange; `false` if unknown.
    pub fn revoke_key(&self, api_key: &str) -> bool {
        self.keys().get_mut(api_key).map(|k| k.revoked = true).is_some()
    }

    pub fn set_permissions(&self, api_key: &str, permissions: BinancePermissions) -> bool {
        self.keys().get_mut(api_key).map(|k| k.permissions = permissions).is_some()
    }

    /// Restricts the key to these IPs (empty: unrestricted).
    pub fn set_ip_allowlist(&self, api_key: &str, ips: Vec<IpAddr>) -> bool {
        self.keys().get_mut(api_key).map(|k| k.ip_allowlist = ips).is_some()
    }

    /// The `/api` request-weight limit per IP per minute.
    pub fn set_weight_limit(&self, limit: u32) {
        self.limits().weight_limit = limit;
    }

    /// The per-endpoint `/sapi` IP weight limit per minute.
    pub fn set_sapi_weight_limit(&self, limit: u32) {
        self.limits().sapi_weight_limit = limit;
    }

    /// How long an IP ban (418) lasts.
    pub fn set_ban_duration(&self, ban: Duration) {
        self.limits().ban = ban;
    }

    /// Forgets all weight counters, `Retry-After` windows and bans.
    pub fn reset_rate_limits(&self) {
        self.limits().ips.clear();
    }

    /// `/api` weight used by `ip` in the current minute, as the last response reported it.
    pub fn used_weight(&self, ip: IpAddr) -> u32 {
        self.limits().ips.get(&ip).map(|u| u.api_used).unwrap_or(0)
    }

    /// Testnet mode: no `/sapi` endpoints (404).
    pub fn set_testnet(&self, testnet: bool) {
        self.testnet.store(testnet, Ordering::Relaxed);
    }

    pub fn is_testnet(&self) -> bool {
        self.testnet.load(Ordering::Relaxed)
    }
}

/// Printed by `tradeeon simulate`.
pub fn seeded_keys_summary() -> String {
    let rows = [
        ("read + trade, no IP restriction", SEEDED_FULL_KEY, SEEDED_FULL_SECRET),
        ("read only, no IP restriction", SEEDED_READ_ONLY_KEY, SEEDED_READ_ONLY_SECRET),
        ("read + trade + withdrawals, 127.0.0.1 only", SEEDED_WITHDRAW_KEY, SEEDED_WITHDRAW_SECRET),
        ("read + trade, 127.0.0.1 only", SEEDED_LOCAL_ONLY_KEY, SEEDED_LOCAL_ONLY_SECRET),
        ("restricted to 203.0.113.7 (-2015 from here)", SEEDED_ELSEWHERE_KEY, SEEDED_ELSEWHERE_SECRET),
        ("revoked (-2015)", SEEDED_REVOKED_KEY, SEEDED_REVOKED_SECRET),
        ("without Enable Reading", SEEDED_NO_READ_KEY, SEEDED_NO_READ_SECRET),
    ];
    let mut out = String::from("Binance (API key / secret):\n");
    for (what, key, secret) in rows {
        out.push_str(&format!("  {what}\n    key:    {key}\n    secret: {secret}\n"));
    }
    out
}

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/api/v3/ping", get(ping))
        .route("/api/v3/time", get(time))
        .route("/api/v3/account", get(account))
        .route("/sapi/v1/account/apiRestrictions", get(api_restrictions))
        .fallback(not_found)
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state((state, Exchange::Binance), crate::faults::apply))
}

// -------------------------------------------------------------------------------------------------
// Handlers
// -------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Api,
    Sapi,
}

/// A Binance error answer.
fn error(status: StatusCode, code: i64, msg: &str) -> Response {
    (status, [("content-type", "application/json")], json!({ "code": code, "msg": msg }).to_string()).into_response()
}

fn client_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn now_ms(state: &SimState) -> i64 {
    state.faults.now_ms(Exchange::Binance)
}

fn seconds_until(now_ms: i64, until_ms: i64) -> u64 {
    let ms = (until_ms - now_ms).max(0) as u64;
    ms.div_ceil(1000).max(1)
}

/// Spends `weight` for the request's IP; `Err` is the 429/418 answer. `Ok` is the header to add.
fn spend(
    state: &SimState,
    ip: IpAddr,
    family: Family,
    endpoint: &'static str,
    weight: u32,
) -> Result<(&'static str, u32), Box<Response>> {
    let now = now_ms(state);
    let minute = now.div_euclid(60_000);
    let minute_end = (minute + 1) * 60_000;
    let mut limits = state.binance.limits();
    let (weight_limit, sapi_limit, ban) = (limits.weight_limit, limits.sapi_weight_limit, limits.ban);
    let usage = limits.ips.entry(ip).or_default();
    if usage.minute != minute {
        usage.minute = minute;
        usage.api_used = 0;
        usage.sapi_used.clear();
    }
    match family {
        Family::Api => {
            let banned_until = match usage.banned_until_ms {
                Some(until) if until > now => Some(until),
                _ => match usage.retry_until_ms {
                    // Kept sending during a 429's Retry-After: automated IP ban.
                    Some(until) if until > now => {
                        let until = now + ban.as_millis() as i64;
                        usage.banned_until_ms = Some(until);
                        usage.retry_until_ms = None;
                        Some(until)
                    }
                    _ => None,
                },
            };
            if let Some(until) = banned_until {
                let mut response = error(
                    StatusCode::IM_A_TEAPOT,
                    -1003,
                    &format!(
                        "Way too much request weight used; IP banned until {until}. Please use WebSocket Streams for live updates to avoid bans."
                    ),
                );
                response.headers_mut().insert("retry-after", HeaderValue::from(seconds_until(now, until)));
                response.headers_mut().insert("x-mbx-used-weight-1m", HeaderValue::from(usage.api_used));
                return Err(Box::new(response));
            }
            usage.api_used = usage.api_used.saturating_add(weight);
            if usage.api_used > weight_limit {
                usage.retry_until_ms = Some(minute_end);
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    -1003,
                    &format!(
                        "Too much request weight used; current limit is {weight_limit} request weight per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
                    ),
                );
                response.headers_mut().insert("retry-after", HeaderValue::from(seconds_until(now, minute_end)));
                response.headers_mut().insert("x-mbx-used-weight-1m", HeaderValue::from(usage.api_used));
                return Err(Box::new(response));
            }
            Ok(("x-mbx-used-weight-1m", usage.api_used))
        }
        Family::Sapi => {
            let used = usage.sapi_used.entry(endpoint).or_default();
            *used = used.saturating_add(weight);
            if *used > sapi_limit {
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    -1003,
                    &format!(
                        "Too much request weight used; current limit is {sapi_limit} request weight per 1 MINUTE."
                    ),
                );
                response.headers_mut().insert("retry-after", HeaderValue::from(seconds_until(now, minute_end)));
                response.headers_mut().insert("x-sapi-used-ip-weight-1m", HeaderValue::from(*used));
                return Err(Box::new(response));
            }
            Ok(("x-sapi-used-ip-weight-1m", *used))
        }
    }
}

fn with_weight(mut response: Response, (name, used): (&'static str, u32)) -> Response {
    response.headers_mut().insert(name, HeaderValue::from(used));
    response
}

fn json_ok(value: serde_json::Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], value.to_string()).into_response()
}

async fn ping(State(state): State<Arc<SimState>>, request: Request) -> Response {
    let ip = client_ip(&request);
    match spend(&state, ip, Family::Api, "ping", 1) {
        Ok(weight) => with_weight(json_ok(json!({})), weight),
        Err(response) => *response,
    }
}

async fn time(State(state): State<Arc<SimState>>, request: Request) -> Response {
    let ip = client_ip(&request);
    match spend(&state, ip, Family::Api, "time", 1) {
        Ok(weight) => with_weight(json_ok(json!({ "serverTime": now_ms(&state) })), weight),
        Err(response) => *response,
    }
}

async fn account(State(state): State<Arc<SimState>>, request: Request) -> Response {
    let ip = client_ip(&request);
    let weight = match spend(&state, ip, Family::Api, "account", 20) {
        Ok(weight) => weight,
        Err(response) => return *response,
    };
    let response = match authenticate(&state, ip, request).await {
        Err(response) => response,
        Ok(key) if !key.permissions.enable_reading => {
            error(StatusCode::UNAUTHORIZED, -2015, "Invalid API-key, IP, or permissions for action.")
        }
        Ok(key) => json_ok(json!({
            "makerCommission": 10,
            "takerCommission": 10,
            "buyerCommission": 0,
            "sellerCommission": 0,
            "commissionRates": { "maker": "0.00100000", "taker": "0.00100000", "buyer": "0.00000000", "seller": "0.00000000" },
            "canTrade": key.permissions.enable_spot_and_margin_trading,
            "canWithdraw": key.permissions.enable_withdrawals,
            "canDeposit": true,
            "brokered": false,
            "requireSelfTradePrevention": false,
            "preventSor": false,
            "updateTime": key.create_time,
            "accountType": "SPOT",
            "balances": [
                { "asset": "BTC", "free": "0.50000000", "locked": "0.00000000" },
                { "asset": "USDT", "free": "1000.00000000", "locked": "0.00000000" }
            ],
            "permissions": ["SPOT"],
            "uid": 354937868
        })),
    };
    with_weight(response, weight)
}

async fn api_restrictions(State(state): State<Arc<SimState>>, request: Request) -> Response {
    if state.binance.is_testnet() {
        return not_found().await;
    }
    let ip = client_ip(&request);
    let weight = match spend(&state, ip, Family::Sapi, "apiRestrictions", 1) {
        Ok(weight) => weight,
        Err(response) => return *response,
    };
    let response = match authenticate(&state, ip, request).await {
        Err(response) => response,
        Ok(key) => json_ok(json!({
            "ipRestrict": !key.ip_allowlist.is_empty(),
            "createTime": key.create_time,
            "enableInternalTransfer": false,
            "enableFutures": false,
            "enablePortfolioMarginTrading": false,
            "enableVanillaOptions": false,
            "permitsUniversalTransfer": false,
            "enableReading": key.permissions.enable_reading,
            "enableSpotAndMarginTrading": key.permissions.enable_spot_and_margin_trading,
            "enableWithdrawals": key.permissions.enable_withdrawals,
            "enableMargin": false
        })),
    };
    with_weight(response, weight)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Body::empty()).into_response()
}

/// HMAC-SHA256 verification, case-insensitive as Binance documents for HMAC keys.
pub fn signature_matches(secret: &str, payload: &str, signature_hex: &str) -> bool {
    let Ok(signature) = hex::decode(signature_hex) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(payload.as_bytes());
    mac.verify_slice(&signature).is_ok()
}

/// The signed payload: the query string as received without its `signature` parameter,
/// concatenated with the body; and the signature.
pub fn split_signature(query: &str, body: &str) -> (String, Option<String>) {
    let mut signature = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("signature=") {
            Some(value) => {
                signature = Some(value.to_string());
                false
            }
            None => true,
        })
        .collect();
    (format!("{}{}", kept.join("&"), body), signature)
}

/// The SIGNED endpoint checks, in order: key format, key known, signature, timestamp, IP.
async fn authenticate(state: &SimState, ip: IpAddr, request: Request) -> Result<KeyEntry, Response> {
    let (parts, body) = request.into_parts();
    let api_key = parts.headers.get("x-mbx-apikey").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if api_key.len() != 64 || !api_key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(error(StatusCode::UNAUTHORIZED, -2014, "API-key format invalid."));
    }
    let Some(key) = state.binance.keys().get(&api_key).filter(|k| !k.revoked).cloned() else {
        return Err(error(StatusCode::UNAUTHORIZED, -2015, "Invalid API-key, IP, or permissions for action."));
    };
    let body = axum::body::to_bytes(body, 1 << 20).await.map_err(|_| {
        error(StatusCode::BAD_REQUEST, -1102, "A mandatory parameter was not sent, was empty/null, or malformed.")
    })?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let query = parts.uri.query().unwrap_or("");

    let (payload, signature) = split_signature(query, &body);
    let Some(signature) = signature.filter(|s| !s.is_empty()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
        ));
    };
    if !signature_matches(&key.secret, &payload, &signature) {
        return Err(error(StatusCode::BAD_REQUEST, -1022, "Signature for this request is not valid."));
    }

    // A parameter sent in both the query string and the body: the query string's wins.
    let params: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .chain(url::form_urlencoded::parse(query.as_bytes()).into_owned())
        .collect();
    let Some(mut timestamp) = params.get("timestamp").and_then(|t| t.parse::<i64>().ok()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            -1102,
            "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
        ));
    };
    if timestamp > 100_000_000_000_000 {
        timestamp /= 1000; // microseconds
    }
    let recv_window = match params.get("recvWindow") {
        None => 5_000.0,
        Some(value) => match value.parse::<f64>() {
            Ok(w) if w > 0.0 && w <= MAX_RECV_WINDOW_MS => w,
            _ => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    -1102,
                    "Mandatory parameter 'recvWindow' was not sent, was empty/null, or malformed.",
                ));
            }
        },
    };
    let server_time = now_ms(state);
    if timestamp >= server_time + 1000 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            -1021,
            "Timestamp for this request was 1000ms ahead of the server's time.",
        ));
    }
    if (server_time - timestamp) as f64 > recv_window {
        return Err(error(StatusCode::BAD_REQUEST, -1021, "Timestamp for this request is outside of the recvWindow."));
    }

    if !key.ip_allowlist.is_empty() && !key.ip_allowlist.contains(&ip) {
        return Err(error(StatusCode::UNAUTHORIZED, -2015, "Invalid API-key, IP, or permissions for action."));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binance's documented HMAC example verifies, whatever the case of the signature.
    #[test]
    fn verifies_the_documented_example() {
        let secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
        let query = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559&signature=c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71";
        let (payload, signature) = split_signature(query, "");
        let signature = signature.unwrap();
        assert!(signature_matches(secret, &payload, &signature));
        assert!(signature_matches(secret, &payload, &signature.to_uppercase()));
        assert!(!signature_matches(secret, &format!("{payload}&x=1"), &signature));
        assert!(!signature_matches("other", &payload, &signature));
    }

    /// The body is concatenated to the query string without a separator.
    #[test]
    fn payload_is_query_then_body() {
        let (payload, signature) = split_signature("symbol=LTCBTC&side=BUY", "quantity=1&signature=ab");
        assert_eq!(payload, "symbol=LTCBTC&side=BUYquantity=1&signature=ab");
        assert_eq!(signature, None);
        let (payload, signature) = split_signature("a=1&signature=ff&b=2", "");
        assert_eq!(payload, "a=1&b=2");
        assert_eq!(signature.as_deref(), Some("ff"));
    }

    #[test]
    fn seeded_keys_have_binance_format() {
        for key in [
            SEEDED_FULL_KEY,
            SEEDED_READ_ONLY_KEY,
            SEEDED_WITHDRAW_KEY,
            SEEDED_LOCAL_ONLY_KEY,
            SEEDED_ELSEWHERE_KEY,
            SEEDED_REVOKED_KEY,
            SEEDED_NO_READ_KEY,
        ] {
            assert_eq!(key.len(), 64, "{key}");
            assert!(key.chars().all(|c| c.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn weight_escalates_from_429_to_418() {
        let state = SimState::default();
        state.binance.set_weight_limit(20);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(spend(&state, ip, Family::Api, "account", 20).unwrap(), ("x-mbx-used-weight-1m", 20));
        let too_many = spend(&state, ip, Family::Api, "time", 1).unwrap_err();
        assert_eq!(too_many.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(too_many.headers().contains_key("retry-after"));
        let banned = spend(&state, ip, Family::Api, "time", 1).unwrap_err();
        assert_eq!(banned.status(), StatusCode::IM_A_TEAPOT);
        let retry: u64 = banned.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((119..=120).contains(&retry), "{retry}");
        // /sapi has its own counters and no ban.
        assert_eq!(spend(&state, ip, Family::Sapi, "apiRestrictions", 1).unwrap(), ("x-sapi-used-ip-weight-1m", 1));
        // Another IP is unaffected.
        assert!(spend(&state, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), Family::Api, "time", 1).is_ok());
    }
}
