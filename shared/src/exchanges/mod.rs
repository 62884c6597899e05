//! Exchange clients: one module per exchange behind one trait, [`ExchangeClient`].
//!
//! A client's one job here is a *credential check*: prove that a key authenticates, and report
//! what it is allowed to do. A check that passes is a [`Verdict`]; every other outcome — including
//! the exchange being down — is a [`Failure`] with a code from the fixed set [`CheckCode`]. Clients
//! never panic. The caller times the check and stores it as a [`CheckResult`].
//!
//! Clients only run inside workers (the API never calls an exchange). They take their base URLs
//! from configuration so tests point them at the simulator over real HTTP, and they ask a
//! [`RateGate`] before every request so that all workers behind one egress IP share one budget.

pub mod binance;
pub mod coinbase;
pub mod kite;
pub mod kraken;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::domain::{Exchange, Permissions};
use crate::vault::SecretValue;

/// Plaintext credentials, in memory only while a worker uses them. Every field zeroizes on drop
/// and prints as `[REDACTED]`.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub api_key: SecretValue,
    pub api_secret: SecretValue,
    /// Coinbase Exchange passphrase, or Kraken's `otp` (two-factor password) when the key has one.
    pub passphrase: Option<SecretValue>,
    /// Zerodha Kite access token (from a `kite_session` job). Other exchanges leave it `None`.
    pub access_token: Option<SecretValue>,
}

/// The fixed set of verdicts a credential check can reach. Documented for users in
/// `docs/troubleshooting.md`; the names are part of the HTTP contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckCode {
    /// Authenticated; `permissions` says what the key may do.
    Ok,
    /// The exchange does not know this API key (or it was deleted/revoked).
    InvalidCredentials,
    /// The key exists but the signature did not verify: usually a wrong secret.
    InvalidSignature,
    /// The key is restricted to IPs that do not include our egress IP.
    IpNotAllowed,
    /// The key lacks a permission the check needs (e.g. read access).
    PermissionDenied,
    /// Our clock and the exchange's disagree by more than the allowed window.
    ClockSkew,
    /// The exchange rejected the nonce (Kraken: not increasing).
    InvalidNonce,
    /// The exchange is rate-limiting us; retry later.
    RateLimited,
    /// The exchange answered 5xx or is in maintenance.
    ExchangeUnavailable,
    /// No answer in time.
    Timeout,
    /// The session (Zerodha access token) has expired; the user must log in again.
    SessionExpired,
    /// The exchange answered something we could not understand.
    BadResponse,
}

impl CheckCode {
    pub const ALL: [CheckCode; 12] = [
        CheckCode::Ok,
        CheckCode::InvalidCredentials,
        CheckCode::InvalidSignature,
        CheckCode::IpNotAllowed,
        CheckCode::PermissionDenied,
        CheckCode::ClockSkew,
        CheckCode::InvalidNonce,
        CheckCode::RateLimited,
        CheckCode::ExchangeUnavailable,
        CheckCode::Timeout,
        CheckCode::SessionExpired,
        CheckCode::BadResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckCode::Ok => "ok",
            CheckCode::InvalidCredentials => "invalid_credentials",
            CheckCode::InvalidSignature => "invalid_signature",
            CheckCode::IpNotAllowed => "ip_not_allowed",
            CheckCode::PermissionDenied => "permission_denied",
            CheckCode::ClockSkew => "clock_skew",
            CheckCode::InvalidNonce => "invalid_nonce",
            CheckCode::RateLimited => "rate_limited",
            CheckCode::ExchangeUnavailable => "exchange_unavailable",
            CheckCode::Timeout => "timeout",
            CheckCode::SessionExpired => "session_expired",
            CheckCode::BadResponse => "bad_response",
        }
    }

    /// Transient codes are worth retrying with backoff; the others are verdicts about the key.
    pub fn is_transient(self) -> bool {
        matches!(self, CheckCode::RateLimited | CheckCode::ExchangeUnavailable | CheckCode::Timeout)
    }
}

/// Warnings about a key that works but is riskier than it should be.
pub mod warnings {
    /// The key can withdraw funds; Tradeeon never needs that.
    pub const WITHDRAWALS_ENABLED: &str = "withdrawals_enabled";
    /// The key is not restricted to our egress IPs.
    pub const NO_IP_RESTRICTION: &str = "no_ip_restriction";
    /// The exchange's testnet has no permissions endpoint, so permissions were not verified.
    pub const PERMISSIONS_UNKNOWN: &str = "permissions_unknown";
}

/// What a passed check proves about a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub permissions: Permissions,
    /// E.g. [`warnings::WITHDRAWALS_ENABLED`].
    pub warnings: Vec<String>,
}

/// Why a check did not pass. Messages are sentences for the user and never contain credentials.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The check ended with `code`: the key was refused (by the exchange, or before any request
    /// when it cannot be valid), or the exchange could not answer.
    Checked {
        code: CheckCode,
        message: String,
        /// How long the exchange asked us to wait, when it said.
        retry_after: Option<Duration>,
        /// A key that authenticates but lacks a permission Tradeeon needs: what it may do.
        found: Option<Verdict>,
    },
    /// [`RateGate::acquire`] refused, so nothing reached the exchange: `rate_limited`, to be tried
    /// again after `wait`. Jobs reschedule these without spending an attempt.
    Unsent { message: String, wait: Duration },
}

impl Failure {
    pub fn new(code: CheckCode, message: impl Into<String>) -> Self {
        debug_assert!(code != CheckCode::Ok);
        Failure::Checked { code, message: message.into(), retry_after: None, found: None }
    }

    /// `permission_denied` for a key that works, keeping what it may do for the user.
    pub fn lacking(message: impl Into<String>, found: Verdict) -> Self {
        Failure::Checked {
            code: CheckCode::PermissionDenied,
            message: message.into(),
            retry_after: None,
            found: Some(found),
        }
    }

    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        if let Failure::Checked { retry_after, .. } = &mut self {
            *retry_after = Some(wait);
        }
        self
    }

    pub fn code(&self) -> CheckCode {
        match self {
            Failure::Checked { code, .. } => *code,
            Failure::Unsent { .. } => CheckCode::RateLimited,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Checked { message, .. } | Failure::Unsent { message, .. } => message,
        }
    }

    /// When to try again, if the exchange or our rate gate said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Checked { retry_after, .. } => *retry_after,
            Failure::Unsent { wait, .. } => Some(*wait),
        }
    }
}

/// A check as jobs store and `GET /jobs/{id}` serves it: the `result` of `test`, `verify`,
/// `rotate` and `kite_session` jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub ok: bool,
    pub code: CheckCode,
    /// A sentence for the user. Never contains credentials.
    pub message: String,
    pub latency_ms: u64,
    pub permissions: Option<Permissions>,
    pub warnings: Vec<String>,
    /// Set with `rate_limited`: how long the exchange asked us to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl CheckResult {
    /// The record of a check that took `latency`.
    pub fn new(outcome: Result<Verdict, Failure>, latency: Duration) -> Self {
        let latency_ms = duration_ms(latency);
        match outcome {
            Ok(Verdict { permissions, warnings }) => Self {
                ok: true,
                code: CheckCode::Ok,
                message: "Credentials are valid.".to_string(),
                latency_ms,
                permissions: Some(permissions),
                warnings,
                retry_after_ms: None,
            },
            Err(failure) => {
                let (code, retry_after_ms) = (failure.code(), failure.retry_after().map(duration_ms));
                let (message, found) = match failure {
                    Failure::Checked { message, found, .. } => (message, found),
                    Failure::Unsent { message, .. } => (message, None),
                };
                let (permissions, warnings) = found.map_or((None, Vec::new()), |v| (Some(v.permissions), v.warnings));
                Self { ok: false, code, message, latency_ms, permissions, warnings, retry_after_ms }
            }
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The warnings every exchange derives the same way from a key's permissions.
pub fn permission_warnings(permissions: &Permissions) -> Vec<String> {
    let mut out = Vec::new();
    if permissions.withdraw {
        out.push(warnings::WITHDRAWALS_ENABLED.to_string());
    }
    if !permissions.ip_restricted {
        out.push(warnings::NO_IP_RESTRICTION.to_string());
    }
    out
}

/// One exchange's client.
pub trait ExchangeClient: Send + Sync {
    fn exchange(&self) -> Exchange;

    /// Proves the credentials work and reports their permissions. Never panics.
    fn check<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Verdict, Failure>>;
}

/// A budget an exchange enforces: which counter a request spends from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitKey {
    pub exchange: Exchange,
    /// The exchange's name for the counter, e.g. `"api"` (Binance request weight per IP),
    /// `"sapi"` (Binance /sapi per IP), `"private"` (Kraken per key).
    pub bucket: &'static str,
    /// For per-key limits (Kraken, Coinbase, Zerodha): a non-reversible fingerprint of the API
    /// key, never the key itself. `None` for per-IP limits.
    pub key_fingerprint: Option<String>,
}

/// What an exchange told us about its limits in a response.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitFeedback {
    /// 429 with `Retry-After`: stop calling this bucket until then.
    RetryAfter(Duration),
    /// Binance 418: the IP is banned until then. Nothing may be sent before it ends.
    Banned(Duration),
    /// Binance `X-MBX-USED-WEIGHT-1M`: weight used in the current minute by everyone on our IP.
    UsedWeight { used: u32, limit_per_minute: u32 },
}

/// Asked before every request. Implemented by the worker with governor limiters shared by all
/// jobs in the process, plus pauses learnt from the exchange's own answers (which also covers
/// the other worker processes behind the same IP).
pub trait RateGate: Send + Sync {
    /// Waits until `cost` units of `key` may be spent. Returns `Err(wait)` instead of waiting when
    /// the bucket is paused for longer than the caller should block (a `Retry-After` or a ban),
    /// so the job can be rescheduled rather than hold a worker slot.
    fn acquire<'a>(&'a self, key: &'a LimitKey, cost: u32) -> BoxFuture<'a, Result<(), Duration>>;

    /// Reports what a response said about the limits.
    fn report(&self, key: &LimitKey, feedback: LimitFeedback);
}

/// No limits at all: for unit tests and benchmarks that measure the clients alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unlimited;

impl RateGate for Unlimited {
    fn acquire<'a>(&'a self, _key: &'a LimitKey, _cost: u32) -> BoxFuture<'a, Result<(), Duration>> {
        Box::pin(async { Ok(()) })
    }

    fn report(&self, _key: &LimitKey, _feedback: LimitFeedback) {}
}

/// Shared by every client: the HTTP client and the rate gate.
#[derive(Clone)]
pub struct ClientContext {
    pub http: reqwest::Client,
    pub gate: Arc<dyn RateGate>,
}

/// Default connect and total timeouts for exchange calls. A check that cannot finish in this time
/// reports `timeout` rather than holding a worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The HTTP client every exchange call goes through: rustls, timeouts, a User-Agent, and the
/// standard `HTTPS_PROXY`/`NO_PROXY` variables honoured (for fixed-IP proxies outside AWS). It
/// follows no redirect: the exchanges' APIs never redirect, and following one would send the
/// key and its signature (custom headers, which reqwest keeps across hosts) wherever it points.
pub fn http_client(request_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::custom(|attempt| attempt.error("the exchange answered with a redirect")))
        .user_agent(concat!("tradeeon-connect/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT.min(request_timeout))
        .timeout(request_timeout)
        .build()
}

/// Maps a transport error to the check codes shared by all exchanges.
pub fn transport_failure(err: &reqwest::Error) -> Failure {
    if err.is_timeout() {
        Failure::new(CheckCode::Timeout, "The exchange did not answer in time.")
    } else if err.is_connect() {
        Failure::new(CheckCode::ExchangeUnavailable, "Could not connect to the exchange.")
    } else if err.is_redirect() {
        Failure::new(
            CheckCode::BadResponse,
            "The exchange answered with a redirect, which we do not follow: no credentials were sent elsewhere.",
        )
    } else if err.is_decode() || err.is_body() {
        Failure::new(CheckCode::BadResponse, "The exchange sent a response we could not read.")
    } else {
        Failure::new(CheckCode::ExchangeUnavailable, "The request to the exchange failed.")
    }
}

/// A non-reversible fingerprint of an API key for rate-limit keys, nonce locks and logs: the first
/// 16 hex characters of its SHA-256. Never log or store the key itself.
pub fn key_fingerprint(api_key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hex = hex::encode(Sha256::digest(api_key.as_bytes()));
    hex.truncate(16);
    hex
}

/// The `Retry-After` header as a duration (whole seconds, the form Binance and Kraken send).
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_documented_names() {
        for code in CheckCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        let transient: Vec<_> = CheckCode::ALL.into_iter().filter(|c| c.is_transient()).collect();
        assert_eq!(transient, [CheckCode::RateLimited, CheckCode::ExchangeUnavailable, CheckCode::Timeout]);
    }

    #[test]
    fn risky_permissions_produce_warnings() {
        let p = Permissions { read: true, trade: true, withdraw: true, ip_restricted: false };
        assert_eq!(permission_warnings(&p), ["withdrawals_enabled", "no_ip_restriction"]);
        let p = Permissions { read: true, trade: true, withdraw: false, ip_restricted: true };
        assert!(permission_warnings(&p).is_empty());
    }
}
