//! Zerodha Kite Connect v3.
//!
//! Kite keys do not sign requests. A user logs in on Kite's own page
//! (`KITE_LOGIN_URL?v=3&api_key=…`, see [`KiteClient::login_url`]); Kite redirects back to the
//! app's registered redirect URL with a one-time `request_token`; the app then POSTs
//! `api_key`, `request_token` and `checksum` = hex SHA-256(api_key + request_token + api_secret)
//! to `/session/token` ([`KiteClient::create_session`]) and receives an `access_token`. Every
//! request carries `X-Kite-Version: 3`; authenticated ones `Authorization: token api_key:access_token`.
//! The access token lives until 06:00 the next morning, Indian time ([`session_expiry`]), unless
//! the user logs out or logs in elsewhere.
//!
//! The credential check ([`ExchangeClient::check`]) is `GET /user/profile` with the stored
//! access token.
//!
//! # Errors
//!
//! Kite errors are `{"status": "error", "message", "error_type"}`:
//! `TokenException` (403) → `session_expired`, except while creating a session, where an invalid
//! `checksum` means a wrong api_secret (`invalid_signature`), an invalid `api_key` is
//! `invalid_credentials`, and a used or expired request token is `session_expired` (log in
//! again); `PermissionException` (403) → `permission_denied`; `InputException` (400) →
//! `invalid_credentials` while creating a session, `bad_response` in the check (it would mean we
//! sent a malformed request); `NetworkException`, `DataException`, `GeneralException` and 5xx →
//! `exchange_unavailable`; 429 → `rate_limited`.
//!
//! # Permissions
//!
//! Kite keys cannot withdraw (funds only leave to the user's registered bank account through
//! Zerodha's own flows): `withdraw = false`. `read = true` once the profile loads; `trade = true`
//! when the profile lists at least one product (CNC, MIS, NRML…). Since 1 April 2026 (SEBI/NSE
//! retail algo rules) Kite rejects every API order request from an IP not registered in the
//! developer console's IP whitelist, so order placement *is* always IP-restricted:
//! `ip_restricted = true` and no `no_ip_restriction` warning. What the profile cannot tell us is
//! whether *our* egress IP is the registered one; that only shows when an order is placed.
//!
//! # Rate limits
//!
//! Per API key: 10 requests/s for all endpoints except quotes (1/s), historical candles (3/s)
//! and order placement (10/s, 400/min) — see [`KITE_RATE`]. A 429 is reported to the gate with its
//! `Retry-After`, or 1 s (the window the limit is expressed in) when there is none.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Days, FixedOffset, NaiveTime, TimeZone as _, Utc};
use futures::future::BoxFuture;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

use super::{
    CheckCode, ClientContext, Credentials, ExchangeClient, Failure, LimitFeedback, LimitKey, Verdict, key_fingerprint,
    retry_after_header, transport_failure,
};
use crate::domain::{Exchange, Permissions};
use crate::vault::SecretValue;

/// Sent on every request: Kite Connect v3 rejects requests without it.
pub const KITE_VERSION: &str = "3";
pub const SESSION_TOKEN_PATH: &str = "/session/token";
pub const PROFILE_PATH: &str = "/user/profile";

/// A documented request budget, for the worker's limiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitDefault {
    /// The [`LimitKey::bucket`] requests spend from.
    pub bucket: &'static str,
    pub per_second: u32,
}

/// Kite Connect: 10 requests per second per API key for everything but quotes, historical data
/// and orders.
pub const KITE_RATE: RateLimitDefault = RateLimitDefault { bucket: "private", per_second: 10 };

const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// India Standard Time. Asia/Kolkata has been a fixed UTC+05:30 with no daylight saving since
/// 1945, so a fixed offset is exact for every date we will see (and avoids a tz database dependency).
fn ist() -> FixedOffset {
    FixedOffset::east_opt(5 * 3600 + 30 * 60).expect("+05:30 is a valid offset")
}

/// When a Kite access token created at `created_at` expires: the first 06:00 IST strictly after
/// it (created before 06:00 IST → 06:00 the same day; at or after 06:00 → 06:00 the next day).
pub fn session_expiry(created_at: DateTime<Utc>) -> DateTime<Utc> {
    let ist = ist();
    let local = created_at.with_timezone(&ist);
    let six = NaiveTime::from_hms_opt(6, 0, 0).expect("06:00 is a valid time");
    let mut day = local.date_naive();
    if local.time() >= six {
        day = day.checked_add_days(Days::new(1)).expect("date in range");
    }
    ist.from_local_datetime(&day.and_time(six)).single().expect("a fixed offset has no gaps").with_timezone(&Utc)
}

/// The `/session/token` checksum: hex SHA-256 of `api_key + request_token + api_secret`.
pub fn checksum(api_key: &str, request_token: &str, api_secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(api_key.as_bytes());
    hasher.update(request_token.as_bytes());
    hasher.update(api_secret.as_bytes());
    hex::encode(hasher.finalize())
}

/// A Kite session from [`KiteClient::create_session`]. `Debug` redacts the token.
#[derive(Debug, Clone)]
pub struct KiteSession {
    pub access_token: SecretValue,
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Deserialize)]
struct KiteError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error_type: String,
}

#[derive(Deserialize)]
struct Envelope<T> {
    status: String,
    data: Option<T>,
}

#[derive(Deserialize)]
struct SessionData {
    user_id: String,
    access_token: String,
}

#[derive(Deserialize)]
struct Profile {
    #[allow(dead_code)]
    user_id: String,
    #[serde(default)]
    products: Vec<String>,
}

/// The Kite Connect client.
#[derive(Clone)]
pub struct KiteClient {
    ctx: ClientContext,
    api_base: Url,
    login_url: Url,
}

impl fmt::Debug for KiteClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KiteClient")
            .field("api_base", &self.api_base.as_str())
            .field("login_url", &self.login_url.as_str())
            .finish_non_exhaustive()
    }
}

/// Which call an error came from: the same Kite error means different things in each.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    CreateSession,
    Check,
}

impl KiteClient {
    pub fn new(ctx: ClientContext, api_base: Url, login_url: Url) -> Self {
        Self { ctx, api_base, login_url }
    }

    /// Where to send the user to log in: `KITE_LOGIN_URL?v=3&api_key=…`.
    pub fn login_url(&self, api_key: &str) -> Url {
        let mut url = self.login_url.clone();
        url.query_pairs_mut().append_pair("v", KITE_VERSION).append_pair("api_key", api_key.trim());
        url
    }

    /// The per-key budget.
    pub fn limit_key(api_key: &str) -> LimitKey {
        LimitKey {
            exchange: Exchange::Zerodha,
            bucket: KITE_RATE.bucket,
            key_fingerprint: Some(key_fingerprint(api_key.trim())),
        }
    }

    /// Exchanges a `request_token` from the login redirect for an access token.
    pub async fn create_session(
        &self,
        api_key: &SecretValue,
        api_secret: &SecretValue,
        request_token: &str,
    ) -> Result<KiteSession, Failure> {
        let api_key = api_key.expose().trim();
        let request_token = request_token.trim();
        if api_key.is_empty() {
            return Err(Failure::new(CheckCode::InvalidCredentials, "The Kite API key is empty."));
        }
        if request_token.is_empty() {
            return Err(Failure::new(
                CheckCode::SessionExpired,
                "The Kite login did not return a request token; log in with Kite again.",
            ));
        }
        let checksum = zeroize::Zeroizing::new(checksum(api_key, request_token, api_secret.expose().trim()));
        let limit_key = Self::limit_key(api_key);
        if let Err(wait) = self.ctx.gate.acquire(&limit_key, 1).await {
            return Err(paused(wait));
        }
        let form = [("api_key", api_key), ("request_token", request_token), ("checksum", checksum.as_str())];
        let request = self
            .ctx
            .http
            .post(endpoint(&self.api_base, SESSION_TOKEN_PATH))
            .header("X-Kite-Version", KITE_VERSION)
            .form(&form);
        let response = request.send().await.map_err(|err| transport_failure(&err))?;
        let status = response.status();
        if status.as_u16() == 429 {
            return Err(self.rate_limited(&limit_key, &response));
        }
        let body = response.bytes().await.map_err(|err| transport_failure(&err))?;
        if !status.is_success() {
            return Err(failure_for(Call::CreateSession, status, &body));
        }
        match serde_json::from_slice::<Envelope<SessionData>>(&body) {
            Ok(Envelope { status, data: Some(data) }) if status == "success" && !data.access_token.is_empty() => {
                Ok(KiteSession {
                    access_token: SecretValue::new(data.access_token),
                    user_id: data.user_id,
                    expires_at: session_expiry(Utc::now()),
                })
            }
            _ => Err(Failure::new(
                CheckCode::BadResponse,
                "Kite answered the session request with something we could not read.",
            )),
        }
    }

    async fn check_profile(&self, credentials: &Credentials) -> Result<Verdict, Failure> {
        let api_key = credentials.api_key.expose().trim();
        let Some(access_token) = credentials.access_token.as_ref().filter(|t| !t.expose().trim().is_empty()) else {
            return Err(Failure::new(
                CheckCode::SessionExpired,
                "There is no Kite session for this connection: log in with Kite to connect it.",
            ));
        };
        let limit_key = Self::limit_key(api_key);
        if let Err(wait) = self.ctx.gate.acquire(&limit_key, 1).await {
            return Err(paused(wait));
        }
        let authorization = zeroize::Zeroizing::new(format!("token {api_key}:{}", access_token.expose().trim()));
        let request = self
            .ctx
            .http
            .get(endpoint(&self.api_base, PROFILE_PATH))
            .header("X-Kite-Version", KITE_VERSION)
            .header("Authorization", authorization.as_str());
        let response = request.send().await.map_err(|err| transport_failure(&err))?;
        let status = response.status();
        if status.as_u16() == 429 {
            return Err(self.rate_limited(&limit_key, &response));
        }
        let body = response.bytes().await.map_err(|err| transport_failure(&err))?;
        if !status.is_success() {
            return Err(failure_for(Call::Check, status, &body));
        }
        match serde_json::from_slice::<Envelope<Profile>>(&body) {
            Ok(Envelope { status, data: Some(profile) }) if status == "success" => {
                // See the module docs: order placement is IP-whitelisted by regulation; Kite
                // keys never withdraw.
                let permissions = Permissions {
                    read: true,
                    trade: !profile.products.is_empty(),
                    withdraw: false,
                    ip_restricted: true,
                };
                let warnings = super::permission_warnings(&permissions);
                Ok(Verdict { permissions, warnings })
            }
            _ => Err(Failure::new(
                CheckCode::BadResponse,
                "Kite answered the profile request with something we could not read.",
            )),
        }
    }

    fn rate_limited(&self, limit_key: &LimitKey, response: &reqwest::Response) -> Failure {
        let wait = retry_after_header(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
        self.ctx.gate.report(limit_key, LimitFeedback::RetryAfter(wait));
        Failure::new(CheckCode::RateLimited, "Kite is rate-limiting this API key; retry later.").with_retry_after(wait)
    }
}

impl ExchangeClient for KiteClient {
    fn exchange(&self) -> Exchange {
        Exchange::Zerodha
    }

    fn check<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Verdict, Failure>> {
        Box::pin(self.check_profile(credentials))
    }
}

/// Maps a non-2xx Kite answer. Kite's own message is not copied into ours.
fn failure_for(call: Call, status: reqwest::StatusCode, body: &[u8]) -> Failure {
    let error = serde_json::from_slice::<KiteError>(body).ok();
    let error_type = error.as_ref().map(|e| e.error_type.as_str()).unwrap_or("");
    let message = error.as_ref().map(|e| e.message.to_ascii_lowercase()).unwrap_or_default();
    let (code, text) = match (call, error_type) {
        (Call::CreateSession, "TokenException" | "InputException") if message.contains("checksum") => (
            CheckCode::InvalidSignature,
            "Kite rejected the checksum: the API secret is wrong. Paste the secret of this Kite Connect app.",
        ),
        (Call::CreateSession, "TokenException" | "InputException") if message.contains("api_key") => {
            (CheckCode::InvalidCredentials, "Kite does not know this API key. Check the Kite Connect app's API key.")
        }
        (Call::CreateSession, "TokenException") => {
            (CheckCode::SessionExpired, "The Kite login has expired or was already used; log in with Kite again.")
        }
        (Call::CreateSession, "InputException") => {
            (CheckCode::InvalidCredentials, "Kite rejected the login details; log in with Kite again.")
        }
        (Call::Check, "TokenException") => (
            CheckCode::SessionExpired,
            "The Kite session has expired or was logged out (sessions end at 06:00 IST daily); log in with Kite again.",
        ),
        (_, "PermissionException") => {
            (CheckCode::PermissionDenied, "Kite refused this app access to the user's profile (PermissionException).")
        }
        (Call::Check, "InputException") => {
            (CheckCode::BadResponse, "Kite rejected the request as malformed (InputException).")
        }
        (_, "NetworkException" | "DataException" | "GeneralException") => {
            (CheckCode::ExchangeUnavailable, "Kite could not reach its order management system; retry later.")
        }
        _ if status.is_server_error() => (CheckCode::ExchangeUnavailable, "Kite is unavailable; retry later."),
        _ if status.as_u16() == 403 && call == Call::Check => {
            (CheckCode::SessionExpired, "The Kite session has expired or was logged out; log in with Kite again.")
        }
        _ => {
            return Failure::new(
                CheckCode::BadResponse,
                format!("Kite answered with an unexpected HTTP {}.", status.as_u16()),
            );
        }
    };
    Failure::new(code, text)
}

fn endpoint(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url.set_query(None);
    url
}

fn paused(wait: Duration) -> Failure {
    let message = "Requests to Kite with this API key are paused after a rate limit; nothing was sent.";
    Failure::Unsent { message: message.to_string(), wait }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn expiry_is_the_next_six_am_ist() {
        // 06:00 IST is 00:30 UTC.
        // Created mid-day IST → next morning.
        assert_eq!(session_expiry(utc("2025-03-10T06:30:00Z")), utc("2025-03-11T00:30:00Z"));
        // One second before 06:00 IST → the same morning.
        assert_eq!(session_expiry(utc("2025-03-10T00:29:59Z")), utc("2025-03-10T00:30:00Z"));
        // Exactly 06:00 IST → the next morning, never "now".
        assert_eq!(session_expiry(utc("2025-03-10T00:30:00Z")), utc("2025-03-11T00:30:00Z"));
        // One second after 06:00 IST → the next morning.
        assert_eq!(session_expiry(utc("2025-03-10T00:30:01Z")), utc("2025-03-11T00:30:00Z"));
        // 23:59 UTC is 05:29 IST the next calendar day → 06:00 IST that (Indian) day.
        assert_eq!(session_expiry(utc("2025-03-10T23:59:00Z")), utc("2025-03-11T00:30:00Z"));
        // 18:30 UTC is midnight IST: the date rolls over in India before it does in UTC.
        assert_eq!(session_expiry(utc("2025-03-10T18:30:00Z")), utc("2025-03-11T00:30:00Z"));
        // Month and year ends.
        assert_eq!(session_expiry(utc("2025-12-31T12:00:00Z")), utc("2026-01-01T00:30:00Z"));
        assert_eq!(session_expiry(utc("2024-02-28T20:00:00Z")), utc("2024-02-29T00:30:00Z"));
    }

    #[test]
    fn expiry_is_always_within_a_day_and_after_creation() {
        let start = utc("2025-01-01T00:00:00Z");
        for minutes in (0..3 * 24 * 60).step_by(7) {
            let created = start + chrono::Duration::minutes(minutes);
            let expiry = session_expiry(created);
            assert!(expiry > created);
            assert!(expiry - created <= chrono::Duration::hours(24));
            assert_eq!(expiry.with_timezone(&ist()).time(), NaiveTime::from_hms_opt(6, 0, 0).unwrap());
        }
    }

    #[test]
    fn checksum_is_hex_sha256_of_key_token_secret() {
        // sha256("abc") — the concatenation is all that is hashed.
        assert_eq!(checksum("a", "b", "c"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
