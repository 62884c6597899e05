//! The command line: parses arguments, loads configuration, wires the crates together.
//!
//! User errors (bad arguments, bad configuration, unreachable database) print one line and exit
//! non-zero; they are not panics and carry no backtrace.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tradeeon_shared::config::Config;
use tradeeon_shared::encryption_key::{self, KeySource, MissingKey};
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;

#[derive(Debug, Parser)]
#[command(
    name = "tradeeon",
    version,
    about = "Tradeeon Connect: connect exchange accounts by API key, keep the keys encrypted, prove they work.",
    long_about = "Tradeeon Connect: connect exchange accounts by API key, keep the keys encrypted, prove they work.\n\n\
        Configuration comes from environment variables (and a .env file in the working directory); \
        see the README for the full list. With no subcommand, `serve` runs."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API, the workers and the scheduler in one process (the default).
    Serve {
        /// Also start the exchange simulator in-process and point every exchange at it, so keys
        /// can be connected and checked with no real exchange account.
        #[arg(long)]
        simulate: bool,
    },
    /// Run only the HTTP API (scale-out: many behind a load balancer, one shared database).
    Api,
    /// Run only the workers and the scheduler (scale-out: many on one shared database).
    Worker,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print a new Fernet key for ENCRYPTION_KEY.
    Keygen,
    /// Re-encrypt every stored secret under the primary (first) ENCRYPTION_KEY.
    Rewrap,
    /// Exit 0 if the local API answers `GET /health` (for container HEALTHCHECKs).
    Healthcheck,
    /// Run the exchange simulator (fake Binance, Coinbase, Kraken and Zerodha on loopback).
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// First of five consecutive ports (Binance, Coinbase Advanced Trade, Coinbase Exchange,
        /// Kraken, Kite); 0 picks free ports.
        #[arg(long, default_value_t = 9001)]
        port: u16,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return argument_error(err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(anyhow::Error::from(err).context("could not start the async runtime")),
    };
    match runtime.block_on(run(cli.command.unwrap_or(Command::Serve { simulate: false }))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(err),
    }
}

/// Help and version go to stdout with success; anything else becomes one line on stderr.
fn argument_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = err.print();
        return ExitCode::SUCCESS;
    }
    let rendered = err.render().to_string();
    let first_line = rendered.lines().next().unwrap_or("invalid arguments");
    eprintln!("{first_line} (see `tradeeon --help`)");
    ExitCode::from(2)
}

fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("error: {}", one_line(&err));
    ExitCode::FAILURE
}

/// The whole cause chain on one line. Some errors repeat their source in their own message
/// (I/O errors do); those repeats are dropped.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if out.ends_with(&message) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(message.lines().next().unwrap_or_default());
    }
    out
}

async fn run(command: Command) -> anyhow::Result<()> {
    if let Command::Keygen = command {
        println!("{}", Keyring::generate_key());
        return Ok(());
    }
    load_dotenv()?;
    let config: Config = tradeeon_shared::config::from_env()?;
    tradeeon_shared::telemetry::init(config.log.format);

    match command {
        Command::Keygen => unreachable!("handled above"),
        Command::Serve { simulate: false } => serve(config, Role::Both).await,
        Command::Serve { simulate: true } => {
            let (simulator, config) = with_simulator(config).await?;
            let result = serve(config, Role::Both).await;
            drop(simulator);
            result
        }
        Command::Api => serve(config, Role::Api).await,
        Command::Worker => serve(config, Role::Worker).await,
        Command::Migrate => {
            let store = connect(&config).await?;
            store.migrate().await.context("migration failed")?;
            println!("migrations applied ({})", store.backend());
            if let Some(app_url) = &config.database.app_url {
                use secrecy::ExposeSecret;
                let login = store
                    .provision_service_login(app_url.expose_secret())
                    .await
                    .context("could not set up the login role of DATABASE_APP_URL")?;
                println!("login role `{login}` is a member of {}", tradeeon_shared::store::SERVICE_ROLE);
            }
            Ok(())
        }
        Command::Rewrap => {
            let keyring = load_keyring(&config, MissingKey::Fail)?;
            let store = connect(&config).await?;
            let report = tradeeon_shared::rewrap::rewrap_all(&store, &keyring).await?;
            println!("{report}");
            if report.undecryptable > 0 {
                anyhow::bail!(
                    "{} connection(s) hold secrets that no ENCRYPTION_KEY decrypts; keep the old key in the list",
                    report.undecryptable
                );
            }
            Ok(())
        }
        Command::Simulate { host, port } => simulate(host, port).await,
        Command::Healthcheck => healthcheck(&config).await,
    }
}

/// A missing `.env` is normal; a malformed one is a user error worth stopping for.
fn load_dotenv() -> anyhow::Result<()> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(err) if err.not_found() => Ok(()),
        Err(err) => Err(anyhow::Error::from(err).context("could not read .env")),
    }
}

async fn connect(config: &Config) -> anyhow::Result<Store> {
    use secrecy::ExposeSecret;
    Store::connect(config.database.url.expose_secret(), config.database.max_connections)
        .await
        .context("could not open the database named by DATABASE_URL")
}

fn load_keyring(config: &Config, missing: MissingKey) -> anyhow::Result<Keyring> {
    let (keyring, source) = encryption_key::load_keyring(&config.vault, &config.database, missing)?;
    match source {
        KeySource::GeneratedFile(path) => tracing::warn!(
            path = %path.display(),
            "ENCRYPTION_KEY is not set: generated a new key into this file. Back it up — without it the stored \
             credentials cannot be decrypted — and set ENCRYPTION_KEY in production."
        ),
        KeySource::ExistingFile(path) => {
            tracing::info!(path = %path.display(), "using the encryption key from the key file")
        }
        KeySource::Environment => tracing::debug!(keys = keyring.len(), "using ENCRYPTION_KEY"),
    }
    Ok(keyring)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Worker,
    Both,
}

async fn serve(mut config: Config, role: Role) -> anyhow::Result<()> {
    // Keys first: a bad ENCRYPTION_KEY should stop the process before it touches the database.
    // Only the single-process default may invent a key: separate api/worker processes must all
    // use the same one, so they fail instead.
    let missing = if role == Role::Both { MissingKey::Generate } else { MissingKey::Fail };
    let keyring = Arc::new(load_keyring(&config, missing)?);
    let local_secret = if role == Role::Both { local_sign_in_secret(&mut config)? } else { None };
    let store = connect(&config).await?;
    if config.database.migrate_on_start {
        store.migrate_on_start().await.context("migration failed (MIGRATE_ON_START)")?;
    }
    store.check_service_role().await.context("DATABASE_URL's role cannot run the service")?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = shutdown_signal()?;
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested; draining");
        let _ = stop_tx.send(true);
    });

    // One registry and one metrics listener per process: in `serve` the API's metrics listener
    // shows the workers' metrics too.
    let registry = prometheus::Registry::new();
    let mut tasks = tokio::task::JoinSet::new();
    if role != Role::Worker {
        let address = std::net::SocketAddr::new(config.http.host, config.http.port);
        let listener = TcpListener::bind(address).await.with_context(|| format!("could not listen on {address}"))?;
        // A port apart from the API's: the load balancer forwards only API_PORT.
        let metrics_address = std::net::SocketAddr::new(config.http.host, config.metrics.api_port);
        let metrics_listener = TcpListener::bind(metrics_address)
            .await
            .with_context(|| format!("could not listen on {metrics_address} (API_METRICS_PORT)"))?;
        tracing::info!("API listening on http://{}", listener.local_addr()?);
        tracing::info!("metrics listening on http://{}/metrics", metrics_listener.local_addr()?);
        let metrics_registry = registry.clone();
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move {
            tradeeon_api::run_metrics(metrics_listener, metrics_registry, stop).await.context("metrics listener failed")
        });
        let mut state = tradeeon_api::AppState::new(&config, store.clone(), keyring.clone(), registry.clone())?;
        if let Some(secret) = &local_secret {
            state = state.with_local_sign_in(local_sign_in(secret, &config, listener.local_addr()?));
        }
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { tradeeon_api::run(listener, state, stop).await.context("API server failed") });
    }
    if role != Role::Api {
        let metrics_listener = if role == Role::Worker {
            let address = std::net::SocketAddr::new(config.http.host, config.metrics.worker_port);
            Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("could not listen on {address} (WORKER_METRICS_PORT)"))?,
            )
        } else {
            None
        };
        let ctx = tradeeon_worker::WorkerContext {
            store: store.clone(),
            keyring: keyring.clone(),
            config: config.clone(),
            registry: registry.clone(),
            metrics_listener,
        };
        let stop = stopped(stop_rx.clone());
        tasks.spawn(async move { tradeeon_worker::run(ctx, stop).await.context("worker failed") });
    }
    // The first part to finish (normally on shutdown) ends the process; a failure in one part
    // stops the others rather than leaving a half-working process behind.
    while let Some(result) = tasks.join_next().await {
        result.context("a task panicked")??;
    }
    Ok(())
}

/// The embedded default with no identity provider (neither `SUPABASE_JWT_SECRET` nor
/// `SUPABASE_URL`) signs its own tokens: a secret kept beside the SQLite database (created on
/// first run, mode 0600) becomes the JWT secret, and the web UI's one-time sign-in links trade
/// for tokens signed with it. PostgreSQL deployments have no data directory and get none.
fn local_sign_in_secret(config: &mut Config) -> anyhow::Result<Option<secrecy::SecretString>> {
    if config.auth.jwt_secret.is_some() || config.auth.supabase_url.is_some() {
        return Ok(None);
    }
    let Some(dir) = config.database.sqlite_dir() else {
        return Ok(None);
    };
    let (secret, path, created) = tradeeon_api::ui::load_or_create_secret(&dir)?;
    if created {
        tracing::warn!(
            path = %path.display(),
            "neither SUPABASE_JWT_SECRET nor SUPABASE_URL is set: generated a local sign-in secret into this file; \
             the web UI signs in one local user through the link printed below"
        );
    } else {
        tracing::info!(path = %path.display(), "local sign-in: tokens are signed with the secret in this file");
    }
    config.auth.jwt_secret = Some(secret.clone());
    Ok(Some(secret))
}

/// The local sign-in, printing a one-time link now and a fresh one each time a link is used.
fn local_sign_in(
    secret: &secrecy::SecretString,
    config: &Config,
    listening: std::net::SocketAddr,
) -> Arc<tradeeon_api::ui::LocalSignIn> {
    // A wildcard address is not something a browser can open; loopback reaches it.
    let ip = match listening.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let base = format!("http://{}", std::net::SocketAddr::new(ip, listening.port()));
    let announce_base = base.clone();
    let local = tradeeon_api::ui::LocalSignIn::new(secret, config.auth.audience.clone(), move |code| {
        eprintln!("Local sign-in link used; the next one (for another browser or tab): {announce_base}/#signin={code}");
    });
    let code = local.issue_code();
    eprintln!(
        "\nWeb UI: open {base}/#signin={code}\n(a one-time local sign-in link; a new one is printed here whenever one is used)\n"
    );
    Arc::new(local)
}

/// Asks the API in this container whether it is alive. Uses loopback when the API listens on
/// every interface.
async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let host = if config.http.host.is_unspecified() { "127.0.0.1".parse()? } else { config.http.host };
    let url = format!("http://{}/health", std::net::SocketAddr::new(host, config.http.port));
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    anyhow::ensure!(response.status().is_success(), "{url} answered {}", response.status());
    Ok(())
}

async fn simulate(host: std::net::IpAddr, port: u16) -> anyhow::Result<()> {
    use tradeeon_simulator::{SimState, Simulator};
    let shutdown = shutdown_signal()?;
    let state = Arc::new(SimState::seeded());
    let simulator = Simulator::start_on(state.clone(), host, port)
        .await
        .with_context(|| format!("could not start the simulator on {host}:{port}"))?;
    println!("Exchange simulator running. Point the service at it with:\n");
    for (variable, value) in simulator.urls.as_env() {
        println!("  export {variable}={value}");
    }
    println!("\nSeeded test keys:\n{}", state.test_keys_summary());
    shutdown.await;
    drop(simulator);
    Ok(())
}

/// Starts the simulator on free loopback ports and points the exchange URLs at it.
async fn with_simulator(mut config: Config) -> anyhow::Result<(tradeeon_simulator::Simulator, Config)> {
    use tradeeon_simulator::{SimState, Simulator};
    let state = Arc::new(SimState::seeded());
    let simulator = Simulator::start(state.clone()).await.context("could not start the exchange simulator")?;
    let urls = &simulator.urls;
    config.exchanges.binance = urls.binance.clone();
    config.exchanges.coinbase = urls.coinbase.clone();
    config.exchanges.coinbase_exchange = urls.coinbase_exchange.clone();
    config.exchanges.kraken = urls.kraken.clone();
    config.exchanges.kite = urls.kite.clone();
    config.exchanges.kite_login = urls.kite_login.clone();
    tracing::warn!("exchange simulator running: every exchange call goes to fake exchanges on loopback");
    eprintln!("Seeded test keys for the simulator:\n{}", state.test_keys_summary());
    Ok((simulator, config))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// SIGTERM is what ECS sends on deploy and scale-in; Ctrl-C is for people. The handlers are
/// installed by this call, not when the returned future is first polled: a SIGTERM that comes
/// right after start-up, before a spawned task has run, must drain the process, not kill it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("could not handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("could not handle SIGINT")?;
        Ok(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
