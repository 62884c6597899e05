//! `kite_session`: "exchange `request_token` for an access token, store it encrypted with its
//! expiry", then set the status from a profile check with the new session.
//!
//! * The session is stored with `Store::store_session` (token encrypted under the primary key,
//!   expiry 06:00 IST next, audit `session_created` in the same transaction).
//! * The profile check then sets permissions and the status: `connected` (`degraded` when slow,
//!   or when the profile check fails transiently — the login itself worked), audit `connected`;
//!   a definitive failure sets `error` and audits `status_changed`.
//! * Only the session request is retried on transient failures. Once Kite has issued a session
//!   the request token is spent, so nothing after that is retried.
//! * A failed session request (wrong secret, used or expired request token) sets `error` or
//!   `expired` and audits `status_changed` when the status changes.

use std::time::Instant;

use serde_json::json;
use tradeeon_shared::domain::{AuditAction, ConnectionId, ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::{CheckResult, Credentials};
use tradeeon_shared::jobs::{ClaimedJob, JobOutcome};
use tradeeon_shared::store::{AuditEntryInput, ConnectionRecord};

use super::{
    JobEnv, JobError, JobResult, REVOKED, Step, connected_audit, decrypt, decrypt_credentials, failed, record_check,
    record_or_defer, retries, retry, status_changed_audit, verdict_status,
};

#[tracing::instrument(name = "kite_session_job", skip_all, fields(connection_id = %connection_id))]
pub(super) async fn run(env: &JobEnv, job: &ClaimedJob, connection_id: ConnectionId, request_token: &str) -> JobResult {
    let Some((record, encrypted, _)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    if record.exchange != Exchange::Zerodha {
        return failed("Only Zerodha connections have Kite sessions.");
    }
    let credentials = decrypt_credentials(&env.keyring, &encrypted, None)?;
    let request_token = decrypt(&env.keyring, request_token)?;
    let started = Instant::now();
    let created =
        env.exchanges.create_kite_session(&credentials.api_key, &credentials.api_secret, request_token.expose()).await;
    let latency = started.elapsed();
    drop(request_token);
    let session = match created {
        Ok(session) => session,
        Err(failure) => {
            tracing::info!(code = failure.code().as_str(), "Kite session could not be created");
            env.record_check_metrics(Exchange::Zerodha, failure.code(), latency);
            let result = match record_or_defer(Err(failure), latency) {
                Ok(result) => result,
                Err(defer) => return Ok(defer),
            };
            if retries(job, &result) {
                return Ok(retry(job, result));
            }
            return apply(env, &record, result, None).await;
        }
    };

    let token = env.keyring.encrypt(&session.access_token).into_inner();
    let audit = AuditEntryInput {
        details: json!({ "expires_at": session.expires_at }),
        ..AuditEntryInput::new(AuditAction::SessionCreated)
    };
    if !env.store.store_session(connection_id, token, session.expires_at, Some(audit)).await? {
        return failed(REVOKED);
    }
    tracing::info!(expires_at = %session.expires_at, "Kite session stored");

    let credentials = Credentials { access_token: Some(session.access_token), ..credentials };
    let (outcome, latency) = env.check(Exchange::Zerodha, &credentials).await;
    drop(credentials);
    let result = CheckResult::new(outcome, latency);
    // The login worked: a transient failure of the profile check only makes the connection degraded.
    apply(env, &record, result, Some(ConnectionStatus::Degraded)).await
}

/// Records `result` on the connection and settles the job. `if_transient`: the status to set
/// when the check failed transiently (`None`: keep the current one).
async fn apply(
    env: &JobEnv,
    record: &ConnectionRecord,
    result: CheckResult,
    if_transient: Option<ConnectionStatus>,
) -> Result<Step, JobError> {
    let failures = if result.ok { 0 } else { record.consecutive_failures.saturating_add(1) };
    let (status, message) = verdict_status(&env.policy, &result)
        .unwrap_or_else(|| (if_transient.unwrap_or(record.status), Some(result.message.clone())));
    if !record_check(env, record, status, message, failures, &result).await? {
        return failed(REVOKED);
    }
    let works = matches!(status, ConnectionStatus::Connected | ConnectionStatus::Degraded);
    if result.ok || (works && record.status != status) {
        env.store.insert_connection_audit(record.id, connected_audit(status, &result)).await?;
    } else if status != record.status {
        env.store
            .insert_connection_audit(record.id, status_changed_audit(record.status, status, &result, None))
            .await?;
    }
    Ok(Step::Finish(JobOutcome::Done(result)))
}
