//! The jobs: what a worker does with a claimed job record. One module per kind.
//!
//! [`run`] is called by the runtime after `Store::claim_job` (which marked the job running and
//! counted the attempt) and returns a [`Step`]: settle the job with an outcome, or run it again
//! later. Jobs are the only code that decrypts credentials; plaintext lives in
//! [`Credentials`] (zeroized on drop, redacted in `Debug`) for the length of one check and never
//! reaches a log line, an error or a result.
//!
//! # Retries
//!
//! A check that failed with a transient code (`rate_limited`, `exchange_unavailable`, `timeout`)
//! is retried after [`RetryPolicy::JOB`]'s delay (never sooner than the exchange's `Retry-After`)
//! while the job's kind retries transient failures and the policy has attempts left; after
//! the last attempt the job settles with the last result. Definitive verdicts (bad key, bad
//! signature, IP not allowed, …) are never retried. Health checks never retry transient failures
//! (the next sweep does), with one exception: see [`health_check`] ("re-checked once").
//!
//! A database error while running a job is retried the same way (the job is idempotent up to
//! its one write that matters); undecryptable credentials fail the job.
//!
//! # Permission policy
//!
//! The clients attach `withdrawals_enabled` / `no_ip_restriction` warnings. With
//! `REJECT_WITHDRAWAL_KEYS=true`, a key that can withdraw fails every check ([`apply_policy`]):
//! `ok = false`, code `permission_denied`, with its permissions and warnings kept.
//!
//! # Audit rows
//!
//! Every change of a connection's status made by a job writes exactly one audit row, never with
//! secrets:
//!
//! * `verify` — `connected` on success (`{code, ok, status, latency_ms, warnings}`), or
//!   `status_changed` on a definitive failure (`{from, to, code, message}`).
//! * `kite_session` — `session_created` (in the same transaction as the encrypted token), then
//!   `connected` when the session makes the connection work, like `verify`; `status_changed` on
//!   a failure that changes the status.
//! * `rotate` — `rotated` (in the swap's transaction; its details carry the new status) or
//!   `rotate_failed` (old keys untouched, status untouched). No extra status row.
//! * `health_check` — `status_changed` (`{from, to, code, reason, message}`) on every change.
//! * `test` — `tested`, written by the statement that settles the job, with the verdict.
//!
//! Every check of a stored connection also writes a health-history row.

mod health_check;
mod kite_session;
mod rotate;
mod test;
mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tradeeon_shared::config::{ExchangeEndpoints, WorkerConfig};
use tradeeon_shared::domain::{AuditAction, ConnectionStatus, Exchange};
use tradeeon_shared::exchanges::{CheckCode, CheckResult, Credentials, Failure, Verdict};
use tradeeon_shared::jobs::{ClaimedJob, JobOutcome};
use tradeeon_shared::retry::RetryPolicy;
use tradeeon_shared::store::{
    AuditEntryInput, ConnectionRecord, EncryptedCredentials, HealthRecord, StatusUpdate, Store, StoreError,
};
use tradeeon_shared::vault::{EncryptedSecret, Keyring, SecretValue, VaultError};

use crate::exchanges::ExchangeClients;
use crate::metrics::WorkerMetrics;

pub use health_check::{DecisionReason, StatusDecision, next_status};

/// How long a healthy connection whose check failed definitively waits for its one re-check.
pub const RECHECK_DELAY: Duration = Duration::from_secs(30);

/// What the jobs need. Build one per process and share it (behind an `Arc`) between jobs.
pub struct JobEnv {
    pub store: Store,
    pub keyring: Arc<Keyring>,
    pub exchanges: Arc<ExchangeClients>,
    pub policy: CheckPolicy,
    /// Where checks and rate-limit waits are reported (`None`: nowhere, e.g. in tests).
    pub metrics: Option<WorkerMetrics>,
}

impl JobEnv {
    /// Everything from configuration: exchange clients for `endpoints`, rate limits, timeout and
    /// policy from `worker` (Kraken nonces coordinated through `store` on PostgreSQL).
    pub fn from_config(
        store: Store,
        keyring: Arc<Keyring>,
        endpoints: &ExchangeEndpoints,
        worker: &WorkerConfig,
    ) -> anyhow::Result<Self> {
        let exchanges = Arc::new(ExchangeClients::for_store(endpoints, worker, &store)?);
        Ok(Self { store, keyring, exchanges, policy: CheckPolicy::from_config(worker), metrics: None })
    }

    /// Reports every check, and the rate gate's waits and the exchanges' rate limiting, to `metrics`.
    pub fn with_metrics(mut self, metrics: WorkerMetrics) -> Self {
        self.exchanges.limits().report_to(metrics.clone());
        self.metrics = Some(metrics);
        self
    }

    /// Runs a credential check, applies the permission policy and records the check's metrics.
    /// Returns what the check concluded and how long it took.
    pub async fn check(&self, exchange: Exchange, credentials: &Credentials) -> (Result<Verdict, Failure>, Duration) {
        let started = Instant::now();
        let outcome = apply_policy(&self.policy, self.exchanges.check(exchange, credentials).await);
        let latency = started.elapsed();
        self.record_check_metrics(exchange, outcome.as_ref().map_or_else(Failure::code, |_| CheckCode::Ok), latency);
        (outcome, latency)
    }

    pub(crate) fn record_check_metrics(&self, exchange: Exchange, code: CheckCode, latency: Duration) {
        if let Some(metrics) = &self.metrics {
            metrics.check_recorded(exchange, code, latency);
        }
    }
}

/// How check results are judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckPolicy {
    /// `REJECT_WITHDRAWAL_KEYS`: keys that can withdraw fail with `permission_denied`.
    pub reject_withdrawal_keys: bool,
    /// `HEALTH_DEGRADED_LATENCY_MS`: a check at least this slow means `degraded`.
    pub degraded_latency: Duration,
    /// `HEALTH_FAILURE_THRESHOLD`: consecutive failed checks before a healthy connection
    /// changes status (at least 1).
    pub failure_threshold: u32,
    /// Delay of the one early re-check of a definitive failure ([`RECHECK_DELAY`]).
    pub recheck_delay: Duration,
}

impl CheckPolicy {
    pub fn from_config(config: &WorkerConfig) -> Self {
        Self {
            reject_withdrawal_keys: config.reject_withdrawal_keys,
            degraded_latency: config.health_degraded_latency,
            failure_threshold: config.health_failure_threshold.max(1),
            recheck_delay: RECHECK_DELAY,
        }
    }
}

impl Default for CheckPolicy {
    /// The documented defaults of [`WorkerConfig`].
    fn default() -> Self {
        Self::from_config(&WorkerConfig::default())
    }
}

/// What the runtime does with the job next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Settle the job (`Store::finish_job`).
    Finish(JobOutcome),
    /// Run it again after `after` (`Store::requeue_job`). `last` is the result of this attempt.
    Retry { after: Duration, last: Option<CheckResult> },
    /// Our rate gate refused to send anything: run it again after `after`, without counting
    /// this attempt (`Store::defer_job`).
    Defer { after: Duration },
}

/// Runs one attempt of a claimed job.
pub async fn run(env: &JobEnv, job: &ClaimedJob) -> Step {
    use tradeeon_shared::jobs::JobPayload;
    let outcome = match &job.payload {
        JobPayload::Test { exchange, credentials, .. } => test::run(env, job, *exchange, credentials).await,
        JobPayload::Verify { connection_id, credentials_version } => {
            verify::run(env, job, *connection_id, *credentials_version).await
        }
        JobPayload::Rotate { connection_id, expected_version, credentials, api_key_hint } => {
            rotate::run(env, job, *connection_id, *expected_version, credentials, api_key_hint).await
        }
        JobPayload::HealthCheck { connection_id } => health_check::run(env, job, *connection_id).await,
        JobPayload::KiteSession { connection_id, request_token } => {
            kite_session::run(env, job, *connection_id, request_token).await
        }
    };
    match outcome {
        Ok(step) => step,
        Err(JobError::Store(err)) => {
            tracing::warn!(error = %error_chain(&err), "job hit a database error");
            if job.record.kind.retries_transient_failures() && RetryPolicy::JOB.has_attempts_left(job.record.attempts) {
                Step::Retry { after: RetryPolicy::JOB.delay(job.record.attempts), last: None }
            } else {
                Step::Finish(JobOutcome::Failed("The database was unavailable; the job could not be completed.".into()))
            }
        }
        Err(JobError::Decrypt(err)) => {
            tracing::error!(error = %err, "stored credentials could not be decrypted");
            Step::Finish(JobOutcome::Failed(
                "The stored credentials could not be decrypted with the configured ENCRYPTION_KEY.".into(),
            ))
        }
    }
}

/// Why a job could not be carried out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    #[error("database error")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Decrypt(#[from] VaultError),
}

pub(crate) type JobResult = Result<Step, JobError>;

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Shared by the job modules
// ---------------------------------------------------------------------------------------------

pub(crate) fn decrypt(keyring: &Keyring, token: &str) -> Result<SecretValue, VaultError> {
    keyring.decrypt(&EncryptedSecret::from(token.to_string())).map(|d| d.value)
}

/// Plaintext credentials from their Fernet tokens (plus a Zerodha access token, if any).
pub(crate) fn decrypt_credentials(
    keyring: &Keyring,
    encrypted: &EncryptedCredentials,
    access_token: Option<&str>,
) -> Result<Credentials, VaultError> {
    Ok(Credentials {
        api_key: decrypt(keyring, &encrypted.api_key)?,
        api_secret: decrypt(keyring, &encrypted.api_secret)?,
        passphrase: encrypted.passphrase.as_deref().map(|p| decrypt(keyring, p)).transpose()?,
        access_token: access_token.map(|t| decrypt(keyring, t)).transpose()?,
    })
}

/// The stored credentials of a connection, with its Zerodha access token when it has one.
pub(crate) async fn stored_credentials(
    env: &JobEnv,
    record: &ConnectionRecord,
    encrypted: &EncryptedCredentials,
) -> Result<Credentials, JobError> {
    let access_token = match record.exchange {
        Exchange::Zerodha => env.store.load_access_token(record.id).await?,
        _ => None,
    };
    Ok(decrypt_credentials(&env.keyring, encrypted, access_token.as_deref())?)
}

/// Applies `REJECT_WITHDRAWAL_KEYS` to a passing check.
pub fn apply_policy(policy: &CheckPolicy, outcome: Result<Verdict, Failure>) -> Result<Verdict, Failure> {
    match outcome {
        Ok(verdict) if policy.reject_withdrawal_keys && verdict.permissions.withdraw => Err(Failure::lacking(
            "This API key can withdraw funds, and this service is configured to refuse such keys \
             (REJECT_WITHDRAWAL_KEYS). Create a key without the withdrawal permission.",
            verdict,
        )),
        outcome => outcome,
    }
}

/// The record of a check, or the [`defer`] step when our rate gate held its request back:
/// nothing was learnt, and waiting for our own budget is not a failed attempt.
pub(crate) fn record_or_defer(outcome: Result<Verdict, Failure>, latency: Duration) -> Result<CheckResult, Step> {
    match outcome {
        Err(Failure::Unsent { wait, .. }) => Err(defer(wait)),
        outcome => Ok(CheckResult::new(outcome, latency)),
    }
}

/// Whether this failed check should be retried (see the module docs).
pub(crate) fn retries(job: &ClaimedJob, result: &CheckResult) -> bool {
    !result.ok
        && result.code.is_transient()
        && job.record.kind.retries_transient_failures()
        && RetryPolicy::JOB.has_attempts_left(job.record.attempts)
}

/// Retry a transient failure while attempts are left, else settle with the result.
pub(crate) fn settle(job: &ClaimedJob, result: CheckResult) -> Step {
    if retries(job, &result) { retry(job, result) } else { Step::Finish(JobOutcome::Done(result)) }
}

pub(crate) fn retry(job: &ClaimedJob, result: CheckResult) -> Step {
    let after = RetryPolicy::JOB.delay_honouring(job.record.attempts, result.retry_after_ms.map(Duration::from_millis));
    Step::Retry { after, last: Some(result) }
}

/// Re-runs a job whose request our rate gate held back, when the gate says the budget frees,
/// plus up to 10% (at least 20 ms) so the jobs it held back together do not all come back in
/// the same instant.
fn defer(wait: Duration) -> Step {
    use rand::Rng;
    let spread = wait.mul_f64(0.1).max(Duration::from_millis(20));
    let after = wait + spread.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
    Step::Defer { after }
}

pub(crate) fn failed(message: &str) -> JobResult {
    Ok(Step::Finish(JobOutcome::Failed(message.to_string())))
}

pub(crate) const REVOKED: &str = "The connection was revoked or deleted before the job ran.";
pub(crate) const SUPERSEDED: &str =
    "superseded: the connection's credentials changed after this job was queued; its result was not applied.";

pub(crate) fn latency_ms(result: &CheckResult) -> i32 {
    i32::try_from(result.latency_ms).unwrap_or(i32::MAX)
}

/// The status a definitive verdict on a connection's credentials means outside the health
/// model (verify, rotate, kite_session): `connected`, `degraded` when slow, `expired` for an
/// ended Zerodha session, `error` otherwise. `None` for a transient failure (nothing learnt
/// about the key).
pub(crate) fn verdict_status(policy: &CheckPolicy, result: &CheckResult) -> Option<(ConnectionStatus, Option<String>)> {
    if result.ok {
        if u128::from(result.latency_ms) >= policy.degraded_latency.as_millis() {
            return Some((ConnectionStatus::Degraded, Some(slow_message(policy, result))));
        }
        return Some((ConnectionStatus::Connected, None));
    }
    match result.code {
        code if code.is_transient() => None,
        CheckCode::SessionExpired => Some((ConnectionStatus::Expired, Some(result.message.clone()))),
        _ => Some((ConnectionStatus::Error, Some(result.message.clone()))),
    }
}

pub(crate) fn slow_message(policy: &CheckPolicy, result: &CheckResult) -> String {
    format!(
        "The exchange took {} ms to answer (more than {} ms); the connection works but is slow.",
        result.latency_ms,
        policy.degraded_latency.as_millis()
    )
}

/// Writes a check's outcome on a connection: its status and the health-history row.
pub(crate) async fn record_check(
    env: &JobEnv,
    record: &ConnectionRecord,
    status: ConnectionStatus,
    message: Option<String>,
    consecutive_failures: i32,
    result: &CheckResult,
) -> Result<bool, StoreError> {
    let checked_at = Utc::now();
    let update = StatusUpdate {
        status,
        status_message: message.clone(),
        latency_ms: Some(latency_ms(result)),
        permissions: result.permissions,
        consecutive_failures,
        checked_at,
        credentials_version: record.credentials_version,
    };
    let health = HealthRecord {
        connection_id: record.id,
        checked_at,
        status,
        code: Some(result.code.as_str().to_string()),
        latency_ms: Some(latency_ms(result)),
        message: message.or_else(|| (!result.ok).then(|| result.message.clone())),
    };
    env.store.record_check(record.id, update, health, None).await
}

/// The `connected` audit row of a check that made a connection work.
pub(crate) fn connected_audit(status: ConnectionStatus, result: &CheckResult) -> AuditEntryInput {
    AuditEntryInput {
        details: json!({
            "code": result.code,
            "ok": result.ok,
            "status": status,
            "latency_ms": result.latency_ms,
            "warnings": result.warnings,
        }),
        ..AuditEntryInput::new(AuditAction::Connected)
    }
}

/// The `status_changed` audit row.
pub(crate) fn status_changed_audit(
    from: ConnectionStatus,
    to: ConnectionStatus,
    result: &CheckResult,
    reason: Option<&str>,
) -> AuditEntryInput {
    let mut details = json!({ "from": from, "to": to, "code": result.code, "message": result.message });
    if let Some(reason) = reason {
        details["reason"] = json!(reason);
    }
    AuditEntryInput { details, ..AuditEntryInput::new(AuditAction::StatusChanged) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tradeeon_shared::domain::Permissions;

    fn passed(permissions: Permissions) -> Result<Verdict, Failure> {
        Ok(Verdict { permissions, warnings: tradeeon_shared::exchanges::permission_warnings(&permissions) })
    }

    fn ok_with(permissions: Permissions, latency_ms: u64) -> CheckResult {
        CheckResult::new(passed(permissions), Duration::from_millis(latency_ms))
    }

    #[test]
    fn withdrawal_keys_are_refused_only_when_configured() {
        let withdraw = Permissions { read: true, trade: true, withdraw: true, ip_restricted: true };
        let result = passed(withdraw);
        assert_eq!(apply_policy(&CheckPolicy::default(), result.clone()), result);
        let strict = CheckPolicy { reject_withdrawal_keys: true, ..CheckPolicy::default() };
        let refused = CheckResult::new(apply_policy(&strict, result), Duration::ZERO);
        assert!(!refused.ok);
        assert_eq!(refused.code, CheckCode::PermissionDenied);
        assert!(refused.message.contains("REJECT_WITHDRAWAL_KEYS"));
        assert_eq!(refused.permissions, Some(withdraw), "permissions are kept for the user");
        assert_eq!(refused.warnings, ["withdrawals_enabled"]);
        // Keys without withdrawals, and failed checks, are untouched.
        let fine = passed(Permissions { withdraw: false, ..withdraw });
        assert_eq!(apply_policy(&strict, fine.clone()), fine);
        let failed = Err(Failure::new(CheckCode::Timeout, "slow"));
        assert_eq!(apply_policy(&strict, failed.clone()), failed);
    }

    #[test]
    fn verdicts_map_to_statuses() {
        let policy = CheckPolicy::default();
        let p = Permissions { read: true, ..Permissions::default() };
        assert_eq!(verdict_status(&policy, &ok_with(p, 10)).unwrap().0, ConnectionStatus::Connected);
        assert_eq!(verdict_status(&policy, &ok_with(p, 2_000)).unwrap().0, ConnectionStatus::Degraded);
        let fail = |code| CheckResult::new(Err(Failure::new(code, "x")), Duration::ZERO);
        assert_eq!(verdict_status(&policy, &fail(CheckCode::InvalidSignature)).unwrap().0, ConnectionStatus::Error);
        assert_eq!(verdict_status(&policy, &fail(CheckCode::SessionExpired)).unwrap().0, ConnectionStatus::Expired);
        for code in [CheckCode::RateLimited, CheckCode::ExchangeUnavailable, CheckCode::Timeout] {
            assert_eq!(verdict_status(&policy, &fail(code)), None);
        }
    }

    #[test]
    fn decrypted_credentials_round_trip_and_never_print() {
        let keyring = Keyring::parse(&Keyring::generate_key()).unwrap();
        let enc = |s: &str| keyring.encrypt(&SecretValue::new(s.to_string())).into_inner();
        let encrypted =
            EncryptedCredentials { api_key: enc("key-123"), api_secret: enc("secret-456"), passphrase: None };
        let creds = decrypt_credentials(&keyring, &encrypted, Some(&enc("token-789"))).unwrap();
        assert_eq!(creds.api_key.expose(), "key-123");
        assert_eq!(creds.access_token.as_ref().unwrap().expose(), "token-789");
        let debug = format!("{creds:?}");
        assert!(!debug.contains("secret-456") && !debug.contains("key-123"), "{debug}");
        let other = Keyring::parse(&Keyring::generate_key()).unwrap();
        assert!(decrypt_credentials(&other, &encrypted, None).is_err());
    }
}
