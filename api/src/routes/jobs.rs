//! Job status: what the API enqueued, as the workers left it.

use axum::Json;
use axum::extract::State;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ErrorBody;
use crate::extract::{self, AuthUser, PathId};
use crate::views::JobView;
use crate::{ApiError, AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_job))
}

/// One of the caller's jobs. Another user's job is a 404.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id (a ULID)", min_length = 26, max_length = 26, pattern = r"^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "The id is not a ULID", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such job of the caller", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = %user.id(), job_id = %id), err(level = "info"))]
async fn get_job(State(state): State<AppState>, user: AuthUser, PathId(id): PathId) -> Result<Json<JobView>, ApiError> {
    let id = extract::job_id(&id)?;
    let job = state.store.get_job(&user.0, id).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(job.into()))
}
