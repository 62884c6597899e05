//! Supabase JWT authentication.
//!
//! Supabase issues HS256 tokens signed with the project's JWT secret and, on newer projects,
//! asymmetric ES256/RS256 tokens whose public keys are published as a JWKS. We accept exactly
//! those: the header's `alg` picks the key source, and a key is only ever used with the
//! algorithm family it belongs to (no algorithm confusion, no `alg: none`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::RwLock;
use tradeeon_shared::domain::UserId;
use url::Url;
use uuid::Uuid;

/// Why a token was refused. The message is safe to show the client: it names the problem, never
/// the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <access token>`")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token was issued for another audience")]
    Audience,
    #[error("the token's subject is not a user id")]
    Subject,
    #[error("the token was signed by an unknown key")]
    UnknownKey,
    #[error("token verification is not configured on this server")]
    NotConfigured,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Expired => "token_expired",
            _ => "invalid_token",
        }
    }
}

/// The caller, as proven by a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser {
    pub id: UserId,
    pub email: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// Verifies access tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    audience: String,
    hs256_secret: Option<SecretString>,
    jwks: Option<JwksCache>,
}

/// Leeway for clock differences between Supabase and us. Small, because tokens are short-lived.
const LEEWAY_SECONDS: u64 = 30;

impl Authenticator {
    pub fn new(
        audience: String,
        hs256_secret: Option<SecretString>,
        supabase_url: Option<&Url>,
        http: reqwest::Client,
    ) -> Self {
        let jwks = supabase_url.map(|base| {
            let url =
                base.join("auth/v1/.well-known/jwks.json").expect("a base URL joined with a relative path is a URL");
            JwksCache::new(url, http)
        });
        Self { audience, hs256_secret, jwks }
    }

    pub async fn verify(&self, token: &str) -> Result<AuthenticatedUser, AuthError> {
        if self.hs256_secret.is_none() && self.jwks.is_none() {
            return Err(AuthError::NotConfigured);
        }
        // decode_header rejects `alg: none` and unknown algorithms: they are not in the enum.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let key = match header.alg {
            Algorithm::HS256 => {
                let secret = self.hs256_secret.as_ref().ok_or(AuthError::Algorithm)?;
                DecodingKey::from_secret(secret.expose_secret().as_bytes())
            }
            Algorithm::ES256 | Algorithm::RS256 => {
                let jwks = self.jwks.as_ref().ok_or(AuthError::Algorithm)?;
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                jwks.key(kid, header.alg).await?
            }
            _ => return Err(AuthError::Algorithm),
        };

        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        // `sub` is checked below, to report a missing one as a subject problem.
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
                _ => AuthError::Malformed,
            }
        })?;
        let sub = data.claims.sub.ok_or(AuthError::Subject)?;
        let id = Uuid::parse_str(&sub).map_err(|_| AuthError::Subject)?;
        let email = data.claims.email.filter(|e| !e.is_empty() && e.len() <= 320);
        Ok(AuthenticatedUser { id: UserId(id), email })
    }
}

/// The project's public keys, fetched from the JWKS endpoint and cached. An unknown `kid` (key
/// rotation) triggers a refetch, at most once per [`JwksCache::REFRESH_INTERVAL`] so a flood of
/// forged `kid`s cannot turn us into a load generator against Supabase.
struct JwksCache {
    url: Url,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, (Algorithm, DecodingKey)>>,
    last_fetch: Mutex<Option<Instant>>,
    /// Held while deciding on and doing a refetch, so that requests arriving together with a new
    /// `kid` wait for the one refetch instead of failing while it is in flight.
    refreshing: tokio::sync::Mutex<()>,
}

impl JwksCache {
    const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

    fn new(url: Url, http: reqwest::Client) -> Self {
        Self {
            url,
            http,
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    async fn key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        if let Some(found) = self.lookup(kid, alg).await? {
            return Ok(found);
        }
        let _refreshing = self.refreshing.lock().await;
        // Another request may have refetched while this one waited.
        if let Some(found) = self.lookup(kid, alg).await? {
            return Ok(found);
        }
        if self.may_refresh() {
            self.refresh().await;
        }
        self.lookup(kid, alg).await?.ok_or(AuthError::UnknownKey)
    }

    async fn lookup(&self, kid: &str, alg: Algorithm) -> Result<Option<DecodingKey>, AuthError> {
        match self.keys.read().await.get(kid) {
            None => Ok(None),
            // A key is only ever used with its own algorithm.
            Some((key_alg, _)) if *key_alg != alg => Err(AuthError::Algorithm),
            Some((_, key)) => Ok(Some(key.clone())),
        }
    }

    fn may_refresh(&self) -> bool {
        let mut last = self.last_fetch.lock().expect("jwks lock poisoned");
        match *last {
            Some(at) if at.elapsed() < Self::REFRESH_INTERVAL => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }

    async fn refresh(&self) {
        let fetched = async {
            let response = self.http.get(self.url.clone()).send().await?.error_for_status()?;
            response.json::<JwkSet>().await
        }
        .await;
        match fetched {
            Ok(set) => {
                let keys: HashMap<_, _> = set.keys.iter().filter_map(usable_key).collect();
                tracing::info!(keys = keys.len(), "refreshed the Supabase JWKS");
                *self.keys.write().await = keys;
            }
            Err(err) => tracing::warn!(error = %err, url = %self.url, "could not fetch the Supabase JWKS"),
        }
    }
}

/// Keeps signing keys we can use: an id, an algorithm we accept that matches the key type.
fn usable_key(jwk: &Jwk) -> Option<(String, (Algorithm, DecodingKey))> {
    use jsonwebtoken::jwk::AlgorithmParameters;
    let kid = jwk.common.key_id.clone()?;
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::EllipticCurve(ec), Some(KeyAlgorithm::ES256) | None)
            if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::RSA(_), Some(KeyAlgorithm::RS256) | None) => Algorithm::RS256,
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, (alg, key)))
}
