//! Zerodha (Kite Connect): no static secret to test, so connecting is a login.
//!
//! 1. `POST /connections/zerodha/login {api_key, api_secret}` stores the app credentials
//!    (encrypted, status `pending`) and returns Kite's login URL and a signed `state` (see
//!    [`crate::login_state`]).
//! 2. The user logs in at Kite, which redirects to the app's redirect URL with `request_token`
//!    and our `state`; the portal posts both to `POST /connections/zerodha/session`, which
//!    enqueues a `kite_session` job (the worker exchanges the token for an access token).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde_json::json;
use tradeeon_shared::domain::{ApiKeyHint, AuditAction, ConnectionId, Exchange};
use tradeeon_shared::jobs::{JobPayload, NewJob};
use tradeeon_shared::store::NewConnection;
use url::Url;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{encrypt, enqueue};
use crate::error::ErrorBody;
use crate::extract::{ApiJson, AuthUser, ClientMeta};
use crate::login_state::LoginState;
use crate::validate;
use crate::views::{JobAccepted, ZerodhaLoginRequest, ZerodhaLoginView, ZerodhaSessionRequest};
use crate::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login)).routes(routes!(session))
}

/// Stores the Kite Connect app's credentials (pending) and starts a Kite login.
#[utoipa::path(
    post,
    path = "/connections/zerodha/login",
    tag = "zerodha",
    security(("bearer" = [])),
    request_body = ZerodhaLoginRequest,
    responses(
        (status = 200, description = "Send the user to `login_url`", body = ZerodhaLoginView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`error.field`)", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id()), err(level = "info"))]
async fn login(
    State(state): State<AppState>,
    user: AuthUser,
    meta: ClientMeta,
    ApiJson(body): ApiJson<ZerodhaLoginRequest>,
) -> Result<Json<ZerodhaLoginView>, ApiError> {
    let app = validate::kite_app(&body.api_key, &body.api_secret)?;
    let new = NewConnection {
        exchange: Exchange::Zerodha,
        credentials: encrypt(&state, &app),
        nickname: None,
        api_key_hint: ApiKeyHint::from_api_key(app.api_key.expose()),
    };
    let mut tx = state.store.begin_user(&user.0).await?;
    let connection = tx.upsert_connection(&new).await?;
    tx.insert_audit(&meta.audit(AuditAction::Connected, Some(connection.id), json!({ "stage": "login_started" })))
        .await?;
    tx.commit().await?;

    let login_state = LoginState::new(user.id(), connection.id, connection.credentials_version, Utc::now());
    let signed = state.login_states.sign(&login_state);
    // The Kite API key is public by design: every Kite login URL carries it.
    let login_url = kite_login_url(&state.settings.kite_login, app.api_key.expose(), &signed);
    Ok(Json(ZerodhaLoginView { login_url, state: signed }))
}

/// `KITE_LOGIN_URL?v=3&api_key=…&redirect_params=state%3D…`: Kite appends `redirect_params` to
/// the app's redirect URL, which is how the `state` comes back.
fn kite_login_url(base: &Url, api_key: &str, state: &str) -> String {
    let redirect_params = url::form_urlencoded::Serializer::new(String::new()).append_pair("state", state).finish();
    let mut url = base.clone();
    url.query_pairs_mut()
        .append_pair("v", "3")
        .append_pair("api_key", api_key)
        .append_pair("redirect_params", &redirect_params);
    url.into()
}

/// Exchanges Kite's `request_token` for a session, in a `kite_session` job.
#[utoipa::path(
    post,
    path = "/connections/zerodha/session",
    tag = "zerodha",
    security(("bearer" = [])),
    request_body = ZerodhaSessionRequest,
    responses(
        (status = 202, description = "Queued; poll `GET /jobs/{id}`", body = JobAccepted),
        (status = 400, description = "Malformed JSON, or a wrong, expired, superseded or already used `state`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 409, description = "A session exchange is already in progress (`error.job_id`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`error.field`)", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id()), err(level = "info"))]
async fn session(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(body): ApiJson<ZerodhaSessionRequest>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let invalid_state = || {
        ApiError::bad_request(
            "invalid_state",
            "This login is not valid (wrong, expired or superseded state); start again at \
             POST /connections/zerodha/login.",
            Some("state"),
        )
    };
    let request_token = validate::token("request_token", &body.request_token)?;
    let claims = state.login_states.verify(body.state.trim(), Utc::now()).ok_or_else(invalid_state)?;
    if claims.user_id != user.id().0 {
        return Err(invalid_state());
    }
    let connection_id = ConnectionId(claims.connection_id);
    let connection = state.store.get_connection(&user.0, connection_id).await?.ok_or_else(invalid_state)?;
    if connection.exchange != Exchange::Zerodha || connection.credentials_version != claims.credentials_version {
        return Err(invalid_state());
    }

    let mut job = NewJob::new(
        user.id(),
        Exchange::Zerodha,
        JobPayload::KiteSession { connection_id, request_token: state.keyring.encrypt(&request_token).into_inner() },
    );
    job.idempotency_key = Some(claims.idempotency_key());
    let tx = state.store.begin_service().await?;
    let job = enqueue(&state, tx, &job).await?.ok_or_else(|| {
        ApiError::bad_request(
            "state_used",
            "This login state has already been used; start again at POST /connections/zerodha/login.",
            Some("state"),
        )
    })?;
    Ok((StatusCode::ACCEPTED, Json(JobAccepted { job: job.into() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_url_carries_the_state_in_redirect_params() {
        let base = Url::parse("https://kite.zerodha.com/connect/login").unwrap();
        let url = Url::parse(&kite_login_url(&base, "kiteapp", "abc.def")).unwrap();
        let pairs: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs["v"], "3");
        assert_eq!(pairs["api_key"], "kiteapp");
        assert_eq!(pairs["redirect_params"], "state=abc.def");
    }
}
