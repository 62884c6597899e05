//! What the API sends and accepts: request bodies and response shapes, each with its OpenAPI
//! schema. Responses are built from the store's records here, so that a field added to a record
//! never reaches clients (or the document) by accident, and no secret ever does.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tradeeon_shared::domain::{AuditAction, ConnectionStatus, Exchange, Features, Permissions};
use tradeeon_shared::exchanges::{CheckCode, CheckResult};
use tradeeon_shared::jobs::{JobKind, JobRecord, JobStatus};
use tradeeon_shared::store::{AuditEntry, ConnectionRecord, HealthEntry};
use tradeeon_shared::vault::SecretValue;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use uuid::Uuid;

/// A string schema restricted to `values`.
fn string_enum(values: &[&'static str]) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values.iter().copied())).into()
}

fn exchange_schema() -> RefOr<Schema> {
    string_enum(&Exchange::ALL.iter().map(|e| e.as_str()).collect::<Vec<_>>())
}
fn connection_status_schema() -> RefOr<Schema> {
    string_enum(&ConnectionStatus::ALL.iter().map(|e| e.as_str()).collect::<Vec<_>>())
}
fn audit_action_schema() -> RefOr<Schema> {
    string_enum(&AuditAction::ALL.iter().map(|e| e.as_str()).collect::<Vec<_>>())
}
/// What `POST /connections` and `POST /connections/test` accept: the exchanges connected with a
/// static API key (Zerodha has its own login flow).
fn static_key_exchange_schema() -> RefOr<Schema> {
    string_enum(&Exchange::ALL.iter().filter(|e| **e != Exchange::Zerodha).map(|e| e.as_str()).collect::<Vec<_>>())
}
fn job_kind_schema() -> RefOr<Schema> {
    string_enum(&JobKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>())
}
fn job_status_schema() -> RefOr<Schema> {
    string_enum(&[JobStatus::Queued, JobStatus::Running, JobStatus::Done, JobStatus::Failed].map(JobStatus::as_str))
}
fn check_code_schema() -> RefOr<Schema> {
    string_enum(&CheckCode::ALL.map(CheckCode::as_str))
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// New credentials for an exchange (`POST /connections`, `POST /connections/test`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionRequest {
    /// `binance`, `coinbase` or `kraken`. Zerodha connects through `/connections/zerodha/login`
    /// (sent here, it answers `400 use_zerodha_login`).
    #[schema(schema_with = static_key_exchange_schema)]
    pub exchange: String,
    /// The API key (Coinbase CDP: the key name `organizations/{org}/apiKeys/{id}`). At most 4096 bytes.
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_key: SecretValue,
    /// The API secret (Coinbase CDP: the private key, PEM or base64 Ed25519; Kraken: base64).
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_secret: SecretValue,
    /// Coinbase Exchange keys' passphrase, or a Kraken key's two-factor password. Not for Binance.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, max_length = 4096)]
    pub passphrase: Option<SecretValue>,
    /// A name for the connection, at most 100 characters.
    #[serde(default)]
    #[schema(max_length = 100)]
    pub nickname: Option<String>,
}

/// Replacement credentials for a connection (`POST /connections/{id}/rotate`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_key: SecretValue,
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_secret: SecretValue,
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, max_length = 4096)]
    pub passphrase: Option<SecretValue>,
}

/// A Kite Connect app's credentials (`POST /connections/zerodha/login`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ZerodhaLoginRequest {
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_key: SecretValue,
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub api_secret: SecretValue,
}

/// What Kite's redirect brought back (`POST /connections/zerodha/session`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ZerodhaSessionRequest {
    /// The `request_token` query parameter of Kite's redirect.
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 4096)]
    pub request_token: SecretValue,
    /// The `state` query parameter of Kite's redirect, as `/connections/zerodha/login` issued it.
    #[schema(min_length = 1)]
    pub state: String,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// What the user has the connection enabled for.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct FeaturesView {
    pub trading: bool,
    pub wallet: bool,
    pub paper: bool,
}

impl From<Features> for FeaturesView {
    fn from(f: Features) -> Self {
        Self { trading: f.trading, wallet: f.wallet, paper: f.paper }
    }
}

/// What the exchange reported the key may do.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct PermissionsView {
    pub read: bool,
    pub trade: bool,
    pub withdraw: bool,
    pub ip_restricted: bool,
}

impl From<Permissions> for PermissionsView {
    fn from(p: Permissions) -> Self {
        Self { read: p.read, trade: p.trade, withdraw: p.withdraw, ip_restricted: p.ip_restricted }
    }
}

/// One exchange connection. Never carries a secret, encrypted or not.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Connection)]
pub struct ConnectionView {
    pub id: Uuid,
    #[schema(schema_with = exchange_schema)]
    pub exchange: Exchange,
    pub nickname: Option<String>,
    #[schema(schema_with = connection_status_schema)]
    pub status: ConnectionStatus,
    pub status_message: Option<String>,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub last_latency_ms: Option<i32>,
    pub features: FeaturesView,
    /// `null` until a check has run.
    pub permissions: Option<PermissionsView>,
    /// The last four characters of the API key, e.g. `…WXYZ`.
    pub api_key_hint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<ConnectionRecord> for ConnectionView {
    fn from(r: ConnectionRecord) -> Self {
        Self {
            id: r.id.0,
            exchange: r.exchange,
            nickname: r.nickname,
            status: r.status,
            status_message: r.status_message,
            last_checked_at: r.last_checked_at,
            last_latency_ms: r.last_latency_ms,
            features: r.features.into(),
            permissions: r.permissions.map(Into::into),
            api_key_hint: r.api_key_hint.map(|h| h.as_str().to_owned()),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The verdict of a credential check.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = CheckResult)]
pub struct CheckResultView {
    pub ok: bool,
    #[schema(schema_with = check_code_schema)]
    pub code: CheckCode,
    pub message: String,
    pub latency_ms: u64,
    pub permissions: Option<PermissionsView>,
    /// E.g. `withdrawals_enabled`, `no_ip_restriction`.
    pub warnings: Vec<String>,
}

impl From<CheckResult> for CheckResultView {
    fn from(r: CheckResult) -> Self {
        Self {
            ok: r.ok,
            code: r.code,
            message: r.message,
            latency_ms: r.latency_ms,
            permissions: r.permissions.map(Into::into),
            warnings: r.warnings,
        }
    }
}

/// A job: `done` means it ran and `result` holds the verdict (which may be a failed check);
/// `failed` means it could not be carried out and `error` says why.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    /// A ULID.
    #[schema(example = "01JD5W5YB2Z9N0E0P7K3V8Q4RT")]
    pub id: String,
    #[schema(schema_with = job_kind_schema)]
    pub kind: JobKind,
    #[schema(schema_with = job_status_schema)]
    pub status: JobStatus,
    pub connection_id: Option<Uuid>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<CheckResultView>,
    pub error: Option<String>,
}

impl From<JobRecord> for JobView {
    fn from(r: JobRecord) -> Self {
        Self {
            id: r.id.to_string(),
            kind: r.kind,
            status: r.status,
            connection_id: r.connection_id.map(|c| c.0),
            attempts: r.attempts,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            result: r.result.map(Into::into),
            error: r.error,
        }
    }
}

/// One audit log row.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = AuditEntry)]
pub struct AuditEntryView {
    pub id: Uuid,
    pub connection_id: Option<Uuid>,
    #[schema(schema_with = audit_action_schema)]
    pub action: AuditAction,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    /// Free-form JSON about the event (never a secret), or `null`.
    #[schema(value_type = Option<Object>)]
    pub details: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl From<AuditEntry> for AuditEntryView {
    fn from(e: AuditEntry) -> Self {
        Self {
            id: e.id,
            connection_id: e.connection_id.map(|c| c.0),
            action: e.action,
            ip_address: e.ip_address.map(|ip| ip.to_string()),
            user_agent: e.user_agent,
            details: e.details,
            created_at: e.created_at,
        }
    }
}

/// One recorded health check of a connection.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = HealthEntry)]
pub struct HealthEntryView {
    pub checked_at: DateTime<Utc>,
    /// The status the check found.
    #[schema(schema_with = connection_status_schema)]
    pub status: ConnectionStatus,
    /// The check's outcome as a stable code (the job result codes, e.g. `invalid_credentials`).
    pub code: Option<String>,
    pub latency_ms: Option<i32>,
    /// A short human-readable explanation, never a secret.
    pub message: Option<String>,
}

impl From<HealthEntry> for HealthEntryView {
    fn from(e: HealthEntry) -> Self {
        Self { checked_at: e.checked_at, status: e.status, code: e.code, latency_ms: e.latency_ms, message: e.message }
    }
}

/// `202` of `POST /connections`: the saved connection (status `pending`) and its `verify` job.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionAccepted {
    pub connection: ConnectionView,
    pub job: JobView,
}

/// `202` of the endpoints that only enqueue a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub job: JobView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub message: String,
}

/// `200` of `POST /connections/zerodha/login`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ZerodhaLoginView {
    /// Send the user here to log in to Kite; Kite redirects back with `request_token` and `state`.
    pub login_url: String,
    /// Opaque, single-use, valid for 10 minutes, bound to the user and the connection.
    pub state: String,
}

/// The static egress addresses to whitelist on exchange API keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct EgressView {
    #[schema(example = json!(["52.1.2.3"]))]
    pub ips: Vec<String>,
}

/// One credential field an exchange needs.
#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialField {
    /// The request field: `api_key`, `api_secret` or `passphrase`.
    pub name: &'static str,
    pub label: &'static str,
    pub required: bool,
    pub help: &'static str,
}

/// A supported exchange and what connecting it takes.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExchangeInfo {
    #[schema(schema_with = exchange_schema)]
    pub id: Exchange,
    pub name: &'static str,
    /// `api_key`: submit the fields to `POST /connections`; `oauth`: start at
    /// `POST /connections/zerodha/login`.
    #[schema(example = "api_key")]
    pub connect_flow: &'static str,
    pub fields: Vec<CredentialField>,
    /// How to create a key on the exchange.
    pub docs_url: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthView {
    #[schema(example = "ok")]
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyView {
    #[schema(example = "ready")]
    pub status: &'static str,
    #[schema(example = "PostgreSQL")]
    pub database: String,
}
