//! The exchange simulator: fake Binance, Coinbase (Advanced Trade and Exchange), Kraken and
//! Zerodha Kite HTTP servers on loopback.
//!
//! Each fake verifies authentication exactly as its exchange documents it (signatures, nonces,
//! timestamps, JWTs), keeps the exchange's rate-limit accounting, and can inject the faults
//! production shows us: latency, 5xx, timeouts, malformed bodies, clock skew, revoked keys and
//! permission changes. The exchanges are unreachable from our test machines, so this is what
//! the worker's clients are tested against, over real HTTP.
//!
//! Each exchange listens on its own port because the exchanges sign the request path (Kraken) or
//! the host and path (Coinbase CDP): a path prefix would change what is signed.

pub mod binance;
pub mod coinbase;
pub mod faults;
pub mod kite;
pub mod kraken;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use url::Url;

pub use faults::{Fault, FaultSet};

/// Shared state of every fake exchange: fault injection plus each exchange's own state.
#[derive(Default)]
pub struct SimState {
    pub faults: FaultSet,
    pub binance: binance::BinanceState,
    pub coinbase: coinbase::CoinbaseState,
    pub kraken: kraken::KrakenState,
    pub kite: kite::KiteState,
}

impl SimState {
    /// A simulator seeded with the documented test keys (see [`SimState::test_keys_summary`]).
    pub fn seeded() -> Self {
        Self {
            faults: FaultSet::default(),
            binance: binance::BinanceState::seeded(),
            coinbase: coinbase::CoinbaseState::seeded(),
            kraken: kraken::KrakenState::seeded(),
            kite: kite::KiteState::seeded(),
        }
    }

    /// Human-readable list of the seeded keys, printed by `tradeeon simulate` so a newcomer can
    /// paste them into the connect form.
    pub fn test_keys_summary(&self) -> String {
        [
            binance::seeded_keys_summary(),
            coinbase::seeded_keys_summary(),
            kraken::seeded_keys_summary(),
            kite::seeded_keys_summary(),
        ]
        .join("\n")
    }
}

/// Where each fake exchange listens; feed these to the `*_BASE_URL` variables.
#[derive(Debug, Clone)]
pub struct SimulatorUrls {
    pub binance: Url,
    pub coinbase: Url,
    pub coinbase_exchange: Url,
    pub kraken: Url,
    pub kite: Url,
    pub kite_login: Url,
}

impl SimulatorUrls {
    /// The environment assignments that point the service at this simulator.
    pub fn as_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BINANCE_BASE_URL", trim(&self.binance)),
            ("COINBASE_BASE_URL", trim(&self.coinbase)),
            ("COINBASE_EXCHANGE_BASE_URL", trim(&self.coinbase_exchange)),
            ("KRAKEN_BASE_URL", trim(&self.kraken)),
            ("KITE_BASE_URL", trim(&self.kite)),
            ("KITE_LOGIN_URL", self.kite_login.to_string()),
        ]
    }
}

fn trim(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_string()
}

/// A running simulator. Dropping it stops the servers.
pub struct Simulator {
    pub urls: SimulatorUrls,
    pub state: Arc<SimState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Simulator {
    /// Starts every fake exchange on `host` with ephemeral ports.
    pub async fn start(state: Arc<SimState>) -> anyhow::Result<Simulator> {
        Self::start_on(state, "127.0.0.1".parse()?, 0).await
    }

    /// Starts on consecutive ports from `first_port` (0 = ephemeral ports): Binance, Coinbase
    /// Advanced Trade, Coinbase Exchange, Kraken, Kite.
    pub async fn start_on(state: Arc<SimState>, host: std::net::IpAddr, first_port: u16) -> anyhow::Result<Simulator> {
        let mut tasks = Vec::new();
        let mut urls = Vec::new();
        let routers = [
            binance::router(state.clone()),
            coinbase::advanced_trade_router(state.clone()),
            coinbase::exchange_router(state.clone()),
            kraken::router(state.clone()),
            kite::router(state.clone()),
        ];
        for (offset, router) in routers.into_iter().enumerate() {
            let port = if first_port == 0 { 0 } else { first_port + offset as u16 };
            let listener = TcpListener::bind(SocketAddr::new(host, port)).await?;
            let address = listener.local_addr()?;
            urls.push(Url::parse(&format!("http://{address}/"))?);
            let app = router.into_make_service_with_connect_info::<SocketAddr>();
            // Like an exchange's own front end, answer without Nagle's delay: a response that
            // left in two writes would otherwise wait for the client's delayed ACK (up to 40 ms)
            // and every check would look that much slower.
            let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
                let _ = stream.set_nodelay(true);
            });
            tasks.push(tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, app).await {
                    tracing::error!(error = %err, "simulator server stopped");
                }
            }));
        }
        let kite_login = urls[4].join("connect/login")?;
        let urls = SimulatorUrls {
            binance: urls[0].clone(),
            coinbase: urls[1].clone(),
            coinbase_exchange: urls[2].clone(),
            kraken: urls[3].clone(),
            kite: urls[4].clone(),
            kite_login,
        };
        Ok(Simulator { urls, state, tasks })
    }
}
