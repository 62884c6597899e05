//! The one error type of the HTTP crate.
//!
//! Clients get a stable `{"error": {"code", "message", "field"?}}`; internal causes are logged
//! with their chain and never sent to the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    /// The database (or another dependency) is unreachable; retrying later may succeed.
    #[error("service unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn public_message(&self) -> &'static str {
        match self {
            Self::NotFound => "No such resource.",
            Self::Unavailable(_) => "The service is temporarily unavailable; retry shortly.",
            Self::Internal(_) => "Something went wrong on our side; it has been logged.",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Unavailable(cause) => tracing::warn!(error = format!("{cause:#}"), "dependency unavailable"),
            Self::Internal(cause) => tracing::error!(error = format!("{cause:#}"), "request failed"),
            Self::NotFound => {}
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code(), message: self.public_message(), field: None } };
        (self.status_code(), Json(body)).into_response()
    }
}
