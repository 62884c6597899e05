//! The one error type of the HTTP crate.
//!
//! Clients get a stable `{"error": {"code", "message", "field"?, "job_id"?}}`; internal causes are
//! logged with their chain and never sent to the client. Messages are written here or by the
//! validators and never echo a submitted value.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tradeeon_shared::jobs::JobId;
use tradeeon_shared::store::StoreError;
use utoipa::ToSchema;

use crate::auth::AuthError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No valid bearer token (401, `WWW-Authenticate: Bearer`).
    #[error("unauthorized: {0}")]
    Unauthorized(AuthError),
    /// The request itself is wrong: malformed JSON (400), wrong content type (415), body too
    /// large (413), a field that fails validation (422), a bad id or query parameter (400).
    #[error("invalid request: {0:?}")]
    Invalid(Invalid),
    #[error("not found")]
    NotFound,
    /// A credential-changing job is already queued or running for the connection (409).
    #[error("a job is already in progress")]
    JobInProgress { job_id: Option<JobId> },
    /// Another write conflicts with this one (409).
    #[error("conflict")]
    Conflict { code: &'static str, message: &'static str },
    /// `REQUIRE_AAL2` is on and the session did not pass a second factor (403).
    #[error("a second factor is required")]
    MfaRequired,
    /// The per-user write budget is spent (429, `Retry-After`).
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// The database (or another dependency) is unreachable; retrying later may succeed.
    #[error("service unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// A request error with the status, stable code, message and (when there is one) the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    /// 422: a body field failed validation.
    pub fn field(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid(Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code,
            message: message.into(),
            field: Some(field.into()),
        })
    }

    /// 400 with an optional field.
    pub fn bad_request(code: &'static str, message: impl Into<String>, field: Option<&str>) -> Self {
        Self::Invalid(Invalid {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
            field: field.map(str::to_owned),
        })
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Invalid(invalid) => invalid.status,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MfaRequired => StatusCode::FORBIDDEN,
            Self::JobInProgress { .. } | Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(err) => err.code(),
            Self::Invalid(invalid) => invalid.code,
            Self::NotFound => "not_found",
            Self::MfaRequired => "mfa_required",
            Self::JobInProgress { .. } => "job_in_progress",
            Self::Conflict { code, .. } => code,
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn public_message(&self) -> String {
        match self {
            Self::Unauthorized(err) => err.to_string(),
            Self::Invalid(invalid) => invalid.message.clone(),
            Self::NotFound => "No such resource.".into(),
            Self::MfaRequired => {
                "Changing exchange keys needs a session verified with a second factor: sign in again with \
                 multi-factor authentication."
                    .into()
            }
            Self::JobInProgress { .. } => {
                "A verification or rotation is already queued or running for this connection; wait for job_id to \
                 finish."
                    .into()
            }
            Self::Conflict { message, .. } => (*message).into(),
            Self::RateLimited { retry_after } => {
                format!("Too many changes; retry in {} s.", retry_after_seconds(*retry_after))
            }
            Self::Unavailable(_) => "The service is temporarily unavailable; retry shortly.".into(),
            Self::Internal(_) => "Something went wrong on our side; it has been logged.".into(),
        }
    }
}

fn retry_after_seconds(wait: Duration) -> u64 {
    // Round up: retrying after a rounded-down wait would be refused again.
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The error body every failure has, documented once in the OpenAPI document.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `invalid_field`, `not_found`, `job_in_progress`.
    #[schema(example = "invalid_field")]
    pub code: String,
    /// A sentence for people. Never echoes a submitted value.
    pub message: String,
    /// The request field the error is about, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// With `job_in_progress`: the job already queued or running for the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "01JD5W5YB2Z9N0E0P7K3V8Q4RT")]
    pub job_id: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Unavailable(cause) => tracing::warn!(error = format!("{cause:#}"), "dependency unavailable"),
            Self::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "request failed"),
            Self::Unauthorized(err) => tracing::debug!(reason = %err, "token refused"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.public_message(),
                field: match &self {
                    Self::Invalid(invalid) => invalid.field.clone(),
                    _ => None,
                },
                job_id: match &self {
                    Self::JobInProgress { job_id } => job_id.map(|id| id.to_string()),
                    _ => None,
                },
            },
        };
        let mut response = (self.status_code(), Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized(err) => {
                // RFC 6750 §3: no error code when the request carried no credentials at all.
                let value = if *err == AuthError::Missing { "Bearer" } else { "Bearer error=\"invalid_token\"" };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
            }
            Self::RateLimited { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds(*retry_after)));
            }
            _ => {}
        }
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        Self::Unauthorized(err)
    }
}

impl From<StoreError> for ApiError {
    /// Store errors that a handler does not handle itself: a missing row is a 404, an
    /// unreachable database a 503, anything else a 500 (logged, not shown).
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => Self::NotFound,
            StoreError::Connect { .. } => Self::Unavailable(err.into()),
            StoreError::Database(ref db) if is_unavailable(db) => Self::Unavailable(err.into()),
            other => Self::Internal(other.into()),
        }
    }
}

/// Errors that mean "the database is not answering" rather than "the query is wrong".
fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // The server ended the session because it is going away or not there yet (a restart or
        // failover mid-request): PostgreSQL's "connection exception" class 08 and
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}
