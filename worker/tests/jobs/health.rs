//! `health_check` jobs: the status model end to end (flap suppression, re-check, drift).

use std::time::Duration;

use tradeeon_shared::domain::{AuditAction, ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::{JobId, JobPayload, JobStatus};
use tradeeon_shared::store::{ConnectionRecord, Store};
use tradeeon_simulator::Fault;
use tradeeon_worker::jobs::{RECHECK_DELAY, Step};

use crate::helpers::*;

/// A Binance connection, verified (`connected`).
async fn connected(app: &TestApp, key: &str, secret: &str) -> ConnectionRecord {
    let conn = app.connect(Exchange::Binance, &Keys::new(key, secret)).await;
    let payload = JobPayload::Verify { connection_id: conn.id, credentials_version: conn.credentials_version };
    assert!(done(&app.run_once(app.enqueue(Exchange::Binance, payload).await).await).ok);
    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, ConnectionStatus::Connected);
    conn
}

async fn health_check(app: &TestApp, conn: &ConnectionRecord) -> (JobId, Step) {
    let id = app.enqueue(conn.exchange, JobPayload::HealthCheck { connection_id: conn.id }).await;
    (id, app.run_once(id).await)
}

fn status_changes(audit: &[tradeeon_shared::store::AuditEntry]) -> Vec<(String, String, String)> {
    audit
        .iter()
        .filter(|e| e.action == AuditAction::StatusChanged)
        .map(|e| {
            let s = |k: &str| e.details[k].as_str().unwrap_or_default().to_string();
            (s("from"), s("to"), s("code"))
        })
        .collect()
}

async fn a_healthy_check_is_recorded_in_history(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET).await;
    let (id, step) = health_check(&app, &conn).await;
    assert!(done(&step).ok);
    assert_eq!(app.job(id).await.status, JobStatus::Done);
    let history = app.store.list_health_history(&app.user, conn.id, 10, None).await.unwrap();
    assert_eq!(history.len(), 2, "verify and health check");
    assert_eq!(history[0].status, ConnectionStatus::Connected);
    assert_eq!(app.audit_actions().await, [AuditAction::Connected], "no status change, no audit row");
}

async fn one_transient_failure_does_not_flip_a_healthy_connection(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET).await;

    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 1 });
    let (_, step) = health_check(&app, &conn).await;
    assert_eq!(done(&step).code, CheckCode::ExchangeUnavailable, "health checks are never retried: {step:?}");
    let after = app.connection(conn.id).await;
    assert_eq!((after.status, after.consecutive_failures), (ConnectionStatus::Connected, 1));

    // It recovers: failures reset.
    let (_, step) = health_check(&app, &conn).await;
    assert!(done(&step).ok);
    assert_eq!(app.connection(conn.id).await.consecutive_failures, 0);

    // Two in a row: degraded, then back to connected.
    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 2 });
    health_check(&app, &conn).await;
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Connected);
    health_check(&app, &conn).await;
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Degraded);
    health_check(&app, &conn).await;
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Connected);

    let changes = status_changes(&app.audit().await);
    assert_eq!(
        changes,
        [
            ("connected".into(), "degraded".into(), "exchange_unavailable".into()),
            ("degraded".into(), "connected".into(), "ok".into()),
        ]
    );
    let history = app.store.list_health_history(&app.user, conn.id, 20, None).await.unwrap();
    assert_eq!(history.len(), 6, "every check is recorded");
}

async fn a_refused_key_is_rechecked_once_before_error(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET).await;
    app.sim.state.binance.revoke_key(sim_binance::SEEDED_FULL_KEY);

    let (id, first) = health_check(&app, &conn).await;
    let (after, result) = retried(&first);
    assert_eq!(after, RECHECK_DELAY);
    assert_eq!(result.code, CheckCode::InvalidCredentials);
    let between = app.connection(conn.id).await;
    assert_eq!((between.status, between.consecutive_failures), (ConnectionStatus::Connected, 1));
    assert_eq!(app.job(id).await.status, JobStatus::Queued);

    // The re-check confirms it.
    let second = app.run_once(id).await;
    assert_eq!(done(&second).code, CheckCode::InvalidCredentials);
    let after = app.connection(conn.id).await;
    assert_eq!((after.status, after.consecutive_failures), (ConnectionStatus::Error, 2));
    assert_eq!(
        status_changes(&app.audit().await),
        [("connected".into(), "error".into(), "invalid_credentials".into())]
    );
}

async fn a_refusal_that_clears_on_recheck_keeps_the_connection(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET).await;
    app.sim.state.binance.revoke_key(sim_binance::SEEDED_FULL_KEY);
    let (id, first) = health_check(&app, &conn).await;
    retried(&first);
    // A glitch on the exchange's side: the key works again by the re-check.
    app.sim.state.binance.add_key(
        sim_binance::SEEDED_FULL_KEY,
        sim_binance::SEEDED_FULL_SECRET,
        tradeeon_simulator::binance::BinancePermissions::READ_TRADE,
        vec![],
    );
    assert!(done(&app.run_once(id).await).ok);
    let after = app.connection(conn.id).await;
    assert_eq!((after.status, after.consecutive_failures), (ConnectionStatus::Connected, 0));
    assert!(status_changes(&app.audit().await).is_empty());
}

async fn permission_drift_degrades(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET).await;
    // The user removes the key's IP restriction and enables withdrawals.
    app.sim.state.binance.set_ip_allowlist(sim_binance::SEEDED_LOCAL_ONLY_KEY, vec![]);
    app.sim
        .state
        .binance
        .set_permissions(sim_binance::SEEDED_LOCAL_ONLY_KEY, tradeeon_simulator::binance::BinancePermissions::ALL);
    let (_, step) = health_check(&app, &conn).await;
    let result = done(&step);
    assert!(result.ok);
    assert_eq!(result.warnings, ["withdrawals_enabled", "no_ip_restriction"]);
    let after = app.connection(conn.id).await;
    assert_eq!(after.status, ConnectionStatus::Degraded);
    let message = after.status_message.unwrap();
    assert!(message.contains("withdrawals were switched on") && message.contains("IP restriction"), "{message}");
    assert!(after.permissions.unwrap().withdraw, "the observed permissions are stored");
    let last = app.audit().await.pop().unwrap();
    assert_eq!(last.action, AuditAction::StatusChanged);
    assert_eq!(last.details["reason"], "permission_drift");
}

async fn a_slow_exchange_degrades_the_connection(store: Store) {
    let config =
        tradeeon_shared::config::WorkerConfig { health_degraded_latency: Duration::from_millis(150), ..test_config() };
    let app = spawn_app_with(store, config).await;
    let conn = connected(&app, sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::Latency(Duration::from_millis(200)));
    health_check(&app, &conn).await;
    let after = app.connection(conn.id).await;
    assert_eq!(after.status, ConnectionStatus::Degraded);
    assert!(after.last_latency_ms.unwrap() >= 200);
}

async fn a_revoked_connection_is_not_checked(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET).await;
    let id = app.enqueue(Exchange::Binance, JobPayload::HealthCheck { connection_id: conn.id }).await;
    let revoke = tradeeon_shared::store::AuditEntryInput::new(AuditAction::Revoked);
    app.store.revoke_connection(&app.user, conn.id, revoke).await.unwrap();
    app.sim.state.faults.clear_log();
    // (A revoke may also settle the queued job itself; then there is nothing left to run.)
    if let Some(step) = app.run_if_claimable(id).await {
        assert!(failed(&step).contains("revoked"), "{step:?}");
    }
    assert_eq!(app.requests(Exchange::Binance), 0);
}

/// Two checks of one connection in flight at once both read it before either writes: each
/// decides from what it read, and the one that writes second must decide again from what the
/// first wrote, not overwrite it (a lost failure would hide a flapping key).
async fn concurrent_checks_of_one_connection_lose_no_failure(store: Store) {
    let app = spawn_app(store).await;
    let conn = connected(&app, sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::Latency(Duration::from_millis(300)));
    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 503, count: 2 });

    let first = app.enqueue(conn.exchange, JobPayload::HealthCheck { connection_id: conn.id }).await;
    let second = app.enqueue(conn.exchange, JobPayload::HealthCheck { connection_id: conn.id }).await;
    let (a, b) = tokio::join!(app.run_once(first), app.run_once(second));
    assert_eq!(done(&a).code, CheckCode::ExchangeUnavailable);
    assert_eq!(done(&b).code, CheckCode::ExchangeUnavailable);

    // Both failures counted: the threshold (2) is reached, so the connection is degraded.
    let after = app.connection(conn.id).await;
    assert_eq!((after.status, after.consecutive_failures), (ConnectionStatus::Degraded, 2));
    let history = app.store.list_health_history(&app.user, conn.id, 10, None).await.unwrap();
    assert_eq!(history.len(), 3, "verify and both checks");
    assert_eq!(
        status_changes(&app.audit().await),
        [("connected".into(), "degraded".into(), "exchange_unavailable".into())]
    );
}

both_backends!(
    concurrent_checks_of_one_connection_lose_no_failure,
    a_healthy_check_is_recorded_in_history,
    one_transient_failure_does_not_flip_a_healthy_connection,
    a_refused_key_is_rechecked_once_before_error,
    a_refusal_that_clears_on_recheck_keeps_the_connection,
    permission_drift_degrades,
    a_slow_exchange_degrades_the_connection,
    a_revoked_connection_is_not_checked,
);
