//! Configuration from environment variables (optionally loaded from a `.env` file by the binary).
//!
//! One struct per concern. Every field's doc comment names its variable and default, and the
//! README's configuration table lists the same variables. Secrets are [`SecretString`]s so that a
//! `Debug` of any config never prints them.

use std::net::IpAddr;
use std::path::PathBuf;

use secrecy::SecretString;
use url::Url;

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
    let url = Url::parse(raw.trim())
        .map_err(|e| ConfigError::new(variable, format!("not a valid URL ({e})")))?;
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
            return Err(ConfigError::new(
                "DATABASE_URL",
                "expected sqlite://PATH or postgres://USER@HOST/DB",
            ));
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
                        ConfigError::new("CORS_ORIGINS", format!("{origin:?} is not an origin like https://example.com"))
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
        Ok(Self { host, port: parse_number(src, "API_PORT", 8000, 0)?, cors_origins })
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
                    ip.parse()
                        .map_err(|_| ConfigError::new("EGRESS_IPS", format!("{ip:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { ips })
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
        let c = config(&[("DATABASE_URL", "postgres://u:hunter2@db/x"), ("SUPABASE_JWT_SECRET", "s3cret-jwt")])
            .unwrap();
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
        ])
        .unwrap();
        assert_eq!(c.egress.ips.len(), 2);
        assert_eq!(c.http.cors_origins, vec!["https://app.tradeeon.com", "http://localhost:5173"]);
        assert_eq!(c.http.port, 9000);
        assert_eq!(c.log.format, LogFormat::Json);

        for (var, value) in [
            ("EGRESS_IPS", "52.1.2.3,not-an-ip"),
            ("API_PORT", "eighty"),
            ("API_PORT", "70000"),
            ("LOG_FORMAT", "xml"),
            ("CORS_ORIGINS", "https://app.tradeeon.com/path"),
            ("BINANCE_BASE_URL", "ftp://example.com"),
            ("API_HOST", "localhost"),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            ("MIGRATE_ON_START", "maybe"),
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
