//! The Kite login flow: `POST /connections/zerodha/login` and `/session`.

use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

both!(
    login_then_session_enqueues_a_kite_session,
    states_are_user_bound_single_use_and_superseded,
    zerodha_is_not_a_static_key_exchange
);

async fn login(app: &TestApp, user: &helpers::TestUser) -> Value {
    let response = app
        .post(
            "/connections/zerodha/login",
            Some(user),
            &json!({ "api_key": "kiteapp123", "api_secret": "kitesecret456" }),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn login_then_session_enqueues_a_kite_session(app: TestApp) {
    let user = app.user();
    let body = login(&app, &user).await;
    let mut keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["login_url", "state"]);
    let url = url::Url::parse(body["login_url"].as_str().unwrap()).unwrap();
    assert!(url.as_str().starts_with("https://kite.example.test/connect/login?"));
    let pairs: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(pairs["v"], "3");
    assert_eq!(pairs["api_key"], "kiteapp123");
    assert_eq!(pairs["redirect_params"], format!("state={}", body["state"].as_str().unwrap()));

    let list: Value = app.get("/connections", Some(&user)).await.json().await.unwrap();
    assert_eq!(list[0]["exchange"], "zerodha");
    assert_eq!(list[0]["status"], "pending");
    let connection_id = list[0]["id"].clone();

    let response = app
        .post(
            "/connections/zerodha/session",
            Some(&user),
            &json!({ "request_token": "req-token-789", "state": body["state"] }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["job"]["kind"], "kite_session");
    assert_eq!(job["job"]["status"], "queued");
    assert_eq!(job["job"]["connection_id"], connection_id);

    // The request token travels encrypted.
    let payloads =
        app.texts("SELECT payload::text FROM public.tradeeon_jobs", "SELECT payload FROM tradeeon_jobs").await;
    let payload: Value = serde_json::from_str(payloads[0].as_deref().unwrap()).unwrap();
    assert!(payload["request_token"].as_str().unwrap().starts_with("gAAAAA"));
    assert!(!payloads[0].as_deref().unwrap().contains("req-token-789"));
}

async fn states_are_user_bound_single_use_and_superseded(app: TestApp) {
    let (user, other) = (app.user(), app.user());
    let first = login(&app, &user).await;
    let session = |state: &Value| json!({ "request_token": "tok", "state": state });

    // Another user cannot use it.
    let error =
        helpers::error_of(app.post("/connections/zerodha/session", Some(&other), &session(&first["state"])).await, 400)
            .await;
    assert_eq!((error["code"].as_str(), error["field"].as_str()), (Some("invalid_state"), Some("state")));
    // Forged or garbage states.
    for state in [json!("garbage"), json!(""), json!(format!("{}x", first["state"].as_str().unwrap()))] {
        let error =
            helpers::error_of(app.post("/connections/zerodha/session", Some(&user), &session(&state)).await, 400).await;
        assert_eq!(error["code"], "invalid_state");
    }
    // A second login supersedes the first state.
    let second = login(&app, &user).await;
    let error =
        helpers::error_of(app.post("/connections/zerodha/session", Some(&user), &session(&first["state"])).await, 400)
            .await;
    assert_eq!(error["code"], "invalid_state");
    // The current state works once.
    assert_eq!(app.post("/connections/zerodha/session", Some(&user), &session(&second["state"])).await.status(), 202);
    let error =
        helpers::error_of(app.post("/connections/zerodha/session", Some(&user), &session(&second["state"])).await, 400)
            .await;
    assert_eq!(error["code"], "state_used");
    // Still used after the job has finished.
    let jobs = app.texts("SELECT id FROM public.tradeeon_jobs", "SELECT id FROM tradeeon_jobs").await;
    assert_eq!(jobs.len(), 1);
    app.finish_job(jobs[0].as_deref().unwrap()).await;
    let error =
        helpers::error_of(app.post("/connections/zerodha/session", Some(&user), &session(&second["state"])).await, 400)
            .await;
    assert_eq!(error["code"], "state_used");
    assert_eq!(app.count("tradeeon_jobs").await, 1);
}

async fn zerodha_is_not_a_static_key_exchange(app: TestApp) {
    let user = app.user();
    for path in ["/connections", "/connections/test"] {
        let error = helpers::error_of(
            app.post(path, Some(&user), &json!({ "exchange": "zerodha", "api_key": "k", "api_secret": "s" })).await,
            400,
        )
        .await;
        assert_eq!(error["code"], "use_zerodha_login");
        assert!(error["message"].as_str().unwrap().contains("/connections/zerodha/login"));
    }
    let error =
        helpers::error_of(app.post("/connections/zerodha/login", Some(&user), &json!({ "api_key": "k" })).await, 422)
            .await;
    assert_eq!(error["field"], "api_secret");
    assert_eq!(app.count("exchange_keys").await, 0);
}
