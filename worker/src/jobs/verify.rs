//! `verify`: "check a newly saved connection; set status, permissions, latency; audit
//! `connected` or the failure."
//!
//! The result is applied only while the connection is active and still has the credentials the
//! job was queued for (`credentials_version`), checked before and again after the exchange call;
//! otherwise the job fails as superseded (a newer verify or rotation owns the status).
//!
//! * ok → `connected` (or `degraded` when slower than `HEALTH_DEGRADED_LATENCY_MS`), permissions
//!   stored, failures reset, audit `connected`.
//! * definitive failure → `error` (`expired` for an ended Zerodha session) with the message,
//!   audit `status_changed`.
//! * transient failure after the last attempt → nothing was learnt about the key: the status
//!   stays (normally `pending`, for the next health sweep to settle), the message and the failed
//!   check are recorded, no audit row.

use tradeeon_shared::domain::ConnectionId;
use tradeeon_shared::jobs::{ClaimedJob, JobOutcome};

use super::{
    JobEnv, JobResult, REVOKED, SUPERSEDED, Step, connected_audit, failed, record_check, record_or_defer, retries,
    retry, status_changed_audit, stored_credentials, verdict_status,
};

#[tracing::instrument(name = "verify_job", skip_all, fields(connection_id = %connection_id, credentials_version))]
pub(super) async fn run(
    env: &JobEnv,
    job: &ClaimedJob,
    connection_id: ConnectionId,
    credentials_version: i32,
) -> JobResult {
    let Some((record, encrypted, version)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    if version != credentials_version {
        return failed(SUPERSEDED);
    }
    let credentials = stored_credentials(env, &record, &encrypted).await?;
    let (outcome, latency) = env.check(record.exchange, &credentials).await;
    drop(credentials);
    let result = match record_or_defer(outcome, latency) {
        Ok(result) => result,
        Err(defer) => return Ok(defer),
    };
    tracing::info!(code = result.code.as_str(), latency_ms = result.latency_ms, "connection verified");
    if retries(job, &result) {
        return Ok(retry(job, result));
    }

    let Some((record, _, version)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    if version != credentials_version {
        return failed(SUPERSEDED);
    }
    let failures = if result.ok { 0 } else { record.consecutive_failures.saturating_add(1) };
    match verdict_status(&env.policy, &result) {
        Some((status, message)) => {
            if !record_check(env, &record, status, message, failures, &result).await? {
                return failed(REVOKED);
            }
            if result.ok {
                env.store.insert_connection_audit(connection_id, connected_audit(status, &result)).await?;
            } else if status != record.status {
                let audit = status_changed_audit(record.status, status, &result, None);
                env.store.insert_connection_audit(connection_id, audit).await?;
            }
        }
        None => {
            let message = Some(result.message.clone());
            if !record_check(env, &record, record.status, message, failures, &result).await? {
                return failed(REVOKED);
            }
        }
    }
    Ok(Step::Finish(JobOutcome::Done(result)))
}
