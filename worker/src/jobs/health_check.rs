//! `health_check`: the scheduled re-check of a stored connection, and the status model.
//!
//! `pending` → `connected` | `degraded` | `error` | `expired`, decided by [`next_status`] from the
//! connection as stored and the new check:
//!
//! * **ok** → `connected`, or `degraded` when slower than `HEALTH_DEGRADED_LATENCY_MS` or on
//!   **permission drift** since the last check: withdrawals switched on, the IP restriction
//!   removed, or trading switched off (drift wins over slowness for the message). Failures reset.
//!   Drift is measured against the permissions stored by the previous check, which this check
//!   replaces: the connection is `degraded` for the check that notices the change (with a
//!   `status_changed` audit row naming it), and the risk warnings stay on every later result.
//! * **authentication or permission failure** (`invalid_credentials`, `invalid_signature`,
//!   `ip_not_allowed`, `permission_denied` — including keys refused by `REJECT_WITHDRAWAL_KEYS`)
//!   → `error` once `HEALTH_FAILURE_THRESHOLD` consecutive checks have failed. Until then a
//!   healthy (`connected`/`degraded`) connection keeps its status, and on its *first* failure the
//!   job asks to be re-checked after [`RECHECK_DELAY`](super::RECHECK_DELAY) (`Step::Retry`) rather than
//!   waiting for the next sweep: "a definitive auth failure is re-checked once before flipping".
//!   This is the one retry a health check makes, whatever `retries_transient_failures` says.
//!   A connection that is not healthy (`pending`, `error`, `expired`) goes to `error` at once.
//! * **transient or exchange-side failure** (`rate_limited`, `exchange_unavailable`, `timeout`,
//!   and `clock_skew`, `invalid_nonce`, `bad_response`, which say nothing about the key being
//!   refused) → a healthy connection becomes `degraded` once the threshold is reached, and keeps
//!   its status before that (flap suppression: one failure does not flip it). Other statuses are
//!   kept: such a failure teaches nothing about the key. Never `error`.
//! * **`session_expired`** → `expired`. Zerodha sessions past `session_expires_at` become
//!   `expired` without calling Kite.
//!
//! The failure counter counts consecutive failed checks of any kind. A threshold of 1 flips on
//! the first failure, without a re-check.
//!
//! Every check writes a health-history row (pruned by age elsewhere); every change of status an
//! audit row `status_changed` `{from, to, code, reason, message}`. A result is applied only if
//! the connection still has the credentials (and, for Zerodha, the session) that were checked.

use std::time::Duration;

use chrono::Utc;
use tradeeon_shared::domain::{ConnectionId, ConnectionStatus, Exchange, Permissions};
use tradeeon_shared::exchanges::{CheckCode, CheckResult, Failure};
use tradeeon_shared::jobs::{ClaimedJob, JobOutcome};
use tradeeon_shared::store::{ConnectionRecord, DecidedFrom, HealthRecord, StatusUpdate};

use super::{
    CheckPolicy, JobEnv, JobResult, REVOKED, SUPERSEDED, Step, failed, latency_ms, record_or_defer, slow_message,
    status_changed_audit, stored_credentials,
};

/// Why [`next_status`] decided what it did (recorded in the `status_changed` audit row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    /// Authenticated, permissions as before, fast enough.
    Healthy,
    /// Works, but slower than `HEALTH_DEGRADED_LATENCY_MS`.
    Slow,
    /// Works, but its permissions became riskier since the last check.
    PermissionDrift,
    /// The Zerodha session has ended.
    SessionExpired,
    /// Authentication or permission failure, confirmed (or the connection was not healthy).
    Failed,
    /// Authentication or permission failure of a healthy connection, not yet confirmed by
    /// `HEALTH_FAILURE_THRESHOLD` checks: status kept.
    Unconfirmed,
    /// A transient failure below the threshold, or on a connection that is not healthy: status kept.
    Inconclusive,
    /// Transient failures reached the threshold.
    Unreliable,
}

impl DecisionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionReason::Healthy => "healthy",
            DecisionReason::Slow => "slow",
            DecisionReason::PermissionDrift => "permission_drift",
            DecisionReason::SessionExpired => "session_expired",
            DecisionReason::Failed => "failed",
            DecisionReason::Unconfirmed => "unconfirmed",
            DecisionReason::Inconclusive => "inconclusive",
            DecisionReason::Unreliable => "unreliable",
        }
    }
}

/// What a health check does to a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusDecision {
    pub status: ConnectionStatus,
    pub message: Option<String>,
    pub consecutive_failures: i32,
    /// Permissions to store (`None` keeps the stored ones).
    pub permissions: Option<Permissions>,
    /// Check again after the policy's `recheck_delay` instead of waiting for the next sweep.
    pub recheck: bool,
    pub reason: DecisionReason,
}

/// How a failed check counts in the status model.
enum FailureKind {
    /// The exchange refused the key: can lead to `error`.
    Refused,
    /// The Zerodha session has ended.
    Session,
    /// Nothing learnt about the key: can lead to `degraded`.
    Inconclusive,
}

fn failure_kind(code: CheckCode) -> FailureKind {
    match code {
        CheckCode::InvalidCredentials
        | CheckCode::InvalidSignature
        | CheckCode::IpNotAllowed
        | CheckCode::PermissionDenied => FailureKind::Refused,
        CheckCode::SessionExpired => FailureKind::Session,
        CheckCode::Ok
        | CheckCode::RateLimited
        | CheckCode::ExchangeUnavailable
        | CheckCode::Timeout
        | CheckCode::ClockSkew
        | CheckCode::InvalidNonce
        | CheckCode::BadResponse => FailureKind::Inconclusive,
    }
}

/// How permissions became riskier (or less useful) between two checks.
fn permission_drift(before: Option<Permissions>, now: Option<Permissions>) -> Vec<&'static str> {
    let (Some(before), Some(now)) = (before, now) else { return Vec::new() };
    let mut drift = Vec::new();
    if !before.withdraw && now.withdraw {
        drift.push("withdrawals were switched on");
    }
    if before.ip_restricted && !now.ip_restricted {
        drift.push("the IP restriction was removed");
    }
    if before.trade && !now.trade {
        drift.push("trading was switched off");
    }
    drift
}

/// The status model (see the module docs): the connection's next status after `check`.
pub fn next_status(previous: &ConnectionRecord, check: &CheckResult, policy: &CheckPolicy) -> StatusDecision {
    use ConnectionStatus::{Connected, Degraded, Error, Expired};
    let threshold = i32::try_from(policy.failure_threshold.max(1)).unwrap_or(i32::MAX);
    let healthy = matches!(previous.status, Connected | Degraded);

    if check.ok {
        let drift = permission_drift(previous.permissions, check.permissions);
        let slow = u128::from(check.latency_ms) >= policy.degraded_latency.as_millis();
        let (status, reason, message) = if !drift.is_empty() {
            let message = format!("The API key's permissions changed since the last check: {}.", drift.join(" and "));
            (Degraded, DecisionReason::PermissionDrift, Some(message))
        } else if slow {
            (Degraded, DecisionReason::Slow, Some(slow_message(policy, check)))
        } else {
            (Connected, DecisionReason::Healthy, None)
        };
        return StatusDecision {
            status,
            message,
            consecutive_failures: 0,
            permissions: check.permissions,
            recheck: false,
            reason,
        };
    }

    let failures = previous.consecutive_failures.saturating_add(1);
    let decision = |status, reason, recheck| StatusDecision {
        status,
        message: Some(check.message.clone()),
        consecutive_failures: failures,
        permissions: check.permissions,
        recheck,
        reason,
    };
    match failure_kind(check.code) {
        FailureKind::Session => decision(Expired, DecisionReason::SessionExpired, false),
        FailureKind::Refused if healthy && failures < threshold => {
            decision(previous.status, DecisionReason::Unconfirmed, previous.consecutive_failures == 0)
        }
        FailureKind::Refused => decision(Error, DecisionReason::Failed, false),
        FailureKind::Inconclusive if healthy && failures >= threshold => {
            decision(Degraded, DecisionReason::Unreliable, false)
        }
        FailureKind::Inconclusive => decision(previous.status, DecisionReason::Inconclusive, false),
    }
}

/// How often a check's write may lose to concurrent checks of the same connection before it
/// gives up (settling as superseded: the other checks' results stand).
const MAX_CONFLICTS: u32 = 3;

#[tracing::instrument(name = "health_check_job", skip_all, fields(connection_id = %connection_id))]
pub(super) async fn run(env: &JobEnv, _job: &ClaimedJob, connection_id: ConnectionId) -> JobResult {
    let Some((record, encrypted, version)) = env.store.load_credentials(connection_id).await? else {
        return failed(REVOKED);
    };
    let now = Utc::now();
    let (result, called) = match record.session_expires_at {
        Some(ended) if record.exchange == Exchange::Zerodha && ended <= now => {
            let message = format!(
                "The Kite session ended at {} (sessions end at 06:00 IST every day); log in with Kite again.",
                ended.format("%Y-%m-%d %H:%M UTC")
            );
            (CheckResult::new(Err(Failure::new(CheckCode::SessionExpired, message)), Duration::ZERO), false)
        }
        _ => {
            let credentials = stored_credentials(env, &record, &encrypted).await?;
            let (outcome, latency) = env.check(record.exchange, &credentials).await;
            // Held back by our rate gate: nothing is recorded; the check runs when the budget frees.
            match record_or_defer(outcome, latency) {
                Ok(result) => (result, true),
                Err(defer) => return Ok(defer),
            }
        }
    };
    tracing::info!(code = result.code.as_str(), latency_ms = result.latency_ms, called, "connection checked");

    // Decided from what was read before the call, and written only if nothing has checked the
    // connection, given it a new session or replaced its keys since (`DecidedFrom`): a check
    // reads the connection once. Another check racing this one is the only way to lose that
    // race; then the decision is made again from what it wrote.
    let mut current = record;
    let mut conflicts = 0;
    let decision = loop {
        let decision = next_status(&current, &result, &env.policy);
        let checked_at = Utc::now();
        let latency = called.then(|| latency_ms(&result));
        let update = StatusUpdate {
            status: decision.status,
            status_message: decision.message.clone(),
            latency_ms: latency,
            permissions: decision.permissions,
            consecutive_failures: decision.consecutive_failures,
            checked_at,
            credentials_version: version,
        };
        let health = HealthRecord {
            connection_id,
            checked_at,
            status: decision.status,
            code: Some(result.code.as_str().to_string()),
            latency_ms: latency,
            message: decision.message.clone(),
        };
        if env.store.record_check(connection_id, update, health, Some(DecidedFrom::of(&current))).await? {
            break decision;
        }
        let Some((now_stored, _, now_version)) = env.store.load_credentials(connection_id).await? else {
            return failed(REVOKED);
        };
        if now_version != version || now_stored.session_expires_at != current.session_expires_at {
            return failed(SUPERSEDED);
        }
        conflicts += 1;
        if conflicts >= MAX_CONFLICTS {
            return failed(SUPERSEDED);
        }
        current = now_stored;
    };
    if decision.status != current.status {
        tracing::info!(from = %current.status, to = %decision.status, reason = decision.reason.as_str(), "status changed");
        let audit = status_changed_audit(current.status, decision.status, &result, Some(decision.reason.as_str()));
        env.store.insert_connection_audit(connection_id, audit).await?;
    }
    if decision.recheck {
        tracing::info!(delay_s = env.policy.recheck_delay.as_secs(), "re-checking before reporting an error");
        return Ok(Step::Retry { after: env.policy.recheck_delay, last: Some(result) });
    }
    // Health checks never retry otherwise: the next sweep is the retry.
    Ok(Step::Finish(JobOutcome::Done(result)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use tradeeon_shared::domain::{Features, UserId};
    use tradeeon_shared::exchanges::Verdict;

    const ALL_STATUSES: [ConnectionStatus; 5] = [
        ConnectionStatus::Pending,
        ConnectionStatus::Connected,
        ConnectionStatus::Degraded,
        ConnectionStatus::Error,
        ConnectionStatus::Expired,
    ];
    const SAFE: Permissions = Permissions { read: true, trade: true, withdraw: false, ip_restricted: true };

    fn record(status: ConnectionStatus, failures: i32, permissions: Option<Permissions>) -> ConnectionRecord {
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        ConnectionRecord {
            id: ConnectionId::new_random(),
            user_id: UserId::new_random(),
            exchange: Exchange::Binance,
            nickname: None,
            status,
            status_message: None,
            last_checked_at: None,
            last_latency_ms: None,
            consecutive_failures: failures,
            features: Features::default(),
            permissions,
            api_key_hint: None,
            session_expires_at: None,
            is_active: true,
            created_at: at,
            updated_at: at,
            credentials_version: 1,
        }
    }

    fn ok(permissions: Permissions, latency_ms: u64) -> CheckResult {
        CheckResult::new(Ok(Verdict { permissions, warnings: Vec::new() }), Duration::from_millis(latency_ms))
    }

    fn fail(code: CheckCode) -> CheckResult {
        CheckResult::new(Err(Failure::new(code, format!("{} happened", code.as_str()))), Duration::from_millis(5))
    }

    fn policy(threshold: u32) -> CheckPolicy {
        CheckPolicy { failure_threshold: threshold, ..CheckPolicy::default() }
    }

    const REFUSED: [CheckCode; 4] = [
        CheckCode::InvalidCredentials,
        CheckCode::InvalidSignature,
        CheckCode::IpNotAllowed,
        CheckCode::PermissionDenied,
    ];
    const INCONCLUSIVE: [CheckCode; 6] = [
        CheckCode::RateLimited,
        CheckCode::ExchangeUnavailable,
        CheckCode::Timeout,
        CheckCode::ClockSkew,
        CheckCode::InvalidNonce,
        CheckCode::BadResponse,
    ];

    #[test]
    fn every_code_is_classified() {
        let classified: usize = REFUSED.len() + INCONCLUSIVE.len() + 2; // + ok + session_expired
        assert_eq!(classified, CheckCode::ALL.len());
    }

    #[test]
    fn a_good_fast_check_is_connected_from_any_status() {
        for status in ALL_STATUSES {
            let d = next_status(&record(status, 3, Some(SAFE)), &ok(SAFE, 50), &policy(2));
            assert_eq!(d.status, ConnectionStatus::Connected, "from {status}");
            assert_eq!(d.reason, DecisionReason::Healthy);
            assert_eq!((d.consecutive_failures, d.recheck, d.message.as_deref()), (0, false, None));
            assert_eq!(d.permissions, Some(SAFE));
        }
        // First check ever (no stored permissions): nothing to drift from.
        let risky = Permissions { withdraw: true, ip_restricted: false, ..SAFE };
        let d = next_status(&record(ConnectionStatus::Pending, 0, None), &ok(risky, 50), &policy(2));
        assert_eq!(d.status, ConnectionStatus::Connected);
    }

    #[test]
    fn slow_checks_are_degraded_at_the_threshold() {
        let p = CheckPolicy::default();
        let threshold_ms = p.degraded_latency.as_millis() as u64;
        let prev = record(ConnectionStatus::Connected, 0, Some(SAFE));
        assert_eq!(next_status(&prev, &ok(SAFE, threshold_ms - 1), &p).status, ConnectionStatus::Connected);
        let d = next_status(&prev, &ok(SAFE, threshold_ms), &p);
        assert_eq!((d.status, d.reason), (ConnectionStatus::Degraded, DecisionReason::Slow));
        assert!(d.message.unwrap().contains("slow"));
        // And back once fast again.
        let prev = record(ConnectionStatus::Degraded, 0, Some(SAFE));
        assert_eq!(next_status(&prev, &ok(SAFE, 10), &p).status, ConnectionStatus::Connected);
    }

    #[test]
    fn permission_drift_degrades() {
        let prev = record(ConnectionStatus::Connected, 0, Some(SAFE));
        for (now, words) in [
            (Permissions { withdraw: true, ..SAFE }, "withdrawals were switched on"),
            (Permissions { ip_restricted: false, ..SAFE }, "the IP restriction was removed"),
            (Permissions { trade: false, ..SAFE }, "trading was switched off"),
        ] {
            let d = next_status(&prev, &ok(now, 10), &policy(2));
            assert_eq!((d.status, d.reason), (ConnectionStatus::Degraded, DecisionReason::PermissionDrift), "{words}");
            assert!(d.message.as_deref().unwrap().contains(words), "{:?}", d.message);
            assert_eq!(d.permissions, Some(now), "the new permissions are stored");
        }
        // Both at once are both named; drift wins over slowness.
        let both = Permissions { withdraw: true, ip_restricted: false, ..SAFE };
        let d = next_status(&prev, &ok(both, 60_000), &policy(2));
        let message = d.message.unwrap();
        assert!(message.contains("withdrawals") && message.contains("IP restriction"), "{message}");
        assert_eq!(d.reason, DecisionReason::PermissionDrift);
        // Safer than before is not drift.
        let risky_before = record(ConnectionStatus::Connected, 0, Some(both));
        assert_eq!(next_status(&risky_before, &ok(SAFE, 10), &policy(2)).status, ConnectionStatus::Connected);
        // Unchanged risky permissions: not drift (the warnings stay on the result).
        assert_eq!(next_status(&risky_before, &ok(both, 10), &policy(2)).status, ConnectionStatus::Connected);
    }

    #[test]
    fn a_refused_key_is_rechecked_once_then_flips_to_error() {
        for code in REFUSED {
            for status in [ConnectionStatus::Connected, ConnectionStatus::Degraded] {
                let first = next_status(&record(status, 0, Some(SAFE)), &fail(code), &policy(2));
                assert_eq!(first.status, status, "{code:?}: one failure keeps {status}");
                assert_eq!(first.reason, DecisionReason::Unconfirmed);
                assert!(first.recheck, "{code:?}: the first failure asks for a re-check");
                assert_eq!(first.consecutive_failures, 1);

                let second = next_status(&record(status, 1, Some(SAFE)), &fail(code), &policy(2));
                assert_eq!((second.status, second.reason), (ConnectionStatus::Error, DecisionReason::Failed));
                assert!(!second.recheck);
                assert_eq!(second.consecutive_failures, 2);
                assert_eq!(second.message.as_deref(), Some(fail(code).message.as_str()));
            }
        }
    }

    #[test]
    fn higher_thresholds_recheck_only_the_first_failure() {
        let p = policy(3);
        let d1 = next_status(&record(ConnectionStatus::Connected, 0, None), &fail(CheckCode::InvalidSignature), &p);
        assert!(d1.recheck && d1.status == ConnectionStatus::Connected);
        let d2 = next_status(&record(ConnectionStatus::Connected, 1, None), &fail(CheckCode::InvalidSignature), &p);
        assert!(!d2.recheck && d2.status == ConnectionStatus::Connected);
        let d3 = next_status(&record(ConnectionStatus::Connected, 2, None), &fail(CheckCode::InvalidSignature), &p);
        assert_eq!(d3.status, ConnectionStatus::Error);
    }

    #[test]
    fn threshold_one_flips_at_once_without_recheck() {
        let p = policy(1);
        let d = next_status(&record(ConnectionStatus::Connected, 0, None), &fail(CheckCode::InvalidCredentials), &p);
        assert_eq!((d.status, d.recheck), (ConnectionStatus::Error, false));
        let d = next_status(&record(ConnectionStatus::Connected, 0, None), &fail(CheckCode::Timeout), &p);
        assert_eq!(d.status, ConnectionStatus::Degraded);
    }

    #[test]
    fn refusal_of_a_connection_that_is_not_healthy_is_error_at_once() {
        for status in [ConnectionStatus::Pending, ConnectionStatus::Error, ConnectionStatus::Expired] {
            for code in REFUSED {
                let d = next_status(&record(status, 0, None), &fail(code), &policy(2));
                assert_eq!((d.status, d.reason, d.recheck), (ConnectionStatus::Error, DecisionReason::Failed, false));
            }
        }
    }

    #[test]
    fn one_transient_failure_does_not_flip_a_healthy_connection() {
        for code in INCONCLUSIVE {
            for status in [ConnectionStatus::Connected, ConnectionStatus::Degraded] {
                let first = next_status(&record(status, 0, Some(SAFE)), &fail(code), &policy(2));
                assert_eq!((first.status, first.reason), (status, DecisionReason::Inconclusive), "{code:?}");
                assert!(!first.recheck, "{code:?}: transient failures wait for the next sweep");
                assert_eq!(first.consecutive_failures, 1);
                assert_eq!(first.permissions, None, "stored permissions are kept");

                let second = next_status(&record(status, 1, Some(SAFE)), &fail(code), &policy(2));
                assert_eq!((second.status, second.reason), (ConnectionStatus::Degraded, DecisionReason::Unreliable));
            }
        }
    }

    #[test]
    fn transient_failures_never_change_other_statuses() {
        for status in [ConnectionStatus::Pending, ConnectionStatus::Error, ConnectionStatus::Expired] {
            for code in INCONCLUSIVE {
                let d = next_status(&record(status, 7, None), &fail(code), &policy(2));
                assert_eq!((d.status, d.reason), (status, DecisionReason::Inconclusive), "{status} {code:?}");
                assert_eq!(d.consecutive_failures, 8);
            }
        }
    }

    #[test]
    fn an_ended_session_is_expired_from_any_status() {
        for status in ALL_STATUSES {
            let d = next_status(&record(status, 0, Some(SAFE)), &fail(CheckCode::SessionExpired), &policy(2));
            assert_eq!(
                (d.status, d.reason, d.recheck),
                (ConnectionStatus::Expired, DecisionReason::SessionExpired, false)
            );
        }
    }

    #[test]
    fn a_mixed_run_of_failures_counts_together() {
        // A timeout, then a refusal: two consecutive failed checks confirm the error.
        let after_timeout =
            next_status(&record(ConnectionStatus::Connected, 0, None), &fail(CheckCode::Timeout), &policy(2));
        assert_eq!(after_timeout.status, ConnectionStatus::Connected);
        let d = next_status(
            &record(ConnectionStatus::Connected, after_timeout.consecutive_failures, None),
            &fail(CheckCode::InvalidCredentials),
            &policy(2),
        );
        assert_eq!(d.status, ConnectionStatus::Error);
        // A recheck that times out: the connection is degraded, not in error.
        let d = next_status(&record(ConnectionStatus::Connected, 1, None), &fail(CheckCode::Timeout), &policy(2));
        assert_eq!(d.status, ConnectionStatus::Degraded);
    }

    #[test]
    fn refused_checks_keep_the_permissions_they_report() {
        let no_read = Permissions { read: false, ..SAFE };
        let mut check = fail(CheckCode::PermissionDenied);
        check.permissions = Some(no_read);
        let d = next_status(&record(ConnectionStatus::Connected, 1, Some(SAFE)), &check, &policy(2));
        assert_eq!(d.permissions, Some(no_read));
    }
}
