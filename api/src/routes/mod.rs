//! One module per route group.

pub mod health;

use crate::ApiError;

/// Unknown paths answer in the same error format as everything else.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
