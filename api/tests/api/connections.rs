//! `GET/POST /connections`, `POST /connections/test`, rotate and revoke.

use serde_json::{Value, json};

use crate::helpers::{self, Backend, TestApp};

both!(
    list_starts_empty_and_shows_a_new_connection,
    one_connection_reads_like_the_list,
    connect_writes_connection_audit_and_job_together,
    connect_again_while_verifying_is_409_and_changes_nothing,
    reconnect_after_verify_replaces_the_keys,
    test_stores_nothing_and_enqueues_encrypted_credentials,
    rotate_enqueues_one_job_and_a_second_is_409,
    rotate_refuses_unknown_ids_and_zerodha,
    revoke_soft_deletes_wipes_secrets_and_cancels_jobs,
    coinbase_and_kraken_shapes,
);

const CONNECTION_KEYS: [&str; 12] = [
    "api_key_hint",
    "created_at",
    "exchange",
    "features",
    "id",
    "last_checked_at",
    "last_latency_ms",
    "nickname",
    "permissions",
    "status",
    "status_message",
    "updated_at",
];
const JOB_KEYS: [&str; 10] =
    ["attempts", "connection_id", "created_at", "error", "finished_at", "id", "kind", "result", "started_at", "status"];

pub fn keys_of(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

async fn list_starts_empty_and_shows_a_new_connection(app: TestApp) {
    let user = app.user();
    let response = app.get("/connections", Some(&user)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!([]));

    let created = app.connect_binance(&user, "BINANCEKEY1234WXYZ").await;
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1);
    let connection = &list[0];
    assert_eq!(keys_of(connection), CONNECTION_KEYS);
    assert_eq!(connection, &created["connection"]);
    assert_eq!(connection["exchange"], "binance");
    assert_eq!(connection["status"], "pending");
    assert_eq!(connection["api_key_hint"], "…WXYZ");
    assert_eq!(connection["permissions"], Value::Null);
    assert_eq!(connection["features"], json!({ "trading": true, "wallet": true, "paper": false }));
}

async fn one_connection_reads_like_the_list(app: TestApp) {
    let user = app.user();
    let created = app.connect_binance(&user, "ONEKEY0001").await;
    let id = created["connection"]["id"].as_str().unwrap();
    let response = app.get(&format!("/connections/{id}"), Some(&user)).await;
    assert_eq!(response.status(), 200);
    let one: Value = response.json().await.unwrap();
    assert_eq!(keys_of(&one), CONNECTION_KEYS);
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    assert_eq!(one, list[0]);

    let unknown = format!("/connections/{}", uuid::Uuid::new_v4());
    assert_eq!(helpers::error_of(app.get(&unknown, Some(&user)).await, 404).await["code"], "not_found");
    assert_eq!(helpers::error_of(app.get("/connections/nope", Some(&user)).await, 400).await["field"], "id");
    assert_eq!(app.get(&format!("/connections/{id}"), None).await.status(), 401);
    assert_eq!(app.delete(&format!("/connections/{id}"), Some(&user)).await.status(), 200);
    assert_eq!(
        helpers::error_of(app.get(&format!("/connections/{id}"), Some(&user)).await, 404).await["code"],
        "not_found"
    );
}

async fn connect_writes_connection_audit_and_job_together(app: TestApp) {
    let user = app.user();
    let response = app
        .post(
            "/connections",
            Some(&user),
            &json!({ "exchange": "BINANCE", "api_key": "  key-abc-123  ", "api_secret": "sec-xyz", "nickname": " Main " }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(keys_of(&body), ["connection", "job"]);
    let connection = &body["connection"];
    assert_eq!(connection["nickname"], "Main");
    assert_eq!(connection["api_key_hint"], "…-123", "the key is trimmed before the hint is taken");
    let job = &body["job"];
    assert_eq!(keys_of(job), JOB_KEYS);
    assert_eq!(job["kind"], "verify");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["connection_id"], connection["id"]);
    assert_eq!(job["result"], Value::Null);

    // The job is really there, and the caller can read it.
    let fetched: Value =
        app.get(&format!("/jobs/{}", job["id"].as_str().unwrap()), Some(&user)).await.json().await.unwrap();
    assert_eq!(&fetched, job);

    // Stored encrypted: Fernet tokens that decrypt (in the test, not the API) to the trimmed input.
    let stored = app
        .texts(
            "SELECT api_key_encrypted || '|' || api_secret_encrypted FROM public.exchange_keys",
            "SELECT api_key_encrypted || '|' || api_secret_encrypted FROM exchange_keys",
        )
        .await;
    let stored = stored[0].clone().unwrap();
    let (key, secret) = stored.split_once('|').unwrap();
    assert!(key.starts_with("gAAAAA") && secret.starts_with("gAAAAA"), "{stored}");
    let decrypt = |t: &str| app.keyring.decrypt(&t.to_owned().into()).unwrap().value.expose().to_owned();
    assert_eq!(decrypt(key), "key-abc-123");
    assert_eq!(decrypt(secret), "sec-xyz");

    // The audit row: `connected`, stage submitted, with the client's address and User-Agent.
    let audit: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    let audit = audit.as_array().unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["action"], "connected");
    assert_eq!(audit[0]["connection_id"], connection["id"]);
    assert_eq!(audit[0]["details"]["stage"], "submitted");
    assert_eq!(audit[0]["details"]["job_id"], job["id"]);
    assert_eq!(audit[0]["ip_address"], "127.0.0.1");
    assert_eq!(audit[0]["user_agent"], "tradeeon-tests/1.0");
}

async fn connect_again_while_verifying_is_409_and_changes_nothing(app: TestApp) {
    let user = app.user();
    let first = app.connect_binance(&user, "FIRSTKEY0001").await;
    let response = app
        .post(
            "/connections",
            Some(&user),
            &json!({ "exchange": "binance", "api_key": "SECONDKEY0002", "api_secret": "s" }),
        )
        .await;
    let error = helpers::error_of(response, 409).await;
    assert_eq!(error["code"], "job_in_progress");
    assert_eq!(error["job_id"], first["job"]["id"]);
    // Rolled back: the first keys and audit trail are untouched, no second job.
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    assert_eq!(list[0]["api_key_hint"], "…0001");
    assert_eq!(app.count("tradeeon_jobs").await, 1);
    assert_eq!(app.count("connection_audit_log").await, 1);
}

async fn reconnect_after_verify_replaces_the_keys(app: TestApp) {
    let user = app.user();
    let first = app.connect_binance(&user, "FIRSTKEY0001").await;
    app.finish_job(first["job"]["id"].as_str().unwrap()).await;
    let second = app.connect_binance(&user, "SECONDKEY0002").await;
    assert_eq!(second["connection"]["id"], first["connection"]["id"], "upserted by (user, exchange)");
    assert_eq!(second["connection"]["api_key_hint"], "…0002");
    assert_ne!(second["job"]["id"], first["job"]["id"]);
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

async fn test_stores_nothing_and_enqueues_encrypted_credentials(app: TestApp) {
    let user = app.user();
    let response = app
        .post(
            "/connections/test",
            Some(&user),
            &json!({ "exchange": "kraken", "api_key": "kraken-key-plain", "api_secret": "c2VjcmV0LXBsYWlu", "passphrase": "otp-plain" }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(keys_of(&body), ["job"]);
    assert_eq!(body["job"]["kind"], "test");
    assert_eq!(body["job"]["status"], "queued");
    assert_eq!(body["job"]["connection_id"], Value::Null);
    assert_eq!(app.count("exchange_keys").await, 0);

    let payloads =
        app.texts("SELECT payload::text FROM public.tradeeon_jobs", "SELECT payload FROM tradeeon_jobs").await;
    let payload: Value = serde_json::from_str(payloads[0].as_deref().unwrap()).unwrap();
    for field in ["api_key", "api_secret", "passphrase"] {
        let token = payload["credentials"][field].as_str().unwrap();
        assert!(token.starts_with("gAAAAA"), "{field} is a Fernet token");
    }
    let text = payloads[0].clone().unwrap();
    for plain in ["kraken-key-plain", "c2VjcmV0LXBsYWlu", "otp-plain"] {
        assert!(!text.contains(plain), "plaintext {plain} in the job table");
    }
    // The `tested` entry is written with the verdict when the job settles, with this request's
    // client as its requester.
    let audit: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    assert_eq!(audit, json!([]));
    app.finish_job(body["job"]["id"].as_str().unwrap()).await;
    let audit: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    assert_eq!(audit.as_array().unwrap().len(), 1);
    assert_eq!(audit[0]["action"], "tested");
    assert_eq!(audit[0]["connection_id"], Value::Null);
    assert_eq!(audit[0]["ip_address"], "127.0.0.1");
    assert_eq!(audit[0]["user_agent"], "tradeeon-tests/1.0");
    assert_eq!(audit[0]["details"]["exchange"], "kraken");
    assert_eq!(audit[0]["details"]["job_id"], body["job"]["id"]);
    assert_eq!(audit[0]["details"]["outcome"], "done");
    assert_eq!(audit[0]["details"]["ok"], true);
    assert_eq!(audit[0]["details"]["code"], "ok");
}

async fn rotate_enqueues_one_job_and_a_second_is_409(app: TestApp) {
    let user = app.user();
    let created = app.connect_binance(&user, "OLDKEY0001").await;
    let id = created["connection"]["id"].as_str().unwrap().to_owned();
    let rotate = json!({ "api_key": "NEWKEY0002", "api_secret": "new-secret" });

    // The verify job is still queued: a rotation must wait for it.
    let error =
        helpers::error_of(app.post(&format!("/connections/{id}/rotate"), Some(&user), &rotate).await, 409).await;
    assert_eq!(error["job_id"], created["job"]["id"]);

    app.finish_job(created["job"]["id"].as_str().unwrap()).await;
    let response = app.post(&format!("/connections/{id}/rotate"), Some(&user), &rotate).await;
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["job"]["kind"], "rotate");
    assert_eq!(job["job"]["connection_id"], id.as_str());

    let error =
        helpers::error_of(app.post(&format!("/connections/{id}/rotate"), Some(&user), &rotate).await, 409).await;
    assert_eq!(error["code"], "job_in_progress");
    assert_eq!(error["job_id"], job["job"]["id"]);

    // Nothing swapped yet: that is the worker's job once the new keys pass.
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    assert_eq!(list[0]["api_key_hint"], "…0001");
}

async fn rotate_refuses_unknown_ids_and_zerodha(app: TestApp) {
    let user = app.user();
    let rotate = json!({ "api_key": "NEWKEY0002", "api_secret": "new-secret" });
    let unknown = uuid::Uuid::new_v4();
    let error =
        helpers::error_of(app.post(&format!("/connections/{unknown}/rotate"), Some(&user), &rotate).await, 404).await;
    assert_eq!(error["code"], "not_found");
    let error = helpers::error_of(app.post("/connections/not-a-uuid/rotate", Some(&user), &rotate).await, 400).await;
    assert_eq!((error["code"].as_str(), error["field"].as_str()), (Some("invalid_id"), Some("id")));

    let login = app
        .post("/connections/zerodha/login", Some(&user), &json!({ "api_key": "kiteapp", "api_secret": "kitesecret" }))
        .await;
    assert_eq!(login.status(), 200);
    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    let id = list[0]["id"].as_str().unwrap();
    let error =
        helpers::error_of(app.post(&format!("/connections/{id}/rotate"), Some(&user), &rotate).await, 400).await;
    assert_eq!(error["code"], "use_zerodha_login");
}

async fn revoke_soft_deletes_wipes_secrets_and_cancels_jobs(app: TestApp) {
    let user = app.user();
    let created = app.connect_binance(&user, "KEY0001").await;
    let id = created["connection"]["id"].as_str().unwrap().to_owned();

    let response = app.delete(&format!("/connections/{id}"), Some(&user)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].is_string());

    assert_eq!(app.get("/connections", Some(&user)).await.json::<Value>().await.unwrap(), json!([]));
    // Soft delete: the row stays, inactive, with its secrets overwritten.
    let rows = app
        .texts(
            "SELECT is_active::text || '|' || api_key_encrypted || '|' || api_secret_encrypted || '|' || COALESCE(passphrase_encrypted, 'NULL') FROM public.exchange_keys",
            "SELECT is_active || '|' || api_key_encrypted || '|' || api_secret_encrypted || '|' || COALESCE(passphrase_encrypted, 'NULL') FROM exchange_keys",
        )
        .await;
    let expected_inactive = if app.backend == Backend::Postgres { "false||" } else { "0||" };
    assert_eq!(rows, vec![Some(format!("{expected_inactive}|NULL"))]);

    // The queued verify job was cancelled with the revoke.
    let job: Value =
        app.get(&format!("/jobs/{}", created["job"]["id"].as_str().unwrap()), Some(&user)).await.json().await.unwrap();
    assert_eq!(job["status"], "failed");
    assert!(job["error"].as_str().unwrap().contains("revoked"));

    let audit: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    assert_eq!(audit[0]["action"], "revoked");
    assert_eq!(audit[0]["connection_id"], id.as_str());
    assert_eq!(audit[0]["ip_address"], "127.0.0.1");

    // Again: it is gone.
    helpers::error_of(app.delete(&format!("/connections/{id}"), Some(&user)).await, 404).await;
    helpers::error_of(app.delete("/connections/123", Some(&user)).await, 400).await;
    // Connecting again reactivates it with new keys.
    let again = app.connect_binance(&user, "KEY0002").await;
    assert_eq!(again["connection"]["id"], id.as_str());
}

async fn coinbase_and_kraken_shapes(app: TestApp) {
    let user = app.user();
    use p256::pkcs8::LineEnding;
    let pem = p256::SecretKey::random(&mut rand::rngs::OsRng).to_sec1_pem(LineEnding::LF).unwrap().to_string();
    let cdp = json!({ "exchange": "coinbase", "api_key": "organizations/org-1/apiKeys/key-1", "api_secret": pem });
    assert_eq!(app.post("/connections/test", Some(&user), &cdp).await.status(), 202);
    let exchange = json!({ "exchange": "coinbase", "api_key": "cbkey", "api_secret": "c2VjcmV0", "passphrase": "pp" });
    assert_eq!(app.post("/connections/test", Some(&user), &exchange).await.status(), 202);
    let bad_cdp = json!({ "exchange": "coinbase", "api_key": "organizations/org-1/apiKeys/key-1", "api_secret": "-----BEGIN EC PRIVATE KEY-----\nnope\n-----END EC PRIVATE KEY-----" });
    let error = helpers::error_of(app.post("/connections/test", Some(&user), &bad_cdp).await, 422).await;
    assert_eq!(error["field"], "api_secret");
    let bad_name = json!({ "exchange": "coinbase", "api_key": "org/x", "api_secret": pem });
    let error = helpers::error_of(app.post("/connections/test", Some(&user), &bad_name).await, 422).await;
    assert_eq!(error["field"], "api_key");
    let kraken = json!({ "exchange": "kraken", "api_key": "k", "api_secret": "not base64 !!" });
    let error = helpers::error_of(app.post("/connections", Some(&user), &kraken).await, 422).await;
    assert_eq!(error["field"], "api_secret");
    assert_eq!(app.count("exchange_keys").await, 0);
}
