//! A worker environment against the simulator, and deterministic job driving.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use tradeeon_shared::config::{self, ExchangeEndpoints, WorkerConfig};
use tradeeon_shared::domain::{ApiKeyHint, AuditAction, ConnectionId, Exchange, UserId};
use tradeeon_shared::exchanges::kraken::{LocalNonces, NonceSource};
use tradeeon_shared::jobs::{JobId, JobPayload, JobRecord, NewJob};
use tradeeon_shared::store::{AuditEntry, ConnectionRecord, EncryptedCredentials, NewConnection, Store, UserContext};
use tradeeon_shared::vault::{Keyring, SecretValue};
use tradeeon_simulator::{SimState, Simulator};
use tradeeon_worker::exchanges::ExchangeClients;
use tradeeon_worker::jobs::{self, JobEnv, Step};
use tradeeon_worker::limits::RateLimits;

pub use tradeeon_simulator::{
    binance as sim_binance, coinbase as sim_coinbase, kite as sim_kite, kraken as sim_kraken,
};

/// Test defaults: a short exchange timeout (for hang faults), the rest as documented.
pub fn test_config() -> WorkerConfig {
    WorkerConfig { exchange_timeout: std::time::Duration::from_secs(1), ..WorkerConfig::default() }
}

pub struct TestApp {
    pub store: Store,
    pub sim: Simulator,
    pub env: JobEnv,
    pub user: UserContext,
}

/// The simulator's URLs as exchange endpoints.
pub fn endpoints(sim: &Simulator) -> ExchangeEndpoints {
    let env = sim.urls.as_env();
    let map: HashMap<&str, &str> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    config::from_vars(&map).expect("simulator endpoints")
}

/// A worker environment for `store` with the default test configuration.
pub async fn spawn_app(store: Store) -> TestApp {
    spawn_app_with(store, test_config()).await
}

pub async fn spawn_app_with(store: Store, config: WorkerConfig) -> TestApp {
    let sim = Simulator::start(Arc::new(SimState::seeded())).await.expect("simulator");
    let keyring = Arc::new(Keyring::parse(&Keyring::generate_key()).expect("keyring"));
    let env = JobEnv::from_config(store.clone(), keyring, &endpoints(&sim), &config).expect("job env");
    let user = UserContext { user_id: UserId::new_random(), email: None };
    store.ensure_user(&user).await.expect("ensure_user");
    TestApp { store, sim, env, user }
}

/// A worker environment whose rate gate is `limits` (nonces in memory).
pub async fn spawn_app_with_limits(store: Store, config: WorkerConfig, limits: RateLimits) -> TestApp {
    let mut app = spawn_app_with(store, config.clone()).await;
    let nonces: Arc<dyn NonceSource> = Arc::new(LocalNonces::new());
    let clients = ExchangeClients::new(&endpoints(&app.sim), &config, Arc::new(limits), nonces).expect("clients");
    app.env.exchanges = Arc::new(clients);
    app
}

/// Plaintext credentials for a test, encrypted on the way in.
pub struct Keys<'a> {
    pub api_key: &'a str,
    pub api_secret: &'a str,
    pub passphrase: Option<&'a str>,
}

impl<'a> Keys<'a> {
    pub fn new(api_key: &'a str, api_secret: &'a str) -> Self {
        Self { api_key, api_secret, passphrase: None }
    }

    pub fn with_passphrase(mut self, passphrase: &'a str) -> Self {
        self.passphrase = Some(passphrase);
        self
    }
}

impl TestApp {
    pub fn encrypt(&self, plaintext: &str) -> String {
        self.env.keyring.encrypt(&SecretValue::new(plaintext.to_string())).into_inner()
    }

    pub fn encrypt_keys(&self, keys: &Keys<'_>) -> EncryptedCredentials {
        EncryptedCredentials {
            api_key: self.encrypt(keys.api_key),
            api_secret: self.encrypt(keys.api_secret),
            passphrase: keys.passphrase.map(|p| self.encrypt(p)),
        }
    }

    /// Saves a connection (status `pending`) with these keys.
    pub async fn connect(&self, exchange: Exchange, keys: &Keys<'_>) -> ConnectionRecord {
        let new = NewConnection {
            exchange,
            credentials: self.encrypt_keys(keys),
            nickname: None,
            api_key_hint: ApiKeyHint::from_api_key(keys.api_key),
        };
        self.store.upsert_connection(&self.user, new, None).await.expect("upsert_connection")
    }

    pub async fn enqueue(&self, exchange: Exchange, payload: JobPayload) -> JobId {
        let job = NewJob::new(self.user.user_id, exchange, payload);
        self.store.enqueue_job(&job).await.expect("enqueue").expect("not a duplicate").id
    }

    pub async fn enqueue_test(&self, exchange: Exchange, keys: &Keys<'_>) -> JobId {
        self.enqueue(exchange, JobPayload::Test { exchange, credentials: self.encrypt_keys(keys), requested_by: None })
            .await
    }

    /// Claims the job and runs one attempt, without settling it (a crash before settling).
    pub async fn run_unsettled(&self, id: JobId) -> Step {
        let job = self.store.claim_job(id).await.expect("claim").expect("job is claimable");
        jobs::run(&self.env, &job).await
    }

    /// One attempt, settled as the runtime does: finish, or requeue at now + delay.
    pub async fn run_once(&self, id: JobId) -> Step {
        self.run_if_claimable(id).await.expect("job is claimable")
    }

    /// Like [`TestApp::run_once`]; `None` if the job was settled already (as the runtime drops a
    /// late ticket).
    pub async fn run_if_claimable(&self, id: JobId) -> Option<Step> {
        let job = self.store.claim_job(id).await.expect("claim")?;
        let step = jobs::run(&self.env, &job).await;
        match &step {
            Step::Finish(outcome) => assert!(self.store.finish_job(id, outcome, None).await.expect("finish")),
            Step::Retry { after, .. } => {
                let run_at = Utc::now() + chrono::Duration::from_std(*after).expect("delay");
                assert!(self.store.requeue_job(id, run_at, None).await.expect("requeue"));
            }
            Step::Defer { after } => {
                let run_at = Utc::now() + chrono::Duration::from_std(*after).expect("delay");
                assert!(self.store.defer_job(id, run_at, None).await.expect("defer"));
            }
        }
        Some(step)
    }

    /// Runs attempts back to back (as if each retry's delay had passed) until the job settles.
    pub async fn run_to_end(&self, id: JobId) -> Vec<Step> {
        let mut steps = Vec::new();
        loop {
            let step = self.run_once(id).await;
            let done = matches!(step, Step::Finish(_));
            steps.push(step);
            if done {
                return steps;
            }
            assert!(steps.len() < 20, "job never settled: {steps:?}");
        }
    }

    pub async fn job(&self, id: JobId) -> JobRecord {
        self.store.get_job(&self.user, id).await.expect("get_job").expect("job exists")
    }

    pub async fn connection(&self, id: ConnectionId) -> ConnectionRecord {
        self.store.get_connection(&self.user, id).await.expect("get_connection").expect("connection exists")
    }

    /// The user's audit log, oldest first.
    pub async fn audit(&self) -> Vec<AuditEntry> {
        let mut log = self.store.list_audit(&self.user, 100, None).await.expect("list_audit");
        log.reverse();
        log
    }

    pub async fn audit_actions(&self) -> Vec<AuditAction> {
        self.audit().await.into_iter().map(|e| e.action).collect()
    }

    /// Requests the simulator received for `exchange`.
    pub fn requests(&self, exchange: Exchange) -> usize {
        self.sim.state.faults.requests(exchange).len()
    }
}

/// The check result a settled job carries.
pub fn done(step: &Step) -> &tradeeon_shared::exchanges::CheckResult {
    match step {
        Step::Finish(tradeeon_shared::jobs::JobOutcome::Done(result)) => result,
        other => panic!("expected a settled check result, got {other:?}"),
    }
}

/// The result an attempt that will be retried carries.
pub fn retried(step: &Step) -> (std::time::Duration, &tradeeon_shared::exchanges::CheckResult) {
    match step {
        Step::Retry { after, last: Some(result) } => (*after, result),
        other => panic!("expected a retry with a result, got {other:?}"),
    }
}

/// The delay of an attempt our rate gate held back (nothing sent, attempt not counted).
pub fn deferred(step: &Step) -> std::time::Duration {
    match step {
        Step::Defer { after } => *after,
        other => panic!("expected a deferral, got {other:?}"),
    }
}

pub fn failed(step: &Step) -> &str {
    match step {
        Step::Finish(tradeeon_shared::jobs::JobOutcome::Failed(message)) => message,
        other => panic!("expected a failed job, got {other:?}"),
    }
}
