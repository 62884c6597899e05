//! Connections: list, read, connect, test, rotate, revoke, their health history, and the audit log.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use tradeeon_shared::domain::{ApiKeyHint, AuditAction};
use tradeeon_shared::jobs::{JobPayload, NewJob, Requester};
use tradeeon_shared::store::{MAX_PAGE_SIZE, NewConnection, PageCursor, REVOKED_REASON};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{encrypt, enqueue};
use crate::error::ErrorBody;
use crate::extract::{self, ApiJson, AuthUser, ClientMeta, PathId};
use crate::validate;
use crate::views::{
    AuditEntryView, ConnectionAccepted, ConnectionRequest, ConnectionView, HealthEntryView, JobAccepted, MessageView,
    RotateRequest,
};
use crate::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_connections, create_connection))
        .routes(routes!(test_connection))
        .routes(routes!(rotate_connection))
        .routes(routes!(get_connection, revoke_connection))
        .routes(routes!(list_health_history))
        .routes(routes!(list_audit))
}

/// The caller's active connections, newest first.
#[utoipa::path(
    get,
    path = "/connections",
    tag = "connections",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's active connections", body = [ConnectionView]),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id()), err(level = "info"))]
async fn list_connections(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<Vec<ConnectionView>>, ApiError> {
    let records = state.store.list_connections(&user.0).await?;
    Ok(Json(records.into_iter().map(ConnectionView::from).collect()))
}

/// One of the caller's active connections.
#[utoipa::path(
    get,
    path = "/connections/{id}",
    tag = "connections",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Connection id")),
    responses(
        (status = 200, description = "The connection", body = ConnectionView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such active connection of the caller", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), connection_id = %id), err(level = "info"))]
async fn get_connection(
    State(state): State<AppState>,
    user: AuthUser,
    PathId(id): PathId,
) -> Result<Json<ConnectionView>, ApiError> {
    let id = extract::connection_id(&id)?;
    let record = state.store.get_connection(&user.0, id).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(record.into()))
}

/// Saves credentials for an exchange (replacing the caller's existing ones for it) with status
/// `pending`, and enqueues a `verify` job — both in one transaction.
#[utoipa::path(
    post,
    path = "/connections",
    tag = "connections",
    security(("bearer" = [])),
    request_body = ConnectionRequest,
    responses(
        (status = 202, description = "Saved (pending) and queued for verification", body = ConnectionAccepted),
        (status = 400, description = "Malformed JSON, or Zerodha (use /connections/zerodha/login)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 409, description = "A verification or rotation is already in progress (`error.job_id`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`error.field`)", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), exchange), err(level = "info"))]
async fn create_connection(
    State(state): State<AppState>,
    user: AuthUser,
    meta: ClientMeta,
    ApiJson(body): ApiJson<ConnectionRequest>,
) -> Result<(StatusCode, Json<ConnectionAccepted>), ApiError> {
    let exchange = validate::static_key_exchange(&body.exchange)?;
    tracing::Span::current().record("exchange", exchange.as_str());
    let credentials = validate::credentials(exchange, &body.api_key, &body.api_secret, body.passphrase.as_ref())?;
    let nickname = validate::nickname(body.nickname)?;
    let new = NewConnection {
        exchange,
        credentials: encrypt(&state, &credentials),
        nickname,
        api_key_hint: ApiKeyHint::from_api_key(credentials.api_key.expose()),
    };
    drop(credentials);

    let mut tx = state.store.begin_user(&user.0).await?;
    let connection = tx.upsert_connection(&new).await?;
    let job = NewJob::new(
        user.id(),
        exchange,
        JobPayload::Verify { connection_id: connection.id, credentials_version: connection.credentials_version },
    );
    tx.insert_audit(&meta.audit(
        AuditAction::Connected,
        Some(connection.id),
        json!({ "stage": "submitted", "job_id": job.id }),
    ))
    .await?;
    let tx = tx.into_service().await?;
    let job = enqueue(&state, tx, &job).await?.ok_or_else(unexpected_duplicate)?;
    Ok((StatusCode::ACCEPTED, Json(ConnectionAccepted { connection: connection.into(), job: job.into() })))
}

/// Checks credentials without storing them: they travel to the worker encrypted, inside the job.
#[utoipa::path(
    post,
    path = "/connections/test",
    tag = "connections",
    security(("bearer" = [])),
    request_body = ConnectionRequest,
    responses(
        (status = 202, description = "Queued; poll `GET /jobs/{id}` for the verdict", body = JobAccepted),
        (status = 400, description = "Malformed JSON, or Zerodha (use /connections/zerodha/login)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`error.field`)", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), exchange), err(level = "info"))]
async fn test_connection(
    State(state): State<AppState>,
    user: AuthUser,
    meta: ClientMeta,
    ApiJson(body): ApiJson<ConnectionRequest>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let exchange = validate::static_key_exchange(&body.exchange)?;
    tracing::Span::current().record("exchange", exchange.as_str());
    let credentials = validate::credentials(exchange, &body.api_key, &body.api_secret, body.passphrase.as_ref())?;
    // Accepted for symmetry with POST /connections; a test stores nothing to name.
    validate::nickname(body.nickname)?;
    // The `tested` audit entry is written with the verdict when the job settles (it carries the
    // requester for that): the request itself is one statement on PostgreSQL, shared with
    // concurrent ones, as this is the endpoint the portal's "Test" button hammers.
    let requested_by = Some(Requester { ip_address: meta.ip, user_agent: meta.user_agent });
    let payload = JobPayload::Test { exchange, credentials: encrypt(&state, &credentials), requested_by };
    drop(credentials);
    let job = NewJob::new(user.id(), exchange, payload);
    let job = state.store.enqueue_job(&job).await?.ok_or_else(unexpected_duplicate)?;
    state.metrics.job_enqueued(job.kind);
    Ok((StatusCode::ACCEPTED, Json(JobAccepted { job: job.into() })))
}

/// Replaces a connection's credentials once the new ones pass a check (a `rotate` job). At most
/// one rotation or verification per connection is queued or running at a time.
#[utoipa::path(
    post,
    path = "/connections/{id}/rotate",
    tag = "connections",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Connection id")),
    request_body = RotateRequest,
    responses(
        (status = 202, description = "Queued; the keys are swapped only if the new ones pass", body = JobAccepted),
        (status = 400, description = "Malformed JSON or id, or a Zerodha connection", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such active connection of the caller", body = ErrorBody),
        (status = 409, description = "A verification or rotation is already in progress (`error.job_id`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is missing, unknown or invalid (`error.field`)", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), connection_id = %id), err(level = "info"))]
async fn rotate_connection(
    State(state): State<AppState>,
    user: AuthUser,
    PathId(id): PathId,
    ApiJson(body): ApiJson<RotateRequest>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    let id = extract::connection_id(&id)?;
    let connection = state.store.get_connection(&user.0, id).await?.ok_or(ApiError::NotFound)?;
    validate::not_zerodha(connection.exchange)?;
    let credentials =
        validate::credentials(connection.exchange, &body.api_key, &body.api_secret, body.passphrase.as_ref())?;
    let encrypted = encrypt(&state, &credentials);
    let api_key_hint = ApiKeyHint::from_api_key(credentials.api_key.expose()).as_str().to_owned();
    drop(credentials);
    let mut tx = state.store.begin_service().await?;
    // The version the new keys replace is read in the enqueueing transaction: a rotation that
    // finished since `get_connection` above has bumped it, one still running makes the insert
    // conflict (409).
    let expected_version = tx.credentials_version(id).await?.ok_or(ApiError::NotFound)?;
    let job = NewJob::new(
        user.id(),
        connection.exchange,
        JobPayload::Rotate { connection_id: id, expected_version, credentials: encrypted, api_key_hint },
    );
    let job = enqueue(&state, tx, &job).await?.ok_or_else(unexpected_duplicate)?;
    Ok((StatusCode::ACCEPTED, Json(JobAccepted { job: job.into() })))
}

/// Revokes a connection: soft delete, stored secrets overwritten, queued jobs of it cancelled,
/// audit row `revoked`. Synchronous.
#[utoipa::path(
    delete,
    path = "/connections/{id}",
    tag = "connections",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Connection id")),
    responses(
        (status = 200, description = "Revoked", body = MessageView),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such active connection of the caller", body = ErrorBody),
        (status = 429, description = "Too many writes; see `Retry-After`", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), connection_id = %id), err(level = "info"))]
async fn revoke_connection(
    State(state): State<AppState>,
    user: AuthUser,
    meta: ClientMeta,
    PathId(id): PathId,
) -> Result<Json<MessageView>, ApiError> {
    let id = extract::connection_id(&id)?;
    let mut tx = state.store.begin_user(&user.0).await?;
    tx.revoke_connection(id, meta.audit(AuditAction::Revoked, Some(id), serde_json::Value::Null)).await?;
    let mut tx = tx.into_service().await?;
    let cancelled = tx.cancel_connection_jobs(id, REVOKED_REASON).await?;
    tx.commit().await?;
    tracing::info!(cancelled_jobs = cancelled, "connection revoked");
    Ok(Json(MessageView { message: "Connection revoked; its stored credentials were destroyed.".into() }))
}

/// Query of `GET /connections/{id}/history`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// Page size, 1–200. Default 50.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// Cursor: checks older than this one. Take it from the previous page's `Link: rel="next"`
    /// header (`<unix microseconds>.<entry id without hyphens>`); empty means none.
    #[param(pattern = r"^([0-9]{1,16}\.[0-9a-f]{32})?$")]
    before: Option<String>,
}

const DEFAULT_HISTORY_PAGE: u32 = 50;
const MAX_HISTORY_PAGE: u32 = 200;

/// The health checks of one of the caller's connections, newest first. When a page is full, a
/// `Link: <…>; rel="next"` header points to the next (older) page.
#[utoipa::path(
    get,
    path = "/connections/{id}/history",
    tag = "connections",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Connection id"), HistoryQuery),
    responses(
        (status = 200, description = "Newest first", body = [HealthEntryView],
            headers(("Link" = String, description = "`<…?limit=N&before=CURSOR>; rel=\"next\"` when there may be more"))),
        (status = 400, description = "The id is not a UUID, or a bad `limit` or `before`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such active connection of the caller", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), connection_id = %id), err(level = "info"))]
async fn list_health_history(
    State(state): State<AppState>,
    user: AuthUser,
    PathId(id): PathId,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(HeaderMap, Json<Vec<HealthEntryView>>), ApiError> {
    let id = extract::connection_id(&id)?;
    let Query(query) = query.map_err(|_| malformed_query())?;
    let (limit, before) =
        page(query.limit.as_deref(), query.before.as_deref(), DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE)?;
    // A revoked connection is gone for its owner, history included.
    state.store.get_connection(&user.0, id).await?.ok_or(ApiError::NotFound)?;
    let entries = state.store.list_health_history(&user.0, id, limit, before).await?;
    let headers =
        next_page(&format!("/connections/{id}/history"), limit, entries.len(), entries.last().map(PageCursor::from));
    Ok((headers, Json(entries.into_iter().map(HealthEntryView::from).collect())))
}

/// Query of `GET /connections/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Page size, 1–1000. Default 50.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Cursor: entries older than this one. Take it from the previous page's `Link: rel="next"`
    /// header (`<unix microseconds>.<entry id without hyphens>`); empty means none.
    #[param(pattern = r"^([0-9]{1,16}\.[0-9a-f]{32})?$")]
    before: Option<String>,
}

const DEFAULT_AUDIT_PAGE: u32 = 50;

/// The caller's audit log, newest first. When a page is full, a `Link: <…>; rel="next"` header
/// points to the next (older) page.
#[utoipa::path(
    get,
    path = "/connections/audit",
    tag = "connections",
    security(("bearer" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "Newest first", body = [AuditEntryView],
            headers(("Link" = String, description = "`<…?limit=N&before=CURSOR>; rel=\"next\"` when there may be more"))),
        (status = 400, description = "A bad `limit` or `before`", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id()), err(level = "info"))]
async fn list_audit(
    State(state): State<AppState>,
    user: AuthUser,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(HeaderMap, Json<Vec<AuditEntryView>>), ApiError> {
    let Query(query) = query.map_err(|_| malformed_query())?;
    let (limit, before) = page(query.limit.as_deref(), query.before.as_deref(), DEFAULT_AUDIT_PAGE, MAX_PAGE_SIZE)?;
    let entries = state.store.list_audit(&user.0, limit, before).await?;
    let headers = next_page("/connections/audit", limit, entries.len(), entries.last().map(PageCursor::from));
    Ok((headers, Json(entries.into_iter().map(AuditEntryView::from).collect())))
}

fn malformed_query() -> ApiError {
    ApiError::bad_request("invalid_query", "The query string is malformed.", None)
}

/// A keyset page's `limit` (`default` when absent, at most `max`) and `before` cursor.
fn page(
    limit: Option<&str>,
    before: Option<&str>,
    default: u32,
    max: u32,
) -> Result<(u32, Option<PageCursor>), ApiError> {
    let limit = match limit {
        None => default,
        Some(raw) => raw.trim().parse::<u32>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("`limit` must be a whole number from 1 to {max}."),
                Some("limit"),
            )
        })?,
    };
    let before = match before {
        None | Some("") => None,
        Some(raw) => Some(raw.parse::<PageCursor>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                "`before` is not a cursor from a previous page's Link header.",
                Some("before"),
            )
        })?),
    };
    Ok((limit, before))
}

/// `Link: <path?limit=N&before=CURSOR>; rel="next"` when the page is full, so there may be more.
fn next_page(path: &str, limit: u32, len: usize, last: Option<PageCursor>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if len == limit as usize
        && let Some(last) = last
        && let Ok(value) = HeaderValue::from_str(&format!("<{path}?limit={limit}&before={last}>; rel=\"next\""))
    {
        headers.insert(header::LINK, value);
    }
    headers
}

/// We never set an idempotency key on these jobs, so "already enqueued" cannot happen.
fn unexpected_duplicate() -> ApiError {
    ApiError::Internal(anyhow::anyhow!("a job without an idempotency key was reported as a duplicate"))
}
