//! The harness every scenario uses: a throw-away PostgreSQL database (on the shared test server
//! or on a private cluster of the scenario's own), real `tradeeon api` / `tradeeon worker`
//! processes with their output captured to files, the exchange simulator in-process, tokens,
//! an HTTP client that keeps every response, canary secrets, waits with deadlines, and the
//! figures each scenario prints.
//!
//! Everything listens on loopback. Processes are killed when their guard drops (also when a
//! scenario panics), databases are dropped, private clusters stopped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tradeeon_shared::domain::{Exchange, UserId};
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::{EncryptedSecret, Keyring};
use tradeeon_simulator::binance::BinancePermissions;
use tradeeon_simulator::coinbase::{CdpPermissions, ExchangePermissions};
use tradeeon_simulator::{SimState, Simulator};

pub const JWT_SECRET: &str = "scenario-supabase-jwt-secret-with-enough-entropy-0123456789";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A sweep schedule that fires once a year: the one sweep a worker runs at start spreads its
/// checks over ~290 days, so none runs during a scenario that wants a quiet queue.
pub const QUIET_SWEEPS: &str = "0 0 1 1 *";

/// What the processes log: everything of ours at debug (more lines for the secret scan to read),
/// the chatty dependencies at info or warn.
const LOG_FILTER: &str = "info,tradeeon=debug,tradeeon_api=debug,tradeeon_worker=debug,tradeeon_shared=debug,\
                          reqwest=debug,tower_http=debug,sqlx=warn,apalis=info,apalis_core=info,apalis_postgres=info";

// ---------------------------------------------------------------------------------------------
// Scenarios run one at a time
// ---------------------------------------------------------------------------------------------

// Async: the guard lives across the scenario's awaits. A scenario that panics still frees it for
// the next (a tokio mutex does not poison).
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for a whole scenario: each one starts several processes and measures timings, which two
/// scenarios side by side on a 2-core CI machine would only blur.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().await
}

// ---------------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------------

pub fn shared_admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
}

/// A database of the scenario's own, dropped `WITH (FORCE)` when the guard goes.
pub struct Database {
    pub name: String,
    pub url: String,
    admin_url: String,
    /// For the scenario's own queries and assertions.
    pub pool: PgPool,
}

impl Database {
    pub async fn create(admin_url: &str) -> Self {
        let name = format!("tradeeon_scenario_{}", ulid::Ulid::generate().to_string().to_lowercase());
        let mut admin = PgConnection::connect(admin_url).await.expect("connect to the admin database");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.expect("create db");
        let _ = admin.close().await;
        let mut url = url::Url::parse(admin_url).expect("admin url");
        url.set_path(&name);
        let url = url.to_string();
        // Migrate once here, so the scenario can query the tables before any process started.
        let store = Store::connect(&url, 2).await.expect("connect the store");
        store.migrate().await.expect("migrate");
        store.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .expect("scenario pool");
        Self { name, url, admin_url: admin_url.to_string(), pool }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the scenario's runtime, which cannot be blocked on: use a thread. FORCE
        // ends the sessions still open (the scenario's own pool among them).
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let Ok(mut admin) = PgConnection::connect(&admin_url).await else { return };
                if let Err(e) = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut admin)
                    .await
                {
                    eprintln!("could not drop scenario database {name}: {e}");
                }
                let _ = admin.close().await;
            });
        });
        let _ = dropped.join();
    }
}

/// A PostgreSQL cluster of the scenario's own (for the restart scenario: the machine's shared
/// server must keep running for every other test). `initdb` refuses to run as root, so as root
/// the cluster belongs to the `postgres` user and every command runs through `runuser`.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl PrivateCluster {
    pub fn start() -> Self {
        use std::os::unix::fs::MetadataExt;
        let bin = postgres_bin_dir().unwrap_or_else(|| {
            panic!("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or on PATH")
        });
        let as_postgres = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let dir = tempfile::Builder::new().prefix("tradeeon-pg-").tempdir().expect("tempdir");
        if as_postgres {
            run_checked(Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()), "chown the cluster directory");
        }
        let port = free_port();
        let cluster = Self { dir, bin, port, as_postgres };
        let data = cluster.data_dir();
        cluster.run(
            &cluster.tool("initdb"),
            &["-D", &data, "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
            "initdb",
        );
        // A test cluster: durability is not what this scenario is about, speed is.
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n",
            cluster.dir.path().display()
        );
        let conf_path = cluster.dir.path().join("data/postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("write postgresql.auto.conf");
        cluster.start_again();
        cluster
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    fn run(&self, program: &str, args: &[&str], what: &str) {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        command.args(args).current_dir(self.dir.path());
        run_checked(&mut command, what);
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_again(&self) {
        let log = self.log_path().display().to_string();
        self.run(
            &self.tool("pg_ctl"),
            &["-D", &self.data_dir(), "-l", &log, "-w", "-t", "60", "start"],
            "pg_ctl start",
        );
    }

    /// `pg_ctl stop -m fast`: sessions are terminated, running transactions roll back (what an
    /// RDS reboot or failover does to the service), and it returns once the server is gone.
    pub fn stop_fast(&self) {
        self.run(
            &self.tool("pg_ctl"),
            &["-D", &self.data_dir(), "-m", "fast", "-w", "-t", "60", "stop"],
            "pg_ctl stop",
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &self.tool("pg_ctl")]);
            c
        } else {
            Command::new(self.tool("pg_ctl"))
        };
        let _ = command
            .args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, bin)) = candidates.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
}

fn run_checked(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: could not run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port nothing listens on right now (for servers that cannot be told to pick one and say which).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A `tradeeon` process; killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exited = Some(status);
                false
            }
            None => true,
        }
    }

    /// `kill -9`: what a crashed host or an OOM kill does.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.exited = Some(self.child.wait().expect("wait for the killed process"));
    }

    /// `kill -TERM`: what ECS sends on deploy and scale-in.
    pub fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits for the process to exit (polling, so the runtime keeps running).
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if !self.is_running() {
                return self.exited.expect("exit status");
            }
            if Instant::now() > deadline {
                panic!("{} (pid {}) did not exit within {limit:?}\n{}", self.name, self.pid(), self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the log shows `needle`; panics (with the log's tail) if the process dies first.
    pub async fn wait_for_log(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if !self.is_running() {
                panic!("{} exited ({:?}) before logging {needle:?}\n{}", self.name, self.exited, self.log_tail(40));
            }
            if Instant::now() > deadline {
                panic!("{} did not log {needle:?} within {limit:?}\n{}", self.name, self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------

/// One scenario's world: database, simulator, key, logs, canaries, figures.
pub struct Scenario {
    pub name: &'static str,
    pub started: Instant,
    pub dir: tempfile::TempDir,
    pub db: Database,
    pub encryption_key: String,
    pub keyring: Keyring,
    pub sim: Simulator,
    pub seen: Arc<Mutex<String>>,
    canaries: Mutex<Vec<String>>,
    /// Files outside `dir` that the secret scan also reads (a private cluster's server log).
    extra_logs: Mutex<Vec<PathBuf>>,
}

impl Scenario {
    /// A scenario on a fresh database of the shared test server.
    pub async fn start(name: &'static str) -> Self {
        Self::start_on(name, &shared_admin_url()).await
    }

    /// A scenario on a fresh database of the server behind `admin_url`.
    pub async fn start_on(name: &'static str, admin_url: &str) -> Self {
        let started = Instant::now();
        let dir = tempfile::Builder::new().prefix(&format!("tradeeon-{name}-")).tempdir().expect("tempdir");
        let db = Database::create(admin_url).await;
        let encryption_key = Keyring::generate_key();
        let keyring = Keyring::parse(&encryption_key).expect("keyring");
        let sim = Simulator::start(Arc::new(SimState::seeded())).await.expect("simulator");
        Self {
            name,
            started,
            dir,
            db,
            encryption_key,
            keyring,
            sim,
            seen: Arc::new(Mutex::new(String::new())),
            canaries: Mutex::new(Vec::new()),
            extra_logs: Mutex::new(Vec::new()),
        }
    }

    pub fn add_log_to_scan(&self, path: PathBuf) {
        self.extra_logs.lock().unwrap().push(path);
    }

    fn command(&self, subcommand: &str, name: &str, env: &[(&str, &str)]) -> (Command, PathBuf) {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tradeeon"));
        command
            .arg(subcommand)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db.url)
            .env("ENCRYPTION_KEY", &self.encryption_key)
            .env("SUPABASE_JWT_SECRET", JWT_SECRET)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", "0")
            .env("API_METRICS_PORT", "0")
            .env("API_USER_RATE_LIMIT_PER_MINUTE", "100000")
            .env("WORKER_METRICS_PORT", "0")
            .env("METRICS_PUBLISHER", "none")
            .env("HEALTH_SWEEP_INTERVAL", QUIET_SWEEPS)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", LOG_FILTER)
            // No stray `.env` from the checkout: run where nothing else is.
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().expect("clone log file")))
            .stderr(Stdio::from(file));
        for (variable, value) in self.sim.urls.as_env() {
            command.env(variable, value);
        }
        for (variable, value) in env {
            command.env(variable, value);
        }
        (command, log)
    }

    fn spawn(&self, subcommand: &str, name: &str, env: &[(&str, &str)]) -> Proc {
        let (mut command, log) = self.command(subcommand, name, env);
        let child = command.spawn().unwrap_or_else(|e| panic!("spawn tradeeon {subcommand}: {e}"));
        Proc { name: name.to_string(), log, child, exited: None }
    }

    /// Starts `tradeeon api` on an ephemeral port and waits until it listens.
    pub async fn spawn_api(&self, name: &str, env: &[(&str, &str)]) -> (Proc, ApiClient) {
        let mut proc = self.spawn("api", name, env);
        let line = proc.wait_for_log("API listening on http://", Duration::from_secs(60)).await;
        let start = line.find("http://").expect("address") + "http://".len();
        let address: String =
            line[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':')).collect();
        let client = ApiClient {
            base: format!("http://{address}"),
            http: reqwest::Client::builder()
                .user_agent("tradeeon-scenarios/1.0")
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            seen: self.seen.clone(),
        };
        (proc, client)
    }

    /// Starts `tradeeon worker` and waits until its job runner runs.
    pub async fn spawn_worker(&self, name: &str, env: &[(&str, &str)]) -> Proc {
        let mut proc = self.spawn("worker", name, env);
        proc.wait_for_log("job runner started", Duration::from_secs(60)).await;
        proc
    }

    /// A new signed-in user.
    pub fn user(&self) -> User {
        User::new()
    }

    fn canary(&self, value: String) -> String {
        self.canaries.lock().unwrap().push(value.clone());
        value
    }

    /// A fresh Binance key pair the simulator accepts (read + trade, any IP); both are canaries.
    pub fn binance_key(&self) -> Creds {
        let (a, b) = (ulid::Ulid::generate().to_string(), ulid::Ulid::generate().to_string());
        let api_key = self.canary(format!("CanaryKey{a}{b}xyz"));
        assert_eq!(api_key.len(), 64);
        let api_secret = self.canary(format!("CanarySecret{}{}", b.to_lowercase(), a.to_lowercase()));
        self.sim.state.binance.add_key(&api_key, &api_secret, BinancePermissions::READ_TRADE, vec![]);
        Creds { exchange: Exchange::Binance, api_key, api_secret, passphrase: None }
    }

    /// A fresh Kraken key (query + trade); key and base64 private key are canaries.
    pub fn kraken_key(&self) -> Creds {
        let id = ulid::Ulid::generate().to_string();
        let api_key = self.canary(format!("CanaryKraken{id}"));
        let secret_bytes = format!("canary-kraken-private-key-{id}-{}", ulid::Ulid::generate());
        let api_secret = self.canary(base64::engine::general_purpose::STANDARD.encode(secret_bytes));
        let permissions: Vec<String> = ["query-funds", "query-open-trades", "query-closed-trades", "modify-trades"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        self.sim.state.kraken.add_key(&api_key, &api_secret, "canary", &permissions, vec![]);
        Creds { exchange: Exchange::Kraken, api_key, api_secret, passphrase: None }
    }

    /// A fresh Coinbase Advanced Trade (CDP, ES256) key; the key name and the PEM's key lines
    /// are canaries.
    pub fn coinbase_cdp_key(&self) -> Creds {
        let name = self.canary(format!("organizations/canary-org/apiKeys/CanaryCdp{}", ulid::Ulid::generate()));
        let permissions = CdpPermissions { can_view: true, can_trade: true, can_transfer: false };
        let pem = self.sim.state.coinbase.add_es256_key(&name, permissions);
        for line in pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16) {
            self.canary(line.to_string());
        }
        Creds { exchange: Exchange::Coinbase, api_key: name, api_secret: pem, passphrase: None }
    }

    /// A fresh Coinbase Exchange key (key + base64 secret + passphrase), all canaries.
    pub fn coinbase_exchange_key(&self) -> Creds {
        let id = ulid::Ulid::generate().to_string().to_lowercase();
        let api_key = self.canary(format!("canarycbx{id}"));
        let api_secret =
            self.canary(base64::engine::general_purpose::STANDARD.encode(format!("canary-cbx-secret-{id}-0123456789")));
        let passphrase = self.canary(format!("canary-passphrase-{id}"));
        let permissions = ExchangePermissions { view: true, trade: true, transfer: false };
        self.sim.state.coinbase.add_exchange_key(&api_key, &api_secret, &passphrase, permissions);
        Creds { exchange: Exchange::Coinbase, api_key, api_secret, passphrase: Some(passphrase) }
    }

    /// Registers a plaintext that must never show up anywhere (e.g. a wrong secret submitted on
    /// purpose).
    pub fn extra_canary(&self, value: String) -> String {
        self.canary(value)
    }

    pub fn decrypt(&self, token: &str) -> String {
        self.keyring.decrypt(&EncryptedSecret::from(token.to_string())).expect("decrypt").value.expose().to_string()
    }

    // -- database helpers ----------------------------------------------------------------------

    /// Statuses of the given jobs (missing ids are absent from the map).
    pub async fn job_statuses(&self, ids: &[String]) -> BTreeMap<String, JobRow> {
        let rows: Vec<JobRow> = sqlx::query_as(
            "SELECT id, kind, status, attempts, result, error FROM public.tradeeon_jobs WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.db.pool)
        .await
        .expect("job statuses");
        rows.into_iter().map(|row| (row.id.clone(), row)).collect()
    }

    /// Waits until every job in `ids` is `done` or `failed`; returns them. Panics at the deadline
    /// naming the jobs still open.
    pub async fn wait_settled(&self, ids: &[String], limit: Duration) -> BTreeMap<String, JobRow> {
        let deadline = Instant::now() + limit;
        loop {
            let rows = self.job_statuses(ids).await;
            let open: Vec<&JobRow> = rows.values().filter(|r| !r.settled()).collect();
            if open.is_empty() && rows.len() == ids.len() {
                return rows;
            }
            if Instant::now() > deadline {
                let missing = ids.iter().filter(|id| !rows.contains_key(*id)).count();
                panic!("{} job(s) not settled within {limit:?} ({missing} missing): {open:?}", open.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Audit rows of one connection, by action; the API's own rows (which carry a `stage`, like
    /// `connected` with stage `submitted`) count as `action:stage`.
    pub async fn audit_actions(&self, connection_id: &str) -> BTreeMap<String, i64> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT action || coalesce(':' || (details ->> 'stage'), ''), count(*)
               FROM public.connection_audit_log WHERE connection_id = $1::uuid GROUP BY 1",
        )
        .bind(connection_id)
        .fetch_all(&self.db.pool)
        .await
        .expect("audit actions");
        rows.into_iter().collect()
    }

    // -- the secret scan -----------------------------------------------------------------------

    /// Looks for every canary in every process log, every response the scenario received, and
    /// every row of every table (the `public`, `auth` and `apalis` schemas: jobs, audit, health
    /// history, the queue's tickets). Panics on a hit; returns the scan's figures.
    pub async fn assert_no_leaks(&self) -> LeakScan {
        let canaries = self.canaries.lock().unwrap().clone();
        assert!(!canaries.is_empty(), "the scenario used canary secrets");
        let mut sources: Vec<(String, String)> = Vec::new();
        let mut log_paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("log dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        log_paths.extend(self.extra_logs.lock().unwrap().iter().cloned());
        let mut log_bytes = 0;
        for path in &log_paths {
            let text = read_lossy(path);
            log_bytes += text.len();
            sources.push((format!("log {}", path.display()), text));
        }
        let responses = self.seen.lock().unwrap().clone();
        let response_bytes = responses.len();
        sources.push(("HTTP responses".into(), responses));

        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_schema::text, table_name::text FROM information_schema.tables
              WHERE table_schema IN ('public', 'auth', 'apalis') AND table_type = 'BASE TABLE'
              ORDER BY 1, 2",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("list tables");
        let mut rows_scanned = 0;
        let mut db_bytes = 0;
        for (schema, table) in &tables {
            let rows: Vec<String> =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT row_to_json(t)::text FROM {schema}.{table} t")))
                    .fetch_all(&self.db.pool)
                    .await
                    .unwrap_or_else(|e| panic!("dump {schema}.{table}: {e}"));
            rows_scanned += rows.len();
            let text = rows.join("\n");
            db_bytes += text.len();
            sources.push((format!("table {schema}.{table}"), text));
        }

        let mut hits = Vec::new();
        for canary in &canaries {
            // bytea columns (the queue's ticket payloads) dump as hex.
            let hex: String = canary.bytes().map(|b| format!("{b:02x}")).collect();
            for (source, text) in &sources {
                if text.contains(canary.as_str()) || text.contains(&hex) {
                    hits.push(format!("{canary} in {source}"));
                }
            }
        }
        let scan = LeakScan {
            canaries: canaries.len(),
            log_files: log_paths.len(),
            log_bytes,
            response_bytes,
            tables: tables.len(),
            rows: rows_scanned,
            db_bytes,
            hits: hits.len(),
        };
        assert!(hits.is_empty(), "canary secrets leaked:\n{}", hits.join("\n"));
        assert!(log_bytes > 0 && response_bytes > 0 && rows_scanned > 0, "the scan read something: {scan:?}");
        scan
    }
}

impl Drop for Scenario {
    /// Keeps the processes' logs in `target/tmp/scenario-logs/<name>/` (the temporary directory
    /// goes): what to read when a scenario fails, in CI too.
    fn drop(&mut self) {
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scenario-logs").join(self.name);
        let _ = std::fs::remove_dir_all(&keep);
        if std::fs::create_dir_all(&keep).is_err() {
            return;
        }
        let mut logs: Vec<PathBuf> =
            std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten().map(|e| e.path()).collect();
        logs.extend(self.extra_logs.lock().unwrap().iter().cloned());
        for path in logs.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
            if let Some(name) = path.file_name() {
                let _ = std::fs::copy(path, keep.join(name));
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// What the secret scan read.
#[derive(Debug, Clone, Copy)]
pub struct LeakScan {
    pub canaries: usize,
    pub log_files: usize,
    pub log_bytes: usize,
    pub response_bytes: usize,
    pub tables: usize,
    pub rows: usize,
    pub db_bytes: usize,
    pub hits: usize,
}

impl std::fmt::Display for LeakScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} canaries, {} log files ({} KiB), {} KiB of responses, {} rows of {} tables ({} KiB): {} hits",
            self.canaries,
            self.log_files,
            self.log_bytes / 1024,
            self.response_bytes / 1024,
            self.rows,
            self.tables,
            self.db_bytes / 1024,
            self.hits
        )
    }
}

/// One `tradeeon_jobs` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub result: Option<Value>,
    pub error: Option<String>,
}

impl JobRow {
    pub fn settled(&self) -> bool {
        self.status == "done" || self.status == "failed"
    }

    /// The check's code (`ok`, `timeout`, …) of a `done` job.
    pub fn code(&self) -> Option<&str> {
        self.result.as_ref().and_then(|r| r["code"].as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Users, credentials, HTTP
// ---------------------------------------------------------------------------------------------

/// A signed-in user: an HS256 Supabase access token for a new user id.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub token: String,
}

impl User {
    pub fn new() -> Self {
        Self::with_id(&UserId::new_random().to_string())
    }

    /// A token for an existing user id.
    pub fn with_id(id: &str) -> Self {
        let id = id.to_string();
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "sub": id, "aud": "authenticated", "role": "authenticated",
            "email": format!("{id}@scenario.example"), "iat": now, "exp": now + 3 * 3600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .expect("sign token");
        Self { id, token }
    }
}

/// Credentials as a user would paste them.
#[derive(Debug, Clone)]
pub struct Creds {
    pub exchange: Exchange,
    pub api_key: String,
    pub api_secret: String,
    pub passphrase: Option<String>,
}

impl Creds {
    pub fn body(&self) -> Value {
        let mut body =
            json!({ "exchange": self.exchange.as_str(), "api_key": self.api_key, "api_secret": self.api_secret });
        if let Some(p) = &self.passphrase {
            body["passphrase"] = json!(p);
        }
        body
    }

    pub fn rotate_body(&self) -> Value {
        let mut body = self.body();
        body.as_object_mut().expect("object").remove("exchange");
        body
    }
}

/// An HTTP client for one API process that keeps every response (status, headers, body) for the
/// secret scan. Cheap to clone.
#[derive(Clone)]
pub struct ApiClient {
    pub base: String,
    http: reqwest::Client,
    seen: Arc<Mutex<String>>,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub elapsed: Duration,
}

impl Reply {
    /// `error.code` of an error body.
    pub fn error_code(&self) -> Option<&str> {
        self.body["error"]["code"].as_str()
    }

    pub fn job_id(&self) -> Option<String> {
        self.body["job"]["id"].as_str().map(str::to_string)
    }
}

impl ApiClient {
    /// Sends a request; `Err` only for a transport failure (refused, reset, timed out).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<&User>,
        body: Option<&Value>,
    ) -> Result<Reply, reqwest::Error> {
        let started = Instant::now();
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        self.read(method, path, response, started).await
    }

    /// A POST with a raw body (malformed JSON on purpose).
    pub async fn post_raw(&self, path: &str, user: &User, body: String) -> Reply {
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&user.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        self.read(reqwest::Method::POST, path, response, started).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    async fn read(
        &self,
        method: reqwest::Method,
        path: &str,
        response: reqwest::Response,
        started: Instant,
    ) -> Result<Reply, reqwest::Error> {
        let status = response.status().as_u16();
        let mut record = format!("{method} {path} -> {status}\n");
        for (name, value) in response.headers() {
            let _ = writeln!(record, "{name}: {}", value.to_str().unwrap_or("<binary>"));
        }
        let text = response.text().await?;
        let elapsed = started.elapsed();
        record.push_str(&text);
        record.push('\n');
        self.seen.lock().unwrap().push_str(&record);
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, body, text, elapsed })
    }

    pub async fn get(&self, path: &str, user: Option<&User>) -> Reply {
        self.send(reqwest::Method::GET, path, user, None).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post(&self, path: &str, user: &User, body: &Value) -> Reply {
        self.send(reqwest::Method::POST, path, Some(user), Some(body))
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn delete(&self, path: &str, user: &User) -> Reply {
        self.send(reqwest::Method::DELETE, path, Some(user), None)
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    /// `POST /connections`; asserts 202 and returns (connection id, job id).
    pub async fn connect(&self, user: &User, creds: &Creds) -> (String, String) {
        let reply = self.post("/connections", user, &creds.body()).await;
        assert_eq!(reply.status, 202, "POST /connections: {}", reply.text);
        let connection = reply.body["connection"]["id"].as_str().expect("connection id").to_string();
        (connection, reply.job_id().expect("job id"))
    }

    /// `POST /connections/test`; asserts 202 and returns the job id.
    pub async fn test_credentials(&self, user: &User, creds: &Creds) -> String {
        let reply = self.post("/connections/test", user, &creds.body()).await;
        assert_eq!(reply.status, 202, "POST /connections/test: {}", reply.text);
        reply.job_id().expect("job id")
    }

    /// `POST /connections/{id}/rotate`; asserts 202 and returns the job id.
    pub async fn rotate(&self, user: &User, connection: &str, creds: &Creds) -> String {
        let reply = self.post(&format!("/connections/{connection}/rotate"), user, &creds.rotate_body()).await;
        assert_eq!(reply.status, 202, "POST /connections/{{id}}/rotate: {}", reply.text);
        reply.job_id().expect("job id")
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting and figures
// ---------------------------------------------------------------------------------------------

/// Polls `probe` every `every` until it returns `Some`; panics with `what` after `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// What a scenario reports: requests/jobs sent, completed, lost, duplicated, errors by kind, and
/// whatever else it measured. Printed, and written to `target/tmp/scenario-figures/<name>.txt`.
#[derive(Debug, Default)]
pub struct Figures {
    pub requests_sent: u64,
    pub jobs_sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub errors: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

impl Figures {
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn report(&self, scenario: &Scenario) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "scenario {}: {:.1} s", scenario.name, scenario.started.elapsed().as_secs_f64());
        let _ = writeln!(
            out,
            "  requests sent {}, jobs sent {}, completed {}, lost {}, duplicated {}",
            self.requests_sent, self.jobs_sent, self.completed, self.lost, self.duplicated
        );
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(out, "  errors by kind: {errors}");
        for note in &self.notes {
            let _ = writeln!(out, "  {note}");
        }
        out
    }

    /// Prints the figures and keeps them in `target/tmp/scenario-figures/`.
    pub fn print(&self, scenario: &Scenario) {
        let report = self.report(scenario);
        println!("{report}");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scenario-figures");
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = std::fs::write(dir.join(format!("{}.txt", scenario.name)), &report);
        }
    }
}

/// Percentile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
