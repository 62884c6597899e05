//! Fake Coinbase: Advanced Trade (CDP keys, JWT bearer auth) and Coinbase Exchange (HMAC +
//! passphrase), each on its own port.
//!
//! **Advanced Trade** — `GET /api/v3/brokerage/key_permissions`. The bearer JWT is verified the
//! way Coinbase documents it: three base64url parts; header `alg` (`ES256` for EC keys, `EdDSA`
//! for Ed25519 keys), `kid` (the key name), `typ: "JWT"` and a non-empty `nonce`; claims
//! `sub == kid`, `iss == "cdp"`, integer `nbf`/`exp` with `exp - nbf` at most 120 s, the (skewable)
//! server clock inside `[nbf - 5 s, exp)`, and `uri == "METHOD host/path"` of the request actually
//! received (`host` as in its `Host` header, so `127.0.0.1:PORT` here); the signature (raw r‖s for
//! ES256) must verify against the registered public key. Like Coinbase, every failure is a bare
//! `401 Unauthorized`; the simulator adds an `x-simulator-reason` header saying which rule failed
//! (Coinbase does not, and clients must not rely on it). Responses carry a `Date` header from the
//! simulator's skewable clock, as a real server's would.
//!
//! **Exchange** — `GET /accounts` and the public `GET /time`. `CB-ACCESS-TIMESTAMP` must be
//! within 30 s of the skewable clock (`401 {"message":"request timestamp expired"}`), the key must
//! exist (`Invalid API Key`), the passphrase match (`Invalid Passphrase`) and `CB-ACCESS-SIGN`
//! equal base64(HMAC-SHA256(base64-decoded secret, timestamp + METHOD + path + body))
//! (`invalid signature`); a key without *view* gets 403.
//!
//! Both keep their documented per-key budgets (Advanced Trade 30 requests/s; Exchange 15/s with
//! bursts of 30) and answer 429 with `Retry-After: 1` beyond them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256, Sha512};
use tradeeon_shared::domain::Exchange;

use crate::SimState;

/// Seeded Advanced Trade key (ES256): can view and trade, cannot transfer.
pub const SEEDED_ES256_KEY_NAME: &str =
    "organizations/7d1f6a0e-5b3c-4e8a-9f21-0c4d5e6f7a80/apiKeys/3b9e2c71-8a4d-4f60-b5e2-1d7c9a0f4e36";
/// Seeded Advanced Trade key (Ed25519): can view, trade and transfer.
pub const SEEDED_ED25519_KEY_NAME: &str =
    "organizations/7d1f6a0e-5b3c-4e8a-9f21-0c4d5e6f7a80/apiKeys/c4a85f12-6e37-4b09-a2d8-93f0e1b7c654";
/// Seeded Coinbase Exchange key: can view and trade.
pub const SEEDED_EXCHANGE_KEY: &str = "5f0e6d1c2b3a49788796a5b4c3d2e1f0";
pub const SEEDED_EXCHANGE_PASSPHRASE: &str = "tradeeon-sim-passphrase";

/// Advanced Trade private endpoints: 30 requests/s per key.
const AT_RATE: (f64, f64) = (30.0, 30.0);
/// Exchange private endpoints: 15 requests/s per profile (key), bursts up to 30.
const EXCHANGE_RATE: (f64, f64) = (15.0, 30.0);
/// Clock tolerance for `nbf` (Coinbase does not document one; a few seconds is usual).
const NBF_LEEWAY_SECS: i64 = 5;
const MAX_JWT_LIFETIME_SECS: i64 = 120;
const EXCHANGE_TIMESTAMP_WINDOW_SECS: f64 = 30.0;

fn derived(label: &str) -> [u8; 32] {
    Sha256::digest(format!("tradeeon-simulator/coinbase/{label}").as_bytes()).into()
}

fn seeded_es256_signing_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&derived("es256")).expect("a SHA-256 output is a valid P-256 scalar")
}

fn seeded_ed25519_signing_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&derived("ed25519"))
}

/// The seeded ES256 key's private key, as the Coinbase Developer Platform shows it (SEC1 PEM).
pub fn seeded_es256_pem() -> String {
    es256_pem(&seeded_es256_signing_key())
}

/// The seeded Ed25519 key's secret, as the Coinbase Developer Platform shows it (base64 of
/// seed ‖ public key).
pub fn seeded_ed25519_secret() -> String {
    ed25519_secret(&seeded_ed25519_signing_key())
}

/// The seeded Coinbase Exchange key's secret (base64 of 64 bytes, like Coinbase's).
pub fn seeded_exchange_secret() -> String {
    STANDARD.encode(Sha512::digest(b"tradeeon-simulator/coinbase/exchange-secret"))
}

fn es256_pem(key: &p256::ecdsa::SigningKey) -> String {
    p256::SecretKey::from(key).to_sec1_pem(p256::pkcs8::LineEnding::LF).expect("PEM encoding").to_string()
}

fn ed25519_secret(key: &ed25519_dalek::SigningKey) -> String {
    let mut bytes = key.to_bytes().to_vec();
    bytes.extend_from_slice(key.verifying_key().as_bytes());
    STANDARD.encode(bytes)
}

/// What a CDP key may do, as `key_permissions` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdpPermissions {
    pub can_view: bool,
    pub can_trade: bool,
    pub can_transfer: bool,
}

/// A registered CDP public key.
#[derive(Debug, Clone)]
pub enum CdpPublicKey {
    Es256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

#[derive(Debug, Clone)]
struct CdpKeyEntry {
    public: CdpPublicKey,
    permissions: CdpPermissions,
    portfolio_uuid: String,
}

/// What a Coinbase Exchange key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangePermissions {
    pub view: bool,
    pub trade: bool,
    pub transfer: bool,
}

#[derive(Clone)]
struct ExchangeKeyEntry {
    secret: Vec<u8>,
    passphrase: String,
    permissions: ExchangePermissions,
}

/// Token buckets per key, in real (unskewed) time.
#[derive(Default)]
pub(crate) struct RateBuckets {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateBuckets {
    /// Spends one token from `key`'s bucket (`rate` per second, `burst` capacity); false when empty.
    pub(crate) fn take(&self, key: &str, (rate, burst): (f64, f64)) -> bool {
        let mut buckets = self.buckets.lock().expect("rate lock");
        let now = Instant::now();
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Keys known to the fake Coinbase, plus its rate-limit accounting.
#[derive(Default)]
pub struct CoinbaseState {
    cdp_keys: Mutex<HashMap<String, CdpKeyEntry>>,
    exchange_keys: Mutex<HashMap<String, ExchangeKeyEntry>>,
    limits: RateBuckets,
}

impl CoinbaseState {
    /// The seeded keys listed by [`seeded_keys_summary`].
    pub fn seeded() -> Self {
        let state = Self::default();
        state.add_cdp_public_key(
            SEEDED_ES256_KEY_NAME,
            CdpPublicKey::Es256(*seeded_es256_signing_key().verifying_key()),
            CdpPermissions { can_view: true, can_trade: true, can_transfer: false },
        );
        state.add_cdp_public_key(
            SEEDED_ED25519_KEY_NAME,
            CdpPublicKey::Ed25519(seeded_ed25519_signing_key().verifying_key()),
            CdpPermissions { can_view: true, can_trade: true, can_transfer: true },
        );
        state.add_exchange_key(
            SEEDED_EXCHANGE_KEY,
            &seeded_exchange_secret(),
            SEEDED_EXCHANGE_PASSPHRASE,
            ExchangePermissions { view: true, trade: true, transfer: false },
        );
        state
    }

    /// Registers a CDP key by its public key.
    pub fn add_cdp_public_key(&self, name: &str, public: CdpPublicKey, permissions: CdpPermissions) {
        let portfolio_uuid = uuid_like(&Sha256::digest(name.as_bytes()));
        self.cdp_keys
            .lock()
            .expect("coinbase lock")
            .insert(name.to_string(), CdpKeyEntry { public, permissions, portfolio_uuid });
    }

    /// Creates a new ES256 CDP key and returns its private key as a SEC1 PEM.
    pub fn add_es256_key(&self, name: &str, permissions: CdpPermissions) -> String {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        self.add_cdp_public_key(name, CdpPublicKey::Es256(*key.verifying_key()), permissions);
        es256_pem(&key)
    }

    /// Creates a new Ed25519 CDP key and returns its secret (base64 of seed ‖ public key).
    pub fn add_ed25519_key(&self, name: &str, permissions: CdpPermissions) -> String {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        self.add_cdp_public_key(name, CdpPublicKey::Ed25519(key.verifying_key()), permissions);
        ed25519_secret(&key)
    }

    /// Changes a CDP key's permissions; false if the key is unknown.
    pub fn set_cdp_permissions(&self, name: &str, permissions: CdpPermissions) -> bool {
        match self.cdp_keys.lock().expect("coinbase lock").get_mut(name) {
            Some(entry) => {
                entry.permissions = permissions;
                true
            }
            None => false,
        }
    }

    /// Deletes a CDP key (requests with it then get 401); false if it was unknown.
    pub fn revoke_cdp_key(&self, name: &str) -> bool {
        self.cdp_keys.lock().expect("coinbase lock").remove(name).is_some()
    }

    /// Registers a Coinbase Exchange key. `secret` is base64, as Coinbase shows it.
    pub fn add_exchange_key(&self, key: &str, secret: &str, passphrase: &str, permissions: ExchangePermissions) {
        let secret = STANDARD.decode(secret).expect("exchange secrets are base64");
        self.exchange_keys
            .lock()
            .expect("coinbase lock")
            .insert(key.to_string(), ExchangeKeyEntry { secret, passphrase: passphrase.to_string(), permissions });
    }

    /// Changes an Exchange key's permissions; false if the key is unknown.
    pub fn set_exchange_permissions(&self, key: &str, permissions: ExchangePermissions) -> bool {
        match self.exchange_keys.lock().expect("coinbase lock").get_mut(key) {
            Some(entry) => {
                entry.permissions = permissions;
                true
            }
            None => false,
        }
    }

    /// Deletes an Exchange key; false if it was unknown.
    pub fn revoke_exchange_key(&self, key: &str) -> bool {
        self.exchange_keys.lock().expect("coinbase lock").remove(key).is_some()
    }
}

fn uuid_like(bytes: &[u8]) -> String {
    let h = hex::encode(&bytes[..16]);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The seeded Coinbase keys, for `tradeeon simulate`.
pub fn seeded_keys_summary() -> String {
    format!(
        "Coinbase Advanced Trade (CDP keys; leave the passphrase empty):\n\
         \x20 ES256 key (view, trade)\n\
         \x20   key name: {SEEDED_ES256_KEY_NAME}\n\
         \x20   private key:\n{pem}\
         \x20 Ed25519 key (view, trade, transfer)\n\
         \x20   key name: {SEEDED_ED25519_KEY_NAME}\n\
         \x20   secret:   {ed}\n\
         Coinbase Exchange (key + secret + passphrase):\n\
         \x20   key:        {SEEDED_EXCHANGE_KEY}\n\
         \x20   secret:     {secret}\n\
         \x20   passphrase: {SEEDED_EXCHANGE_PASSPHRASE}\n",
        pem = seeded_es256_pem().lines().map(|l| format!("      {l}\n")).collect::<String>(),
        ed = seeded_ed25519_secret(),
        secret = seeded_exchange_secret(),
    )
}

// ---------------------------------------------------------------------------------------------
// Advanced Trade
// ---------------------------------------------------------------------------------------------

/// The fake Advanced Trade API.
pub fn advanced_trade_router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/api/v3/brokerage/key_permissions", get(key_permissions))
        .layer(axum::middleware::from_fn_with_state(state.clone(), date_header))
        .layer(axum::middleware::from_fn_with_state((state.clone(), Exchange::Coinbase), crate::faults::apply))
        .with_state(state)
}

/// Stamps responses with the simulator's (skewable) clock, as a real server's `Date` would be.
async fn date_header(State(state): State<Arc<SimState>>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let now = chrono::DateTime::from_timestamp_millis(state.faults.now_ms(Exchange::Coinbase)).unwrap_or_default();
    if let Ok(value) = HeaderValue::from_str(&now.format("%a, %d %b %Y %H:%M:%S GMT").to_string()) {
        response.headers_mut().insert("date", value);
    }
    response
}

fn unauthorized(reason: &'static str) -> Response {
    tracing::debug!(reason, "coinbase advanced trade: 401");
    let mut response = (StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
    response.headers_mut().insert("x-simulator-reason", HeaderValue::from_static(reason));
    response
}

fn too_many_requests(body: serde_json::Value) -> Response {
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
    response
}

async fn key_permissions(State(state): State<Arc<SimState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let now_s = state.faults.now_ms(Exchange::Coinbase).div_euclid(1000);
    let key_name = match verify_jwt(&state, &method, &uri, &headers, now_s) {
        Ok(name) => name,
        Err(reason) => return unauthorized(reason),
    };
    if !state.coinbase.limits.take(&format!("at:{key_name}"), AT_RATE) {
        return too_many_requests(json!({"error": "RATE_LIMIT_EXCEEDED", "message": "Too many requests"}));
    }
    let Some(entry) = state.coinbase.cdp_keys.lock().expect("coinbase lock").get(&key_name).cloned() else {
        return unauthorized("key deleted");
    };
    axum::Json(json!({
        "can_view": entry.permissions.can_view,
        "can_trade": entry.permissions.can_trade,
        "can_transfer": entry.permissions.can_transfer,
        "portfolio_uuid": entry.portfolio_uuid,
        "portfolio_type": "DEFAULT",
    }))
    .into_response()
}

/// Verifies the bearer JWT of a request; the key name on success, the failed rule otherwise.
fn verify_jwt(
    state: &SimState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    now_s: i64,
) -> Result<String, &'static str> {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).ok_or("missing authorization")?;
    let token = authorization.strip_prefix("Bearer ").ok_or("not a bearer token")?.trim();
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, signature_b64] = parts[..] else { return Err("not a JWS compact token") };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
    let header: serde_json::Value =
        decode(header_b64).and_then(|b| serde_json::from_slice(&b).ok()).ok_or("header is not base64url JSON")?;
    let claims: serde_json::Value =
        decode(claims_b64).and_then(|b| serde_json::from_slice(&b).ok()).ok_or("claims are not base64url JSON")?;
    let signature = decode(signature_b64).ok_or("signature is not base64url")?;

    if header["typ"] != "JWT" {
        return Err("typ is not JWT");
    }
    let alg = header["alg"].as_str().ok_or("alg missing")?;
    let kid = header["kid"].as_str().ok_or("kid missing")?;
    if header["nonce"].as_str().is_none_or(str::is_empty) {
        return Err("nonce missing");
    }
    if claims["sub"].as_str() != Some(kid) {
        return Err("sub does not equal kid");
    }
    if claims["iss"] != "cdp" {
        return Err("iss is not cdp");
    }
    let nbf = claims["nbf"].as_i64().ok_or("nbf missing")?;
    let exp = claims["exp"].as_i64().ok_or("exp missing")?;
    if exp <= nbf || exp - nbf > MAX_JWT_LIFETIME_SECS {
        return Err("exp must be after nbf and at most 120 s later");
    }
    if now_s + NBF_LEEWAY_SECS < nbf {
        return Err("not yet valid (nbf)");
    }
    if now_s >= exp {
        return Err("expired (exp)");
    }
    let host = headers.get("host").and_then(|v| v.to_str().ok()).ok_or("missing host")?;
    let expected_uri = format!("{} {}{}", method.as_str(), host, uri.path());
    if claims["uri"].as_str() != Some(expected_uri.as_str()) {
        return Err("uri does not match the request");
    }
    let public = state.coinbase.cdp_keys.lock().expect("coinbase lock").get(kid).map(|e| e.public.clone());
    let public = public.ok_or("unknown key")?;
    let signing_input = format!("{header_b64}.{claims_b64}");
    let verified = match (&public, alg) {
        (CdpPublicKey::Es256(key), "ES256") => {
            use p256::ecdsa::signature::Verifier as _;
            p256::ecdsa::Signature::from_slice(&signature)
                .is_ok_and(|sig| key.verify(signing_input.as_bytes(), &sig).is_ok())
        }
        (CdpPublicKey::Ed25519(key), "EdDSA") => ed25519_dalek::Signature::from_slice(&signature)
            .is_ok_and(|sig| key.verify_strict(signing_input.as_bytes(), &sig).is_ok()),
        _ => return Err("alg does not match the key type"),
    };
    if !verified {
        return Err("bad signature");
    }
    Ok(kid.to_string())
}

// ---------------------------------------------------------------------------------------------
// Exchange
// ---------------------------------------------------------------------------------------------

/// The fake Coinbase Exchange API.
pub fn exchange_router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/accounts", get(accounts))
        .route("/time", get(time))
        .layer(axum::middleware::from_fn_with_state((state.clone(), Exchange::Coinbase), crate::faults::apply))
        .with_state(state)
}

fn exchange_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}

async fn time(State(state): State<Arc<SimState>>) -> Response {
    let now_ms = state.faults.now_ms(Exchange::Coinbase);
    let iso = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default().to_rfc3339();
    axum::Json(json!({ "iso": iso, "epoch": now_ms as f64 / 1000.0 })).into_response()
}

async fn accounts(State(state): State<Arc<SimState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let (Some(key), Some(sign), Some(timestamp), Some(passphrase)) = (
        header("cb-access-key"),
        header("cb-access-sign"),
        header("cb-access-timestamp"),
        header("cb-access-passphrase"),
    ) else {
        return exchange_error(
            StatusCode::BAD_REQUEST,
            "CB-ACCESS-KEY, CB-ACCESS-SIGN, CB-ACCESS-TIMESTAMP and CB-ACCESS-PASSPHRASE headers are required",
        );
    };
    let Ok(ts) = timestamp.parse::<f64>() else {
        return exchange_error(StatusCode::BAD_REQUEST, "invalid timestamp");
    };
    let now = state.faults.now_ms(Exchange::Coinbase) as f64 / 1000.0;
    if !ts.is_finite() || (now - ts).abs() > EXCHANGE_TIMESTAMP_WINDOW_SECS {
        return exchange_error(StatusCode::UNAUTHORIZED, "request timestamp expired");
    }
    let Some(entry) = state.coinbase.exchange_keys.lock().expect("coinbase lock").get(key).cloned() else {
        return exchange_error(StatusCode::UNAUTHORIZED, "Invalid API Key");
    };
    if entry.passphrase != passphrase {
        return exchange_error(StatusCode::UNAUTHORIZED, "Invalid Passphrase");
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or(uri.path());
    let mut mac = Hmac::<Sha256>::new_from_slice(&entry.secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(method.as_str().as_bytes());
    mac.update(path.as_bytes());
    // GET: the body is empty.
    let valid = STANDARD.decode(sign).is_ok_and(|sig| mac.verify_slice(&sig).is_ok());
    if !valid {
        return exchange_error(StatusCode::UNAUTHORIZED, "invalid signature");
    }
    if !state.coinbase.limits.take(&format!("exchange:{key}"), EXCHANGE_RATE) {
        let mut response = exchange_error(StatusCode::TOO_MANY_REQUESTS, "Private rate limit exceeded");
        response.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return response;
    }
    if !entry.permissions.view {
        return exchange_error(StatusCode::FORBIDDEN, "Forbidden");
    }
    let profile_id = uuid_like(&Sha256::digest(format!("profile:{key}").as_bytes()));
    let account = |currency: &str, balance: &str| {
        json!({
            "id": uuid_like(&Sha256::digest(format!("{key}:{currency}").as_bytes())),
            "currency": currency,
            "balance": balance,
            "hold": "0.0000000000000000",
            "available": balance,
            "profile_id": profile_id,
            "trading_enabled": entry.permissions.trade,
        })
    };
    axum::Json(json!([account("BTC", "0.2500000000000000"), account("USD", "1520.5000000000000000")])).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_lists_every_seeded_key_and_is_stable() {
        let summary = seeded_keys_summary();
        for needle in [
            SEEDED_ES256_KEY_NAME,
            SEEDED_ED25519_KEY_NAME,
            SEEDED_EXCHANGE_KEY,
            SEEDED_EXCHANGE_PASSPHRASE,
            "-----BEGIN EC PRIVATE KEY-----",
            "-----END EC PRIVATE KEY-----",
        ] {
            assert!(summary.contains(needle), "{needle} missing from\n{summary}");
        }
        assert!(summary.contains(&seeded_ed25519_secret()));
        assert!(summary.contains(&seeded_exchange_secret()));
        assert_eq!(summary, seeded_keys_summary(), "seeded keys are deterministic");
        assert_eq!(STANDARD.decode(seeded_exchange_secret()).unwrap().len(), 64);
    }
}
