//! Jobs: what the API enqueues and the workers run.
//!
//! Every job has a record in `tradeeon_jobs` — the source of truth for `GET /jobs/{id}` — and a
//! ticket on the apalis queue that wakes a worker. The ticket carries only the job id; the
//! payload (with credentials as Fernet tokens, never plaintext) lives on the record and is wiped
//! when the job finishes, so finished jobs keep no ciphertext either.
//!
//! Job kinds and their retry policy:
//!
//! | kind | what it does | retried |
//! | --- | --- | --- |
//! | `test` | checks credentials that are not stored | transient codes, up to [`MAX_ATTEMPTS`] |
//! | `verify` | checks a newly saved connection and records its status | same |
//! | `rotate` | checks new credentials, swaps them in only if they pass | same |
//! | `health_check` | scheduled re-check of a stored connection | never (the next sweep is the retry) |
//! | `kite_session` | exchanges a Kite `request_token` for an access token | same as `test` |
//!
//! Transient codes are `rate_limited`, `exchange_unavailable` and `timeout`; definitive verdicts
//! (bad key, bad signature, …) are never retried. Retries back off as [`RetryPolicy::JOB`] says, by
//! rescheduling the ticket, because apalis's SQL backends retry immediately.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::domain::{ConnectionId, Exchange, UserId};
use crate::exchanges::CheckResult;
use crate::retry::RetryPolicy;
use crate::store::EncryptedCredentials;

/// The apalis queue every ticket goes to.
pub const QUEUE: &str = "tradeeon";

/// Attempts before a job with a transient failure is settled with its last result.
pub const MAX_ATTEMPTS: i32 = RetryPolicy::JOB.max_attempts;

/// A job's id: a ULID we assign ourselves (apalis's `push` returns none), also used as the
/// apalis task id of the job's first ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Ulid);

impl JobId {
    pub fn new() -> Self {
        Self(Ulid::generate())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = ulid::DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(s).map(Self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Test,
    Verify,
    Rotate,
    HealthCheck,
    KiteSession,
}

impl JobKind {
    pub const ALL: [JobKind; 5] =
        [JobKind::Test, JobKind::Verify, JobKind::Rotate, JobKind::HealthCheck, JobKind::KiteSession];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Test => "test",
            JobKind::Verify => "verify",
            JobKind::Rotate => "rotate",
            JobKind::HealthCheck => "health_check",
            JobKind::KiteSession => "kite_session",
        }
    }

    /// Kinds that change a connection's credentials or status from a user's request: at most one
    /// of them may be queued or running per connection.
    pub fn changes_connection(self) -> bool {
        matches!(self, JobKind::Verify | JobKind::Rotate | JobKind::KiteSession)
    }

    /// Whether a transient failure is retried (health checks are not: the next sweep is).
    pub fn retries_transient_failures(self) -> bool {
        self != JobKind::HealthCheck
    }
}

/// A stored job kind or status that this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownValue {
    what: &'static str,
    value: String,
}

impl FromStr for JobKind {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownValue { what: "job kind", value: s.chars().take(32).collect() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker (also between retries).
    Queued,
    /// A worker has it.
    Running,
    /// It ran; `result` holds the verdict, which may be a failed credential check.
    Done,
    /// It could not be carried out; `error` says why.
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
        }
    }
}

impl FromStr for JobStatus {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [JobStatus::Queued, JobStatus::Running, JobStatus::Done, JobStatus::Failed]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownValue { what: "job status", value: s.chars().take(32).collect() })
    }
}

/// Who asked for a `test` job. Its `tested` audit entry is written when the job settles, in the
/// same statement (transaction, on SQLite), with the verdict: the request itself writes only the job record and its
/// ticket (`POST /connections/test` is the endpoint the portal's "Test" button hammers), and the
/// entry says what the test found, not just that one was asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub ip_address: Option<std::net::IpAddr>,
    pub user_agent: Option<String>,
}

/// What a job needs to run. Credentials appear only as Fernet tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobPayload {
    /// Check credentials that are not stored anywhere else. `requested_by`: the request's
    /// client, for the `tested` audit entry written when the job settles (see
    /// [`Requester`]); `None` for jobs enqueued without one (and by earlier releases, which
    /// audited at request time).
    Test {
        exchange: Exchange,
        credentials: EncryptedCredentials,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_by: Option<Requester>,
    },
    /// Check the stored credentials of a connection, as of `credentials_version` (a result for
    /// older credentials is never applied to newer ones).
    Verify { connection_id: ConnectionId, credentials_version: i32 },
    /// Check `credentials`; if they pass, swap them in unless the connection's credentials moved
    /// past `expected_version` meanwhile.
    Rotate {
        connection_id: ConnectionId,
        expected_version: i32,
        credentials: EncryptedCredentials,
        api_key_hint: String,
    },
    /// Scheduled re-check of a stored connection.
    HealthCheck { connection_id: ConnectionId },
    /// Exchange a Kite `request_token` (a Fernet token here) for an access token.
    KiteSession { connection_id: ConnectionId, request_token: String },
}

impl JobPayload {
    pub fn kind(&self) -> JobKind {
        match self {
            JobPayload::Test { .. } => JobKind::Test,
            JobPayload::Verify { .. } => JobKind::Verify,
            JobPayload::Rotate { .. } => JobKind::Rotate,
            JobPayload::HealthCheck { .. } => JobKind::HealthCheck,
            JobPayload::KiteSession { .. } => JobKind::KiteSession,
        }
    }

    pub fn connection_id(&self) -> Option<ConnectionId> {
        match self {
            JobPayload::Test { .. } => None,
            JobPayload::Verify { connection_id, .. }
            | JobPayload::Rotate { connection_id, .. }
            | JobPayload::HealthCheck { connection_id }
            | JobPayload::KiteSession { connection_id, .. } => Some(*connection_id),
        }
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    /// Whose job it is; `GET /jobs/{id}` shows it only to them.
    pub user_id: UserId,
    pub exchange: Exchange,
    pub payload: JobPayload,
    /// At most one job per key is ever enqueued (scheduled sweeps use one per connection and
    /// slot, so several scheduler processes enqueue each check once).
    pub idempotency_key: Option<String>,
    /// Not before this time (spreads a sweep over its interval). `None`: now.
    pub run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    pub fn new(user_id: UserId, exchange: Exchange, payload: JobPayload) -> Self {
        Self { id: JobId::new(), user_id, exchange, payload, idempotency_key: None, run_at: None }
    }
}

/// A job as `GET /jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    pub id: JobId,
    pub kind: JobKind,
    pub status: JobStatus,
    pub connection_id: Option<ConnectionId>,
    pub exchange: Exchange,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<CheckResult>,
    pub error: Option<String>,
}

/// A job a worker has claimed: its record and its payload.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub record: JobRecord,
    pub user_id: UserId,
    pub payload: JobPayload,
}

/// How a run of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The job reached a verdict (possibly a failed check).
    Done(CheckResult),
    /// It could not be carried out (e.g. its connection was revoked meanwhile).
    Failed(String),
}

/// The apalis task arguments: just the id of the job record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTicket {
    pub job_id: JobId,
}

/// The apalis task id of one ticket. The worker acknowledges a ticket itself — the statement
/// that settles or reschedules its job also deletes it — so it must say which ticket ran.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TicketId(pub String);

impl std::fmt::Display for TicketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_serialize_with_their_kind_and_no_plaintext() {
        let payload = JobPayload::Test {
            exchange: Exchange::Binance,
            credentials: EncryptedCredentials {
                api_key: "gAAAAA-key".into(),
                api_secret: "gAAAAA-secret".into(),
                passphrase: None,
            },
            requested_by: None,
        };
        let json = serde_json::to_value(&payload).unwrap();
        assert_eq!(json["kind"], "test");
        assert_eq!(payload.kind(), JobKind::Test);
        let back: JobPayload = serde_json::from_value(json).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn kinds_round_trip_their_names() {
        for kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>().unwrap(), kind);
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
