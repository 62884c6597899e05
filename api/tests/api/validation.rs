//! Bad input gets a clear 4xx and changes nothing; the per-user write budget.

use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

both!(
    bad_bodies_get_clear_errors_and_change_nothing,
    bad_transport_gets_clear_errors,
    ids_that_are_not_utf8_get_the_error_format,
);
both_with!([("API_USER_RATE_LIMIT_PER_MINUTE", "3")], writes_are_rate_limited_per_user);

async fn bad_bodies_get_clear_errors_and_change_nothing(app: TestApp) {
    let user = app.user();
    let long = "a".repeat(4097);
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (json!({ "exchange": "ftx", "api_key": "k", "api_secret": "s" }), 422, "unknown_exchange", Some("exchange")),
        (json!({ "exchange": "binance", "api_secret": "s" }), 422, "missing_field", Some("api_key")),
        (json!({ "exchange": "binance", "api_key": "k" }), 422, "missing_field", Some("api_secret")),
        (json!({ "api_key": "k", "api_secret": "s" }), 422, "missing_field", Some("exchange")),
        (json!({ "exchange": "binance", "api_key": "", "api_secret": "s" }), 422, "invalid_field", Some("api_key")),
        (json!({ "exchange": "binance", "api_key": "   ", "api_secret": "s" }), 422, "invalid_field", Some("api_key")),
        (json!({ "exchange": "binance", "api_key": "k", "api_secret": "" }), 422, "invalid_field", Some("api_secret")),
        (json!({ "exchange": "binance", "api_key": long, "api_secret": "s" }), 422, "invalid_field", Some("api_key")),
        (
            json!({ "exchange": "binance", "api_key": "k", "api_secret": long }),
            422,
            "invalid_field",
            Some("api_secret"),
        ),
        (
            json!({ "exchange": "kraken", "api_key": "k", "api_secret": "c2Vj", "passphrase": long }),
            422,
            "invalid_field",
            Some("passphrase"),
        ),
        (
            json!({ "exchange": "binance", "api_key": "k", "api_secret": "s", "passphrase": "p" }),
            422,
            "invalid_field",
            Some("passphrase"),
        ),
        (
            json!({ "exchange": "binance", "api_key": "k", "api_secret": "s", "extra": 1 }),
            422,
            "unknown_field",
            Some("extra"),
        ),
        (
            json!({ "exchange": "binance", "api_key": 12345678, "api_secret": "s" }),
            422,
            "invalid_field",
            Some("api_key"),
        ),
        (
            json!({ "exchange": "binance", "api_key": "k", "api_secret": "s", "nickname": "x".repeat(101) }),
            422,
            "invalid_field",
            Some("nickname"),
        ),
        (
            json!({ "exchange": "binance", "api_key": "k", "api_secret": "s", "nickname": "bell\u{7}" }),
            422,
            "invalid_field",
            Some("nickname"),
        ),
        (
            json!({ "exchange": "binance", "api_key": "k\u{0}", "api_secret": "s" }),
            422,
            "invalid_field",
            Some("api_key"),
        ),
        (json!(["not", "an", "object"]), 422, "invalid_field", None),
        (
            json!({ "exchange": "zerodha", "api_key": "k", "api_secret": "s" }),
            400,
            "use_zerodha_login",
            Some("exchange"),
        ),
    ];
    for path in ["/connections", "/connections/test"] {
        for (body, status, code, field) in &cases {
            let error = helpers::error_of(app.post(path, Some(&user), body).await, *status).await;
            assert_eq!(error["code"], *code, "{path} {body}");
            assert_eq!(error["field"].as_str(), *field, "{path} {body}");
            let message = error["message"].as_str().unwrap();
            assert!(!message.contains("12345678") && !message.contains("aaaa"), "echoed a value: {message}");
        }
    }
    let created = app.connect_binance(&user, "KEY0001").await;
    app.finish_job(created["job"]["id"].as_str().unwrap()).await;
    let id = created["connection"]["id"].as_str().unwrap();
    let rotate_cases = [
        (json!({ "api_key": "k" }), "missing_field", "api_secret"),
        (json!({ "api_key": "k", "api_secret": "s", "exchange": "binance" }), "unknown_field", "exchange"),
        (json!({ "api_key": "", "api_secret": "s" }), "invalid_field", "api_key"),
    ];
    for (body, code, field) in rotate_cases {
        let error =
            helpers::error_of(app.post(&format!("/connections/{id}/rotate"), Some(&user), &body).await, 422).await;
        assert_eq!((error["code"].as_str(), error["field"].as_str()), (Some(code), Some(field)), "{body}");
    }
    // Nothing changed: one connection (the valid one), its one audit row and its one job.
    assert_eq!(app.count("exchange_keys").await, 1);
    assert_eq!(app.count("connection_audit_log").await, 1);
    assert_eq!(app.count("tradeeon_jobs").await, 1);
}

async fn bad_transport_gets_clear_errors(app: TestApp) {
    let user = app.user();
    let valid = r#"{"exchange":"binance","api_key":"k","api_secret":"s"}"#;
    let send = |content_type: Option<&'static str>, body: String| {
        let mut request = app.client.post(app.url("/connections")).bearer_auth(&user.token).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request.send()
    };
    let error = helpers::error_of(send(None, valid.into()).await.unwrap(), 415).await;
    assert_eq!(error["code"], "unsupported_media_type");
    let error = helpers::error_of(send(Some("text/plain"), valid.into()).await.unwrap(), 415).await;
    assert_eq!(error["code"], "unsupported_media_type");
    let error = helpers::error_of(send(Some("application/json"), "{\"exchange\": ".into()).await.unwrap(), 400).await;
    assert_eq!(error["code"], "malformed_json");
    let error =
        helpers::error_of(send(Some("application/json"), format!("{valid} trailing")).await.unwrap(), 400).await;
    assert_eq!(error["code"], "malformed_json");
    let huge = format!(r#"{{"exchange":"binance","api_key":"k","api_secret":"{}"}}"#, "a".repeat(70 * 1024));
    let error = helpers::error_of(send(Some("application/json"), huge).await.unwrap(), 413).await;
    assert_eq!(error["code"], "payload_too_large");
    assert_eq!(send(Some("application/json; charset=utf-8"), valid.into()).await.unwrap().status(), 202);

    // Unknown paths and methods answer in the same format.
    let error = helpers::error_of(app.get("/nope", Some(&user)).await, 404).await;
    assert_eq!(error["code"], "not_found");
    let response = app.client.put(app.url("/connections")).bearer_auth(&user.token).send().await.unwrap();
    let error = helpers::error_of(response, 405).await;
    assert_eq!(error["code"], "method_not_allowed");
    assert_eq!(app.count("exchange_keys").await, 1);
}

async fn writes_are_rate_limited_per_user(app: TestApp) {
    let (user, other) = (app.user(), app.user());
    let body = json!({ "exchange": "binance", "api_key": "k", "api_secret": "s" });
    for _ in 0..3 {
        assert_eq!(app.post("/connections/test", Some(&user), &body).await.status(), 202);
    }
    let response = app.post("/connections/test", Some(&user), &body).await;
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    let error = helpers::error_of(response, 429).await;
    assert_eq!(error["code"], "rate_limited");
    // DELETE is a write too; reads are not limited; other users have their own budget.
    helpers::error_of(app.delete(&format!("/connections/{}", uuid::Uuid::new_v4()), Some(&user)).await, 429).await;
    for _ in 0..5 {
        assert_eq!(app.get("/connections", Some(&user)).await.status(), 200);
    }
    assert_eq!(app.post("/connections/test", Some(&other), &body).await.status(), 202);
    assert_eq!(app.count("tradeeon_jobs").await, 4);
}

/// Found while fuzzing (issue 7, scenario 6): a path id that is not UTF-8 once percent-decoded
/// (`/jobs/%FF`) got axum's own plain-text 400 instead of the API's JSON error body.
async fn ids_that_are_not_utf8_get_the_error_format(app: TestApp) {
    let user = app.user();
    for (method, path) in [
        ("GET", "/jobs/%FF"),
        ("GET", "/jobs/%C0%80"),
        ("DELETE", "/connections/%FF"),
        ("POST", "/connections/%FE%FF/rotate"),
    ] {
        let mut request = app.client.request(method.parse().unwrap(), app.url(path)).bearer_auth(&user.token);
        if method == "POST" {
            request = request.json(&json!({ "api_key": "k", "api_secret": "s" }));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["content-type"].to_str().unwrap(), "application/json", "{method} {path}");
        let error = helpers::error_of(response, 400).await;
        assert_eq!(
            (error["code"].as_str(), error["field"].as_str()),
            (Some("invalid_id"), Some("id")),
            "{method} {path}"
        );
    }
    // Still a 401 first without a token.
    helpers::error_of(app.get("/jobs/%FF", None).await, 401).await;
}
