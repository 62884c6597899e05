//! `rotate` jobs: new keys are checked first and swapped in only if they pass; idempotent.

use tradeeon_shared::domain::{ApiKeyHint, AuditAction, ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::{JobPayload, JobStatus};
use tradeeon_shared::store::{ConnectionRecord, NewConnection, Store};
use tradeeon_worker::jobs::Step;

use crate::helpers::*;

fn rotate(app: &TestApp, conn: &ConnectionRecord, keys: &Keys<'_>) -> JobPayload {
    JobPayload::Rotate {
        connection_id: conn.id,
        expected_version: conn.credentials_version,
        credentials: app.encrypt_keys(keys),
        api_key_hint: ApiKeyHint::from_api_key(keys.api_key).as_str().to_string(),
    }
}

async fn stored_api_key(app: &TestApp, conn: &ConnectionRecord) -> String {
    let (_, creds, _) = app.store.load_credentials(conn.id).await.unwrap().unwrap();
    let token = tradeeon_shared::vault::EncryptedSecret::from(creds.api_key);
    app.env.keyring.decrypt(&token).unwrap().value.expose().to_string()
}

async fn a_passing_rotation_swaps_the_keys(store: Store) {
    let app = spawn_app(store).await;
    let old = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let conn = app.connect(Exchange::Binance, &old).await;
    let new = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    let id = app.enqueue(Exchange::Binance, rotate(&app, &conn, &new)).await;
    let step = app.run_once(id).await;
    assert!(done(&step).ok, "{step:?}");

    assert_eq!(stored_api_key(&app, &conn).await, sim_binance::SEEDED_LOCAL_ONLY_KEY);
    let after = app.connection(conn.id).await;
    assert_eq!(after.credentials_version, conn.credentials_version + 1);
    assert_eq!(after.api_key_hint, Some(ApiKeyHint::from_api_key(sim_binance::SEEDED_LOCAL_ONLY_KEY)));
    assert_eq!(after.status, ConnectionStatus::Connected);
    assert!(after.permissions.unwrap().ip_restricted, "the new key's permissions");
    let audit = app.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, AuditAction::Rotated);
    assert_eq!(audit[0].details["status"], "connected");
    assert!(!audit[0].details.to_string().contains(sim_binance::SEEDED_LOCAL_ONLY_SECRET));
    assert_eq!(app.job(id).await.status, JobStatus::Done);
}

async fn a_failing_rotation_keeps_the_old_keys(store: Store) {
    let app = spawn_app(store).await;
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let old = Keys::new(sim_kraken::SEEDED_FULL_KEY, &secret);
    let conn = app.connect(Exchange::Kraken, &old).await;
    let bad_secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_REVOKED_KEY);
    let new = Keys::new(sim_kraken::SEEDED_REVOKED_KEY, &bad_secret);
    let step = app.run_once(app.enqueue(Exchange::Kraken, rotate(&app, &conn, &new)).await).await;
    assert_eq!(done(&step).code, CheckCode::InvalidCredentials);

    assert_eq!(stored_api_key(&app, &conn).await, sim_kraken::SEEDED_FULL_KEY);
    let after = app.connection(conn.id).await;
    assert_eq!(after.credentials_version, conn.credentials_version);
    assert_eq!(after.status, conn.status, "status untouched");
    let audit = app.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, AuditAction::RotateFailed);
    assert_eq!(audit[0].details["code"], "invalid_credentials");
}

async fn rotate_run_twice_after_a_crash_swaps_and_audits_once(store: Store) {
    let app = spawn_app(store).await;
    let old = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let conn = app.connect(Exchange::Binance, &old).await;
    let new = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    let id = app.enqueue(Exchange::Binance, rotate(&app, &conn, &new)).await;
    // First attempt swaps, then the worker dies before settling the job.
    let first = app.run_unsettled(id).await;
    assert!(matches!(first, Step::Finish(_)));
    // The ticket is handed to another worker, which runs the job again.
    let second = app.run_once(id).await;
    assert!(done(&second).ok, "{second:?}");

    let after = app.connection(conn.id).await;
    assert_eq!(after.credentials_version, conn.credentials_version + 1, "one swap");
    assert_eq!(stored_api_key(&app, &conn).await, sim_binance::SEEDED_LOCAL_ONLY_KEY);
    assert_eq!(after.status, ConnectionStatus::Connected);
    assert_eq!(app.audit_actions().await, [AuditAction::Rotated], "one audit row");
    let job = app.job(id).await;
    assert_eq!((job.status, job.attempts), (JobStatus::Done, 2));
}

async fn a_rotation_overtaken_by_new_keys_is_not_applied(store: Store) {
    let app = spawn_app(store).await;
    let old = Keys::new(sim_binance::SEEDED_FULL_KEY, sim_binance::SEEDED_FULL_SECRET);
    let conn = app.connect(Exchange::Binance, &old).await;
    let new = Keys::new(sim_binance::SEEDED_LOCAL_ONLY_KEY, sim_binance::SEEDED_LOCAL_ONLY_SECRET);
    let id = app.enqueue(Exchange::Binance, rotate(&app, &conn, &new)).await;
    // The user re-connects with other keys meanwhile.
    let other = Keys::new(sim_binance::SEEDED_READ_ONLY_KEY, sim_binance::SEEDED_READ_ONLY_SECRET);
    let reconnect = NewConnection {
        exchange: Exchange::Binance,
        credentials: app.encrypt_keys(&other),
        nickname: None,
        api_key_hint: ApiKeyHint::from_api_key(other.api_key),
    };
    app.store.upsert_connection(&app.user, reconnect, None).await.unwrap();
    let step = app.run_once(id).await;
    assert!(failed(&step).contains("changed meanwhile"), "{step:?}");
    assert_eq!(stored_api_key(&app, &conn).await, sim_binance::SEEDED_READ_ONLY_KEY);
    assert!(app.audit().await.is_empty());
}

both_backends!(
    a_passing_rotation_swaps_the_keys,
    a_failing_rotation_keeps_the_old_keys,
    rotate_run_twice_after_a_crash_swaps_and_audits_once,
    a_rotation_overtaken_by_new_keys_is_not_applied,
);
