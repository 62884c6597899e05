//! The `state` of the Zerodha (Kite) login: binds Kite's redirect to the user who started it.
//!
//! Stateless and signed: `base64url(claims) "." base64url(HMAC-SHA256(key, "v1." claims))`, where
//! the claims are the user, the connection, the connection's `credentials_version` when the login
//! started, a random nonce and an expiry ten minutes out. So a state is
//!
//! * **user-bound** (the session endpoint compares the claim with the caller),
//! * **connection-bound** and **superseded** by a newer login (which bumps the version),
//! * **short-lived** (the expiry is signed), and
//! * **single-use**: the session endpoint enqueues its job with idempotency key
//!   `kite_state:<nonce>`, and the job table allows each key once — across processes and forever
//!   (job records outlive the ten-minute expiry).
//!
//! The HMAC key is derived from the primary `ENCRYPTION_KEY` (HMAC-SHA256 of a fixed label), so
//! every API process behind the load balancer verifies the others' states and no new secret needs
//! managing. Without `ENCRYPTION_KEY` (the embedded SQLite default, one process) a random key is
//! drawn at start; a login started before a restart must then be started again.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tradeeon_shared::config::VaultConfig;
use tradeeon_shared::domain::{ConnectionId, UserId};
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// How long a login may take from `login` to `session`.
pub const STATE_TTL: chrono::Duration = chrono::Duration::minutes(10);

const KEY_LABEL: &[u8] = b"tradeeon/zerodha-login-state/v1";
const VERSION_PREFIX: &[u8] = b"v1.";

/// What a state proves once its signature and expiry check out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginState {
    #[serde(rename = "u")]
    pub user_id: Uuid,
    #[serde(rename = "c")]
    pub connection_id: Uuid,
    #[serde(rename = "v")]
    pub credentials_version: i32,
    #[serde(rename = "n")]
    pub nonce: String,
    #[serde(rename = "e")]
    pub expires_at: i64,
}

impl LoginState {
    pub fn new(user: UserId, connection: ConnectionId, credentials_version: i32, now: DateTime<Utc>) -> Self {
        Self {
            user_id: user.0,
            connection_id: connection.0,
            credentials_version,
            nonce: hex_nonce(),
            expires_at: (now + STATE_TTL).timestamp(),
        }
    }

    /// The job idempotency key that makes this state single-use.
    pub fn idempotency_key(&self) -> String {
        format!("kite_state:{}", self.nonce)
    }
}

fn hex_nonce() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs and checks states.
pub struct StateSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for StateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateSigner([REDACTED])")
    }
}

impl StateSigner {
    /// Derives the key from the primary `ENCRYPTION_KEY`, or draws a random one without it.
    pub fn from_vault_config(vault: &VaultConfig) -> Self {
        let primary = vault
            .encryption_keys
            .as_ref()
            .and_then(|keys| keys.expose_secret().split(',').map(str::trim).find(|k| !k.is_empty()).map(str::to_owned));
        match primary {
            Some(primary) => {
                let mut mac = HmacSha256::new_from_slice(primary.as_bytes()).expect("HMAC takes any key length");
                mac.update(KEY_LABEL);
                Self { key: mac.finalize().into_bytes().into() }
            }
            None => {
                use rand::RngCore;
                let mut key = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                Self { key }
            }
        }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(VERSION_PREFIX);
        mac.update(payload.as_bytes());
        mac
    }

    pub fn sign(&self, state: &LoginState) -> String {
        let payload = B64.encode(serde_json::to_vec(state).expect("a LoginState serializes"));
        let tag = B64.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// The claims of an authentic, unexpired state; `None` otherwise (the caller does not learn
    /// which check failed, and neither does the client).
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Option<LoginState> {
        if token.len() > 1024 {
            return None;
        }
        let (payload, tag) = token.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        self.mac(payload).verify_slice(&tag).ok()?;
        let state: LoginState = serde_json::from_slice(&B64.decode(payload).ok()?).ok()?;
        (state.expires_at > now.timestamp()).then_some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn signer(key: &str) -> StateSigner {
        StateSigner::from_vault_config(&VaultConfig { encryption_keys: Some(SecretString::from(key.to_owned())) })
    }

    #[test]
    fn states_verify_only_unaltered_unexpired_and_with_the_same_key() {
        let now = Utc::now();
        let a = signer("key-one, key-two");
        let state = LoginState::new(UserId::new_random(), ConnectionId::new_random(), 3, now);
        let token = a.sign(&state);
        assert_eq!(a.verify(&token, now), Some(state.clone()));
        // Another process with the same primary key accepts it; another key does not.
        assert_eq!(signer("key-one").verify(&token, now), Some(state.clone()));
        assert_eq!(signer("key-two").verify(&token, now), None);
        // Expired.
        assert_eq!(a.verify(&token, now + STATE_TTL + chrono::Duration::seconds(1)), None);
        // Tampered claims keep the old tag.
        let (_, tag) = token.split_once('.').unwrap();
        let mut forged = state.clone();
        forged.user_id = Uuid::new_v4();
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(a.verify(&format!("{forged_payload}.{tag}"), now), None);
        for garbage in ["", ".", "abc", "abc.def", &"x".repeat(2000)] {
            assert_eq!(a.verify(garbage, now), None, "{garbage}");
        }
        // Nonces differ per login.
        let other = LoginState::new(UserId::new_random(), ConnectionId::new_random(), 3, now);
        assert_ne!(state.nonce, other.nonce);
    }
}
