//! One module per route group, each an [`OpenApiRouter`] so that the OpenAPI document is built
//! from the very handlers that serve the routes.

pub mod catalog;
pub mod connections;
pub mod health;
pub mod jobs;
pub mod zerodha;

use tradeeon_shared::jobs::{JobRecord, NewJob};
use tradeeon_shared::store::{EncryptedCredentials, ServiceTx, StoreError};
use utoipa_axum::router::OpenApiRouter;

use crate::validate::ValidCredentials;
use crate::{ApiError, AppState};

/// Every route with its documentation.
pub fn all() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(health::router())
        .merge(catalog::router())
        .merge(connections::router())
        .merge(jobs::router())
        .merge(zerodha::router())
}

fn encrypt(state: &AppState, credentials: &ValidCredentials) -> EncryptedCredentials {
    credentials.encrypt(&state.keyring)
}

/// Enqueues `job` in `tx` and commits. `Ok(None)`: its idempotency key was used before (nothing
/// written). A credential-changing job already queued or running for the connection rolls the
/// whole transaction back and answers 409 with that job's id.
async fn enqueue(state: &AppState, mut tx: ServiceTx, job: &NewJob) -> Result<Option<JobRecord>, ApiError> {
    match tx.enqueue_job(job).await {
        Ok(Some(record)) => {
            tx.commit().await?;
            state.metrics.job_enqueued(record.kind);
            Ok(Some(record))
        }
        Ok(None) => Ok(None),
        Err(StoreError::Conflict(_)) => {
            drop(tx);
            let running = match job.payload.connection_id() {
                Some(connection_id) => state.store.active_change_job(connection_id).await?,
                None => None,
            };
            Err(ApiError::JobInProgress { job_id: running })
        }
        Err(other) => Err(other.into()),
    }
}
