//! Configuration from environment variables (optionally loaded from a `.env` file by the binary).
//!
//! One struct per concern, declared with serde and read by [`from_env`] (or [`from_vars`] in
//! tests, which never touch the process environment). Each field is named after its variable,
//! `VARIABLE=default` when it has a default, and parsed to its final type here (URLs, addresses,
//! durations, the sweep schedule), so nothing downstream parses a setting again; a default goes
//! through the same parser as a set value. Empty values count as unset, as most deploy tooling
//! writes `X=` for "no value". Secrets are [`SecretString`]s, so a `Debug` of any config never
//! prints them, and are read as plain strings, so no parse error can echo them. The README's
//! configuration table lists exactly [`Config::variables`]; a test holds the two together.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Display;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, Error as _, IntoDeserializer, MapAccess, Visitor};
use url::Url;

use crate::exchanges::kraken::KrakenTier;
use crate::schedule::{SweepSchedule, parse_duration};

/// A configuration value that could not be used. The message names the variable and says what
/// is accepted; it never echoes a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl serde::de::Error for ConfigError {
    fn custom<T: Display>(reason: T) -> Self {
        Self { variable: "configuration", reason: reason.to_string() }
    }
}

/// Reads a configuration struct (a [`Config`] or one of its sections) from (variable, value)
/// pairs: tests pass their own and never touch the process environment.
pub fn from_vars<T: DeserializeOwned>(
    vars: impl IntoIterator<Item = (impl AsRef<str>, impl AsRef<str>)>,
) -> Result<T, ConfigError> {
    let values = vars
        .into_iter()
        .filter(|(_, value)| !value.as_ref().trim().is_empty())
        .map(|(name, value)| (name.as_ref().to_owned(), value.as_ref().trim().to_owned()))
        .collect();
    T::deserialize(&Vars { values, read: RefCell::default() })
}

/// Reads a configuration struct from the process environment.
pub fn from_env<T: DeserializeOwned>() -> Result<T, ConfigError> {
    from_vars(
        std::env::vars_os().filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?))),
    )
}

/// The non-empty (trimmed) variables a configuration is read from, and the fields read so far.
#[derive(Default)]
struct Vars {
    values: HashMap<String, String>,
    read: RefCell<Vec<&'static str>>,
}

/// `NAME` or `NAME=default`.
fn variable_and_default(field: &'static str) -> (&'static str, Option<&'static str>) {
    field.split_once('=').map_or((field, None), |(variable, default)| (variable, Some(default)))
}

impl<'de> Deserializer<'de> for &Vars {
    type Error = ConfigError;

    /// A struct's fields are variables (`NAME` or `NAME=default`) or, named in lower case,
    /// sections read from the same variables.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        let mut entries = Vec::new();
        for &field in fields {
            let (variable, default) = variable_and_default(field);
            if variable.bytes().any(|b| b.is_ascii_lowercase()) {
                entries.push((field, None));
                continue;
            }
            self.read.borrow_mut().push(field);
            if let Some(value) = self.values.get(variable).map(String::as_str).or(default) {
                entries.push((field, Some((variable, value.to_owned()))));
            }
        }
        visitor.visit_map(Fields { vars: self, entries: entries.into_iter(), value: None })
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ConfigError> {
        Err(ConfigError::custom("only structs are read from variables"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// A struct's fields with their values; `None` for a nested section.
struct Fields<'a> {
    vars: &'a Vars,
    entries: std::vec::IntoIter<(&'static str, Option<(&'static str, String)>)>,
    value: Option<(&'static str, String)>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = ConfigError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ConfigError> {
        let Some((field, value)) = self.entries.next() else { return Ok(None) };
        self.value = value;
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ConfigError> {
        match self.value.take() {
            Some((variable, value)) => seed.deserialize(Value(value)).map_err(|e| ConfigError { variable, ..e }),
            None => seed.deserialize(self.vars),
        }
    }
}

/// A variable's value: a string, also where an `Option` is expected (so that a secret read as an
/// `Option<SecretString>` can never be rejected, and quoted, as "not an option").
struct Value(String);

impl<'de> Deserializer<'de> for Value {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// Everything the binary needs, grouped by concern.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub database: DatabaseConfig,
    pub vault: VaultConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub exchanges: ExchangeEndpoints,
    pub egress: EgressConfig,
    pub worker: WorkerConfig,
    pub metrics: MetricsConfig,
    pub scheduler: SchedulerConfig,
}

impl Config {
    /// Every variable the configuration reads, with its default as one would write it.
    pub fn variables() -> Vec<(&'static str, Option<&'static str>)> {
        let vars = Vars::default();
        Self::deserialize(&vars).expect("the documented defaults are valid");
        vars.read.take().into_iter().map(variable_and_default).collect()
    }
}

/// The store and the job queue share one database.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    /// `DATABASE_URL` — `sqlite://path` (created on first run) or `postgres://…`.
    /// Default `sqlite://./data/tradeeon.db`. Kept secret because it may carry a password.
    #[serde(rename = "DATABASE_URL=sqlite://./data/tradeeon.db", deserialize_with = "database_url")]
    pub url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS` — pool size per process. Default 10.
    #[serde(rename = "DATABASE_MAX_CONNECTIONS=10", deserialize_with = "at_least::<_, _, 1>")]
    pub max_connections: u32,
    /// `MIGRATE_ON_START` — apply pending migrations when `serve`, `api` or `worker` start.
    /// Default true. Concurrent starts are safe: the migrator takes a lock.
    #[serde(rename = "MIGRATE_ON_START=true", deserialize_with = "flag")]
    pub migrate_on_start: bool,
    /// `DATABASE_APP_URL` — read by `tradeeon migrate` only (PostgreSQL): the URL the API and
    /// workers will connect with. Migrate, running as the tables' owner, makes that URL's user
    /// a login role with that URL's password and membership in `tradeeon_service`. No default.
    #[serde(rename = "DATABASE_APP_URL")]
    pub app_url: Option<SecretString>,
}

impl DatabaseConfig {
    pub fn is_sqlite(&self) -> bool {
        self.url.expose_secret().to_ascii_lowercase().starts_with("sqlite:")
    }

    /// The directory holding the SQLite database file (where the embedded default keeps its
    /// generated encryption key). `None` for PostgreSQL and in-memory SQLite.
    pub fn sqlite_dir(&self) -> Option<PathBuf> {
        if !self.is_sqlite() {
            return None;
        }
        let url = self.url.expose_secret();
        let path = url.split_once(':').map(|(_, rest)| rest).unwrap_or_default();
        let path = path.trim_start_matches("//");
        let path = path.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" || path.starts_with("memory") {
            return None;
        }
        let parent = PathBuf::from(path).parent().map(PathBuf::from).unwrap_or_default();
        Some(if parent.as_os_str().is_empty() { PathBuf::from(".") } else { parent })
    }
}

/// Keys for the credential vault.
#[derive(Debug, Clone, Deserialize)]
pub struct VaultConfig {
    /// `ENCRYPTION_KEY` — one or more Fernet keys, comma-separated; the first encrypts, all
    /// decrypt. Required with PostgreSQL. With SQLite and no key, `serve` generates one into
    /// `encryption.key` beside the database file (mode 0600) and warns. No default.
    #[serde(rename = "ENCRYPTION_KEY")]
    pub encryption_keys: Option<SecretString>,
}

/// Supabase authentication.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthConfig {
    /// `SUPABASE_URL` — the project URL; asymmetric tokens are verified against
    /// `SUPABASE_URL/auth/v1/.well-known/jwks.json`. No default.
    #[serde(rename = "SUPABASE_URL", default, deserialize_with = "http_url")]
    pub supabase_url: Option<Url>,
    /// `SUPABASE_JWT_SECRET` — the HS256 secret of the Supabase project. No default.
    #[serde(rename = "SUPABASE_JWT_SECRET")]
    pub jwt_secret: Option<SecretString>,
    /// `JWT_AUDIENCE` — the required `aud` claim. Default `authenticated`.
    #[serde(rename = "JWT_AUDIENCE=authenticated")]
    pub audience: String,
    /// `PORTAL_SIGNIN_URL` — the portal page the web UI sends a signed-out user to. It is given
    /// `redirect_to` and `state` and must send the user back to `redirect_to` with
    /// `#access_token=…&expires_in=…&state=…`; the UI accepts a token only with the `state` it
    /// issued. No default (the UI then has no way to sign in but the embedded default's links).
    #[serde(rename = "PORTAL_SIGNIN_URL", default, deserialize_with = "http_url")]
    pub portal_signin_url: Option<Url>,
    /// `REQUIRE_AAL2` — refuse writes (connecting, rotating, revoking, testing keys) unless the
    /// token says the user passed a second factor in this session (`aal` = `aal2`, Supabase MFA).
    /// Default false.
    #[serde(rename = "REQUIRE_AAL2=false", deserialize_with = "flag")]
    pub require_aal2: bool,
}

/// The HTTP listener of the API.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpConfig {
    /// `API_HOST` — address to bind. Default `127.0.0.1` (use `0.0.0.0` in containers).
    #[serde(rename = "API_HOST=127.0.0.1", deserialize_with = "parsed")]
    pub host: IpAddr,
    /// `API_PORT` — port to bind. Default 8000.
    #[serde(rename = "API_PORT=8000", deserialize_with = "at_least::<_, _, 0>")]
    pub port: u16,
    /// `CORS_ORIGINS` — comma-separated origins allowed to call the API from a browser, e.g.
    /// `https://app.tradeeon.com`, each kept in its ASCII serialization (as browsers send it).
    /// Default: none (same-origin only).
    #[serde(rename = "CORS_ORIGINS", default, deserialize_with = "origins")]
    pub cors_origins: Vec<String>,
    /// `TRUST_PROXY` — take the client address (for audit rows) from the last entry of
    /// `X-Forwarded-For`, the one the load balancer appends. Set it only behind a proxy that
    /// always sets the header (the ALB); otherwise clients could forge their address. Default
    /// false: the peer address of the TCP connection.
    #[serde(rename = "TRUST_PROXY=false", deserialize_with = "flag")]
    pub trust_proxy: bool,
    /// `API_USER_RATE_LIMIT_PER_MINUTE` — write requests (POST, DELETE) one user may make per
    /// minute; beyond it the API answers 429 with `Retry-After`. Default 60.
    #[serde(rename = "API_USER_RATE_LIMIT_PER_MINUTE=60", deserialize_with = "at_least::<_, _, 1>")]
    pub user_rate_limit_per_minute: u32,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    /// `LOG_FORMAT` — `pretty` (default) or `json` (one object per line, for CloudWatch Logs).
    /// Verbosity follows `RUST_LOG` (default `info`).
    #[serde(rename = "LOG_FORMAT=pretty", deserialize_with = "lowercase")]
    pub format: LogFormat,
}

/// Base URLs of the exchanges' APIs. Tests and `serve --simulate` point them at the simulator.
#[derive(Debug, Clone, Deserialize)]
pub struct ExchangeEndpoints {
    /// `BINANCE_BASE_URL` — default `https://api.binance.com` (testnet: `https://testnet.binance.vision`).
    #[serde(rename = "BINANCE_BASE_URL=https://api.binance.com", deserialize_with = "http_url")]
    pub binance: Url,
    /// `COINBASE_BASE_URL` — Coinbase Advanced Trade (CDP keys). Default `https://api.coinbase.com`.
    #[serde(rename = "COINBASE_BASE_URL=https://api.coinbase.com", deserialize_with = "http_url")]
    pub coinbase: Url,
    /// `COINBASE_EXCHANGE_BASE_URL` — Coinbase Exchange (key + secret + passphrase).
    /// Default `https://api.exchange.coinbase.com`.
    #[serde(rename = "COINBASE_EXCHANGE_BASE_URL=https://api.exchange.coinbase.com", deserialize_with = "http_url")]
    pub coinbase_exchange: Url,
    /// `KRAKEN_BASE_URL` — default `https://api.kraken.com`.
    #[serde(rename = "KRAKEN_BASE_URL=https://api.kraken.com", deserialize_with = "http_url")]
    pub kraken: Url,
    /// `KITE_BASE_URL` — Zerodha Kite Connect API. Default `https://api.kite.trade`.
    #[serde(rename = "KITE_BASE_URL=https://api.kite.trade", deserialize_with = "http_url")]
    pub kite: Url,
    /// `KITE_LOGIN_URL` — where users log in to Kite. Default `https://kite.zerodha.com/connect/login`.
    #[serde(rename = "KITE_LOGIN_URL=https://kite.zerodha.com/connect/login", deserialize_with = "http_url")]
    pub kite_login: Url,
}

/// The static egress addresses users must whitelist on their exchange API keys.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EgressConfig {
    /// `EGRESS_IPS` — comma-separated IP addresses (the NAT gateway's Elastic IPs). Default: none.
    #[serde(rename = "EGRESS_IPS", default, deserialize_with = "ip_list")]
    pub ips: Vec<IpAddr>,
}

/// Where the metrics go: Prometheus on listeners of their own, apart from the API's public port,
/// and (the workers') CloudWatch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MetricsConfig {
    /// `METRICS_PUBLISHER` — `cloudwatch` (default) or `none`. With `cloudwatch` the workers push
    /// their metrics to CloudWatch through the standard AWS configuration (`AWS_REGION`,
    /// credentials, `AWS_ENDPOINT_URL`); without a region publishing is off and says so once.
    #[serde(rename = "METRICS_PUBLISHER=cloudwatch", deserialize_with = "lowercase")]
    pub publisher: MetricsPublisher,
    /// `CLOUDWATCH_NAMESPACE` — the CloudWatch namespace. Default `Tradeeon/Connections`.
    #[serde(rename = "CLOUDWATCH_NAMESPACE=Tradeeon/Connections", deserialize_with = "cloudwatch_namespace")]
    pub cloudwatch_namespace: String,
    /// `METRICS_PUBLISH_INTERVAL` — how often to push to CloudWatch, in seconds (`60`, `60s`) or
    /// minutes (`2m`). Default 60 s; at least 1 s.
    #[serde(rename = "METRICS_PUBLISH_INTERVAL=60", deserialize_with = "publish_interval")]
    pub publish_interval: Duration,
    /// `WORKER_METRICS_PORT` — port of `tradeeon worker`'s own `/metrics` listener, on the
    /// `API_HOST` address. Default 9100.
    #[serde(rename = "WORKER_METRICS_PORT=9100", deserialize_with = "at_least::<_, _, 0>")]
    pub worker_port: u16,
    /// `API_METRICS_PORT` — port of the `/metrics` listener of `tradeeon api` and `tradeeon serve`
    /// (where it shows the workers' metrics too), on the `API_HOST` address. A port of its own:
    /// the load balancer forwards only `API_PORT`, so the metrics never face the internet.
    /// Default 9101.
    #[serde(rename = "API_METRICS_PORT=9101", deserialize_with = "at_least::<_, _, 0>")]
    pub api_port: u16,
}

/// `METRICS_PUBLISHER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsPublisher {
    CloudWatch,
    None,
}

pub const DEFAULT_CLOUDWATCH_NAMESPACE: &str = "Tradeeon/Connections";

/// The workers: exchange calls, rate limits and the health model.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerConfig {
    pub rate_limits: RateLimitConfig,
    /// `EXCHANGE_TIMEOUT_MS` — total time one exchange request may take before the check reports
    /// `timeout`. Default 15000 (15 s); at least 100.
    #[serde(rename = "EXCHANGE_TIMEOUT_MS=15000", deserialize_with = "millis::<_, 100>")]
    pub exchange_timeout: Duration,
    /// `REJECT_WITHDRAWAL_KEYS` — refuse API keys that can withdraw funds: their checks fail with
    /// `permission_denied` instead of passing with the `withdrawals_enabled` warning. Default false.
    #[serde(rename = "REJECT_WITHDRAWAL_KEYS=false", deserialize_with = "flag")]
    pub reject_withdrawal_keys: bool,
    /// `HEALTH_DEGRADED_LATENCY_MS` — a check slower than this marks the connection `degraded`.
    /// Default 2000.
    #[serde(rename = "HEALTH_DEGRADED_LATENCY_MS=2000", deserialize_with = "millis::<_, 1>")]
    pub health_degraded_latency: Duration,
    /// `HEALTH_FAILURE_THRESHOLD` — consecutive failed checks before a healthy connection becomes
    /// `error` (definitive failures) or `degraded` (transient ones). Default 2; at least 1.
    #[serde(rename = "HEALTH_FAILURE_THRESHOLD=2", deserialize_with = "at_least::<_, _, 1>")]
    pub health_failure_threshold: u32,
}

impl Default for WorkerConfig {
    /// The documented defaults.
    fn default() -> Self {
        from_vars([("", ""); 0]).expect("the documented defaults are valid")
    }
}

/// Our own request budgets per exchange bucket, shared by all jobs of one worker process. The
/// exchanges' answers (`Retry-After`, bans, Binance's used-weight headers) are honoured on top of
/// these, whatever they are set to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RateLimitConfig {
    /// `EXCHANGE_RATE_LIMITS` — `on` or `off`. `off` removes our own budgets (for benchmarks);
    /// pauses an exchange asks for are still honoured. Default on.
    #[serde(rename = "EXCHANGE_RATE_LIMITS=on", deserialize_with = "on_off")]
    pub enabled: bool,
    /// `BINANCE_WEIGHT_PER_MINUTE` — `/api` request weight per minute for our egress IP.
    /// Default 6000 (Binance's `REQUEST_WEIGHT` limit).
    #[serde(rename = "BINANCE_WEIGHT_PER_MINUTE=6000", deserialize_with = "at_least::<_, _, 1>")]
    pub binance_weight_per_minute: u32,
    /// `BINANCE_SAPI_WEIGHT_PER_MINUTE` — `/sapi` IP weight per minute. Default 12000.
    #[serde(rename = "BINANCE_SAPI_WEIGHT_PER_MINUTE=12000", deserialize_with = "at_least::<_, _, 1>")]
    pub binance_sapi_weight_per_minute: u32,
    /// `KRAKEN_TIER` — `starter`, `intermediate` or `pro`: the verification tier of the Kraken
    /// accounts, which sets the per-key call counter (maximum 15/20/20, decaying 0.33/0.5/1 per
    /// second). Default `starter` (the strictest).
    #[serde(rename = "KRAKEN_TIER=starter", deserialize_with = "lowercase")]
    pub kraken_tier: KrakenTier,
    /// `COINBASE_REQUESTS_PER_SECOND` — Coinbase Advanced Trade requests per second per key.
    /// Default 30.
    #[serde(rename = "COINBASE_REQUESTS_PER_SECOND=30", deserialize_with = "at_least::<_, _, 1>")]
    pub coinbase_requests_per_second: u32,
    /// `COINBASE_EXCHANGE_REQUESTS_PER_SECOND` — Coinbase Exchange requests per second per key
    /// (bursts of twice that, as Coinbase allows). Default 15.
    #[serde(rename = "COINBASE_EXCHANGE_REQUESTS_PER_SECOND=15", deserialize_with = "at_least::<_, _, 1>")]
    pub coinbase_exchange_requests_per_second: u32,
    /// `KITE_REQUESTS_PER_SECOND` — Zerodha Kite requests per second per API key. Default 10.
    #[serde(rename = "KITE_REQUESTS_PER_SECOND=10", deserialize_with = "at_least::<_, _, 1>")]
    pub kite_requests_per_second: u32,
}

/// The job runner and the health-sweep scheduler of `tradeeon worker` / `serve`.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// `HEALTH_SWEEP_INTERVAL` — how often every active connection is re-checked: an interval
    /// (`5m`, `300s`, `1h`) or a cron expression (`*/5 * * * *`, five or six fields, UTC).
    /// Default `5m`.
    #[serde(rename = "HEALTH_SWEEP_INTERVAL=5m", deserialize_with = "parsed")]
    pub sweep_schedule: SweepSchedule,
    /// `HEALTH_HISTORY_RETENTION_DAYS` — health-check history older than this is pruned.
    /// Default 30.
    #[serde(rename = "HEALTH_HISTORY_RETENTION_DAYS=30", deserialize_with = "days")]
    pub history_retention: Duration,
    /// `JOB_RETENTION_DAYS` — settled job records older than this are pruned. Default 7.
    #[serde(rename = "JOB_RETENTION_DAYS=7", deserialize_with = "days")]
    pub job_retention: Duration,
    /// `WORKER_CONCURRENCY` — jobs one worker process runs at once. Default 16.
    #[serde(rename = "WORKER_CONCURRENCY=16", deserialize_with = "at_least::<_, _, 1>")]
    pub concurrency: usize,
}

// The fields' parsers. Each takes the value as a string, so a type mismatch can never quote it,
// and says what it accepts; `database_url` alone sees a secret, and its message leaves it out.

fn with<'de, D: Deserializer<'de>, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error> {
    parse(&String::deserialize(d)?).map_err(D::Error::custom)
}

fn parsed<'de, D: Deserializer<'de>, T: FromStr<Err: std::fmt::Display>>(d: D) -> Result<T, D::Error> {
    with(d, |v| v.parse().map_err(|e: T::Err| e.to_string()))
}

/// An enum spelled in any case.
fn lowercase<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    T::deserialize(String::deserialize(d)?.to_ascii_lowercase().into_deserializer())
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    with(d, |v| match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    })
}

fn on_off<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    with(d, |v| match v.to_ascii_lowercase().as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, got {v:?}")),
    })
}

fn at_least<'de, D: Deserializer<'de>, T: TryFrom<u64>, const MIN: u64>(d: D) -> Result<T, D::Error> {
    with(d, |v| match v.parse::<u64>() {
        Ok(n) if n < MIN => Err(format!("must be at least {MIN}, got {v:?}")),
        Ok(n) => T::try_from(n).map_err(|_| format!("{v:?} is too large")),
        Err(_) => Err(format!("expected a whole number, got {v:?}")),
    })
}

fn millis<'de, D: Deserializer<'de>, const MIN: u64>(d: D) -> Result<Duration, D::Error> {
    at_least::<D, u64, MIN>(d).map(Duration::from_millis)
}

fn days<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    at_least::<D, u32, 1>(d).map(|n| Duration::from_secs(86_400 * u64::from(n)))
}

fn publish_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    with(d, |v| match parse_duration(&v.to_ascii_lowercase(), &[("", 1_000), ("s", 1_000), ("m", 60_000)]) {
        Some(interval) if interval >= Duration::from_secs(1) => Ok(interval),
        _ => Err(format!("expected whole seconds (60, 60s) or minutes (1m), at least 1s, got {v:?}")),
    })
}

/// An `http(s)` URL, for a `Url` or an `Option<Url>` field.
fn http_url<'de, D: Deserializer<'de>, T: From<Url>>(d: D) -> Result<T, D::Error> {
    with(d, |v| {
        let url = Url::parse(v).map_err(|e| format!("not a valid URL ({e})"))?;
        match url.scheme() {
            "http" | "https" => Ok(url.into()),
            other => Err(format!("expected an http(s) URL, got scheme {other:?}")),
        }
    })
}

fn database_url<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    let url = SecretString::deserialize(d)?;
    let scheme = url.expose_secret().split(':').next().unwrap_or_default().to_ascii_lowercase();
    match scheme.as_str() {
        "sqlite" | "postgres" | "postgresql" => Ok(url),
        _ => Err(D::Error::custom("expected sqlite://PATH or postgres://USER@HOST/DB")),
    }
}

fn comma_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    with(d, |v| comma_list(v).map(|ip| ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))).collect())
}

fn origins<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    with(d, |v| {
        comma_list(v)
            .map(|origin| {
                let url =
                    Url::parse(origin).map_err(|_| format!("{origin:?} is not an origin like https://example.com"))?;
                if url.path() != "/" || url.query().is_some() || origin.ends_with('/') {
                    return Err(format!("{origin:?} must be a bare origin (scheme://host[:port], no path)"));
                }
                Ok(url.origin().ascii_serialization())
            })
            .collect()
    })
}

/// CloudWatch's own rules, checked here so a typo fails at startup rather than every minute.
fn cloudwatch_namespace<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    with(d, |v| {
        let valid_chars = v.chars().all(|c| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c));
        if v.len() > 255 || !valid_chars || v.starts_with("AWS/") {
            return Err(format!(
                "expected at most 255 letters, digits or . - _ / # : (not starting with AWS/), got {v:?}"
            ));
        }
        Ok(v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        from_vars(vars.iter().copied())
    }

    #[test]
    fn defaults_are_the_documented_values() {
        let c = config(&[]).unwrap();
        assert_eq!(c.database.url.expose_secret(), "sqlite://./data/tradeeon.db");
        assert!(c.database.is_sqlite());
        assert_eq!(c.database.sqlite_dir(), Some(PathBuf::from("./data")));
        assert_eq!(c.http.host.to_string(), "127.0.0.1");
        assert_eq!(c.http.port, 8000);
        assert_eq!(c.auth.audience, "authenticated");
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.exchanges.binance.as_str(), "https://api.binance.com/");
        assert_eq!(c.exchanges.kite_login.as_str(), "https://kite.zerodha.com/connect/login");
        assert!(c.egress.ips.is_empty());
        assert!(c.vault.encryption_keys.is_none());
        assert!(!c.http.trust_proxy);
        assert_eq!(c.http.user_rate_limit_per_minute, 60);
        assert!(c.auth.portal_signin_url.is_none());
        assert!(matches!(c.scheduler.sweep_schedule, SweepSchedule::Every(d) if d == Duration::from_secs(300)));
        assert_eq!(c.scheduler.history_retention, Duration::from_secs(30 * 86_400));

        let c = c.metrics;
        assert_eq!(c.publisher, MetricsPublisher::CloudWatch);
        assert_eq!(c.cloudwatch_namespace, "Tradeeon/Connections");
        assert_eq!(c.cloudwatch_namespace, DEFAULT_CLOUDWATCH_NAMESPACE);
        assert_eq!(c.publish_interval, Duration::from_secs(60));
        assert_eq!(c.worker_port, 9100);
        assert_eq!(c.api_port, 9101);

        let c = WorkerConfig::default();
        assert!(c.rate_limits.enabled);
        assert_eq!(c.rate_limits.binance_weight_per_minute, 6_000);
        assert_eq!(c.rate_limits.binance_sapi_weight_per_minute, 12_000);
        assert_eq!(c.rate_limits.kraken_tier, KrakenTier::Starter);
        assert_eq!(c.rate_limits.coinbase_requests_per_second, 30);
        assert_eq!(c.rate_limits.coinbase_exchange_requests_per_second, 15);
        assert_eq!(c.rate_limits.kite_requests_per_second, 10);
        assert_eq!(c.exchange_timeout, Duration::from_secs(15));
        assert!(!c.reject_withdrawal_keys);
        assert_eq!(c.health_degraded_latency, Duration::from_secs(2));
        assert_eq!(c.health_failure_threshold, 2);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = config(&[("DATABASE_URL", ""), ("API_PORT", "  "), ("ENCRYPTION_KEY", "")]).unwrap();
        assert_eq!(c.database.url.expose_secret(), "sqlite://./data/tradeeon.db");
        assert_eq!(c.http.port, 8000);
        assert!(c.vault.encryption_keys.is_none());
    }

    #[test]
    fn unsupported_database_url_names_the_variable_without_echoing_it() {
        let err = config(&[("DATABASE_URL", "mysql://root:hunter2@db/x")]).unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("postgres://"), "{err}");
    }

    #[test]
    fn postgres_url_is_accepted_and_has_no_key_dir() {
        let c = config(&[("DATABASE_URL", "postgres://postgres@127.0.0.1/tradeeon")]).unwrap();
        assert!(!c.database.is_sqlite());
        assert_eq!(c.database.sqlite_dir(), None);
    }

    #[test]
    fn database_url_password_is_redacted_in_debug() {
        let c =
            config(&[("DATABASE_URL", "postgres://u:hunter2@db/x"), ("SUPABASE_JWT_SECRET", "s3cret-jwt")]).unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("s3cret-jwt"), "{debug}");
    }

    #[test]
    fn sqlite_dir_follows_the_database_file() {
        let c = config(&[("DATABASE_URL", "sqlite:///var/lib/tradeeon/db.sqlite?mode=rwc")]).unwrap();
        assert_eq!(c.database.sqlite_dir(), Some(PathBuf::from("/var/lib/tradeeon")));
        let c = config(&[("DATABASE_URL", "sqlite::memory:")]).unwrap();
        assert_eq!(c.database.sqlite_dir(), None);
        let c = config(&[("DATABASE_URL", "sqlite://tradeeon.db")]).unwrap();
        assert_eq!(c.database.sqlite_dir(), Some(PathBuf::from(".")));
    }

    #[test]
    fn values_are_parsed() {
        let c = config(&[
            ("EGRESS_IPS", " 52.1.2.3, 2600:1f18::1 "),
            ("CORS_ORIGINS", "https://app.tradeeon.com,http://localhost:5173"),
            ("API_PORT", "9000"),
            ("LOG_FORMAT", "json"),
            ("TRUST_PROXY", "true"),
            ("API_USER_RATE_LIMIT_PER_MINUTE", "120"),
            ("HEALTH_SWEEP_INTERVAL", "*/10 * * * *"),
        ])
        .unwrap();
        assert_eq!(c.egress.ips.len(), 2);
        assert_eq!(c.http.cors_origins, vec!["https://app.tradeeon.com", "http://localhost:5173"]);
        assert_eq!(c.http.port, 9000);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.http.trust_proxy);
        assert_eq!(c.http.user_rate_limit_per_minute, 120);
        assert!(matches!(c.scheduler.sweep_schedule, SweepSchedule::Cron(_)));

        let metrics = |vars: &[(&str, &str)]| from_vars::<MetricsConfig>(vars.iter().copied()).unwrap();
        let c = metrics(&[
            ("METRICS_PUBLISHER", "None"),
            ("CLOUDWATCH_NAMESPACE", "Tradeeon/Staging"),
            ("METRICS_PUBLISH_INTERVAL", "30s"),
            ("WORKER_METRICS_PORT", "9200"),
            ("API_METRICS_PORT", "9201"),
        ]);
        assert_eq!(c.publisher, MetricsPublisher::None);
        assert_eq!(c.cloudwatch_namespace, "Tradeeon/Staging");
        assert_eq!(c.publish_interval, Duration::from_secs(30));
        assert_eq!(c.worker_port, 9200);
        assert_eq!(c.api_port, 9201);
        assert_eq!(metrics(&[("METRICS_PUBLISH_INTERVAL", "90")]).publish_interval, Duration::from_secs(90));
        assert_eq!(metrics(&[("METRICS_PUBLISH_INTERVAL", "2m")]).publish_interval, Duration::from_secs(120));

        let c = from_vars::<WorkerConfig>([
            ("EXCHANGE_RATE_LIMITS", "OFF"),
            ("KRAKEN_TIER", "pro"),
            ("EXCHANGE_TIMEOUT_MS", "2500"),
            ("REJECT_WITHDRAWAL_KEYS", "true"),
            ("HEALTH_FAILURE_THRESHOLD", "3"),
        ])
        .unwrap();
        assert!(!c.rate_limits.enabled);
        assert_eq!(c.rate_limits.kraken_tier, KrakenTier::Pro);
        assert_eq!(c.exchange_timeout, Duration::from_millis(2500));
        assert!(c.reject_withdrawal_keys);
        assert_eq!(c.health_failure_threshold, 3);
    }

    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("EGRESS_IPS", "52.1.2.3,not-an-ip"),
            ("API_PORT", "eighty"),
            ("API_PORT", "70000"),
            ("API_METRICS_PORT", "-1"),
            ("LOG_FORMAT", "xml"),
            ("CORS_ORIGINS", "https://app.tradeeon.com/path"),
            ("BINANCE_BASE_URL", "ftp://example.com"),
            ("PORTAL_SIGNIN_URL", "javascript:alert(1)"),
            ("API_HOST", "localhost"),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            ("MIGRATE_ON_START", "maybe"),
            ("TRUST_PROXY", "sometimes"),
            ("API_USER_RATE_LIMIT_PER_MINUTE", "0"),
            ("API_USER_RATE_LIMIT_PER_MINUTE", "lots"),
            ("HEALTH_SWEEP_INTERVAL", "soon"),
            ("HEALTH_SWEEP_INTERVAL", "0s"),
            ("JOB_RETENTION_DAYS", "0"),
            ("WORKER_CONCURRENCY", "many"),
            ("METRICS_PUBLISHER", "prometheus"),
            ("CLOUDWATCH_NAMESPACE", "AWS/EC2"),
            ("CLOUDWATCH_NAMESPACE", "Tradeeon\\Connections"),
            ("METRICS_PUBLISH_INTERVAL", "0"),
            ("METRICS_PUBLISH_INTERVAL", "1h"),
            ("METRICS_PUBLISH_INTERVAL", "-5s"),
            ("WORKER_METRICS_PORT", "70000"),
            ("EXCHANGE_RATE_LIMITS", "maybe"),
            ("KRAKEN_TIER", "gold"),
            ("BINANCE_WEIGHT_PER_MINUTE", "0"),
            ("BINANCE_SAPI_WEIGHT_PER_MINUTE", "lots"),
            ("COINBASE_REQUESTS_PER_SECOND", "-1"),
            ("COINBASE_EXCHANGE_REQUESTS_PER_SECOND", "1.5"),
            ("KITE_REQUESTS_PER_SECOND", "0"),
            ("EXCHANGE_TIMEOUT_MS", "5"),
            ("REJECT_WITHDRAWAL_KEYS", "sometimes"),
            ("HEALTH_DEGRADED_LATENCY_MS", "slow"),
            ("HEALTH_FAILURE_THRESHOLD", "0"),
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{var}={value}: {err}");
        }
        // A section read on its own names the variable too, nested sections included.
        assert_eq!(
            from_vars::<MetricsConfig>([("WORKER_METRICS_PORT", "x")]).unwrap_err().variable,
            "WORKER_METRICS_PORT"
        );
        assert_eq!(from_vars::<WorkerConfig>([("KRAKEN_TIER", "gold")]).unwrap_err().variable, "KRAKEN_TIER");
    }

    /// README.md's configuration table is the operators' reference: it must name exactly the
    /// variables the code reads, each with the code's default (`—` for none).
    #[test]
    fn readme_table_matches_the_variables_the_code_reads() {
        let readme = include_str!("../../README.md");
        let section = readme.split("\n## Configuration\n").nth(1).expect("README has a Configuration section");
        let rows: Vec<(&str, Option<&str>)> = section
            .lines()
            .skip_while(|line| !line.starts_with("| variable | default |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`'), (cells[2] != "—").then(|| cells[2].trim_matches('`')))
            })
            .collect();
        let documented: BTreeMap<_, _> = rows.iter().copied().collect();
        assert_eq!(documented.len(), rows.len(), "a variable appears twice in README.md's table");
        let variables = Config::variables();
        let read: BTreeMap<_, _> = variables.iter().copied().collect();
        assert_eq!(read.len(), variables.len(), "two fields read the same variable: {variables:?}");
        let names: BTreeSet<_> = documented.keys().chain(read.keys()).collect();
        let show = |entry: Option<&Option<&str>>| match entry {
            None => "absent".to_owned(),
            Some(None) => "no default".to_owned(),
            Some(Some(default)) => format!("default {default:?}"),
        };
        let differences: Vec<String> = names
            .into_iter()
            .filter(|name| documented.get(*name) != read.get(*name))
            .map(|name| format!("{name}: README {}, code {}", show(documented.get(name)), show(read.get(name))))
            .collect();
        assert!(differences.is_empty(), "README.md's configuration table differs from the code:\n{differences:#?}");
    }
}
