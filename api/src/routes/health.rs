//! Liveness, readiness and the OpenAPI document: no authentication. (The metrics have a listener
//! of their own: `crate::metrics::serve`.)

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ErrorBody;
use crate::views::{HealthView, ReadyView};
use crate::{ApiError, AppState};

/// How long readiness waits for the database before calling it down.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(health)).routes(routes!(ready)).routes(routes!(crate::openapi::document))
}

/// Liveness: no I/O, so a slow database never gets a healthy task killed.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Alive", body = HealthView)))]
async fn health() -> Json<HealthView> {
    Json(HealthView { status: "ok" })
}

/// Readiness: 200 only while the database answers (within 2 s).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers", body = ReadyView),
        (status = 503, description = "The database does not answer", body = ErrorBody),
    )
)]
async fn ready(State(state): State<AppState>) -> Result<Json<ReadyView>, ApiError> {
    match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(ReadyView { status: "ready", database: state.store.backend().to_string() })),
        Ok(Err(err)) => Err(ApiError::Unavailable(err.into())),
        Err(_) => Err(ApiError::Unavailable(anyhow::anyhow!("the database did not answer within {READY_TIMEOUT:?}"))),
    }
}
