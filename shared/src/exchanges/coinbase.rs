//! Coinbase: one connection type, two APIs.
//!
//! * **Advanced Trade** (the default; CDP API keys). The key is a *key name*
//!   (`organizations/{org_id}/apiKeys/{key_id}`, or a bare key id for newer keys) and a private
//!   key: either an ECDSA P-256 key as a SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`, algorithm
//!   `ES256`) or an Ed25519 key as base64 of 64 bytes (32-byte seed ‖ 32-byte public key,
//!   algorithm `EdDSA`). Every request carries `Authorization: Bearer <JWT>` with a JWT signed
//!   fresh for that one request: header `{alg, kid: key name, nonce: random hex, typ: "JWT"}`,
//!   claims `{sub: key name, iss: "cdp", nbf: now, exp: now + 120, uri: "GET host/path"}`
//!   (Coinbase: "Your JWT expires after 2 minutes"). `host` is the request host exactly as the
//!   docs' `request_host` (`api.coinbase.com`: no scheme); against the simulator, which listens on
//!   `127.0.0.1:PORT`, it is `host:port`, i.e. what the `Host` header carries (the port only when
//!   it is not the scheme's default). The check is `GET /api/v3/brokerage/key_permissions`.
//! * **Coinbase Exchange** (chosen when the connection has a passphrase). Headers
//!   `CB-ACCESS-KEY`, `CB-ACCESS-SIGN` = base64(HMAC-SHA256(base64-decoded secret,
//!   timestamp + METHOD + requestPath + body)), `CB-ACCESS-TIMESTAMP` (Unix seconds, decimals
//!   allowed, must be within 30 s of Coinbase's clock) and `CB-ACCESS-PASSPHRASE`. The check is
//!   `GET /accounts`.
//!
//! # Verdicts
//!
//! Advanced Trade answers every authentication failure — unknown or deleted key, wrong private
//! key, bad or expired JWT — with a bare `401 Unauthorized` and no reason, so a 401 maps to
//! `invalid_credentials` ("the key name is unknown or the private key does not belong to it").
//! The one case we can tell apart is clock skew: every HTTP response carries a `Date` header,
//! and when it disagrees with our clock by more than [`CDP_CLOCK_SKEW_TOLERANCE`] a 401 is
//! reported as `clock_skew` (the JWT's `nbf`/`exp` come from our clock). A secret that is not a
//! CDP private key is rejected locally as `invalid_credentials`, without a request.
//!
//! Coinbase Exchange says why in `{"message": ...}`: `Invalid API Key` → `invalid_credentials`,
//! `invalid signature` → `invalid_signature`, `Invalid Passphrase` → `invalid_credentials`,
//! `request timestamp expired` → `clock_skew`; 403 → `permission_denied`.
//!
//! # Permissions
//!
//! Advanced Trade reports them (`can_view`, `can_trade`, `can_transfer`) → read, trade, withdraw.
//! A CDP key may also carry an IP allowlist, but `key_permissions` does not say whether it does:
//! `ip_restricted` is reported `false` meaning *not verified*, and the `no_ip_restriction` warning
//! is deliberately **not** emitted (it would assert something we do not know). A key without
//! `can_view` fails with `permission_denied` (the permissions are still attached).
//!
//! Coinbase Exchange has no endpoint that reports an API key's permissions (`/profiles` lists
//! profiles, not key scopes). A successful `GET /accounts` proves *view*; trade and transfer are
//! unknown, reported `false` with the `permissions_unknown` warning (and, as above, no IP claim).
//!
//! # Rate limits
//!
//! Both are per key (Advanced Trade: per user; Exchange: per profile, and an Exchange key is
//! scoped to one profile), so the [`LimitKey`] carries the key's fingerprint. Documented defaults:
//! Advanced Trade private endpoints 30 requests/s ([`ADVANCED_TRADE_RATE`]); Exchange private
//! endpoints 15 requests/s with bursts up to 30 ([`EXCHANGE_RATE`]). A 429 is reported to the gate
//! with its `Retry-After` (Coinbase does not document the header; without it we assume 1 s,
//! the length of the window both limits are expressed in).

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use url::Url;

use super::{
    CheckCode, ClientContext, Credentials, ExchangeClient, Failure, LimitFeedback, LimitKey, Verdict, key_fingerprint,
    retry_after_header, transport_failure, warnings,
};
use crate::domain::{Exchange, Permissions};

/// The Advanced Trade endpoint that reports a CDP key's permissions.
pub const KEY_PERMISSIONS_PATH: &str = "/api/v3/brokerage/key_permissions";
/// The Coinbase Exchange endpoint used as the check (needs the *view* permission).
pub const ACCOUNTS_PATH: &str = "/accounts";
/// `iss` of every CDP JWT.
pub const CDP_ISSUER: &str = "cdp";
/// A CDP JWT is valid for two minutes (`exp = nbf + 120`).
pub const CDP_JWT_LIFETIME_SECS: i64 = 120;
/// On a 401 from Advanced Trade, a `Date` header further than this from our clock means the
/// JWT was rejected for its time window: `clock_skew`.
pub const CDP_CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(30);
/// Coinbase Exchange rejects a `CB-ACCESS-TIMESTAMP` more than this far from its clock.
pub const EXCHANGE_TIMESTAMP_WINDOW: Duration = Duration::from_secs(30);

/// A documented request budget, for the worker's limiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitDefault {
    /// The [`LimitKey::bucket`] requests spend from.
    pub bucket: &'static str,
    pub per_second: u32,
    pub burst: u32,
}

/// Advanced Trade private endpoints: 30 requests per second per user (per key here).
pub const ADVANCED_TRADE_RATE: RateLimitDefault = RateLimitDefault { bucket: "private", per_second: 30, burst: 30 };
/// Coinbase Exchange private endpoints: 15 requests per second per profile, bursts up to 30.
pub const EXCHANGE_RATE: RateLimitDefault = RateLimitDefault { bucket: "exchange_private", per_second: 15, burst: 30 };

/// Without a `Retry-After` on a 429, wait one limit window.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// CDP keys and JWTs
// ---------------------------------------------------------------------------------------------

/// A parsed CDP private key. `Debug` never shows key material.
pub enum CdpKey {
    /// ECDSA P-256, signs `ES256` JWTs.
    Es256(p256::ecdsa::SigningKey),
    /// Ed25519, signs `EdDSA` JWTs.
    Ed25519(ed25519_dalek::SigningKey),
}

impl fmt::Debug for CdpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CdpKey::{}([REDACTED])", self.alg())
    }
}

/// Why a secret is not a CDP private key. The messages never include any part of the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdpKeyError {
    /// A PEM block was found but is not a P-256 EC private key.
    BadPem,
    /// Base64 that decodes to something other than 64 bytes.
    BadEd25519Length,
    /// 64 bytes whose second half is not the public key of the first half.
    Ed25519Mismatch,
    /// Neither PEM nor base64.
    Unrecognised,
}

impl CdpKeyError {
    pub fn message(self) -> &'static str {
        match self {
            CdpKeyError::BadPem => {
                "The API secret looks like a PEM key but is not a valid EC (P-256) private key. Paste the whole \
                 private key from the Coinbase Developer Platform, including the BEGIN/END lines."
            }
            CdpKeyError::BadEd25519Length => {
                "The API secret is base64 but not an Ed25519 private key (expected 64 bytes). Paste the key \
                 secret exactly as the Coinbase Developer Platform showed it."
            }
            CdpKeyError::Ed25519Mismatch => {
                "The API secret is damaged: its Ed25519 public half does not match its private half. Paste the \
                 key secret again exactly as the Coinbase Developer Platform showed it."
            }
            CdpKeyError::Unrecognised => {
                "The API secret is not a Coinbase CDP private key: expected an EC private key in PEM format \
                 (-----BEGIN EC PRIVATE KEY-----) or a base64 Ed25519 key secret."
            }
        }
    }
}

impl fmt::Display for CdpKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for CdpKeyError {}

impl CdpKey {
    /// Parses a CDP key secret: a SEC1 (or PKCS#8) PEM for ES256 — literal `\n` escapes, as in
    /// the downloaded JSON key file, are accepted — or base64 of seed ‖ public key for Ed25519.
    pub fn parse(secret: &str) -> Result<CdpKey, CdpKeyError> {
        let secret = secret.trim();
        if secret.contains("-----BEGIN") {
            let pem = zeroize::Zeroizing::new(secret.replace("\\n", "\n"));
            if let Ok(key) = p256::SecretKey::from_sec1_pem(&pem) {
                return Ok(CdpKey::Es256(key.into()));
            }
            use p256::pkcs8::DecodePrivateKey as _;
            return p256::SecretKey::from_pkcs8_pem(&pem)
                .map(|key| CdpKey::Es256(key.into()))
                .map_err(|_| CdpKeyError::BadPem);
        }
        let bytes = zeroize::Zeroizing::new(STANDARD.decode(secret).map_err(|_| CdpKeyError::Unrecognised)?);
        if bytes.len() != 64 {
            return Err(CdpKeyError::BadEd25519Length);
        }
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[..32]);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(CdpKeyError::Ed25519Mismatch);
        }
        Ok(CdpKey::Ed25519(key))
    }

    /// The JWS `alg`: `ES256` or `EdDSA`.
    pub fn alg(&self) -> &'static str {
        match self {
            CdpKey::Es256(_) => "ES256",
            CdpKey::Ed25519(_) => "EdDSA",
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            CdpKey::Es256(key) => {
                use p256::ecdsa::signature::Signer as _;
                let signature: p256::ecdsa::Signature = key.sign(message);
                // JWS ES256 wants the raw 64-byte r ‖ s, not DER.
                signature.to_bytes().to_vec()
            }
            CdpKey::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                key.sign(message).to_bytes().to_vec()
            }
        }
    }
}

#[derive(Serialize)]
struct JwtHeader<'a> {
    alg: &'static str,
    kid: &'a str,
    nonce: String,
    typ: &'static str,
}

#[derive(Serialize)]
struct JwtClaims<'a> {
    sub: &'a str,
    iss: &'static str,
    nbf: i64,
    exp: i64,
    uri: &'a str,
}

/// The `uri` claim: `"METHOD host[:port]/path"`, e.g. `"GET api.coinbase.com/api/v3/brokerage/key_permissions"`.
/// The port is included only when the URL has a non-default one (as in the `Host` header).
pub fn jwt_uri(method: &str, url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{method} {host}:{port}{}", url.path()),
        None => format!("{method} {host}{}", url.path()),
    }
}

/// Builds a CDP JWT for one request. `now` is Unix seconds.
pub fn build_cdp_jwt(key_name: &str, key: &CdpKey, uri: &str, now: i64) -> String {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let header = JwtHeader { alg: key.alg(), kid: key_name, nonce, typ: "JWT" };
    let claims = JwtClaims { sub: key_name, iss: CDP_ISSUER, nbf: now, exp: now + CDP_JWT_LIFETIME_SECS, uri };
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("JWT header serializes"));
    let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("JWT claims serialize"));
    let signing_input = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(key.sign(signing_input.as_bytes()));
    format!("{signing_input}.{signature}")
}

/// The Coinbase Exchange `CB-ACCESS-SIGN` value. `secret` is the base64 secret as Coinbase shows
/// it; `None` when it is not base64.
pub fn exchange_signature(
    secret: &str,
    timestamp: &str,
    method: &str,
    request_path: &str,
    body: &str,
) -> Option<String> {
    let key = zeroize::Zeroizing::new(STANDARD.decode(secret.trim()).ok()?);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(method.as_bytes());
    mac.update(request_path.as_bytes());
    mac.update(body.as_bytes());
    Some(STANDARD.encode(mac.finalize().into_bytes()))
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// The `key_permissions` answer.
#[derive(Debug, Clone, Deserialize)]
struct KeyPermissions {
    can_view: bool,
    can_trade: bool,
    can_transfer: bool,
    #[allow(dead_code)]
    #[serde(default)]
    portfolio_uuid: Option<String>,
    #[allow(dead_code)]
    #[serde(default)]
    portfolio_type: Option<String>,
}

/// Coinbase Exchange error bodies: `{"message": "..."}`.
#[derive(Debug, Deserialize)]
struct ExchangeError {
    message: String,
}

/// Checks Coinbase credentials: Advanced Trade (CDP) keys, or Coinbase Exchange keys when the
/// connection has a passphrase.
#[derive(Clone)]
pub struct CoinbaseClient {
    ctx: ClientContext,
    advanced_trade_base: Url,
    exchange_base: Url,
}

impl fmt::Debug for CoinbaseClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoinbaseClient")
            .field("advanced_trade_base", &self.advanced_trade_base.as_str())
            .field("exchange_base", &self.exchange_base.as_str())
            .finish_non_exhaustive()
    }
}

impl CoinbaseClient {
    pub fn new(ctx: ClientContext, advanced_trade_base: Url, exchange_base: Url) -> Self {
        Self { ctx, advanced_trade_base, exchange_base }
    }

    /// The budget a check with this key spends from.
    pub fn limit_key(credentials: &Credentials) -> LimitKey {
        let rate = if uses_exchange(credentials) { EXCHANGE_RATE } else { ADVANCED_TRADE_RATE };
        LimitKey {
            exchange: Exchange::Coinbase,
            bucket: rate.bucket,
            key_fingerprint: Some(key_fingerprint(credentials.api_key.expose().trim())),
        }
    }

    async fn check_advanced_trade(&self, credentials: &Credentials) -> Result<Verdict, Failure> {
        let key_name = credentials.api_key.expose().trim();
        if key_name.is_empty() {
            return Err(Failure::new(
                CheckCode::InvalidCredentials,
                "The API key name is empty: paste the key name (organizations/…/apiKeys/…) from the Coinbase \
                 Developer Platform.",
            ));
        }
        let key = CdpKey::parse(credentials.api_secret.expose())
            .map_err(|err| Failure::new(CheckCode::InvalidCredentials, err.message()))?;
        let limit_key = Self::limit_key(credentials);
        if let Err(wait) = self.ctx.gate.acquire(&limit_key, 1).await {
            return Err(paused(wait));
        }
        let url = endpoint(&self.advanced_trade_base, KEY_PERMISSIONS_PATH);
        let jwt = build_cdp_jwt(key_name, &key, &jwt_uri("GET", &url), chrono::Utc::now().timestamp());
        let response = self
            .ctx
            .http
            .get(url)
            .bearer_auth(jwt)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|err| transport_failure(&err))?;
        let status = response.status();
        if status.as_u16() == 429 {
            return Err(self.rate_limited(&limit_key, &response));
        }
        if status.is_server_error() {
            return Err(unavailable(status));
        }
        if status.as_u16() == 401 {
            if let Some(skew) = date_skew(&response)
                && skew > CDP_CLOCK_SKEW_TOLERANCE
            {
                return Err(Failure::new(
                    CheckCode::ClockSkew,
                    format!(
                        "Coinbase rejected the request and its clock differs from ours by about {} s; the signed \
                         token is only valid for 2 minutes. Check the worker's clock (NTP).",
                        skew.as_secs()
                    ),
                ));
            }
            return Err(Failure::new(
                CheckCode::InvalidCredentials,
                "Coinbase rejected the API key: the key name is unknown or was deleted, or the private key does not \
                 belong to it. Check both were copied from the same key in the Coinbase Developer Platform.",
            ));
        }
        if status.as_u16() == 403 {
            return Err(Failure::new(
                CheckCode::PermissionDenied,
                "Coinbase refused this API key access to its permissions (403). Give the key the View permission.",
            ));
        }
        if !status.is_success() {
            return Err(unexpected_status(status));
        }
        let body = response.bytes().await.map_err(|err| transport_failure(&err))?;
        let Ok(found) = serde_json::from_slice::<KeyPermissions>(&body) else {
            return Err(Failure::new(
                CheckCode::BadResponse,
                "Coinbase answered the permissions request with something we could not read.",
            ));
        };
        // `key_permissions` does not report IP allowlists: `false` here means "not verified".
        let permissions = Permissions {
            read: found.can_view,
            trade: found.can_trade,
            withdraw: found.can_transfer,
            ip_restricted: false,
        };
        let mut warnings = Vec::new();
        if permissions.withdraw {
            warnings.push(warnings::WITHDRAWALS_ENABLED.to_string());
        }
        if !found.can_view {
            return Err(Failure::lacking(
                "The key authenticates but lacks the View permission Tradeeon needs. Edit the key in the Coinbase \
                 Developer Platform and enable View.",
                Verdict { permissions, warnings },
            ));
        }
        Ok(Verdict { permissions, warnings })
    }

    async fn check_exchange(&self, credentials: &Credentials, passphrase: &str) -> Result<Verdict, Failure> {
        let api_key = credentials.api_key.expose().trim();
        if api_key.is_empty() {
            return Err(Failure::new(CheckCode::InvalidCredentials, "The API key is empty."));
        }
        let url = endpoint(&self.exchange_base, ACCOUNTS_PATH);
        let sign_now = || {
            let timestamp = chrono::Utc::now().timestamp().to_string();
            exchange_signature(credentials.api_secret.expose(), &timestamp, "GET", url.path(), "")
                .map(|signature| (timestamp, signature))
        };
        let invalid_secret = || {
            Failure::new(
                CheckCode::InvalidCredentials,
                "The API secret is not valid base64. Paste it exactly as Coinbase Exchange showed it when the key was \
                 created.",
            )
        };
        // A secret that cannot sign fails here, before it spends any of the rate budget.
        if sign_now().is_none() {
            return Err(invalid_secret());
        }
        let limit_key = Self::limit_key(credentials);
        if let Err(wait) = self.ctx.gate.acquire(&limit_key, 1).await {
            return Err(paused(wait));
        }
        // Signed once the gate has let the request through: it may have held it for seconds, and
        // Coinbase refuses a timestamp more than 30 s old.
        let Some((timestamp, signature)) = sign_now() else {
            return Err(invalid_secret());
        };
        let request = self
            .ctx
            .http
            .get(url)
            .header("CB-ACCESS-KEY", api_key)
            .header("CB-ACCESS-SIGN", signature)
            .header("CB-ACCESS-TIMESTAMP", &timestamp)
            .header("CB-ACCESS-PASSPHRASE", passphrase)
            .header("accept", "application/json");
        let response = request.send().await.map_err(|err| transport_failure(&err))?;
        let status = response.status();
        if status.as_u16() == 429 {
            return Err(self.rate_limited(&limit_key, &response));
        }
        if status.is_server_error() {
            return Err(unavailable(status));
        }
        let body = response.bytes().await.map_err(|err| transport_failure(&err))?;
        if status.is_success() {
            if !matches!(serde_json::from_slice::<serde_json::Value>(&body), Ok(serde_json::Value::Array(_))) {
                return Err(Failure::new(
                    CheckCode::BadResponse,
                    "Coinbase Exchange answered the accounts request with something we could not read.",
                ));
            }
            // Listing accounts proves View; Coinbase Exchange has no endpoint reporting trade,
            // transfer or IP allowlist settings of a key, so those are unverified (`false`).
            let permissions = Permissions { read: true, trade: false, withdraw: false, ip_restricted: false };
            return Ok(Verdict { permissions, warnings: vec![warnings::PERMISSIONS_UNKNOWN.to_string()] });
        }
        let message = serde_json::from_slice::<ExchangeError>(&body).map(|e| e.message.to_ascii_lowercase()).ok();
        let message = message.as_deref().unwrap_or("");
        let (code, text) = if message.contains("timestamp") && message.contains("expired") {
            (
                CheckCode::ClockSkew,
                "Coinbase Exchange rejected the request timestamp as expired: our clock and Coinbase's differ by more \
                 than 30 seconds. Check the worker's clock (NTP).",
            )
        } else if message.contains("invalid signature") {
            (
                CheckCode::InvalidSignature,
                "Coinbase Exchange rejected the signature: the API secret is wrong. Paste the secret that was shown \
                 with this key.",
            )
        } else if message.contains("passphrase") {
            (
                CheckCode::InvalidCredentials,
                "Coinbase Exchange rejected the passphrase. Enter the passphrase you chose when creating this key.",
            )
        } else if message.contains("api key") {
            (CheckCode::InvalidCredentials, "Coinbase Exchange does not know this API key (deleted, or mistyped).")
        } else if status.as_u16() == 401 {
            (CheckCode::InvalidCredentials, "Coinbase Exchange rejected the credentials (401).")
        } else if status.as_u16() == 403 {
            (
                CheckCode::PermissionDenied,
                "Coinbase Exchange refused this key access to accounts (403): give the key the View permission.",
            )
        } else {
            return Err(unexpected_status(status));
        };
        Err(Failure::new(code, text))
    }

    fn rate_limited(&self, limit_key: &LimitKey, response: &reqwest::Response) -> Failure {
        let wait = retry_after_header(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
        self.ctx.gate.report(limit_key, LimitFeedback::RetryAfter(wait));
        Failure::new(CheckCode::RateLimited, "Coinbase is rate-limiting this key; retry later.").with_retry_after(wait)
    }
}

impl ExchangeClient for CoinbaseClient {
    fn exchange(&self) -> Exchange {
        Exchange::Coinbase
    }

    fn check<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Verdict, Failure>> {
        Box::pin(async move {
            match exchange_passphrase(credentials) {
                Some(passphrase) => self.check_exchange(credentials, passphrase).await,
                None => self.check_advanced_trade(credentials).await,
            }
        })
    }
}

/// A non-blank passphrase selects Coinbase Exchange.
fn exchange_passphrase(credentials: &Credentials) -> Option<&str> {
    credentials.passphrase.as_ref().map(|p| p.expose()).filter(|p| !p.trim().is_empty())
}

fn uses_exchange(credentials: &Credentials) -> bool {
    exchange_passphrase(credentials).is_some()
}

/// `base` with `path` appended to whatever path it already has.
fn endpoint(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url.set_query(None);
    url
}

fn paused(wait: Duration) -> Failure {
    let message = "Requests to Coinbase with this key are paused after a rate limit; nothing was sent.";
    Failure::Unsent { message: message.to_string(), wait }
}

fn unavailable(status: reqwest::StatusCode) -> Failure {
    Failure::new(CheckCode::ExchangeUnavailable, format!("Coinbase is unavailable (HTTP {}).", status.as_u16()))
}

fn unexpected_status(status: reqwest::StatusCode) -> Failure {
    Failure::new(CheckCode::BadResponse, format!("Coinbase answered with an unexpected HTTP {}.", status.as_u16()))
}

/// How far the response's `Date` header is from our clock.
fn date_skew(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::DATE)?.to_str().ok()?;
    let theirs = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let diff = chrono::Utc::now().signed_duration_since(theirs).num_milliseconds().unsigned_abs();
    Some(Duration::from_millis(diff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_uri_uses_host_and_port_only_when_not_default() {
        let url = Url::parse("https://api.coinbase.com/api/v3/brokerage/key_permissions").unwrap();
        assert_eq!(jwt_uri("GET", &url), "GET api.coinbase.com/api/v3/brokerage/key_permissions");
        let url = Url::parse("http://127.0.0.1:8123/api/v3/brokerage/key_permissions").unwrap();
        assert_eq!(jwt_uri("GET", &url), "GET 127.0.0.1:8123/api/v3/brokerage/key_permissions");
    }

    #[test]
    fn endpoint_keeps_a_base_path() {
        let base = Url::parse("https://api.coinbase.com").unwrap();
        assert_eq!(
            endpoint(&base, KEY_PERMISSIONS_PATH).as_str(),
            "https://api.coinbase.com/api/v3/brokerage/key_permissions"
        );
        let base = Url::parse("http://proxy.local/coinbase/").unwrap();
        assert_eq!(endpoint(&base, ACCOUNTS_PATH).as_str(), "http://proxy.local/coinbase/accounts");
    }

    #[test]
    fn es256_jwt_has_documented_shape_and_verifies() {
        use p256::ecdsa::signature::Verifier as _;
        let signing = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let pem = p256::SecretKey::from(&signing).to_sec1_pem(p256::pkcs8::LineEnding::LF).unwrap();
        assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let key = CdpKey::parse(&pem).unwrap();
        let name = "organizations/org/apiKeys/key";
        let uri = "GET api.coinbase.com/api/v3/brokerage/key_permissions";
        let jwt = build_cdp_jwt(name, &key, uri, 1_700_000_000);
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], name);
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["nonce"].as_str().unwrap().len(), 32);
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], name);
        assert_eq!(claims["iss"], "cdp");
        assert_eq!(claims["nbf"], 1_700_000_000);
        assert_eq!(claims["exp"], 1_700_000_120);
        assert_eq!(claims["uri"], uri);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(signature.len(), 64, "raw r||s, not DER");
        let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
        let input = format!("{}.{}", parts[0], parts[1]);
        signing.verifying_key().verify(input.as_bytes(), &signature).unwrap();
    }

    #[test]
    fn escaped_newlines_in_a_pem_are_accepted() {
        let signing = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let pem = p256::SecretKey::from(&signing).to_sec1_pem(p256::pkcs8::LineEnding::LF).unwrap();
        let escaped = pem.replace('\n', "\\n");
        assert!(matches!(CdpKey::parse(&escaped), Ok(CdpKey::Es256(_))));
    }

    #[test]
    fn ed25519_secret_is_seed_then_public_key() {
        use ed25519_dalek::Verifier as _;
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let mut bytes = signing.to_bytes().to_vec();
        bytes.extend_from_slice(signing.verifying_key().as_bytes());
        let key = CdpKey::parse(&STANDARD.encode(&bytes)).unwrap();
        assert_eq!(key.alg(), "EdDSA");
        let jwt = build_cdp_jwt("k", &key, "GET h/p", 1);
        let parts: Vec<&str> = jwt.split('.').collect();
        let signature = ed25519_dalek::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        signing.verifying_key().verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).unwrap();

        // A corrupted public half is caught locally.
        bytes[40] ^= 1;
        assert_eq!(CdpKey::parse(&STANDARD.encode(&bytes)).unwrap_err(), CdpKeyError::Ed25519Mismatch);
        assert_eq!(CdpKey::parse(&STANDARD.encode([0u8; 32])).unwrap_err(), CdpKeyError::BadEd25519Length);
    }

    #[test]
    fn malformed_secrets_are_rejected_without_echoing_them() {
        let secret = "-----BEGIN EC PRIVATE KEY-----\nTOPSECRETGARBAGE\n-----END EC PRIVATE KEY-----\n";
        let err = CdpKey::parse(secret).unwrap_err();
        assert_eq!(err, CdpKeyError::BadPem);
        assert!(!err.message().contains("TOPSECRET"));
        assert_eq!(CdpKey::parse("not a key at all!").unwrap_err(), CdpKeyError::Unrecognised);
        let key = CdpKey::parse(&STANDARD.encode({
            let s = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let mut b = s.to_bytes().to_vec();
            b.extend_from_slice(s.verifying_key().as_bytes());
            b
        }))
        .unwrap();
        assert_eq!(format!("{key:?}"), "CdpKey::EdDSA([REDACTED])");
    }

    #[test]
    fn exchange_signature_matches_the_documented_prehash() {
        // HMAC-SHA256(base64decode(secret), timestamp + method + path + body), base64.
        let secret = STANDARD.encode(b"0123456789abcdef0123456789abcdef");
        let sig = exchange_signature(&secret, "1700000000", "GET", "/accounts", "").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef0123456789abcdef").unwrap();
        mac.update(b"1700000000GET/accounts");
        assert_eq!(sig, STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(exchange_signature("%%%", "1", "GET", "/accounts", ""), None);
    }
}
