//! The web UI: plain HTML, CSS and ES modules from `web/`, embedded in the binary at compile time
//! and served without authentication — `/` and `/kite/callback` (the page), `/ui/…` (its assets).
//! The page is a client of the public HTTP API only; it holds the caller's access token in
//! `sessionStorage` and never stores a credential.
//!
//! These routes are not part of the API contract: [`router`] is merged after the OpenAPI
//! document is built, so none of them appears in `/openapi.json`.
//!
//! Also here: the *local sign-in* of the embedded default. `tradeeon serve` with neither
//! `SUPABASE_JWT_SECRET` nor `SUPABASE_URL` has no identity provider, so it signs its own HS256
//! tokens with a secret kept beside the database ([`load_or_create_secret`]) and prints a one-time
//! link (`/#signin=<code>`). The page trades the code for a short-lived token of one fixed local
//! user (`POST /ui/local-signin`); each code works once, and a fresh link is printed whenever one
//! is used.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::AuthError;
use crate::extract::{ApiJson, AuthUser, bearer_token};
use crate::{ApiError, AppState};

/// The UI's routes. Public by design: they serve static files and the sign-in exchange.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/kite/callback", get(page))
        .route("/ui/config", get(config))
        .route("/ui/local-signin", post(local_sign_in))
        .route("/ui/local-signin/renew", post(renew_local_sign_in))
        .route("/ui/{*path}", get(asset))
}

// ---------------------------------------------------------------------------------------------
// Static assets
// ---------------------------------------------------------------------------------------------

struct Asset {
    /// Path below `web/` (and below `/ui/` in URLs).
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $content_type:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../web/", $path)),
        }
    };
}

/// Every file of `web/`. A file missing here is a 404; a file listed but missing fails the build.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("js/main.js", "text/javascript; charset=utf-8"),
    asset!("js/api.js", "text/javascript; charset=utf-8"),
    asset!("js/auth.js", "text/javascript; charset=utf-8"),
    asset!("js/dom.js", "text/javascript; charset=utf-8"),
    asset!("js/labels.js", "text/javascript; charset=utf-8"),
    asset!("js/dialog.js", "text/javascript; charset=utf-8"),
    asset!("js/jobs.js", "text/javascript; charset=utf-8"),
    asset!("js/credentials.js", "text/javascript; charset=utf-8"),
    asset!("js/connections.js", "text/javascript; charset=utf-8"),
    asset!("js/wizard.js", "text/javascript; charset=utf-8"),
    asset!("js/modals.js", "text/javascript; charset=utf-8"),
    asset!("js/security.js", "text/javascript; charset=utf-8"),
    asset!("js/history.js", "text/javascript; charset=utf-8"),
];

const INDEX: usize = 0;

/// The page may load only its own scripts, styles and images and talk only to this origin; it
/// may not be framed (clickjacking on the revoke button) and sends no Referer (Kite's callback
/// URL carries a request token).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Strong validators, computed once: `"<first 16 bytes of SHA-256, hex>"` per asset.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let digest = Sha256::digest(asset.body);
                let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

async fn page(headers: HeaderMap) -> Response {
    serve(INDEX, &headers)
}

async fn asset(UrlPath(path): UrlPath<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|asset| asset.path == path) {
        Some(index) => serve(index, &headers),
        None => ApiError::NotFound.into_response(),
    }
}

/// Answers with the asset, or `304` when the client's copy is current. `no-cache` makes the
/// browser revalidate every time, so a new binary's UI is picked up at once.
fn serve(index: usize, request: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    let mut response = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { asset.body.into_response() };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if asset.content_type.starts_with("text/html") {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        // A page that opened this one (or that this one opens) gets no handle on it: it cannot
        // navigate it to a crafted sign-in fragment or read anything of it.
        headers.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Local sign-in
// ---------------------------------------------------------------------------------------------

/// The one user the local sign-in signs in as.
pub const LOCAL_USER_ID: Uuid = Uuid::from_u128(0x7ad3_0c41_10ca_4e00_8000_0000_0000_0001);
/// Its email (`.invalid` is reserved: it can never belong to a real account).
pub const LOCAL_USER_EMAIL: &str = "local@tradeeon.invalid";
/// File name of the local signing secret inside the SQLite database's directory.
pub const SECRET_FILE_NAME: &str = "local-signin.key";
/// How long a local token is valid. The page renews it while it is open.
pub const LOCAL_TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// The longest a local session lasts: renewals stop this long after its sign-in link was used,
/// so a token that leaked from an open page cannot be kept alive for ever.
pub const LOCAL_SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 60 * 60);
/// `iss` of local tokens, so they are recognisable in logs and by [`renew_local_sign_in`].
const LOCAL_ISSUER: &str = "tradeeon-local";

/// Issues one-time sign-in codes and trades them for tokens of [`LOCAL_USER_ID`].
pub struct LocalSignIn {
    key: EncodingKey,
    /// The same secret, to read the sign-in time back from a token presented for renewal.
    decoding_key: DecodingKey,
    audience: String,
    /// SHA-256 of every code not used yet. Hashes, so that a lookup leaks no timing about codes.
    codes: Mutex<HashSet<[u8; 32]>>,
    /// Tells the person at the terminal about a new code (the binary prints the link).
    announce: Box<dyn Fn(&str) + Send + Sync>,
}

impl LocalSignIn {
    /// `secret` must be the HS256 secret the [`crate::auth::Authenticator`] verifies with, and
    /// `audience` its `JWT_AUDIENCE`. `announce` is called with each code issued after one is
    /// used.
    pub fn new(secret: &SecretString, audience: String, announce: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            decoding_key: DecodingKey::from_secret(secret.expose_secret().as_bytes()),
            audience,
            codes: Mutex::new(HashSet::new()),
            announce: Box::new(announce),
        }
    }

    /// A new one-time code (256 random bits, URL-safe).
    pub fn issue_code(&self) -> String {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let code = URL_SAFE_NO_PAD.encode(bytes);
        self.codes.lock().expect("sign-in codes lock").insert(Sha256::digest(code.as_bytes()).into());
        code
    }

    /// Uses up `code`: true exactly once per issued code.
    fn redeem(&self, code: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(code.as_bytes()).into();
        self.codes.lock().expect("sign-in codes lock").remove(&hash)
    }

    /// A token of a session that started at `auth_time` (Unix seconds). It expires after
    /// [`LOCAL_TOKEN_LIFETIME`], or when the session reaches [`LOCAL_SESSION_MAX_AGE`].
    fn token(&self, auth_time: i64) -> Result<LocalToken, ApiError> {
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: String,
            email: &'a str,
            aud: &'a str,
            iss: &'a str,
            role: &'a str,
            iat: i64,
            nbf: i64,
            exp: i64,
            auth_time: i64,
        }
        let now = chrono::Utc::now().timestamp();
        let exp = (now + LOCAL_TOKEN_LIFETIME.as_secs() as i64).min(auth_time + LOCAL_SESSION_MAX_AGE.as_secs() as i64);
        let claims = Claims {
            sub: LOCAL_USER_ID.to_string(),
            email: LOCAL_USER_EMAIL,
            aud: &self.audience,
            iss: LOCAL_ISSUER,
            role: "authenticated",
            iat: now,
            nbf: now,
            exp,
            auth_time,
        };
        let access_token = jsonwebtoken::encode(&Header::default(), &claims, &self.key)
            .map_err(|e| ApiError::Internal(anyhow::Error::from(e).context("could not sign a local token")))?;
        Ok(LocalToken { access_token, token_type: "bearer", expires_in: (exp - now).max(0) as u64 })
    }

    /// A fresh token for the session `presented` (a valid local token) belongs to, unless that
    /// session is [`LOCAL_SESSION_MAX_AGE`] old.
    fn renew(&self, presented: &str) -> Result<LocalToken, ApiError> {
        #[derive(Deserialize)]
        struct Session {
            auth_time: i64,
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[LOCAL_ISSUER]);
        // A token from before sessions had a start has none: its session starts again at a link.
        let session = jsonwebtoken::decode::<Session>(presented, &self.decoding_key, &validation)
            .map_err(|_| ApiError::Unauthorized(AuthError::SessionTooOld))?
            .claims;
        let age = chrono::Utc::now().timestamp() - session.auth_time;
        if age >= LOCAL_SESSION_MAX_AGE.as_secs() as i64 {
            return Err(ApiError::Unauthorized(AuthError::SessionTooOld));
        }
        self.token(session.auth_time)
    }
}

/// Loads the local signing secret from `dir/local-signin.key`, creating it (mode 0600, like
/// `encryption.key`) when missing. Returns whether it was created.
pub fn load_or_create_secret(dir: &Path) -> anyhow::Result<(SecretString, PathBuf, bool)> {
    let path = dir.join(SECRET_FILE_NAME);
    if path.exists() {
        return Ok((read_secret(&path)?, path, false));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = SecretString::from(URL_SAFE_NO_PAD.encode(bytes));
    bytes.fill(0);
    let mut options = std::fs::OpenOptions::new();
    // create_new: of two processes starting at once, the loser reads the winner's file.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(secret.expose_secret().as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("could not write {}", path.display()))?;
            Ok((secret, path, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((read_secret(&path)?, path, false)),
        Err(e) => Err(anyhow::Error::from(e).context(format!("could not create {}", path.display()))),
    }
}

fn read_secret(path: &Path) -> anyhow::Result<SecretString> {
    let contents = SecretString::from(
        std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?,
    );
    let secret = contents.expose_secret().trim();
    anyhow::ensure!(secret.len() >= 32, "{}: the local sign-in secret is too short", path.display());
    Ok(SecretString::from(secret.to_owned()))
}

/// What the page needs to know before it has a token.
#[derive(Serialize)]
struct UiConfig {
    /// Whether `/#signin=<code>` links work here (the embedded default without Supabase).
    local_sign_in: bool,
    /// `PORTAL_SIGNIN_URL`: where the page sends a user to sign in.
    portal_signin_url: Option<String>,
}

async fn config(State(state): State<AppState>) -> Json<UiConfig> {
    Json(UiConfig {
        local_sign_in: state.local_sign_in.is_some(),
        portal_signin_url: state.settings.portal_signin_url.as_ref().map(|url| url.to_string()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInRequest {
    code: String,
}

#[derive(Serialize)]
struct LocalToken {
    access_token: String,
    token_type: &'static str,
    /// Seconds.
    expires_in: u64,
}

/// `POST /ui/local-signin {code}` → `{access_token, token_type, expires_in}`; a used, unknown
/// or malformed code is a 400 on `code`. A 404 where local sign-in is off.
async fn local_sign_in(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<SignInRequest>,
) -> Result<Json<LocalToken>, ApiError> {
    let local = state.local_sign_in.as_ref().ok_or(ApiError::NotFound)?;
    if !local.redeem(body.code.trim()) {
        return Err(ApiError::bad_request(
            "invalid_code",
            "This sign-in link is not valid or has already been used. Open the newest link that tradeeon serve \
             printed in its terminal.",
            Some("code"),
        ));
    }
    let token = local.token(chrono::Utc::now().timestamp())?;
    tracing::info!("local sign-in link used");
    let next = local.issue_code();
    (local.announce)(&next);
    Ok(Json(token))
}

/// `POST /ui/local-signin/renew` with a valid local token → a fresh one, so an open page stays
/// signed in while a leaked, expired token stays useless; for at most [`LOCAL_SESSION_MAX_AGE`]
/// after the sign-in link was used.
async fn renew_local_sign_in(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
) -> Result<Json<LocalToken>, ApiError> {
    let local = state.local_sign_in.as_ref().ok_or(ApiError::NotFound)?;
    if user.id().0 != LOCAL_USER_ID {
        return Err(ApiError::NotFound);
    }
    Ok(Json(local.renew(bearer_token(&headers)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_embedded_once_with_a_type() {
        let mut seen = HashSet::new();
        for asset in ASSETS {
            assert!(seen.insert(asset.path), "{} listed twice", asset.path);
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
            assert!(asset.content_type.contains('/'), "{}", asset.path);
        }
        assert_eq!(ASSETS[INDEX].path, "index.html");
        assert_eq!(etags().len(), ASSETS.len());
    }

    #[test]
    fn codes_work_once() {
        let secret = SecretString::from("a-local-secret-of-enough-length-0123456789".to_owned());
        let local = LocalSignIn::new(&secret, "authenticated".into(), |_| {});
        let code = local.issue_code();
        assert!(!local.redeem("not-a-code"));
        assert!(local.redeem(&code));
        assert!(!local.redeem(&code));
    }

    #[tokio::test]
    async fn local_tokens_verify_as_the_local_user() {
        let secret = SecretString::from("a-local-secret-of-enough-length-0123456789".to_owned());
        let local = LocalSignIn::new(&secret, "authenticated".into(), |_| {});
        let token = local.token(chrono::Utc::now().timestamp()).unwrap();
        assert_eq!(token.expires_in, LOCAL_TOKEN_LIFETIME.as_secs());
        let auth = crate::auth::Authenticator::new("authenticated".into(), Some(secret), None, reqwest::Client::new());
        let user = auth.verify(&token.access_token).await.unwrap();
        assert_eq!(user.id.0, LOCAL_USER_ID);
        assert_eq!(user.email.as_deref(), Some(LOCAL_USER_EMAIL));
    }

    #[test]
    fn renewals_stop_when_the_session_is_twelve_hours_old() {
        let secret = SecretString::from("a-local-secret-of-enough-length-0123456789".to_owned());
        let local = LocalSignIn::new(&secret, "authenticated".into(), |_| {});
        let now = chrono::Utc::now().timestamp();
        let max_age = LOCAL_SESSION_MAX_AGE.as_secs() as i64;

        let fresh = local.token(now).unwrap();
        let renewed = local.renew(&fresh.access_token).unwrap();
        assert_eq!(renewed.expires_in, LOCAL_TOKEN_LIFETIME.as_secs());
        // Renewing carries the session's start along: it does not restart the clock.
        let late = local.token(now - max_age + 600).unwrap();
        assert_eq!(late.expires_in, 600, "the last token ends with the session");
        let renewed = local.renew(&late.access_token).unwrap();
        assert!(renewed.expires_in <= 600, "{}", renewed.expires_in);

        let old = local.token(now - max_age - 1).unwrap();
        assert!(matches!(local.renew(&old.access_token), Err(ApiError::Unauthorized(AuthError::SessionTooOld))));
        // A token without a session start (an older release's) or signed by another secret.
        let other = LocalSignIn::new(&SecretString::from("x".repeat(40)), "authenticated".into(), |_| {});
        assert!(local.renew(&other.token(now).unwrap().access_token).is_err());
        assert!(local.renew("not.a.token").is_err());
    }

    #[test]
    fn the_secret_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (first, path, created) = load_or_create_secret(&data).unwrap();
        assert!(created);
        assert_eq!(path, data.join(SECRET_FILE_NAME));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (second, _, created) = load_or_create_secret(&data).unwrap();
        assert!(!created);
        assert_eq!(first.expose_secret(), second.expose_secret());
    }
}
