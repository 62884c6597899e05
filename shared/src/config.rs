//! Configuration from environment variables (optionally loaded from a `.env` file by the binary).
//!
//! One struct per concern. Every field's doc comment names its variable and default, and the
//! README's configuration table lists the same variables. Secrets are [`SecretString`]s so that a
//! `Debug` of any config never prints them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use crate::exchanges::kraken::KrakenTier;
use crate::schedule::SweepSchedule;

/// A configuration value that could not be used. The message names the variable and says what
/// is accepted; it never echoes a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub reason: String,
}

impl ConfigError {
    fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self { variable, reason: reason.into() }
    }
}

/// Where configuration values come from. Production reads the process environment; tests pass
/// a map so they never touch (or race on) the real environment.
pub trait Source {
    fn get(&self, variable: &str) -> Option<String>;
}

/// The process environment. Empty values count as unset, as most deploy tooling writes `X=` for
/// "no value".
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, variable: &str) -> Option<String> {
        std::env::var(variable).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Source for std::collections::HashMap<&str, &str, S> {
    fn get(&self, variable: &str) -> Option<String> {
        self.get(variable).map(|v| v.to_string()).filter(|v| !v.trim().is_empty())
    }
}

fn parse_bool(src: &dyn Source, variable: &'static str, default: bool) -> Result<bool, ConfigError> {
    match src.get(variable) {
        None => Ok(default),
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::new(variable, format!("expected true or false, got {v:?}"))),
        },
    }
}

fn parse_number<T: std::str::FromStr>(
    src: &dyn Source,
    variable: &'static str,
    default: T,
    min: T,
) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    match src.get(variable) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            Ok(_) => Err(ConfigError::new(variable, format!("must be at least {min}, got {v:?}"))),
            Err(_) => Err(ConfigError::new(variable, format!("expected a whole number, got {v:?}"))),
        },
    }
}

fn parse_url(src: &dyn Source, variable: &'static str, default: &str) -> Result<Url, ConfigError> {
    let raw = src.get(variable).unwrap_or_else(|| default.to_string());
    let url = Url::parse(raw.trim()).map_err(|e| ConfigError::new(variable, format!("not a valid URL ({e})")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(ConfigError::new(variable, format!("expected an http(s) URL, got scheme {other:?}"))),
    }
}

fn comma_list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Everything the binary needs, grouped by concern.
#[derive(Debug, Clone)]
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
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&ProcessEnv)
    }

    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            database: DatabaseConfig::from_source(src)?,
            vault: VaultConfig::from_source(src),
            auth: AuthConfig::from_source(src)?,
            http: HttpConfig::from_source(src)?,
            log: LogConfig::from_source(src)?,
            exchanges: ExchangeEndpoints::from_source(src)?,
            egress: EgressConfig::from_source(src)?,
            worker: WorkerConfig::from_source(src)?,
            metrics: MetricsConfig::from_source(src)?,
            scheduler: SchedulerConfig::from_source(src)?,
        })
    }
}

/// The store and the job queue share one database.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL` — `sqlite://path` (created on first run) or `postgres://…`.
    /// Default `sqlite://./data/tradeeon.db`. Kept secret because it may carry a password.
    pub url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS` — pool size per process. Default 10.
    pub max_connections: u32,
    /// `MIGRATE_ON_START` — apply pending migrations when `serve`, `api` or `worker` start.
    /// Default true. Concurrent starts are safe: the migrator takes a lock.
    pub migrate_on_start: bool,
}

pub const DEFAULT_DATABASE_URL: &str = "sqlite://./data/tradeeon.db";

impl DatabaseConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let url = src.get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string());
        let url = url.trim().to_string();
        let scheme = url.split(':').next().unwrap_or_default().to_ascii_lowercase();
        if !matches!(scheme.as_str(), "sqlite" | "postgres" | "postgresql") {
            return Err(ConfigError::new("DATABASE_URL", "expected sqlite://PATH or postgres://USER@HOST/DB"));
        }
        Ok(Self {
            url: SecretString::from(url),
            max_connections: parse_number(src, "DATABASE_MAX_CONNECTIONS", 10, 1)?,
            migrate_on_start: parse_bool(src, "MIGRATE_ON_START", true)?,
        })
    }

    pub fn is_sqlite(&self) -> bool {
        use secrecy::ExposeSecret;
        self.url.expose_secret().to_ascii_lowercase().starts_with("sqlite:")
    }

    /// The directory holding the SQLite database file (where the embedded default keeps its
    /// generated encryption key). `None` for PostgreSQL and in-memory SQLite.
    pub fn sqlite_dir(&self) -> Option<PathBuf> {
        use secrecy::ExposeSecret;
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
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// `ENCRYPTION_KEY` — one or more Fernet keys, comma-separated; the first encrypts, all
    /// decrypt. Required with PostgreSQL. With SQLite and no key, `serve` generates one into
    /// `encryption.key` beside the database file (mode 0600) and warns.
    pub encryption_keys: Option<SecretString>,
}

impl VaultConfig {
    pub fn from_source(src: &dyn Source) -> Self {
        Self { encryption_keys: src.get("ENCRYPTION_KEY").map(SecretString::from) }
    }
}

/// Supabase authentication.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `SUPABASE_URL` — the project URL; asymmetric tokens are verified against
    /// `SUPABASE_URL/auth/v1/.well-known/jwks.json`. No default.
    pub supabase_url: Option<Url>,
    /// `SUPABASE_JWT_SECRET` — the HS256 secret of the Supabase project. No default.
    pub jwt_secret: Option<SecretString>,
    /// `JWT_AUDIENCE` — the required `aud` claim. Default `authenticated`.
    pub audience: String,
    /// `PORTAL_SIGNIN_URL` — the portal page the web UI sends a signed-out user to. It is given
    /// `redirect_to` and `state` and must send the user back to `redirect_to` with
    /// `#access_token=…&expires_in=…&state=…`; the UI accepts a token only with the `state` it
    /// issued. No default (the UI then has no way to sign in but the embedded default's links).
    pub portal_signin_url: Option<Url>,
}

impl AuthConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let supabase_url = match src.get("SUPABASE_URL") {
            None => None,
            Some(_) => Some(parse_url(src, "SUPABASE_URL", "")?),
        };
        Ok(Self {
            supabase_url,
            jwt_secret: src.get("SUPABASE_JWT_SECRET").map(SecretString::from),
            audience: src.get("JWT_AUDIENCE").unwrap_or_else(|| "authenticated".to_string()),
            portal_signin_url: match src.get("PORTAL_SIGNIN_URL") {
                None => None,
                Some(_) => Some(parse_url(src, "PORTAL_SIGNIN_URL", "")?),
            },
        })
    }
}

/// The HTTP listener of the API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `API_HOST` — address to bind. Default `127.0.0.1` (use `0.0.0.0` in containers).
    pub host: IpAddr,
    /// `API_PORT` — port to bind. Default 8000.
    pub port: u16,
    /// `CORS_ORIGINS` — comma-separated origins allowed to call the API from a browser, e.g.
    /// `https://app.tradeeon.com`. Default: none (same-origin only).
    pub cors_origins: Vec<String>,
    /// `TRUST_PROXY` — take the client address (for audit rows) from the last entry of
    /// `X-Forwarded-For`, the one the load balancer appends. Set it only behind a proxy that
    /// always sets the header (the ALB); otherwise clients could forge their address. Default
    /// false: the peer address of the TCP connection.
    pub trust_proxy: bool,
    /// `API_USER_RATE_LIMIT_PER_MINUTE` — write requests (POST, DELETE) one user may make per
    /// minute; beyond it the API answers 429 with `Retry-After`. Default 60.
    pub user_rate_limit_per_minute: u32,
}

impl HttpConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let host = match src.get("API_HOST") {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| ConfigError::new("API_HOST", format!("expected an IP address, got {v:?}")))?,
        };
        let cors_origins = match src.get("CORS_ORIGINS") {
            None => Vec::new(),
            Some(raw) => comma_list(&raw)
                .map(|origin| {
                    let url = Url::parse(origin).map_err(|_| {
                        ConfigError::new(
                            "CORS_ORIGINS",
                            format!("{origin:?} is not an origin like https://example.com"),
                        )
                    })?;
                    if url.path() != "/" || url.query().is_some() || origin.ends_with('/') {
                        return Err(ConfigError::new(
                            "CORS_ORIGINS",
                            format!("{origin:?} must be a bare origin (scheme://host[:port], no path)"),
                        ));
                    }
                    Ok(origin.to_string())
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            host,
            port: parse_number(src, "API_PORT", 8000, 0)?,
            cors_origins,
            trust_proxy: parse_bool(src, "TRUST_PROXY", false)?,
            user_rate_limit_per_minute: parse_number(src, "API_USER_RATE_LIMIT_PER_MINUTE", 60, 1)?,
        })
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `LOG_FORMAT` — `pretty` (default) or `json` (one object per line, for CloudWatch Logs).
    /// Verbosity follows `RUST_LOG` (default `info`).
    pub format: LogFormat,
}

impl LogConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let format = match src.get("LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new("LOG_FORMAT", format!("expected pretty or json, got {other:?}")));
            }
        };
        Ok(Self { format })
    }
}

/// Base URLs of the exchanges' APIs. Tests and `serve --simulate` point them at the simulator.
#[derive(Debug, Clone)]
pub struct ExchangeEndpoints {
    /// `BINANCE_BASE_URL` — default `https://api.binance.com` (testnet: `https://testnet.binance.vision`).
    pub binance: Url,
    /// `COINBASE_BASE_URL` — Coinbase Advanced Trade (CDP keys). Default `https://api.coinbase.com`.
    pub coinbase: Url,
    /// `COINBASE_EXCHANGE_BASE_URL` — Coinbase Exchange (key + secret + passphrase).
    /// Default `https://api.exchange.coinbase.com`.
    pub coinbase_exchange: Url,
    /// `KRAKEN_BASE_URL` — default `https://api.kraken.com`.
    pub kraken: Url,
    /// `KITE_BASE_URL` — Zerodha Kite Connect API. Default `https://api.kite.trade`.
    pub kite: Url,
    /// `KITE_LOGIN_URL` — where users log in to Kite. Default `https://kite.zerodha.com/connect/login`.
    pub kite_login: Url,
}

impl ExchangeEndpoints {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            binance: parse_url(src, "BINANCE_BASE_URL", "https://api.binance.com")?,
            coinbase: parse_url(src, "COINBASE_BASE_URL", "https://api.coinbase.com")?,
            coinbase_exchange: parse_url(src, "COINBASE_EXCHANGE_BASE_URL", "https://api.exchange.coinbase.com")?,
            kraken: parse_url(src, "KRAKEN_BASE_URL", "https://api.kraken.com")?,
            kite: parse_url(src, "KITE_BASE_URL", "https://api.kite.trade")?,
            kite_login: parse_url(src, "KITE_LOGIN_URL", "https://kite.zerodha.com/connect/login")?,
        })
    }
}

/// The static egress addresses users must whitelist on their exchange API keys.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    /// `EGRESS_IPS` — comma-separated IP addresses (the NAT gateway's Elastic IPs). Default: none.
    pub ips: Vec<IpAddr>,
}

impl EgressConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let ips = match src.get("EGRESS_IPS") {
            None => Vec::new(),
            Some(raw) => comma_list(&raw)
                .map(|ip| {
                    ip.parse().map_err(|_| ConfigError::new("EGRESS_IPS", format!("{ip:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { ips })
    }
}

/// Where the workers' metrics go: Prometheus on their own listener, and CloudWatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `METRICS_PUBLISHER` — `cloudwatch` (default) or `none`. With `cloudwatch` the workers push
    /// their metrics to CloudWatch through the standard AWS configuration (`AWS_REGION`,
    /// credentials, `AWS_ENDPOINT_URL`); without a region publishing is off and says so once.
    pub publisher: MetricsPublisher,
    /// `CLOUDWATCH_NAMESPACE` — the CloudWatch namespace. Default `Tradeeon/Connections`.
    pub cloudwatch_namespace: String,
    /// `METRICS_PUBLISH_INTERVAL` — how often to push to CloudWatch, in seconds (`60`, `60s`) or
    /// minutes (`2m`). Default 60 s; at least 1 s.
    pub publish_interval: Duration,
    /// `WORKER_METRICS_PORT` — port of `tradeeon worker`'s own `/metrics` listener, on the
    /// `API_HOST` address. Default 9100. (`tradeeon serve` shows the same metrics on the API's
    /// `/metrics`.)
    pub worker_port: u16,
}

/// `METRICS_PUBLISHER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsPublisher {
    CloudWatch,
    None,
}

pub const DEFAULT_CLOUDWATCH_NAMESPACE: &str = "Tradeeon/Connections";

impl MetricsConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let publisher = match src.get("METRICS_PUBLISHER").map(|v| v.trim().to_ascii_lowercase()) {
            None => MetricsPublisher::CloudWatch,
            Some(v) if v == "cloudwatch" => MetricsPublisher::CloudWatch,
            Some(v) if v == "none" => MetricsPublisher::None,
            Some(v) => {
                return Err(ConfigError::new("METRICS_PUBLISHER", format!("expected cloudwatch or none, got {v:?}")));
            }
        };
        let namespace = src.get("CLOUDWATCH_NAMESPACE").map(|v| v.trim().to_string());
        let cloudwatch_namespace = namespace.unwrap_or_else(|| DEFAULT_CLOUDWATCH_NAMESPACE.to_string());
        // CloudWatch's own rules, checked here so a typo fails at startup rather than every minute.
        let valid_chars = cloudwatch_namespace.chars().all(|c| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c));
        if cloudwatch_namespace.len() > 255 || !valid_chars || cloudwatch_namespace.starts_with("AWS/") {
            return Err(ConfigError::new(
                "CLOUDWATCH_NAMESPACE",
                format!(
                    "expected at most 255 letters, digits or . - _ / # : (not starting with AWS/), got {cloudwatch_namespace:?}"
                ),
            ));
        }
        let publish_interval = match src.get("METRICS_PUBLISH_INTERVAL") {
            None => Duration::from_secs(60),
            Some(raw) => {
                let v = raw.trim().to_ascii_lowercase();
                let (number, unit) = match v.strip_suffix('m') {
                    Some(n) => (n, 60),
                    None => (v.strip_suffix('s').unwrap_or(&v), 1),
                };
                match number.trim().parse::<u64>() {
                    Ok(n) if n >= 1 => Duration::from_secs(n.saturating_mul(unit)),
                    _ => {
                        return Err(ConfigError::new(
                            "METRICS_PUBLISH_INTERVAL",
                            format!("expected whole seconds (60, 60s) or minutes (1m), at least 1s, got {raw:?}"),
                        ));
                    }
                }
            }
        };
        Ok(Self {
            publisher,
            cloudwatch_namespace,
            publish_interval,
            worker_port: parse_number(src, "WORKER_METRICS_PORT", 9100, 0)?,
        })
    }
}

#[cfg(test)]
mod metrics_config_tests {
    use super::*;
    use std::collections::HashMap;

    fn metrics(vars: &[(&'static str, &'static str)]) -> Result<MetricsConfig, ConfigError> {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        MetricsConfig::from_source(&map)
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = metrics(&[]).unwrap();
        assert_eq!(c.publisher, MetricsPublisher::CloudWatch);
        assert_eq!(c.cloudwatch_namespace, "Tradeeon/Connections");
        assert_eq!(c.publish_interval, Duration::from_secs(60));
        assert_eq!(c.worker_port, 9100);
    }

    #[test]
    fn values_are_parsed_and_errors_name_the_variable() {
        let c = metrics(&[
            ("METRICS_PUBLISHER", "None"),
            ("CLOUDWATCH_NAMESPACE", "Tradeeon/Staging"),
            ("METRICS_PUBLISH_INTERVAL", "30s"),
            ("WORKER_METRICS_PORT", "9200"),
        ])
        .unwrap();
        assert_eq!(c.publisher, MetricsPublisher::None);
        assert_eq!(c.cloudwatch_namespace, "Tradeeon/Staging");
        assert_eq!(c.publish_interval, Duration::from_secs(30));
        assert_eq!(c.worker_port, 9200);
        assert_eq!(metrics(&[("METRICS_PUBLISH_INTERVAL", "90")]).unwrap().publish_interval, Duration::from_secs(90));
        assert_eq!(metrics(&[("METRICS_PUBLISH_INTERVAL", "2m")]).unwrap().publish_interval, Duration::from_secs(120));
        for (var, value) in [
            ("METRICS_PUBLISHER", "prometheus"),
            ("CLOUDWATCH_NAMESPACE", "AWS/EC2"),
            ("CLOUDWATCH_NAMESPACE", "Tradeeon\\Connections"),
            ("METRICS_PUBLISH_INTERVAL", "0"),
            ("METRICS_PUBLISH_INTERVAL", "1h"),
            ("METRICS_PUBLISH_INTERVAL", "-5s"),
            ("WORKER_METRICS_PORT", "70000"),
        ] {
            let err = metrics(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{var}={value}: {err}");
        }
    }
}

/// The workers: exchange calls, rate limits and the health model.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub rate_limits: RateLimitConfig,
    /// `EXCHANGE_TIMEOUT_MS` — total time one exchange request may take before the check reports
    /// `timeout`. Default 15000 (15 s); at least 100.
    pub exchange_timeout: Duration,
    /// `REJECT_WITHDRAWAL_KEYS` — refuse API keys that can withdraw funds: their checks fail with
    /// `permission_denied` instead of passing with the `withdrawals_enabled` warning. Default false.
    pub reject_withdrawal_keys: bool,
    /// `HEALTH_DEGRADED_LATENCY_MS` — a check slower than this marks the connection `degraded`.
    /// Default 2000.
    pub health_degraded_latency: Duration,
    /// `HEALTH_FAILURE_THRESHOLD` — consecutive failed checks before a healthy connection becomes
    /// `error` (definitive failures) or `degraded` (transient ones). Default 2; at least 1.
    pub health_failure_threshold: u32,
}

impl WorkerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        Ok(Self {
            rate_limits: RateLimitConfig::from_source(src)?,
            exchange_timeout: Duration::from_millis(parse_number(src, "EXCHANGE_TIMEOUT_MS", 15_000, 100)?),
            reject_withdrawal_keys: parse_bool(src, "REJECT_WITHDRAWAL_KEYS", false)?,
            health_degraded_latency: Duration::from_millis(parse_number(src, "HEALTH_DEGRADED_LATENCY_MS", 2_000, 1)?),
            health_failure_threshold: parse_number(src, "HEALTH_FAILURE_THRESHOLD", 2, 1)?,
        })
    }
}

impl Default for WorkerConfig {
    /// The documented defaults.
    fn default() -> Self {
        Self::from_source(&std::collections::HashMap::<&str, &str>::new()).expect("defaults are valid")
    }
}

/// Our own request budgets per exchange bucket, shared by all jobs of one worker process. The
/// exchanges' answers (`Retry-After`, bans, Binance's used-weight headers) are honoured on top of
/// these, whatever they are set to.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// `EXCHANGE_RATE_LIMITS` — `on` or `off`. `off` removes our own budgets (for benchmarks);
    /// pauses an exchange asks for are still honoured. Default on.
    pub enabled: bool,
    /// `BINANCE_WEIGHT_PER_MINUTE` — `/api` request weight per minute for our egress IP.
    /// Default 6000 (Binance's `REQUEST_WEIGHT` limit).
    pub binance_weight_per_minute: u32,
    /// `BINANCE_SAPI_WEIGHT_PER_MINUTE` — `/sapi` IP weight per minute. Default 12000.
    pub binance_sapi_weight_per_minute: u32,
    /// `KRAKEN_TIER` — `starter`, `intermediate` or `pro`: the verification tier of the Kraken
    /// accounts, which sets the per-key call counter (maximum 15/20/20, decaying 0.33/0.5/1 per
    /// second). Default `starter` (the strictest).
    pub kraken_tier: KrakenTier,
    /// `COINBASE_REQUESTS_PER_SECOND` — Coinbase Advanced Trade requests per second per key.
    /// Default 30.
    pub coinbase_requests_per_second: u32,
    /// `COINBASE_EXCHANGE_REQUESTS_PER_SECOND` — Coinbase Exchange requests per second per key
    /// (bursts of twice that, as Coinbase allows). Default 15.
    pub coinbase_exchange_requests_per_second: u32,
    /// `KITE_REQUESTS_PER_SECOND` — Zerodha Kite requests per second per API key. Default 10.
    pub kite_requests_per_second: u32,
}

impl RateLimitConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let enabled = match src.get("EXCHANGE_RATE_LIMITS").map(|v| v.trim().to_ascii_lowercase()) {
            None => true,
            Some(v) if v == "on" => true,
            Some(v) if v == "off" => false,
            Some(v) => return Err(ConfigError::new("EXCHANGE_RATE_LIMITS", format!("expected on or off, got {v:?}"))),
        };
        let kraken_tier = match src.get("KRAKEN_TIER").map(|v| v.trim().to_ascii_lowercase()) {
            None => KrakenTier::Starter,
            Some(v) if v == "starter" => KrakenTier::Starter,
            Some(v) if v == "intermediate" => KrakenTier::Intermediate,
            Some(v) if v == "pro" => KrakenTier::Pro,
            Some(v) => {
                return Err(ConfigError::new(
                    "KRAKEN_TIER",
                    format!("expected starter, intermediate or pro, got {v:?}"),
                ));
            }
        };
        Ok(Self {
            enabled,
            binance_weight_per_minute: parse_number(src, "BINANCE_WEIGHT_PER_MINUTE", 6_000, 1)?,
            binance_sapi_weight_per_minute: parse_number(src, "BINANCE_SAPI_WEIGHT_PER_MINUTE", 12_000, 1)?,
            kraken_tier,
            coinbase_requests_per_second: parse_number(src, "COINBASE_REQUESTS_PER_SECOND", 30, 1)?,
            coinbase_exchange_requests_per_second: parse_number(src, "COINBASE_EXCHANGE_REQUESTS_PER_SECOND", 15, 1)?,
            kite_requests_per_second: parse_number(src, "KITE_REQUESTS_PER_SECOND", 10, 1)?,
        })
    }
}

#[cfg(test)]
mod worker_config_tests {
    use super::*;
    use std::collections::HashMap;

    fn worker(vars: &[(&'static str, &'static str)]) -> Result<WorkerConfig, ConfigError> {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        WorkerConfig::from_source(&map)
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = worker(&[]).unwrap();
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
    fn values_are_parsed_and_errors_name_the_variable() {
        let c = worker(&[
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
        for (var, value) in [
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
            let err = worker(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{var}={value}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::collections::HashMap;

    fn config(vars: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        Config::from_source(&map)
    }

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = config(&[]).unwrap();
        assert_eq!(c.database.url.expose_secret(), DEFAULT_DATABASE_URL);
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
    fn lists_and_numbers_are_parsed_and_checked() {
        let c = config(&[
            ("EGRESS_IPS", " 52.1.2.3, 2600:1f18::1 "),
            ("CORS_ORIGINS", "https://app.tradeeon.com,http://localhost:5173"),
            ("API_PORT", "9000"),
            ("LOG_FORMAT", "json"),
            ("TRUST_PROXY", "true"),
            ("API_USER_RATE_LIMIT_PER_MINUTE", "120"),
        ])
        .unwrap();
        assert_eq!(c.egress.ips.len(), 2);
        assert_eq!(c.http.cors_origins, vec!["https://app.tradeeon.com", "http://localhost:5173"]);
        assert_eq!(c.http.port, 9000);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.http.trust_proxy);
        assert_eq!(c.http.user_rate_limit_per_minute, 120);

        for (var, value) in [
            ("EGRESS_IPS", "52.1.2.3,not-an-ip"),
            ("API_PORT", "eighty"),
            ("API_PORT", "70000"),
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
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{var}={value}: {err}");
        }
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
}

/// The job runner and the health-sweep scheduler of `tradeeon worker` / `serve`.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// `HEALTH_SWEEP_INTERVAL` — how often every active connection is re-checked: an interval
    /// (`5m`, `300s`, `1h`) or a cron expression (`*/5 * * * *`, five or six fields, UTC).
    /// Default `5m`.
    pub sweep_schedule: SweepSchedule,
    /// `HEALTH_HISTORY_RETENTION_DAYS` — health-check history older than this is pruned.
    /// Default 30.
    pub history_retention: Duration,
    /// `JOB_RETENTION_DAYS` — settled job records older than this are pruned. Default 7.
    pub job_retention: Duration,
    /// `WORKER_CONCURRENCY` — jobs one worker process runs at once. Default 16.
    pub concurrency: usize,
}

impl SchedulerConfig {
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let day = Duration::from_secs(86_400);
        Ok(Self {
            sweep_schedule: src.get("HEALTH_SWEEP_INTERVAL").as_deref().unwrap_or("5m").parse().map_err(
                |e: crate::schedule::ScheduleParseError| ConfigError::new("HEALTH_SWEEP_INTERVAL", e.to_string()),
            )?,
            history_retention: day * parse_number(src, "HEALTH_HISTORY_RETENTION_DAYS", 30u32, 1)?,
            job_retention: day * parse_number(src, "JOB_RETENTION_DAYS", 7u32, 1)?,
            concurrency: parse_number(src, "WORKER_CONCURRENCY", 16usize, 1)?,
        })
    }
}
