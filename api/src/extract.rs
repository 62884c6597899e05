//! Request extractors: the authenticated caller, the client's address for audit rows, and JSON
//! bodies whose every rejection answers in the API's error format.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use serde::de::DeserializeOwned;
use tradeeon_shared::domain::{AuditAction, ConnectionId, UserId};
use tradeeon_shared::jobs::JobId;
use tradeeon_shared::store::{AuditEntryInput, StoreError, UserContext};

use crate::auth::AuthError;
use crate::error::Invalid;
use crate::{ApiError, AppState};

/// Largest request body any route accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest bearer token we try to verify (Supabase access tokens are around 1 KiB).
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Longest User-Agent kept in an audit row.
const MAX_USER_AGENT_CHARS: usize = 512;

/// The caller, proven by a valid Supabase token; their `users` row exists. On write methods the
/// per-user rate limit has been charged.
#[derive(Debug, Clone)]
pub struct AuthUser(pub UserContext);

impl AuthUser {
    pub fn id(&self) -> UserId {
        self.0.user_id
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let user = state.auth.verify(token).await?;
        if is_write(&parts.method) {
            if state.settings.require_aal2 && !user.aal2 {
                return Err(ApiError::MfaRequired);
            }
            state.limiter.check(user.id)?;
        }
        let context = UserContext { user_id: user.id, email: user.email };
        state.users.ensure(state, &context).await?;
        Ok(AuthUser(context))
    }
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(header::AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Users whose profile row this process has already ensured (with the email it was ensured
/// with), so that only the first request of a user pays for the write.
#[derive(Default)]
pub struct SeenUsers {
    seen: Mutex<HashMap<UserId, Option<String>>>,
}

impl SeenUsers {
    /// Bounds the memory a flood of distinct (valid) users can take; forgetting only costs one
    /// idempotent write per user.
    const MAX_ENTRIES: usize = 100_000;

    async fn ensure(&self, state: &AppState, user: &UserContext) -> Result<(), ApiError> {
        if self.seen.lock().expect("seen-users lock").get(&user.user_id) == Some(&user.email) {
            return Ok(());
        }
        match state.store.ensure_user(user).await {
            Ok(()) => {}
            // Two accounts claiming one email: their profiles cannot both hold it.
            Err(StoreError::Conflict(_)) => {
                return Err(ApiError::Conflict {
                    code: "email_in_use",
                    message: "Another account already uses this email address.",
                });
            }
            Err(other) => return Err(other.into()),
        }
        let mut seen = self.seen.lock().expect("seen-users lock");
        if seen.len() >= Self::MAX_ENTRIES {
            seen.clear();
        }
        seen.insert(user.user_id, user.email.clone());
        Ok(())
    }
}

/// Who sent the request, for audit rows: the client address (from `X-Forwarded-For` only with
/// `TRUST_PROXY=true`) and the User-Agent.
#[derive(Debug, Clone, Default)]
pub struct ClientMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl ClientMeta {
    /// An audit row carrying this request's metadata.
    pub fn audit(
        &self,
        action: AuditAction,
        connection_id: Option<ConnectionId>,
        details: serde_json::Value,
    ) -> AuditEntryInput {
        AuditEntryInput { connection_id, action, ip_address: self.ip, user_agent: self.user_agent.clone(), details }
    }
}

impl FromRequestParts<AppState> for ClientMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip());
        let forwarded = if state.settings.trust_proxy { forwarded_for(parts) } else { None };
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().filter(|c| !c.is_control()).take(MAX_USER_AGENT_CHARS).collect::<String>())
            .filter(|ua| !ua.is_empty());
        Ok(Self { ip: forwarded.or(peer), user_agent })
    }
}

/// The last `X-Forwarded-For` entry: the address the load balancer saw. Earlier entries come
/// from the client and prove nothing.
fn forwarded_for(parts: &Parts) -> Option<IpAddr> {
    let last = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|entry| !entry.is_empty())?;
    last.parse().ok()
}

/// A JSON body. Every failure is an [`ApiError`]: wrong or missing content type → 415, body
/// over [`MAX_BODY_BYTES`] → 413, malformed JSON → 400, a missing, unknown or mistyped field →
/// 422 naming the field. Messages never echo submitted values.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::Invalid(Invalid {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                message: "Send the body as JSON with `Content-Type: application/json`.".into(),
                field: None,
            }));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::Invalid(Invalid {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "payload_too_large",
                    message: format!("The body is larger than {} KiB.", MAX_BODY_BYTES / 1024),
                    field: None,
                })
            } else {
                ApiError::bad_request("unreadable_body", "The request body could not be read.", None)
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would read a struct from a JSON array positionally; every body here is an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        if let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            return Err(json_error(&err, "."));
        }
        return Err(ApiError::Invalid(Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            message: "The body must be a JSON object.".into(),
            field: None,
        }));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        json_error(err.inner(), &path)
    })?;
    deserializer.end().map_err(|err| json_error(&err, "."))?;
    Ok(value)
}

/// Maps a serde_json error to a message of our own: serde's "invalid type" messages quote the
/// offending value, which may be a credential, so only the expectation is kept.
fn json_error(err: &serde_json::Error, path: &str) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "malformed_json",
            format!("The body is not valid JSON (line {}, column {}).", err.line(), err.column()),
            None,
        ),
        Category::Data => {
            let text = err.to_string();
            let field = (path != "." && !path.is_empty()).then(|| path.to_owned());
            if let Some(name) = quoted(&text, "missing field `") {
                ApiError::field(name.clone(), "missing_field", format!("`{name}` is required."))
            } else if let Some(name) = quoted(&text, "unknown field `") {
                ApiError::field(name.clone(), "unknown_field", format!("`{name}` is not a field of this request."))
            } else {
                let expected = text
                    .split(", expected ")
                    .nth(1)
                    .map(|rest| rest.split(" at line ").next().unwrap_or(rest).to_owned())
                    .unwrap_or_else(|| "another value".into());
                let message = match &field {
                    Some(name) => format!("`{name}` has the wrong type: expected {expected}."),
                    None => format!("The body has the wrong shape: expected {expected}."),
                };
                ApiError::Invalid(Invalid {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "invalid_field",
                    message,
                    field,
                })
            }
        }
    }
}

/// The text between `prefix` and the next backtick, capped (it may be a client-chosen name).
fn quoted(text: &str, prefix: &str) -> Option<String> {
    let start = text.find(prefix)? + prefix.len();
    let rest = &text[start..];
    let end = rest.find('`')?;
    Some(rest[..end].chars().filter(|c| !c.is_control()).take(64).collect())
}

/// The `{id}` segment of a path, percent-decoded. axum's own `Path` rejection (for a segment that
/// is not UTF-8 once decoded, e.g. `/jobs/%FF`) is a plain-text 400; this one answers in the
/// API's error format, as the document says every error does.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(_) => Err(ApiError::bad_request("invalid_id", "The id in the path is not valid UTF-8.", Some("id"))),
        }
    }
}

/// A connection id from the path; anything but a UUID is a 400.
pub fn connection_id(raw: &str) -> Result<ConnectionId, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("invalid_id", "The connection id must be a UUID.", Some("id")))
}

/// A job id from the path; anything but a ULID is a 400.
pub fn job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request("invalid_id", "The job id must be a ULID.", Some("id")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    fn fields(err: ApiError) -> (StatusCode, &'static str, Option<String>, String) {
        match err {
            ApiError::Invalid(i) => (i.status, i.code, i.field, i.message),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn json_errors_name_the_field_and_never_echo_values() {
        let (status, code, field, _) = fields(parse_json::<Body>(br#"{"name":"x"}"#).unwrap_err());
        assert_eq!(
            (status, code, field.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, "missing_field", Some("count"))
        );

        let (_, code, field, _) = fields(parse_json::<Body>(br#"{"name":"x","count":1,"extra":2}"#).unwrap_err());
        assert_eq!((code, field.as_deref()), ("unknown_field", Some("extra")));

        let (_, code, field, message) =
            fields(parse_json::<Body>(br#"{"name":"x","count":"SECRET-VALUE"}"#).unwrap_err());
        assert_eq!((code, field.as_deref()), ("invalid_field", Some("count")));
        assert!(!message.contains("SECRET-VALUE"), "{message}");

        let (status, code, _, _) = fields(parse_json::<Body>(br#"{"name":"#).unwrap_err());
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "malformed_json"));
        let (status, code, _, _) = fields(parse_json::<Body>(br#"{"name":"x","count":1} trailing"#).unwrap_err());
        assert_eq!((status, code), (StatusCode::BAD_REQUEST, "malformed_json"));
        let (status, code, _, _) = fields(parse_json::<Body>(br#"[1,2]"#).unwrap_err());
        assert_eq!((status, code), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field"));
    }

    #[test]
    fn content_types() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(!is_json(&headers));
        for (value, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
            ("application/x-www-form-urlencoded", false),
        ] {
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_json(&headers), ok, "{value}");
        }
    }
}
