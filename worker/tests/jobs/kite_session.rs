//! `kite_session` jobs: the Zerodha login flow through the simulator's login page.

use chrono::{Duration as ChronoDuration, Utc};
use tradeeon_shared::domain::{AuditAction, ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::CheckCode;
use tradeeon_shared::jobs::JobPayload;
use tradeeon_shared::store::{ConnectionRecord, Store};

use crate::helpers::*;

/// Logs the seeded user in on the simulator's Kite login page and returns the request token.
async fn log_in(app: &TestApp) -> String {
    let url = app.env.exchanges.kite_login_url(sim_kite::SEEDED_API_KEY);
    let page = reqwest::get(url).await.unwrap().error_for_status().unwrap().text().await.unwrap();
    let start = page.find("<code id=\"request_token\">").expect("the page shows a request token") + 25;
    let end = start + page[start..].find("</code>").unwrap();
    page[start..end].to_string()
}

async fn connect_kite(app: &TestApp) -> ConnectionRecord {
    app.connect(Exchange::Zerodha, &Keys::new(sim_kite::SEEDED_API_KEY, sim_kite::SEEDED_API_SECRET)).await
}

fn session_job(app: &TestApp, conn: &ConnectionRecord, request_token: &str) -> JobPayload {
    JobPayload::KiteSession { connection_id: conn.id, request_token: app.encrypt(request_token) }
}

async fn a_kite_login_creates_a_session_and_connects(store: Store) {
    let app = spawn_app(store).await;
    let conn = connect_kite(&app).await;
    let token = log_in(&app).await;
    let step = app.run_once(app.enqueue(Exchange::Zerodha, session_job(&app, &conn, &token)).await).await;
    let result = done(&step);
    assert!(result.ok, "{result:?}");

    let after = app.connection(conn.id).await;
    assert_eq!(after.status, ConnectionStatus::Connected);
    let expires = after.session_expires_at.expect("session expiry stored");
    assert!(expires > Utc::now() && expires <= Utc::now() + ChronoDuration::hours(24));
    let permissions = after.permissions.unwrap();
    assert!(permissions.read && permissions.trade && !permissions.withdraw);
    // The access token is stored encrypted and works for later checks.
    let stored = app.store.load_access_token(conn.id).await.unwrap().expect("token stored");
    assert!(stored.starts_with("gAAAA"), "a Fernet token, not the plaintext");
    assert_eq!(app.audit_actions().await, [AuditAction::SessionCreated, AuditAction::Connected]);

    let step =
        app.run_once(app.enqueue(Exchange::Zerodha, JobPayload::HealthCheck { connection_id: conn.id }).await).await;
    assert!(done(&step).ok, "{step:?}");
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Connected);
}

async fn a_used_request_token_asks_for_a_new_login(store: Store) {
    let app = spawn_app(store).await;
    let conn = connect_kite(&app).await;
    let token = log_in(&app).await;
    assert!(done(&app.run_once(app.enqueue(Exchange::Zerodha, session_job(&app, &conn, &token)).await).await).ok);
    // The same request token again (e.g. a replayed redirect).
    let step = app.run_once(app.enqueue(Exchange::Zerodha, session_job(&app, &conn, &token)).await).await;
    assert_eq!(done(&step).code, CheckCode::SessionExpired);
    let after = app.connection(conn.id).await;
    assert_eq!(after.status, ConnectionStatus::Expired);
    let last = app.audit().await.pop().unwrap();
    assert_eq!(last.action, AuditAction::StatusChanged);
    assert_eq!((last.details["from"].as_str(), last.details["to"].as_str()), (Some("connected"), Some("expired")));
}

async fn a_wrong_api_secret_is_an_error(store: Store) {
    let app = spawn_app(store).await;
    let conn = app.connect(Exchange::Zerodha, &Keys::new(sim_kite::SEEDED_API_KEY, "not-the-secret")).await;
    let token = log_in(&app).await;
    let step = app.run_once(app.enqueue(Exchange::Zerodha, session_job(&app, &conn, &token)).await).await;
    assert_eq!(done(&step).code, CheckCode::InvalidSignature);
    assert_eq!(app.connection(conn.id).await.status, ConnectionStatus::Error);
    assert!(app.store.load_access_token(conn.id).await.unwrap().is_none());
}

async fn an_ended_session_expires_without_calling_kite(store: Store) {
    let app = spawn_app(store).await;
    let conn = connect_kite(&app).await;
    let token = log_in(&app).await;
    assert!(done(&app.run_once(app.enqueue(Exchange::Zerodha, session_job(&app, &conn, &token)).await).await).ok);
    // 06:00 IST has passed.
    let stored = app.store.load_access_token(conn.id).await.unwrap().unwrap();
    app.store.store_session(conn.id, stored, Utc::now() - ChronoDuration::minutes(1), None).await.unwrap();
    app.sim.state.faults.clear_log();

    let step =
        app.run_once(app.enqueue(Exchange::Zerodha, JobPayload::HealthCheck { connection_id: conn.id }).await).await;
    assert_eq!(done(&step).code, CheckCode::SessionExpired);
    assert_eq!(app.requests(Exchange::Zerodha), 0, "Kite was not called");
    let after = app.connection(conn.id).await;
    assert_eq!(after.status, ConnectionStatus::Expired);
    let last = app.audit().await.pop().unwrap();
    assert_eq!(last.action, AuditAction::StatusChanged);
    assert_eq!(last.details["to"], "expired");
    assert_eq!(last.details["reason"], "session_expired");
}

both_backends!(
    a_kite_login_creates_a_session_and_connects,
    a_used_request_token_asks_for_a_new_login,
    a_wrong_api_secret_is_an_error,
    an_ended_session_expires_without_calling_kite,
);
