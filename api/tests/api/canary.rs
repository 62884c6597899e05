//! Canary secrets: submit recognisable plaintext credentials through every route that takes one
//! (and through failing requests), then look for them everywhere they must not be — every log
//! line the app wrote (captured at TRACE), every response (bodies and headers), and the database
//! (every table on PostgreSQL; the raw database files on SQLite). Only Fernet tokens may be
//! stored.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::helpers::{self, Backend, LogBuffer, TestApp};

#[tokio::test]
async fn postgres() {
    with_captured_logs(Backend::Postgres).await;
}

#[tokio::test]
async fn sqlite() {
    with_captured_logs(Backend::Sqlite).await;
}

async fn with_captured_logs(backend: Backend) {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // #[tokio::test] runs everything (the app's tasks included) on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let canaries = Canaries::new();
    let seen = Arc::new(Mutex::new(String::new()));
    let (c, s) = (canaries.clone(), seen.clone());
    helpers::run(backend, &[], move |app| exercise(app, c, s)).await;

    let logs = logs.text();
    assert!(logs.contains("tradeeon_api"), "the app's logs were captured ({} bytes)", logs.len());
    let responses = seen.lock().unwrap().clone();
    for canary in canaries.all() {
        assert!(!logs.contains(&canary), "canary {canary} in the logs");
        assert!(!responses.contains(&canary), "canary {canary} in a response");
    }
}

#[derive(Clone)]
struct Canaries {
    key: String,
    secret: String,
    kraken_secret: String,
    otp: String,
    rotated_key: String,
    rotated_secret: String,
    kite_secret: String,
    request_token: String,
    rejected: String,
}

impl Canaries {
    fn new() -> Self {
        let tag = tradeeon_shared::jobs::JobId::new().to_string();
        Self {
            key: format!("CANARYKEY{tag}"),
            secret: format!("CANARYSECRET{tag}"),
            kraken_secret: base64::engine::general_purpose::STANDARD.encode(format!("CANARYKRAKEN{tag}")),
            otp: format!("CANARYOTP{tag}"),
            rotated_key: format!("CANARYROTKEY{tag}"),
            rotated_secret: format!("CANARYROTSECRET{tag}"),
            kite_secret: format!("CANARYKITE{tag}"),
            request_token: format!("CANARYTOKEN{tag}"),
            rejected: format!("CANARYREJECTED{tag}"),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![
            self.key.clone(),
            self.secret.clone(),
            self.kraken_secret.clone(),
            self.otp.clone(),
            self.rotated_key.clone(),
            self.rotated_secret.clone(),
            self.kite_secret.clone(),
            self.request_token.clone(),
            self.rejected.clone(),
        ]
    }
}

async fn record(seen: &Mutex<String>, response: reqwest::Response) -> Value {
    let mut text = format!("{:?}\n", response.headers());
    let body = response.text().await.unwrap();
    text.push_str(&body);
    seen.lock().unwrap().push_str(&text);
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

async fn exercise(app: TestApp, c: Canaries, seen: Arc<Mutex<String>>) {
    let user = app.user();
    let created = record(
        &seen,
        app.post(
            "/connections",
            Some(&user),
            &json!({ "exchange": "binance", "api_key": c.key, "api_secret": c.secret }),
        )
        .await,
    )
    .await;
    let connection_id = created["connection"]["id"].as_str().unwrap().to_owned();
    record(
        &seen,
        app.post(
            "/connections/test",
            Some(&user),
            &json!({ "exchange": "kraken", "api_key": c.key, "api_secret": c.kraken_secret, "passphrase": c.otp }),
        )
        .await,
    )
    .await;
    app.finish_job(created["job"]["id"].as_str().unwrap()).await;
    let rotated = record(
        &seen,
        app.post(
            &format!("/connections/{connection_id}/rotate"),
            Some(&user),
            &json!({ "api_key": c.rotated_key, "api_secret": c.rotated_secret }),
        )
        .await,
    )
    .await;
    assert_eq!(rotated["job"]["kind"], "rotate");
    let login = record(
        &seen,
        app.post(
            "/connections/zerodha/login",
            Some(&user),
            &json!({ "api_key": "kitepublicapp", "api_secret": c.kite_secret }),
        )
        .await,
    )
    .await;
    let session = record(
        &seen,
        app.post(
            "/connections/zerodha/session",
            Some(&user),
            &json!({ "request_token": c.request_token, "state": login["state"] }),
        )
        .await,
    )
    .await;
    assert_eq!(session["job"]["kind"], "kite_session");
    // Kite's redirect brings the browser back with the request token in the query string.
    let callback =
        app.get(&format!("/kite/callback?action=login&status=success&request_token={}", c.request_token), None).await;
    assert_eq!(callback.status(), 200);
    record(&seen, callback).await;

    // Rejected requests must not echo what they rejected either.
    for body in [
        json!({ "exchange": "kraken", "api_key": "k", "api_secret": format!("{}!", c.rejected) }),
        json!({ "exchange": "binance", "api_key": c.rejected, "api_secret": "s", "unknown": c.rejected }),
        json!({ "exchange": c.rejected, "api_key": "k", "api_secret": "s" }),
        json!({ "exchange": "binance", "api_key": [c.rejected], "api_secret": "s" }),
        json!({ "exchange": "coinbase", "api_key": c.rejected, "api_secret": "s" }),
    ] {
        let error = record(&seen, app.post("/connections", Some(&user), &body).await).await;
        assert!(error["error"].is_object(), "{error}");
    }
    let raw = app
        .client
        .post(app.url("/connections"))
        .bearer_auth(&user.token)
        .header("content-type", "application/json")
        .body(format!("{{\"api_key\": \"{}\"", c.rejected))
        .send()
        .await
        .unwrap();
    record(&seen, raw).await;
    for path in ["/connections", "/connections/audit", "/openapi.json"] {
        record(&seen, app.get(path, Some(&user)).await).await;
    }
    record(&seen, app.metrics().await).await;
    for job in [created["job"]["id"].as_str().unwrap(), rotated["job"]["id"].as_str().unwrap()] {
        record(&seen, app.get(&format!("/jobs/{job}"), Some(&user)).await).await;
    }

    // The database holds only Fernet tokens.
    let stored = app
        .texts(
            "SELECT COALESCE(api_key_encrypted, '') || ' ' || COALESCE(api_secret_encrypted, '') || ' ' || COALESCE(passphrase_encrypted, '') FROM public.exchange_keys",
            "SELECT COALESCE(api_key_encrypted, '') || ' ' || COALESCE(api_secret_encrypted, '') || ' ' || COALESCE(passphrase_encrypted, '') FROM exchange_keys",
        )
        .await;
    for row in stored.iter().flatten() {
        for token in row.split_whitespace() {
            assert!(token.starts_with("gAAAAA"), "a stored credential is not a Fernet token");
        }
    }
    let everything = dump(&app).await;
    assert!(everything.len() > 1000, "the dump has content");
    for canary in c.all() {
        assert!(!everything.contains(&canary), "canary {canary} stored in the database");
    }
}

/// Every byte the database holds, as text.
async fn dump(app: &TestApp) -> String {
    if let Some(pool) = app.store.pg_pool() {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
              WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mut out = String::new();
        for table in tables {
            let rows: Vec<Option<String>> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
                    .fetch_all(pool)
                    .await
                    .unwrap();
            for row in rows.into_iter().flatten() {
                out.push_str(&row);
                out.push('\n');
            }
        }
        out
    } else {
        // Checkpoint-free: read the main file and the WAL as they are.
        let dir = app.sqlite_dir.as_ref().unwrap();
        let mut out = String::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
        out
    }
}
