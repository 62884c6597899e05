//! `verify` jobs: status, permissions, latency and the audit row of a newly saved connection.

use std::time::Duration;

use tradeeon_shared::domain::{AuditAction, ConnectionStatus, Exchange, Permissions};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::{JobPayload, JobStatus};
use tradeeon_shared::store::{NewConnection, Store};
use tradeeon_simulator::Fault;

use crate::helpers::*;

fn verify(conn: &tradeeon_shared::store::ConnectionRecord) -> JobPayload {
    JobPayload::Verify { connection_id: conn.id, credentials_version: conn.credentials_version }
}

async fn verify_applies_status_permissions_and_latency(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    let conn = app.connect(Exchange::Binance, &keys).await;
    assert_eq!(conn.status, ConnectionStatus::Pending);
    let id = app.enqueue(Exchange::Binance, verify(&conn)).await;
    let step = app.run_once(id).await;
    let result = done(&step).clone();
    assert!(result.ok);

    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, ConnectionStatus::Connected);
    assert_eq!(conn.status_message, None);
    assert_eq!(conn.permissions, Some(Permissions { read: true, trade: true, withdraw: false, ip_restricted: true }));
    assert_eq!(conn.last_latency_ms, Some(result.latency_ms as i32));
    assert!(conn.last_checked_at.is_some());
    assert_eq!(conn.consecutive_failures, 0);

    let audit = app.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, AuditAction::Connected);
    assert_eq!(audit[0].connection_id, Some(conn.id));
    assert_eq!(audit[0].details["code"], "ok");
    assert_eq!(audit[0].details["ok"], true);
    assert_eq!(audit[0].details["status"], "connected");
    let history = app.store.list_health_history(&app.user, conn.id, 10, None).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].code.as_deref(), Some("ok"));
    assert_eq!(app.job(id).await.status, JobStatus::Done);
}

async fn verify_of_a_refused_key_sets_error_and_audits_the_failure(store: Store) {
    let app = spawn_app(store).await;
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_REVOKED_KEY);
    let conn = app.connect(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_REVOKED_KEY, &secret)).await;
    let step = app.run_once(app.enqueue(Exchange::Kraken, verify(&conn)).await).await;
    assert_eq!(done(&step).code, CheckCode::InvalidCredentials);
    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, ConnectionStatus::Error);
    assert!(conn.status_message.unwrap().contains("Kraken"));
    assert_eq!(conn.consecutive_failures, 1);
    let audit = app.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, AuditAction::StatusChanged);
    assert_eq!(audit[0].details["from"], "pending");
    assert_eq!(audit[0].details["to"], "error");
    assert_eq!(audit[0].details["code"], "invalid_credentials");
}

async fn a_slow_connection_is_degraded(store: Store) {
    let config =
        tradeeon_shared::config::WorkerConfig { health_degraded_latency: Duration::from_millis(200), ..test_config() };
    let app = spawn_app_with(store, config).await;
    app.sim.state.faults.inject(Exchange::Kraken, Fault::Latency(Duration::from_millis(300)));
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let conn = app.connect(Exchange::Kraken, &Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret)).await;
    let step = app.run_once(app.enqueue(Exchange::Kraken, verify(&conn)).await).await;
    assert!(done(&step).ok);
    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, ConnectionStatus::Degraded);
    assert!(conn.last_latency_ms.unwrap() >= 300);
    assert!(conn.status_message.unwrap().contains("slow"));
    assert_eq!(app.audit().await[0].details["status"], "degraded");
}

async fn a_transient_failure_is_retried_without_touching_the_connection(store: Store) {
    let app = spawn_app(store).await;
    app.sim.state.faults.inject(Exchange::Binance, Fault::ServerErrors { status: 500, count: 1 });
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let conn = app.connect(Exchange::Binance, &keys).await;
    let id = app.enqueue(Exchange::Binance, verify(&conn)).await;
    let first = app.run_once(id).await;
    assert_eq!(retried(&first).1.code, CheckCode::ExchangeUnavailable);
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Pending);
    assert!(app.audit().await.is_empty());
    let second = app.run_once(id).await;
    assert!(done(&second).ok);
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Connected);
}

async fn verify_of_superseded_credentials_is_not_applied(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_binance::SEEDED_REVOKED_KEY, sim_binance::SEEDED_REVOKED_SECRET);
    let conn = app.connect(Exchange::Binance, &keys).await;
    let id = app.enqueue(Exchange::Binance, verify(&conn)).await;
    // The user saves new keys before the worker gets to the job.
    let good = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let new = NewConnection {
        exchange: Exchange::Binance,
        credentials: app.encrypt_keys(&good),
        nickname: None,
        api_key_hint: tradeeon_shared::domain::ApiKeyHint::from_api_key(good.api_key),
    };
    app.store.upsert_connection(&app.user, new, None).await.unwrap();
    let step = app.run_once(id).await;
    assert!(failed(&step).starts_with("superseded"), "{step:?}");
    let conn = app.connection(conn.id).await;
    assert_eq!(conn.status, ConnectionStatus::Pending, "the old keys' verdict is not applied to the new ones");
    assert!(app.audit().await.is_empty());
    assert_eq!(app.job(id).await.status, JobStatus::Failed);
}

async fn verify_of_a_revoked_connection_fails(store: Store) {
    let app = spawn_app(store).await;
    let keys = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let conn = app.connect(Exchange::Binance, &keys).await;
    let id = app.enqueue(Exchange::Binance, verify(&conn)).await;
    let revoke = tradeeon_shared::store::AuditEntryInput::new(AuditAction::Revoked);
    app.store.revoke_connection(&app.user, conn.id, revoke).await.unwrap();
    // (A revoke may also settle the queued job itself; then there is nothing left to run.)
    if let Some(step) = app.run_if_claimable(id).await {
        assert!(failed(&step).contains("revoked"), "{step:?}");
    }
    assert_eq!(app.requests(Exchange::Binance), 0, "nothing is sent for a revoked connection");
}

both_backends!(
    verify_applies_status_permissions_and_latency,
    verify_of_a_refused_key_sets_error_and_audits_the_failure,
    a_slow_connection_is_degraded,
    a_transient_failure_is_retried_without_touching_the_connection,
    verify_of_superseded_credentials_is_not_applied,
    verify_of_a_revoked_connection_fails,
);
