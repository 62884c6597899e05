//! The HTTP API of Tradeeon Connect.
//!
//! It authenticates, validates, encrypts and enqueues; it never calls an exchange and never
//! decrypts a stored secret (that is the workers' job, behind the NAT's static IP). All SQL goes
//! through `tradeeon_shared::store`.

mod error;
mod routes;

use std::future::Future;

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;

pub use error::ApiError;

/// What every handler can reach. Cheap to clone (everything inside is reference-counted).
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Encrypts incoming credentials. The API holds the keys but never decrypts stored secrets.
    pub keyring: Arc<Keyring>,
}

/// The complete router, with no listener attached, so tests can drive it over real HTTP on an
/// ephemeral port.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::health::router())
        .fallback(routes::not_found)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
