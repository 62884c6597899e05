//! Spawns the API on `127.0.0.1:0` against a fresh database of either backend, and mints tokens.
//!
//! * SQLite: a file in a temporary directory.
//! * PostgreSQL: `CREATE DATABASE tradeeon_test_<ulid>` through `TEST_DATABASE_ADMIN_URL`
//!   (default `postgres://postgres@127.0.0.1:5432/postgres`), dropped `WITH (FORCE)` when the
//!   case ends, also when it panics.
//!
//! Every app also gets a JWKS server of its own (ES256 and RS256 keys) that counts its hits, so
//! tests can use all three token kinds Supabase issues.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse as _;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::net::TcpListener;
use tradeeon_shared::config::Config;
use tradeeon_shared::domain::Permissions;
use tradeeon_shared::exchanges::{CheckResult, Verdict};
use tradeeon_shared::jobs::{JobId, JobOutcome};
use tradeeon_shared::store::Store;
use tradeeon_shared::vault::Keyring;
use uuid::Uuid;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DB_PREFIX: &str = "tradeeon_test_";
const CASE_TIMEOUT: Duration = Duration::from_secs(90);

pub const JWT_SECRET: &str = "test-supabase-jwt-secret-with-enough-entropy-0123456789";
pub const AUDIENCE: &str = "authenticated";
pub const EC_KID: &str = "ec-test-key";
pub const RSA_KID: &str = "rsa-test-key";
pub const RSA_PRIVATE_PEM: &str = include_str!("fixtures/rsa_test_key.pem");
pub const RSA_PUBLIC_PEM: &str = include_str!("fixtures/rsa_test_key.pub.pem");
const RSA_MODULUS_B64: &str = include_str!("fixtures/rsa_test_key.n");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Generates `mod <case> { fn postgres(); fn sqlite() }` for each `async fn <case>(TestApp)`.
macro_rules! both {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn postgres() {
                crate::helpers::run(crate::helpers::Backend::Postgres, &[], super::$case).await;
            }
            #[tokio::test]
            async fn sqlite() {
                crate::helpers::run(crate::helpers::Backend::Sqlite, &[], super::$case).await;
            }
        }
    )+};
}

/// Like `both!`, with extra environment for the app: `both_with!([("VAR", "value")], case, ...)`.
macro_rules! both_with {
    ($env:tt, $($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn postgres() {
                crate::helpers::run(crate::helpers::Backend::Postgres, &$env, super::$case).await;
            }
            #[tokio::test]
            async fn sqlite() {
                crate::helpers::run(crate::helpers::Backend::Sqlite, &$env, super::$case).await;
            }
        }
    )+};
}

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// The signing keys behind a JWKS server.
pub struct Keys {
    pub ec_pem: String,
    pub ec_public_pem: String,
    pub ec_jwk: Value,
    pub rsa_jwk: Value,
}

impl Keys {
    pub fn generate() -> Self {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let ec_pem = secret.to_pkcs8_pem(LineEnding::LF).expect("pkcs8 pem").to_string();
        let public = secret.public_key();
        let ec_public_pem = public.to_public_key_pem(LineEnding::LF).expect("public pem");
        let point = public.to_encoded_point(false);
        let ec_jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": EC_KID, "alg": "ES256", "use": "sig",
            "x": B64.encode(point.x().expect("x")), "y": B64.encode(point.y().expect("y")),
        });
        let rsa_jwk = json!({
            "kty": "RSA", "kid": RSA_KID, "alg": "RS256", "use": "sig",
            "n": RSA_MODULUS_B64.trim(), "e": "AQAB",
        });
        Self { ec_pem, ec_public_pem, ec_jwk, rsa_jwk }
    }

    pub fn jwks(&self) -> Value {
        // An HS ("oct") key in the set must never be used: it is a classic confusion vector.
        json!({ "keys": [self.ec_jwk, self.rsa_jwk, { "kty": "oct", "kid": "hs-key", "k": B64.encode(JWT_SECRET) }] })
    }
}

/// A JWKS endpoint at `{url}auth/v1/.well-known/jwks.json` that counts requests. What it
/// answers can be changed while it runs: the key set, a `Cache-Control` header, or a 500.
pub struct JwksServer {
    pub url: url::Url,
    pub hits: Arc<AtomicUsize>,
    answer: Arc<std::sync::Mutex<JwksAnswer>>,
    _task: tokio::task::JoinHandle<()>,
}

struct JwksAnswer {
    jwks: Value,
    cache_control: Option<&'static str>,
    failing: bool,
}

impl JwksServer {
    pub async fn start(jwks: Value) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(std::sync::Mutex::new(JwksAnswer { jwks, cache_control: None, failing: false }));
        let counter = hits.clone();
        let serving = answer.clone();
        let app = Router::new().route(
            "/auth/v1/.well-known/jwks.json",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = serving.lock().unwrap();
                let mut response = if answer.failing {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                } else {
                    axum::Json(answer.jwks.clone()).into_response()
                };
                if let Some(value) = answer.cache_control {
                    response.headers_mut().insert("cache-control", axum::http::HeaderValue::from_static(value));
                }
                std::future::ready(response)
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind jwks");
        let addr = listener.local_addr().expect("jwks addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: url::Url::parse(&format!("http://{addr}/")).expect("url"), hits, answer, _task: task }
    }

    /// Publishes `jwks` from now on.
    pub fn publish(&self, jwks: Value) {
        self.answer.lock().unwrap().jwks = jwks;
    }

    pub fn set_cache_control(&self, value: Option<&'static str>) {
        self.answer.lock().unwrap().cache_control = value;
    }

    /// Answers 500 from now on (or again the key set).
    pub fn set_failing(&self, failing: bool) {
        self.answer.lock().unwrap().failing = failing;
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Claims of a token for `user` from the project this server publishes the keys of.
    pub fn claims(&self, user: Uuid) -> Value {
        project_claims(user, &self.url)
    }
}

/// Claims of a normal Supabase access token for `user`, with no `iss` (for a server without
/// `SUPABASE_URL`).
pub fn claims(user: Uuid) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "sub": user.to_string(), "aud": AUDIENCE, "role": "authenticated",
        "email": format!("{user}@example.com"), "iat": now, "exp": now + 3600,
    })
}

/// Claims of a normal access token for `user` issued by the Supabase project at `supabase_url`.
pub fn project_claims(user: Uuid, supabase_url: &url::Url) -> Value {
    let mut claims = claims(user);
    claims["iss"] = json!(supabase_url.join("auth/v1").expect("issuer").as_str());
    claims
}

pub fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("encode hs256")
}

pub fn es256(claims: &Value, keys: &Keys, kid: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_pem(keys.ec_pem.as_bytes()).expect("ec key"))
        .expect("encode es256")
}

pub fn rs256(claims: &Value, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("rsa key"))
        .expect("encode rs256")
}

/// A token with an arbitrary header, signed with HMAC-SHA256 under `key` (or unsigned with
/// `key: None`), for tokens a JWT library refuses to make.
pub fn raw_token(header: &Value, claims: &Value, key: Option<&[u8]>) -> String {
    use hmac::{Hmac, Mac};
    let signing_input = format!(
        "{}.{}",
        B64.encode(serde_json::to_vec(header).unwrap()),
        B64.encode(serde_json::to_vec(claims).unwrap())
    );
    let signature = match key {
        None => String::new(),
        Some(key) => {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
            mac.update(signing_input.as_bytes());
            B64.encode(mac.finalize().into_bytes())
        }
    };
    format!("{signing_input}.{signature}")
}

/// Captures what a tracing subscriber writes (give it `move || buffer.clone()` as its writer).
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A signed-in user of the app under test.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub token: String,
}

pub struct TestApp {
    pub backend: Backend,
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub keyring: Arc<Keyring>,
    pub keys: Keys,
    pub jwks: JwksServer,
    /// Where a SQLite database lives (to grep its files).
    pub sqlite_dir: Option<PathBuf>,
    pub metrics_registry: prometheus::Registry,
    /// The metrics listener (`API_METRICS_PORT` in production), apart from `base`.
    pub metrics_base: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn user(&self) -> TestUser {
        let id = Uuid::new_v4();
        TestUser { id, token: hs256(&self.jwks.claims(id), JWT_SECRET) }
    }

    /// `GET /metrics` on the metrics listener.
    pub async fn metrics(&self) -> reqwest::Response {
        self.client.get(format!("{}/metrics", self.metrics_base)).send().await.expect("metrics listener answers")
    }

    pub async fn get(&self, path: &str, user: Option<&TestUser>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        request.send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, user: Option<&TestUser>, body: &Value) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        request.send().await.expect("POST")
    }

    pub async fn delete(&self, path: &str, user: Option<&TestUser>) -> reqwest::Response {
        let mut request = self.client.delete(self.url(path));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        request.send().await.expect("DELETE")
    }

    /// `POST /connections` with valid Binance-shaped credentials; returns the 202 body.
    pub async fn connect_binance(&self, user: &TestUser, key: &str) -> Value {
        let response = self
            .post("/connections", Some(user), &json!({ "exchange": "binance", "api_key": key, "api_secret": "s3cr3t" }))
            .await;
        assert_eq!(response.status(), 202, "connect: {}", response.text().await.unwrap_or_default());
        response.json().await.expect("json")
    }

    /// Plays the worker: settles a job as done with a passing check.
    pub async fn finish_job(&self, job_id: &str) {
        let id: JobId = job_id.parse().expect("job id");
        self.store.claim_job(id).await.expect("claim").expect("claimable");
        let passed = Ok(Verdict { permissions: Permissions::default(), warnings: vec![] });
        let result = CheckResult { permissions: None, ..CheckResult::new(passed, Duration::from_millis(12)) };
        assert!(self.store.finish_job(id, &JobOutcome::Done(result), None).await.expect("finish"));
    }

    /// Runs a query returning text rows (`sqlite_sql` binds nothing; both return one text column).
    pub async fn texts(&self, pg_sql: &str, sqlite_sql: &str) -> Vec<Option<String>> {
        if let Some(pool) = self.store.pg_pool() {
            sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(pg_sql.to_owned()))
                .fetch_all(pool)
                .await
                .expect("pg query")
        } else {
            let pool = self.store.sqlite_pool().expect("sqlite pool");
            sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(sqlite_sql.to_owned()))
                .fetch_all(pool)
                .await
                .expect("sqlite query")
        }
    }

    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        if let Some(pool) = self.store.pg_pool() {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql)).fetch_one(pool).await.expect("count")
        } else {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .fetch_one(self.store.sqlite_pool().expect("sqlite"))
                .await
                .expect("count")
        }
    }
}

/// Starts an app on `backend` with `env` on top of the test defaults, runs `case`, cleans up.
pub async fn run<F, Fut>(backend: Backend, env: &[(&'static str, &'static str)], case: F)
where
    F: FnOnce(TestApp) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let env: Vec<(&'static str, String)> = env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}/tradeeon.db", dir.path().display());
            let path = dir.path().to_path_buf();
            isolate(async move { start_and_run(backend, url, Some(path), env, case).await }).await;
            drop(dir);
        }
        Backend::Postgres => {
            let name = format!("{DB_PREFIX}{}", tradeeon_shared::jobs::JobId::new().to_string().to_lowercase());
            let mut admin = PgConnection::connect(&admin_url()).await.expect("connect to admin database");
            sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.expect("create db");
            let mut url = url::Url::parse(&admin_url()).expect("admin url");
            url.set_path(&name);
            let url = url.to_string();
            let outcome =
                tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, start_and_run(backend, url, None, env, case))).await;
            if let Err(e) = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut admin)
                .await
            {
                eprintln!("could not drop test database {name}: {e}");
            }
            let _ = admin.close().await;
            settle(outcome);
        }
    }
}

async fn isolate(body: impl Future<Output = ()> + Send + 'static) {
    settle(tokio::spawn(tokio::time::timeout(CASE_TIMEOUT, body)).await);
}

fn settle(outcome: Result<Result<(), tokio::time::error::Elapsed>, tokio::task::JoinError>) {
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("test case timed out after {CASE_TIMEOUT:?}"),
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// The configuration a test app runs with (the same parser production uses).
pub fn test_config(database_url: &str, jwks_base: &str, env: &[(&'static str, String)]) -> Config {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", database_url.to_owned()),
        ("SUPABASE_URL", jwks_base.to_owned()),
        ("SUPABASE_JWT_SECRET", JWT_SECRET.to_owned()),
        ("API_USER_RATE_LIMIT_PER_MINUTE", "1000".to_owned()),
        ("EGRESS_IPS", "52.1.2.3, 2600:1f18::1".to_owned()),
        ("KITE_LOGIN_URL", "https://kite.example.test/connect/login".to_owned()),
    ]);
    for (k, v) in env {
        vars.insert(k, v.clone());
    }
    tradeeon_shared::config::from_vars(&vars).expect("test config")
}

async fn start_and_run<F, Fut>(
    backend: Backend,
    database_url: String,
    sqlite_dir: Option<PathBuf>,
    env: Vec<(&'static str, String)>,
    case: F,
) where
    F: FnOnce(TestApp) -> Fut,
    Fut: Future<Output = ()>,
{
    let store = Store::connect(&database_url, 5).await.expect("connect");
    store.migrate().await.expect("migrate");
    let keys = Keys::generate();
    let jwks = JwksServer::start(keys.jwks()).await;
    let config = test_config(&database_url, jwks.url.as_str(), &env);
    let keyring = Arc::new(Keyring::parse(&Keyring::generate_key()).expect("keyring"));
    let registry = prometheus::Registry::new();
    let state =
        tradeeon_api::AppState::new(&config, store.clone(), keyring.clone(), registry.clone()).expect("app state");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tradeeon_api::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let metrics_addr = metrics_listener.local_addr().expect("metrics addr");
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = tokio::spawn(tradeeon_api::run_metrics(metrics_listener, registry.clone(), async move {
        let _ = metrics_stopped.await;
    }));
    let app = TestApp {
        backend,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().user_agent("tradeeon-tests/1.0").build().expect("client"),
        store: store.clone(),
        keyring,
        keys,
        jwks,
        sqlite_dir,
        metrics_registry: registry,
        metrics_base: format!("http://{metrics_addr}"),
    };
    case(app).await;
    let _ = stop_tx.send(());
    let _ = stop_metrics.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), metrics_server).await;
    store.close().await;
}

/// The error body's `error` object, asserting the status.
pub async fn error_of(response: reqwest::Response, status: u16) -> Value {
    let actual = response.status().as_u16();
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(actual, status, "body: {body}");
    let error = body.get("error").cloned().unwrap_or_else(|| panic!("no `error` in {body}"));
    assert!(error["code"].is_string() && error["message"].is_string(), "{body}");
    error
}
