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
    #[error("the token was issued by another Supabase project")]
    Issuer,
    #[error("anonymous sign-ins cannot manage exchange connections: sign in with an account")]
    Anonymous,
    #[error("this session is older than its limit: sign in again")]
    SessionTooOld,
    #[error("token verification is not configured on this server")]
    NotConfigured,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "unauthenticated",
            AuthError::Expired | AuthError::SessionTooOld => "token_expired",
            AuthError::Anonymous => "anonymous_user",
            _ => "invalid_token",
        }
    }
}

/// The caller, as proven by a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser {
    pub id: UserId,
    pub email: Option<String>,
    /// The session passed a second factor (`aal` = `aal2`).
    pub aal2: bool,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    email: Option<String>,
    /// Supabase marks the users of anonymous sign-ins.
    #[serde(default)]
    is_anonymous: bool,
    /// Supabase's authenticator assurance level: `aal1`, or `aal2` after MFA.
    #[serde(default)]
    aal: Option<String>,
}

/// Verifies access tokens. Cheap to share behind an `Arc`.
pub struct Authenticator {
    audience: String,
    /// `SUPABASE_URL/auth/v1`, the `iss` of the project's tokens, when SUPABASE_URL is set.
    issuer: Option<String>,
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
        let join = |path| supabase_url.map(|base| base.join(path).expect("a base URL joined with a relative path"));
        let jwks = join("auth/v1/.well-known/jwks.json").map(|url| JwksCache::new(url, http));
        let issuer = join("auth/v1").map(String::from);
        Self { audience, issuer, hs256_secret, jwks }
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
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::Issuer,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
                _ => AuthError::Malformed,
            }
        })?;
        if data.claims.is_anonymous {
            return Err(AuthError::Anonymous);
        }
        let sub = data.claims.sub.ok_or(AuthError::Subject)?;
        let id = Uuid::parse_str(&sub).map_err(|_| AuthError::Subject)?;
        let email = data.claims.email.filter(|e| !e.is_empty() && e.len() <= 320);
        let aal2 = data.claims.aal.as_deref() == Some("aal2");
        Ok(AuthenticatedUser { id: UserId(id), email, aal2 })
    }
}

/// The project's public keys, fetched from the JWKS endpoint and cached for as long as its
/// `Cache-Control: max-age` says, but never longer than [`JwksCache::MAX_AGE`]: a signing key the
/// project revoked stops verifying within that time, without a restart. An unknown `kid` (key
/// rotation) triggers a refetch too, at most once per [`JwksCache::REFRESH_INTERVAL`] so a flood
/// of forged `kid`s cannot turn us into a load generator against Supabase.
struct JwksCache {
    url: Url,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, (Algorithm, DecodingKey)>>,
    last_fetch: Mutex<Option<Instant>>,
    /// When the keys must be fetched again (`None`: never fetched).
    expires: Mutex<Option<Instant>>,
    /// Held while deciding on and doing a refetch, so that requests arriving together with a new
    /// `kid` wait for the one refetch instead of failing while it is in flight.
    refreshing: tokio::sync::Mutex<()>,
}

impl JwksCache {
    const REFRESH_INTERVAL: Duration = Duration::from_secs(60);
    /// The longest the keys are used without asking again, whatever `Cache-Control` says.
    const MAX_AGE: Duration = Duration::from_secs(600);
    /// The shortest: an answer marked `no-cache` is fetched again at most this often.
    const MIN_AGE: Duration = Duration::from_secs(1);

    fn new(url: Url, http: reqwest::Client) -> Self {
        Self {
            url,
            http,
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            expires: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    async fn key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        if !self.stale()
            && let Some(found) = self.lookup(kid, alg).await?
        {
            return Ok(found);
        }
        let _refreshing = self.refreshing.lock().await;
        // Another request may have refetched while this one waited.
        if !self.stale()
            && let Some(found) = self.lookup(kid, alg).await?
        {
            return Ok(found);
        }
        if self.stale() || self.may_refresh() {
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

    fn stale(&self) -> bool {
        self.expires.lock().expect("jwks lock poisoned").is_none_or(|at| Instant::now() >= at)
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
        *self.last_fetch.lock().expect("jwks lock poisoned") = Some(Instant::now());
        let fetched = async {
            let response = self.http.get(self.url.clone()).send().await?.error_for_status()?;
            let max_age = max_age(response.headers());
            Ok::<_, reqwest::Error>((response.json::<JwkSet>().await?, max_age))
        }
        .await;
        let retry_in = match fetched {
            Ok((set, max_age)) => {
                let keys: HashMap<_, _> = set.keys.iter().filter_map(usable_key).collect();
                tracing::info!(keys = keys.len(), "refreshed the Supabase JWKS");
                *self.keys.write().await = keys;
                max_age.unwrap_or(Self::MAX_AGE).clamp(Self::MIN_AGE, Self::MAX_AGE)
            }
            Err(err) => {
                // The keys we have stay in use until Supabase answers again.
                tracing::warn!(error = %err, url = %self.url, "could not fetch the Supabase JWKS");
                Self::REFRESH_INTERVAL
            }
        };
        *self.expires.lock().expect("jwks lock poisoned") = Some(Instant::now() + retry_in);
    }
}

fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    max_age_of(headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?)
}

/// How long a `Cache-Control` value lets an answer be reused: `max-age`, or nothing for
/// `no-cache` and `no-store`; `None` when it does not say.
pub fn max_age_of(value: &str) -> Option<Duration> {
    value.split(',').map(str::trim).find_map(|directive| {
        let directive = directive.to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        directive.strip_prefix("max-age=")?.trim_matches('"').parse().ok().map(Duration::from_secs)
    })
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
