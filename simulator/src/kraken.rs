//! Fake Kraken spot REST API, following Kraken's "Spot REST Authentication", "Get API Key Info",
//! "Spot Error Messages" and "Spot REST Rate Limits" documentation.
//!
//! Endpoints: `GET /0/public/Time`, `POST /0/private/GetApiKeyInfo` (no permission required) and
//! `POST /0/private/Balance` (needs `query-funds`); other private methods answer
//! `EGeneral:Unknown method`. Like Kraken, every answer is HTTP 200 with `{"error":[…],"result":…}`.
//!
//! A private request is checked in this order:
//! 1. `API-Key` names a known, non-revoked key — else `EAPI:Invalid key`.
//! 2. The key's call counter (+1 per call, decaying per second; Starter tier by default: max 15,
//!    −0.33/s, see [`KrakenState::set_tier`]) has room — else `EAPI:Rate limit exceeded`.
//! 3. `API-Sign` equals base64(HMAC-SHA512(base64-decoded secret, URI path + SHA256(nonce + POST
//!    data))) computed over the path and the raw body exactly as received — else
//!    `EAPI:Invalid signature`.
//! 4. `nonce` is greater than every nonce accepted for the key (nonce window 0) — else
//!    `EAPI:Invalid nonce`.
//! 5. The client IP is in the key's IP allowlist, if it has one, and `otp` matches the key's
//!    two-factor password, if it has one — else `EGeneral:Permission denied`. Kraken does not
//!    document its answer to either; this is the simulator's choice.
//! 6. The method's permission (`query-funds` for `Balance`) — else `EGeneral:Permission denied`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256, Sha512};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::kraken::KrakenTier;

use crate::SimState;

/// Query funds, open/closed orders, create & cancel orders; no IP restriction.
pub const SEEDED_FULL_KEY: &str = "SimKrakenFull4f7ebd3a3bb6fad7c228c8b40360a2413110acc7293";
/// Query only (funds, orders, ledger); no IP restriction.
pub const SEEDED_READ_ONLY_KEY: &str = "SimKrakenReadonly20f6b0fe9b158ee4fc4f029741379a20d455c3f";
/// Full trading plus `withdraw-funds`; allowlist 127.0.0.1 and ::1.
pub const SEEDED_WITHDRAW_KEY: &str = "SimKrakenWithdraw2e24261774ffde7a77c567bcac0706b4463de85";
/// Query + trade, allowlist 127.0.0.1 and ::1, two-factor password [`SEEDED_OTP`].
pub const SEEDED_OTP_KEY: &str = "SimKrakenOtpdf1f8dc2816feeedb21bce10f11a04868c28004311fd";
/// The two-factor password of [`SEEDED_OTP_KEY`].
pub const SEEDED_OTP: &str = "tradeeon-sim-2fa";
/// Query + trade, allowlist 203.0.113.7 only: `EGeneral:Permission denied` from here.
pub const SEEDED_ELSEWHERE_KEY: &str = "SimKrakenElsewhere51dfd2ccc31216e9e9bf37604b96e9522712af";
/// Deleted: `EAPI:Invalid key`.
pub const SEEDED_REVOKED_KEY: &str = "SimKrakenRevoked8e519673dd7769da6612824f5f31a6d0497b8c54";
/// Can create orders but not query funds.
pub const SEEDED_NO_FUNDS_KEY: &str = "SimKrakenNofundsd45b747c956359a965233a62e688cfc11a4bd0c6";

pub const ELSEWHERE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

/// A seeded key's private key: base64 of 64 bytes, like Kraken's.
pub fn seeded_secret(api_key: &str) -> String {
    STANDARD.encode(Sha512::digest(format!("tradeeon-simulator/kraken/secret/{api_key}").as_bytes()))
}

const READ: &[&str] = &["query-funds", "query-open-trades", "query-closed-trades", "query-ledger"];
const TRADE: &[&str] = &["query-funds", "query-open-trades", "query-closed-trades", "modify-trades", "close-trades"];

#[derive(Clone)]
struct KeyEntry {
    name: String,
    secret: Vec<u8>,
    permissions: Vec<String>,
    ip_allowlist: Vec<IpAddr>,
    otp: Option<String>,
    revoked: bool,
    last_nonce: u64,
    counter: f64,
    counter_at: Instant,
    created: i64,
    last_used: Option<i64>,
}

/// The fake Kraken's keys and switches. All methods are test hooks.
pub struct KrakenState {
    keys: Mutex<HashMap<String, KeyEntry>>,
    /// (max counter, decay per second)
    limit: Mutex<(f64, f64)>,
    invalid_nonces: AtomicU64,
}

impl Default for KrakenState {
    fn default() -> Self {
        let tier = KrakenTier::Starter;
        Self {
            keys: Mutex::new(HashMap::new()),
            limit: Mutex::new((tier.max_counter(), tier.decay_per_second())),
            invalid_nonces: AtomicU64::new(0),
        }
    }
}

impl KrakenState {
    /// The keys documented in [`seeded_keys_summary`].
    pub fn seeded() -> Self {
        let state = Self::default();
        let local = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
        let with = |base: &[&str], extra: &[&str]| base.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();
        state.add_key(SEEDED_FULL_KEY, &seeded_secret(SEEDED_FULL_KEY), "tradeeon-full", &with(TRADE, &[]), vec![]);
        state.add_key(
            SEEDED_READ_ONLY_KEY,
            &seeded_secret(SEEDED_READ_ONLY_KEY),
            "tradeeon-read",
            &with(READ, &[]),
            vec![],
        );
        state.add_key(
            SEEDED_WITHDRAW_KEY,
            &seeded_secret(SEEDED_WITHDRAW_KEY),
            "tradeeon-withdraw",
            &with(TRADE, &["withdraw-funds", "add-funds"]),
            local.clone(),
        );
        state.add_key(SEEDED_OTP_KEY, &seeded_secret(SEEDED_OTP_KEY), "tradeeon-otp", &with(TRADE, &[]), local);
        state.set_otp(SEEDED_OTP_KEY, Some(SEEDED_OTP));
        state.add_key(
            SEEDED_ELSEWHERE_KEY,
            &seeded_secret(SEEDED_ELSEWHERE_KEY),
            "tradeeon-elsewhere",
            &with(TRADE, &[]),
            vec![ELSEWHERE_IP],
        );
        state.add_key(
            SEEDED_REVOKED_KEY,
            &seeded_secret(SEEDED_REVOKED_KEY),
            "tradeeon-revoked",
            &with(TRADE, &[]),
            vec![],
        );
        state.revoke_key(SEEDED_REVOKED_KEY);
        state.add_key(
            SEEDED_NO_FUNDS_KEY,
            &seeded_secret(SEEDED_NO_FUNDS_KEY),
            "tradeeon-no-funds",
            &with(&["modify-trades", "close-trades"], &[]),
            vec![],
        );
        state
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyEntry>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a key. `secret_base64` is the private key as Kraken shows it;
    /// `permissions` use GetApiKeyInfo's names (`query-funds`, `withdraw-funds`, …).
    pub fn add_key(
        &self,
        api_key: &str,
        secret_base64: &str,
        name: &str,
        permissions: &[String],
        ip_allowlist: Vec<IpAddr>,
    ) {
        let entry = KeyEntry {
            name: name.to_string(),
            secret: STANDARD.decode(secret_base64).expect("Kraken private keys are base64"),
            permissions: permissions.to_vec(),
            ip_allowlist,
            otp: None,
            revoked: false,
            last_nonce: 0,
            counter: 0.0,
            counter_at: Instant::now(),
            created: chrono::Utc::now().timestamp(),
            last_used: None,
        };
        self.keys().insert(api_key.to_string(), entry);
    }

    pub fn revoke_key(&self, api_key: &str) -> bool {
        self.keys().get_mut(api_key).map(|k| k.revoked = true).is_some()
    }

    pub fn set_permissions(&self, api_key: &str, permissions: &[&str]) -> bool {
        self.keys()
            .get_mut(api_key)
            .map(|k| k.permissions = permissions.iter().map(|p| p.to_string()).collect())
            .is_some()
    }

    /// Empty: unrestricted.
    pub fn set_ip_allowlist(&self, api_key: &str, ips: Vec<IpAddr>) -> bool {
        self.keys().get_mut(api_key).map(|k| k.ip_allowlist = ips).is_some()
    }

    /// The key's two-factor password (`otp`), or none.
    pub fn set_otp(&self, api_key: &str, otp: Option<&str>) -> bool {
        self.keys().get_mut(api_key).map(|k| k.otp = otp.map(str::to_string)).is_some()
    }

    /// The call counter's maximum and decay of the account's verification tier.
    pub fn set_tier(&self, tier: KrakenTier) {
        self.set_rate_limit(tier.max_counter(), tier.decay_per_second());
    }

    /// A custom counter maximum and decay per second.
    pub fn set_rate_limit(&self, max_counter: f64, decay_per_second: f64) {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner()) = (max_counter, decay_per_second);
    }

    /// The last nonce accepted for the key.
    pub fn last_nonce(&self, api_key: &str) -> Option<u64> {
        self.keys().get(api_key).map(|k| k.last_nonce)
    }

    /// Forces the key's last accepted nonce (as if another application had used it).
    pub fn set_last_nonce(&self, api_key: &str, nonce: u64) -> bool {
        self.keys().get_mut(api_key).map(|k| k.last_nonce = nonce).is_some()
    }

    /// How many requests were refused with `EAPI:Invalid nonce` so far.
    pub fn invalid_nonce_count(&self) -> u64 {
        self.invalid_nonces.load(Ordering::Relaxed)
    }
}

/// Printed by `tradeeon simulate`.
pub fn seeded_keys_summary() -> String {
    let rows = [
        ("query + trade, no IP restriction", SEEDED_FULL_KEY),
        ("query only, no IP restriction", SEEDED_READ_ONLY_KEY),
        ("query + trade + withdraw, 127.0.0.1 only", SEEDED_WITHDRAW_KEY),
        ("query + trade, 127.0.0.1 only, two-factor password below", SEEDED_OTP_KEY),
        ("allowlist 203.0.113.7 (Permission denied from here)", SEEDED_ELSEWHERE_KEY),
        ("revoked (EAPI:Invalid key)", SEEDED_REVOKED_KEY),
        ("without Query Funds", SEEDED_NO_FUNDS_KEY),
    ];
    let mut out = String::from("Kraken (API key / private key):\n");
    for (what, key) in rows {
        out.push_str(&format!("  {what}\n    key:    {key}\n    secret: {}\n", seeded_secret(key)));
    }
    out.push_str(&format!("  two-factor password (otp) of the 2FA key: {SEEDED_OTP}\n"));
    out
}

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/0/public/Time", get(public_time))
        .route("/0/private/{method}", post(private))
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state((state, Exchange::Kraken), crate::faults::apply))
}

fn answer(errors: &[&str], result: Option<serde_json::Value>) -> Response {
    let mut body = json!({ "error": errors });
    if let Some(result) = result {
        body["result"] = result;
    }
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

async fn public_time(State(state): State<Arc<SimState>>) -> Response {
    let now = chrono::DateTime::from_timestamp_millis(state.faults.now_ms(Exchange::Kraken)).unwrap_or_default();
    answer(
        &[],
        Some(json!({ "unixtime": now.timestamp(), "rfc1123": now.format("%a, %d %b %y %H:%M:%S +0000").to_string() })),
    )
}

/// `API-Sign` as Kraken computes it, implemented independently of the client.
pub fn expected_sign(secret: &[u8], uri_path: &str, nonce: &str, raw_body: &[u8]) -> Vec<u8> {
    let mut sha = Sha256::new();
    sha.update(nonce.as_bytes());
    sha.update(raw_body);
    let mut mac = Hmac::<Sha512>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(uri_path.as_bytes());
    mac.update(&sha.finalize());
    mac.finalize().into_bytes().to_vec()
}

async fn private(State(state): State<Arc<SimState>>, Path(method): Path<String>, request: Request) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return answer(&["EGeneral:Invalid arguments"], None);
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let api_key = header("api-key").unwrap_or_default();
    let api_sign = header("api-sign").unwrap_or_default();
    let params: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let nonce_text = params.get("nonce").cloned().unwrap_or_default();
    let (max_counter, decay) = *state.kraken.limit.lock().unwrap_or_else(|p| p.into_inner());

    let mut keys = state.kraken.keys();
    let Some(key) = keys.get_mut(&api_key).filter(|k| !k.revoked) else {
        return answer(&["EAPI:Invalid key"], None);
    };

    let now = Instant::now();
    key.counter = (key.counter - decay * now.duration_since(key.counter_at).as_secs_f64()).max(0.0);
    key.counter_at = now;
    let cost =
        if matches!(method.as_str(), "Ledgers" | "QueryLedgers" | "TradesHistory" | "QueryTrades") { 2.0 } else { 1.0 };
    if key.counter + cost > max_counter {
        return answer(&["EAPI:Rate limit exceeded"], None);
    }
    key.counter += cost;

    let signature_ok = STANDARD
        .decode(api_sign.trim())
        .map(|sent| sent == expected_sign(&key.secret, parts.uri.path(), &nonce_text, &body))
        .unwrap_or(false);
    if !signature_ok {
        return answer(&["EAPI:Invalid signature"], None);
    }

    match nonce_text.parse::<u64>() {
        Ok(nonce) if nonce > key.last_nonce => key.last_nonce = nonce,
        _ => {
            state.kraken.invalid_nonces.fetch_add(1, Ordering::Relaxed);
            return answer(&["EAPI:Invalid nonce"], None);
        }
    }
    key.last_used = Some(chrono::Utc::now().timestamp());

    if !key.ip_allowlist.is_empty() && !key.ip_allowlist.contains(&ip) {
        return answer(&["EGeneral:Permission denied"], None);
    }
    if let Some(otp) = &key.otp
        && params.get("otp") != Some(otp)
    {
        return answer(&["EGeneral:Permission denied"], None);
    }

    let has = |p: &str| key.permissions.iter().any(|q| q == p);
    match method.as_str() {
        "GetApiKeyInfo" => answer(
            &[],
            Some(json!({
                "apiKeyName": key.name,
                "apiKey": api_key,
                "nonce": key.last_nonce.to_string(),
                "nonceWindow": 0,
                "permissions": key.permissions,
                "iban": "AA88 N84G WOAK NMOI",
                "validUntil": "0",
                "queryFrom": "0",
                "queryTo": "0",
                "createdTime": key.created.to_string(),
                "modifiedTime": key.created.to_string(),
                "ipAllowlist": key.ip_allowlist.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "lastUsed": key.last_used.map(|t| t.to_string()),
            })),
        ),
        "Balance" if has("query-funds") => answer(&[], Some(json!({ "ZUSD": "1000.0000", "XXBT": "0.5000000000" }))),
        "Balance" => answer(&["EGeneral:Permission denied"], None),
        _ => answer(&["EGeneral:Unknown method"], None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Kraken's "Spot REST Authentication" guide.
    #[test]
    fn verifies_the_documented_example() {
        let secret = STANDARD
            .decode("kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==")
            .unwrap();
        let body = "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25";
        let sign = expected_sign(&secret, "/0/private/AddOrder", "1616492376594", body.as_bytes());
        assert_eq!(
            STANDARD.encode(sign),
            "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
        );
    }

    #[test]
    fn seeded_secrets_are_64_bytes() {
        assert_eq!(STANDARD.decode(seeded_secret(SEEDED_FULL_KEY)).unwrap().len(), 64);
        assert_ne!(seeded_secret(SEEDED_FULL_KEY), seeded_secret(SEEDED_READ_ONLY_KEY));
        assert!(seeded_keys_summary().contains(SEEDED_OTP));
    }
}
