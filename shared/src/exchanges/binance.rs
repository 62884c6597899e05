//! Binance spot: a credential check against `GET /sapi/v1/account/apiRestrictions`.
//!
//! Follows Binance's spot API documentation (`binance-spot-api-docs`, `rest-api.md` and
//! `errors.md`, and the wallet docs' "Get API Key Permission"):
//!
//! * SIGNED requests carry the key in `X-MBX-APIKEY`, plus `timestamp` (ms) and `recvWindow`;
//!   `signature` is the hex HMAC-SHA256, keyed with the secret, of the exact query string sent
//!   (the query string concatenated with the body; our checks have no body), appended last.
//! * The server rejects a `timestamp` that is 1 s or more ahead of its clock or older than
//!   `recvWindow` with `-1021`. We then read `GET /api/v3/time`, keep the offset (for every later
//!   request of this client) and retry once; a second `-1021` is `clock_skew`.
//! * `/api/*` requests spend the per-IP request weight (6,000 per minute, reported in
//!   `X-MBX-USED-WEIGHT-1M`); `/sapi/*` IP-limited endpoints have their own independent 12,000 per
//!   minute, reported in `X-SAPI-USED-IP-WEIGHT-1M`. A 429 carries `Retry-After`; continuing to
//!   send during it gets the IP banned (418, with `Retry-After` until the ban ends).
//! * `-2015` ("Invalid API-key, IP, or permissions for action.") is the same code for an unknown
//!   key, a request from an IP outside the key's whitelist, and a missing permission: Binance
//!   does not tell them apart, so neither can we (`invalid_credentials`, with the IP whitelist
//!   named as a possible cause in the message).
//! * The Spot Test Network has no `/sapi` endpoints (404): the check then falls back to
//!   `GET /api/v3/account`, whose `canTrade`/`canWithdraw` give partial permissions.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::Deserialize;
use sha2::Sha256;
use url::Url;

use super::{
    CheckCode, ClientContext, Credentials, ExchangeClient, Failure, LimitFeedback, LimitKey, Verdict,
    permission_warnings, retry_after_header, transport_failure, warnings,
};
use crate::domain::{Exchange, Permissions};

/// `recvWindow` we send with every SIGNED request (Binance's default and recommended maximum).
pub const RECV_WINDOW_MS: u64 = 5_000;
/// The `/api/*` request-weight limit per IP per minute (`REQUEST_WEIGHT` in `exchangeInfo`).
pub const API_WEIGHT_LIMIT_PER_MINUTE: u32 = 6_000;
/// The independent per-endpoint limit of IP-limited `/sapi/*` endpoints.
pub const SAPI_IP_WEIGHT_LIMIT_PER_MINUTE: u32 = 12_000;

/// `GET /sapi/v1/account/apiRestrictions` — "Get API Key Permission (USER_DATA)", weight(IP) 1.
pub const API_RESTRICTIONS_PATH: &str = "/sapi/v1/account/apiRestrictions";
const API_RESTRICTIONS_WEIGHT: u32 = 1;
/// `GET /api/v3/account` — "Account information (USER_DATA)", weight 20.
pub const ACCOUNT_PATH: &str = "/api/v3/account";
const ACCOUNT_WEIGHT: u32 = 20;
/// `GET /api/v3/time` — "Check server time", weight 1.
pub const TIME_PATH: &str = "/api/v3/time";
const TIME_WEIGHT: u32 = 1;

/// The header carrying the API key.
pub const API_KEY_HEADER: &str = "X-MBX-APIKEY";
const USED_WEIGHT_HEADER: &str = "x-mbx-used-weight-1m";
const SAPI_USED_IP_WEIGHT_HEADER: &str = "x-sapi-used-ip-weight-1m";

/// Used when a 429 or 418 arrives without a readable `Retry-After` (Binance always sends one).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Binance's shortest IP ban, used when a 418 arrives without `Retry-After`.
const DEFAULT_BAN: Duration = Duration::from_secs(120);

/// Hex HMAC-SHA256 of `payload` keyed with the API secret: the `signature` parameter.
pub fn sign(secret: &str, payload: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(payload.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Which Binance counter a request spends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    /// `/api/*`: request weight per IP.
    Api,
    /// `/sapi/*` IP-limited endpoints.
    Sapi,
}

impl Bucket {
    fn limit_key(self) -> LimitKey {
        LimitKey {
            exchange: Exchange::Binance,
            bucket: match self {
                Bucket::Api => "api",
                Bucket::Sapi => "sapi",
            },
            key_fingerprint: None,
        }
    }
}

/// What Binance answered, once transport, limits and server errors are dealt with.
enum Reply {
    Json(serde_json::Value),
    NotFound,
    Error { code: i64, msg: String },
}

/// A reply and when (our clock, without the offset) the request left and the answer arrived.
struct Sent {
    reply: Reply,
    sent_ms: i64,
    received_ms: i64,
}

/// `Err` ends the check.
type Step<T> = Result<T, Failure>;

/// The response of `GET /sapi/v1/account/apiRestrictions` (the fields we use).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiRestrictions {
    ip_restrict: bool,
    enable_reading: bool,
    enable_spot_and_margin_trading: bool,
    enable_withdrawals: bool,
}

/// The response of `GET /api/v3/account` (the fields we use).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Account {
    can_trade: bool,
    can_withdraw: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerTime {
    server_time: i64,
}

/// The Binance spot client. Holds the learnt offset between our clock and Binance's, so create
/// one per process (it is cheap to share behind an `Arc`).
pub struct BinanceClient {
    ctx: ClientContext,
    base_url: Url,
    time_offset_ms: AtomicI64,
}

impl fmt::Debug for BinanceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BinanceClient")
            .field("base_url", &self.base_url.as_str())
            .field("time_offset_ms", &self.time_offset_ms())
            .finish_non_exhaustive()
    }
}

impl BinanceClient {
    /// `base_url` is `https://api.binance.com` (or the testnet, or the simulator).
    pub fn new(ctx: ClientContext, base_url: Url) -> Self {
        Self { ctx, base_url, time_offset_ms: AtomicI64::new(0) }
    }

    /// Binance's clock minus ours, in milliseconds, as last measured (0 until a `-1021`).
    pub fn time_offset_ms(&self) -> i64 {
        self.time_offset_ms.load(Ordering::Relaxed)
    }

    fn now_ms() -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    fn endpoint(&self, path: &str) -> Url {
        let mut url = self.base_url.clone();
        let prefix = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(None);
        url
    }

    /// `timestamp=…&recvWindow=5000&signature=…` with the corrected clock.
    fn signed_query(&self, secret: &str) -> String {
        let timestamp = Self::now_ms() + self.time_offset_ms();
        let payload = format!("timestamp={timestamp}&recvWindow={RECV_WINDOW_MS}");
        let signature = sign(secret, &payload);
        format!("{payload}&signature={signature}")
    }

    fn report_weights(&self, headers: &HeaderMap) {
        let read =
            |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u32>().ok());
        if let Some(used) = read(USED_WEIGHT_HEADER) {
            self.ctx.gate.report(
                &Bucket::Api.limit_key(),
                LimitFeedback::UsedWeight { used, limit_per_minute: API_WEIGHT_LIMIT_PER_MINUTE },
            );
        }
        if let Some(used) = read(SAPI_USED_IP_WEIGHT_HEADER) {
            self.ctx.gate.report(
                &Bucket::Sapi.limit_key(),
                LimitFeedback::UsedWeight { used, limit_per_minute: SAPI_IP_WEIGHT_LIMIT_PER_MINUTE },
            );
        }
    }

    /// Asks the gate, sends one GET — signed with `secret`, if given, once the gate has let it
    /// through: the gate may hold a request for seconds, longer than Binance's receive window —
    /// and classifies the answer. Every failure that ends the check (paused bucket, transport,
    /// 429/418, 5xx, unreadable body) is `Err`.
    async fn send(
        &self,
        path: &str,
        secret: Option<&str>,
        api_key: Option<&HeaderValue>,
        bucket: Bucket,
        weight: u32,
    ) -> Step<Sent> {
        let limit_key = bucket.limit_key();
        if let Err(wait) = self.ctx.gate.acquire(&limit_key, weight).await {
            return Err(Failure::Unsent {
                message:
                    "Requests to Binance from our IP address are paused (rate limit); nothing was sent, the check \
                          will be retried later."
                        .to_string(),
                wait,
            });
        }

        let mut url = self.endpoint(path);
        url.set_query(secret.map(|secret| self.signed_query(secret)).as_deref());
        let mut request = self.ctx.http.get(url);
        if let Some(key) = api_key {
            request = request.header(API_KEY_HEADER, key.clone());
        }
        let sent_ms = Self::now_ms();
        let response = request.send().await.map_err(|err| transport_failure(&err))?;
        let received_ms = Self::now_ms();
        let status = response.status();
        self.report_weights(response.headers());
        tracing::debug!(exchange = "binance", path, status = status.as_u16(), "binance response");

        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after_header(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
            self.ctx.gate.report(&limit_key, LimitFeedback::RetryAfter(wait));
            return Err(Failure::new(
                CheckCode::RateLimited,
                "Binance is rate-limiting our IP address; the check will be retried later.",
            )
            .with_retry_after(wait));
        }
        if status.as_u16() == 418 {
            let wait = retry_after_header(response.headers()).unwrap_or(DEFAULT_BAN);
            self.ctx.gate.report(&limit_key, LimitFeedback::Banned(wait));
            return Err(Failure::new(
                CheckCode::RateLimited,
                "Binance has temporarily banned our IP address for exceeding its rate limits; nothing will be sent until the ban ends.")
            .with_retry_after(wait));
        }
        if status.is_server_error() {
            return Err(Failure::new(
                CheckCode::ExchangeUnavailable,
                format!("Binance answered HTTP {}; it may be in maintenance.", status.as_u16()),
            ));
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(Sent { reply: Reply::NotFound, sent_ms, received_ms });
        }

        let body = response.bytes().await.map_err(|err| transport_failure(&err))?;
        let bad_response = || {
            Failure::new(
                CheckCode::BadResponse,
                format!("Binance answered HTTP {} with a body we could not read.", status.as_u16()),
            )
        };
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|_| bad_response())?;
        if let (Some(code), Some(msg)) =
            (value.get("code").and_then(|c| c.as_i64()), value.get("msg").and_then(|m| m.as_str()))
            && (!status.is_success() || code < 0)
        {
            let msg: String = msg.chars().take(200).collect();
            return Ok(Sent { reply: Reply::Error { code, msg }, sent_ms, received_ms });
        }
        if status.is_success() {
            return Ok(Sent { reply: Reply::Json(value), sent_ms, received_ms });
        }
        if status == StatusCode::FORBIDDEN {
            return Err(Failure::new(
                CheckCode::ExchangeUnavailable,
                "Binance's web application firewall rejected the request (HTTP 403).",
            ));
        }
        Err(bad_response())
    }

    /// Reads Binance's clock and keeps the offset for later requests.
    async fn resync_clock(&self) -> Step<()> {
        let sent = self.send(TIME_PATH, None, None, Bucket::Api, TIME_WEIGHT).await?;
        let value = match sent.reply {
            Reply::Json(value) => value,
            Reply::Error { code, msg } => return Err(map_error(code, &msg)),
            Reply::NotFound => {
                return Err(Failure::new(
                    CheckCode::BadResponse,
                    "Binance has no server-time endpoint at this address.",
                ));
            }
        };
        let time: ServerTime = serde_json::from_value(value)
            .map_err(|_| Failure::new(CheckCode::BadResponse, "Binance sent a server time we could not read."))?;
        let midpoint = sent.sent_ms + (sent.received_ms - sent.sent_ms) / 2;
        let offset = time.server_time - midpoint;
        self.time_offset_ms.store(offset, Ordering::Relaxed);
        tracing::info!(exchange = "binance", offset_ms = offset, "resynchronised with Binance's server time");
        Ok(())
    }

    /// One SIGNED GET; on `-1021` resynchronises the clock and retries once.
    async fn signed_get(
        &self,
        credentials: &Credentials,
        api_key: &HeaderValue,
        path: &str,
        bucket: Bucket,
        weight: u32,
    ) -> Step<Reply> {
        let mut resynced = false;
        loop {
            let secret = Some(credentials.api_secret.expose());
            let sent = self.send(path, secret, Some(api_key), bucket, weight).await?;
            match sent.reply {
                Reply::Error { code: -1021, .. } if !resynced => {
                    self.resync_clock().await?;
                    resynced = true;
                }
                Reply::Error { code: -1021, .. } => {
                    return Err(Failure::new(
                        CheckCode::ClockSkew,
                        "Our clock and Binance's disagree by more than the 5-second receive window, even after \
                         resynchronising with Binance's server time.",
                    ));
                }
                reply => return Ok(reply),
            }
        }
    }

    async fn run_check(&self, credentials: &Credentials) -> Step<Verdict> {
        let mut api_key = HeaderValue::from_str(credentials.api_key.expose()).map_err(|_| {
            Failure::new(CheckCode::InvalidCredentials, "The API key contains characters Binance keys never have.")
        })?;
        api_key.set_sensitive(true);

        let reply = self
            .signed_get(credentials, &api_key, API_RESTRICTIONS_PATH, Bucket::Sapi, API_RESTRICTIONS_WEIGHT)
            .await?;
        match reply {
            Reply::Json(value) => {
                let r: ApiRestrictions = serde_json::from_value(value).map_err(|_| {
                    Failure::new(CheckCode::BadResponse, "Binance sent API key permissions we could not read.")
                })?;
                let permissions = Permissions {
                    read: r.enable_reading,
                    trade: r.enable_spot_and_margin_trading,
                    withdraw: r.enable_withdrawals,
                    ip_restricted: r.ip_restrict,
                };
                verdict(permissions, permission_warnings(&permissions))
            }
            Reply::NotFound => self.check_without_sapi(credentials, &api_key).await,
            Reply::Error { code, msg } => Err(map_error(code, &msg)),
        }
    }

    /// The testnet has no `/sapi`: authenticate with the account endpoint instead. Its
    /// `canTrade`/`canWithdraw` are account-level flags, and it says nothing about IP
    /// restrictions, hence `permissions_unknown`.
    async fn check_without_sapi(&self, credentials: &Credentials, api_key: &HeaderValue) -> Step<Verdict> {
        let reply = self.signed_get(credentials, api_key, ACCOUNT_PATH, Bucket::Api, ACCOUNT_WEIGHT).await?;
        match reply {
            Reply::Json(value) => {
                let account: Account = serde_json::from_value(value).map_err(|_| {
                    Failure::new(CheckCode::BadResponse, "Binance sent account data we could not read.")
                })?;
                let permissions = Permissions {
                    read: true,
                    trade: account.can_trade,
                    withdraw: account.can_withdraw,
                    ip_restricted: false,
                };
                let mut warns = Vec::new();
                if permissions.withdraw {
                    warns.push(warnings::WITHDRAWALS_ENABLED.to_string());
                }
                warns.push(warnings::PERMISSIONS_UNKNOWN.to_string());
                verdict(permissions, warns)
            }
            Reply::NotFound => Err(Failure::new(
                CheckCode::BadResponse,
                "Binance has neither the API-key permission endpoint nor the account endpoint at this address.",
            )),
            Reply::Error { code, msg } => Err(map_error(code, &msg)),
        }
    }
}

/// `ok`, unless the key cannot read (the least Tradeeon needs).
fn verdict(permissions: Permissions, warnings: Vec<String>) -> Step<Verdict> {
    if !permissions.read {
        return Err(Failure::lacking(
            "The API key works but does not have \"Enable Reading\", which Tradeeon needs.",
            Verdict { permissions, warnings: Vec::new() },
        ));
    }
    Ok(Verdict { permissions, warnings })
}

/// Binance's `{code,msg}` errors (errors.md) as failures.
fn map_error(code: i64, msg: &str) -> Failure {
    let (check, message) = match code {
        -2014 => (CheckCode::InvalidCredentials, "Binance says the API key format is invalid.".to_string()),
        -2015 => (
            CheckCode::InvalidCredentials,
            "Binance rejected the API key (\"Invalid API-key, IP, or permissions for action\"): the key does not \
             exist or was deleted, or it is restricted to trusted IPs that do not include ours (add our egress IPs \
             to the key's IP whitelist), or it lacks the permission for this request."
                .to_string(),
        ),
        -1022 => (
            CheckCode::InvalidSignature,
            "Binance could not verify the request signature: the API secret is probably wrong.".to_string(),
        ),
        -1021 => {
            (CheckCode::ClockSkew, "Our clock and Binance's disagree by more than the receive window.".to_string())
        }
        -1002 => (CheckCode::PermissionDenied, "Binance says the key is not authorized for this request.".to_string()),
        -1003 => (CheckCode::RateLimited, "Binance is rate-limiting our IP address.".to_string()),
        -1000 | -1001 | -1006 | -1007 | -1008 => {
            (CheckCode::ExchangeUnavailable, format!("Binance could not process the request right now (error {code})."))
        }
        _ => (CheckCode::BadResponse, format!("Binance answered with an unexpected error {code}: {msg}")),
    };
    Failure::new(check, message)
}

impl ExchangeClient for BinanceClient {
    fn exchange(&self) -> Exchange {
        Exchange::Binance
    }

    fn check<'a>(&'a self, credentials: &'a Credentials) -> BoxFuture<'a, Result<Verdict, Failure>> {
        Box::pin(async move {
            let outcome = self.run_check(credentials).await;
            let code = outcome.as_ref().map_or_else(Failure::code, |_| CheckCode::Ok);
            tracing::debug!(exchange = "binance", code = code.as_str(), "binance credential check finished");
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HMAC example of "SIGNED Endpoint Examples for POST /api/v3/order" in Binance's
    /// `rest-api.md`.
    #[test]
    fn signs_binance_documented_example() {
        let secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j";
        let payload = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
        assert_eq!(sign(secret, payload), "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71");
    }

    #[test]
    fn error_codes_map_to_check_codes() {
        assert_eq!(map_error(-2014, "").code(), CheckCode::InvalidCredentials);
        let ip = map_error(-2015, "Invalid API-key, IP, or permissions for action.");
        assert_eq!(ip.code(), CheckCode::InvalidCredentials);
        assert!(ip.message().contains("IP whitelist"), "{}", ip.message());
        assert_eq!(map_error(-1022, "").code(), CheckCode::InvalidSignature);
        assert_eq!(map_error(-1021, "").code(), CheckCode::ClockSkew);
        assert_eq!(map_error(-1008, "").code(), CheckCode::ExchangeUnavailable);
        assert_eq!(map_error(-1121, "Invalid symbol.").code(), CheckCode::BadResponse);
    }

    #[test]
    fn endpoint_keeps_a_base_path_prefix() {
        let ctx = ClientContext { http: reqwest::Client::new(), gate: std::sync::Arc::new(super::super::Unlimited) };
        let client = BinanceClient::new(ctx.clone(), Url::parse("https://api.binance.com").unwrap());
        assert_eq!(client.endpoint(TIME_PATH).as_str(), "https://api.binance.com/api/v3/time");
        let client = BinanceClient::new(ctx, Url::parse("http://127.0.0.1:9000/proxy/").unwrap());
        assert_eq!(client.endpoint(TIME_PATH).as_str(), "http://127.0.0.1:9000/proxy/api/v3/time");
    }
}
