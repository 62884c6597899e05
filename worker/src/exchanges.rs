//! Every exchange client, built once per worker process from configuration and shared by all
//! jobs: one HTTP client, one rate gate ([`RateLimits`]) and one Kraken nonce source.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tradeeon_shared::config::{ExchangeEndpoints, WorkerConfig};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::binance::BinanceClient;
use tradeeon_shared::exchanges::coinbase::CoinbaseClient;
use tradeeon_shared::exchanges::kite::{KiteClient, KiteSession};
use tradeeon_shared::exchanges::kraken::{KrakenClient, LocalNonces, NonceLease, NonceSource};
use tradeeon_shared::exchanges::{ClientContext, Credentials, ExchangeClient, Failure, RateGate, Verdict, http_client};
use tradeeon_shared::store::{Backend, Store};
use tradeeon_shared::vault::SecretValue;
use url::Url;

use crate::limits::RateLimits;

/// The four exchange clients.
pub struct ExchangeClients {
    binance: BinanceClient,
    coinbase: CoinbaseClient,
    kraken: KrakenClient,
    kite: KiteClient,
    limits: Arc<RateLimits>,
}

impl fmt::Debug for ExchangeClients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeClients")
            .field("binance", &self.binance)
            .field("coinbase", &self.coinbase)
            .field("kraken", &self.kraken)
            .field("kite", &self.kite)
            .finish_non_exhaustive()
    }
}

impl ExchangeClients {
    /// Clients for `endpoints` with the timeout, rate limits and Kraken tier of `config`, and
    /// Kraken nonces that `store` coordinates across processes (PostgreSQL) or that this process
    /// keeps in memory (SQLite, where one process runs the workers).
    pub fn for_store(endpoints: &ExchangeEndpoints, config: &WorkerConfig, store: &Store) -> anyhow::Result<Self> {
        let nonces: Arc<dyn NonceSource> = match store.backend() {
            Backend::Postgres => Arc::new(DatabaseNonces::new(store.clone())),
            Backend::Sqlite => Arc::new(LocalNonces::new()),
        };
        let limits = Arc::new(RateLimits::new(&config.rate_limits));
        Self::new(endpoints, config, limits, nonces)
    }

    /// Clients sharing `limits` and `nonces`.
    pub fn new(
        endpoints: &ExchangeEndpoints,
        config: &WorkerConfig,
        limits: Arc<RateLimits>,
        nonces: Arc<dyn NonceSource>,
    ) -> anyhow::Result<Self> {
        let http = http_client(config.exchange_timeout)?;
        let gate: Arc<dyn RateGate> = limits.clone();
        let ctx = ClientContext { http, gate };
        Ok(Self {
            binance: BinanceClient::new(ctx.clone(), endpoints.binance.clone()),
            coinbase: CoinbaseClient::new(ctx.clone(), endpoints.coinbase.clone(), endpoints.coinbase_exchange.clone()),
            kraken: KrakenClient::new(ctx.clone(), endpoints.kraken.clone(), nonces)
                .with_tier(config.rate_limits.kraken_tier),
            kite: KiteClient::new(ctx, endpoints.kite.clone(), endpoints.kite_login.clone()),
            limits,
        })
    }

    /// The rate gate (for its wait counters).
    pub fn limits(&self) -> &Arc<RateLimits> {
        &self.limits
    }

    fn client(&self, exchange: Exchange) -> &dyn ExchangeClient {
        match exchange {
            Exchange::Binance => &self.binance,
            // Exchange API when the credentials carry a passphrase, else Advanced Trade (CDP).
            Exchange::Coinbase => &self.coinbase,
            Exchange::Kraken => &self.kraken,
            Exchange::Zerodha => &self.kite,
        }
    }

    /// Proves `credentials` work on `exchange` and reports their permissions.
    pub async fn check(&self, exchange: Exchange, credentials: &Credentials) -> Result<Verdict, Failure> {
        self.client(exchange).check(credentials).await
    }

    /// Exchanges a Kite `request_token` for an access token.
    pub async fn create_kite_session(
        &self,
        api_key: &SecretValue,
        api_secret: &SecretValue,
        request_token: &str,
    ) -> Result<KiteSession, Failure> {
        self.kite.create_session(api_key, api_secret, request_token).await
    }

    /// Where to send a user to log in to Kite with this app's API key.
    pub fn kite_login_url(&self, api_key: &str) -> Url {
        self.kite.login_url(api_key)
    }
}

/// One `tokio` mutex per key, for serializing work per key inside this process. Entries nobody
/// holds are dropped once the map grows, so it stays as small as the set of keys in use.
#[derive(Default)]
struct KeyedMutexes {
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedMutexes {
    const PRUNE_ABOVE: usize = 256;

    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let slot = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.len() > Self::PRUNE_ABOVE {
                keys.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            keys.entry(key.to_string()).or_default().clone()
        };
        slot.lock_owned().await
    }
}

/// Kraken nonces coordinated through the database, so several worker processes can use one API
/// key: see `Store::lease_kraken_nonce`. Requests with one key are serialized inside the process
/// first (so a busy key holds one database connection, not one per waiting job), then across
/// processes by the lease's advisory lock.
///
/// If the database cannot be reached, nonces come from this process's memory after a few
/// attempts (logged): a check must not hang on the database, and a nonce from the clock in
/// microseconds is larger than the stored ones unless clocks disagree.
pub struct DatabaseNonces {
    store: Store,
    local: KeyedMutexes,
    fallback: LocalNonces,
}

impl DatabaseNonces {
    const ATTEMPTS: u32 = 3;
    /// Longest wait for one lease (another process's request with the key takes at most the
    /// exchange timeout).
    const LEASE_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn new(store: Store) -> Self {
        Self { store, local: KeyedMutexes::default(), fallback: LocalNonces::new() }
    }
}

impl fmt::Debug for DatabaseNonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseNonces").field("backend", &self.store.backend()).finish_non_exhaustive()
    }
}

impl NonceSource for DatabaseNonces {
    fn next<'a>(&'a self, key_fingerprint: &'a str) -> BoxFuture<'a, NonceLease> {
        Box::pin(async move {
            let local = self.local.lock(key_fingerprint).await;
            for attempt in 1..=Self::ATTEMPTS {
                match tokio::time::timeout(Self::LEASE_TIMEOUT, self.store.lease_kraken_nonce(key_fingerprint)).await {
                    Ok(Ok(Some(lease))) => return NonceLease::new(lease.nonce(), Box::new((lease, local))),
                    Ok(Ok(None)) => break,
                    Ok(Err(err)) => {
                        tracing::warn!(key = key_fingerprint, attempt, error = %err, "could not lease a Kraken nonce from the database");
                    }
                    Err(_) => {
                        tracing::warn!(key = key_fingerprint, attempt, "timed out waiting for a Kraken nonce lease");
                    }
                }
                if attempt < Self::ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
            let lease = self.fallback.next(key_fingerprint).await;
            let nonce = lease.nonce();
            NonceLease::new(nonce, Box::new((lease, local)))
        })
    }
}
