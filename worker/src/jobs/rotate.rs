//! `rotate`: "check the *new* credentials first; only if they pass, swap them in one transaction
//! and audit `rotated`; otherwise keep the old keys untouched and audit `rotate_failed`.
//! Idempotent if run twice (a crash after the swap must not fail or double-audit)."
//!
//! The swap is `Store::swap_credentials`, a compare-and-swap on `credentials_version` that writes
//! the `rotated` row in its transaction. When it finds the version moved on, the stored
//! credentials tell the two cases apart: equal to this job's → an earlier attempt of this job
//! swapped them and stopped before settling (only the status is left to write, no second audit
//! row); different → someone else changed the connection meanwhile (the job fails). The same
//! test runs before the check, so a re-run after a crash never writes `rotate_failed` for keys it
//! already swapped in.
//!
//! After a swap the connection's status comes from the new keys' check (`connected`/`degraded`,
//! failures reset); the `rotated` row's details carry it, so no separate `status_changed` row is
//! written. A failed rotation leaves status and keys untouched.
//!
//! Zerodha: a Kite check needs a session, which new credentials do not have yet, so rotating a
//! Zerodha connection always fails with `session_expired`; it is re-connected with a new login.

use serde_json::json;
use tradeeon_shared::domain::{ApiKeyHint, AuditAction, ConnectionId};
use tradeeon_shared::exchanges::CheckResult;
use tradeeon_shared::jobs::{ClaimedJob, JobOutcome};
use tradeeon_shared::store::{AuditEntryInput, ConnectionRecord, EncryptedCredentials};

use super::{
    JobEnv, JobError, JobResult, REVOKED, Step, decrypt_credentials, failed, record_check, record_or_defer, retries,
    retry, verdict_status,
};

const CHANGED: &str = "The connection changed meanwhile (new credentials were saved by another request); this \
                       rotation was not applied.";

#[tracing::instrument(name = "rotate_job", skip_all, fields(connection_id = %connection_id, expected_version))]
pub(super) async fn run(
    env: &JobEnv,
    job: &ClaimedJob,
    connection_id: ConnectionId,
    expected_version: i32,
    new: &EncryptedCredentials,
    api_key_hint: &str,
) -> JobResult {
    let Some((record, current, version)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    let already_swapped = current == *new && version > expected_version;
    if !already_swapped && version != expected_version {
        return failed(CHANGED);
    }

    let credentials = decrypt_credentials(&env.keyring, new, None)?;
    let (outcome, latency) = env.check(record.exchange, &credentials).await;
    drop(credentials);
    let result = match record_or_defer(outcome, latency) {
        Ok(result) => result,
        Err(defer) => return Ok(defer),
    };
    tracing::info!(
        code = result.code.as_str(),
        latency_ms = result.latency_ms,
        already_swapped,
        "new credentials checked"
    );
    if retries(job, &result) {
        return Ok(retry(job, result));
    }

    if already_swapped {
        tracing::info!("the keys were swapped by an earlier attempt; recording the status only");
        return finish_after_swap(env, &record, result).await;
    }
    if !result.ok {
        let audit = AuditEntryInput {
            details: json!({
                "code": result.code,
                "message": result.message,
                "api_key_hint": api_key_hint,
            }),
            ..AuditEntryInput::new(AuditAction::RotateFailed)
        };
        env.store.insert_connection_audit(connection_id, audit).await?;
        return Ok(Step::Finish(JobOutcome::Done(result)));
    }

    let status = verdict_status(&env.policy, &result).map(|(status, _)| status);
    let audit = AuditEntryInput {
        details: json!({
            "code": result.code,
            "ok": result.ok,
            "status": status,
            "latency_ms": result.latency_ms,
            "warnings": result.warnings,
            "api_key_hint": api_key_hint,
            "credentials_version": expected_version + 1,
        }),
        ..AuditEntryInput::new(AuditAction::Rotated)
    };
    let hint = ApiKeyHint::from_stored(api_key_hint.to_string());
    let swapped = env.store.swap_credentials(connection_id, expected_version, new.clone(), hint, audit).await?;
    let Some((record, current, _)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    if !swapped && current != *new {
        return failed(CHANGED);
    }
    finish_after_swap(env, &record, result).await
}

/// Records the new keys' check on the connection and settles the job.
async fn finish_after_swap(env: &JobEnv, record: &ConnectionRecord, result: CheckResult) -> Result<Step, JobError> {
    let written = match verdict_status(&env.policy, &result) {
        Some((status, message)) => {
            let failures = if result.ok { 0 } else { record.consecutive_failures.saturating_add(1) };
            record_check(env, record, status, message, failures, &result).await?
        }
        None => {
            let failures = record.consecutive_failures.saturating_add(1);
            record_check(env, record, record.status, Some(result.message.clone()), failures, &result).await?
        }
    };
    if !written {
        return failed(REVOKED);
    }
    Ok(Step::Finish(JobOutcome::Done(result)))
}
