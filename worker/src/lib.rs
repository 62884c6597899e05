//! Tradeeon Connect workers: the only part of the system that decrypts credentials and talks to
//! exchanges (from behind the NAT gateway's static IP in production).
//!
//! Job kinds (credential tests, verification, rotation, Zerodha sessions, health sweeps), the
//! per-exchange rate limits and the metrics publisher are registered here; storage goes through
//! `tradeeon_shared::store`.

use std::future::Future;

use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;

/// What the workers need from the process that starts them.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Store,
    pub keyring: std::sync::Arc<Keyring>,
}

/// Runs the workers until `shutdown` resolves.
///
/// No job kinds are registered yet: the job runner, exchange clients and scheduler arrive with
/// the worker issue. Until then this only holds the process open so `serve` has its final shape.
pub async fn run(ctx: WorkerContext, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    tracing::info!(backend = %ctx.store.backend(), "worker started (no job kinds registered yet)");
    shutdown.await;
    tracing::info!("worker stopped");
    Ok(())
}
