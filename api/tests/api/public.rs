//! The public routes (`/health`, `/ready`, `/exchanges`, `/egress`, `/ui/config`), the metrics
//! listener apart from them, CORS, HSTS, the client address recorded in audit rows, and the
//! request id every answer and log line carries.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tracing_subscriber::EnvFilter;
use tradeeon_shared::config::LogFormat;
use tradeeon_shared::jobs::JobId;
use tradeeon_shared::telemetry;

use crate::helpers::{self, Backend, LogBuffer, TestApp};

both!(
    health_and_ready,
    ready_is_503_when_the_database_is_gone,
    exchanges_and_egress_need_no_token,
    metrics_count_requests_and_jobs,
    metrics_are_not_served_on_the_public_port,
    odd_requests_add_no_metric_series
);
both_with!([("CORS_ORIGINS", "https://app.tradeeon.test")], cors_allows_only_configured_origins);
both_with!([("TRUST_PROXY", "true")], forwarded_for_is_trusted_only_with_trust_proxy);
both!(forwarded_for_is_ignored_by_default);
both_with!([("TRUST_PROXY", "true")], hsts_only_for_requests_the_proxy_received_over_https);
both!(hsts_needs_a_trusted_proxy);
both_with!([("PORTAL_SIGNIN_URL", "https://portal.tradeeon.test/connect/signin")], ui_config_names_the_portal);
both!(every_answer_carries_a_request_id);

async fn health_and_ready(app: TestApp) {
    let response = app.get("/health", None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({ "status": "ok" }));
    let response = app.get("/ready", None).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
}

async fn ready_is_503_when_the_database_is_gone(app: TestApp) {
    app.store.close().await;
    let started = std::time::Instant::now();
    let error = helpers::error_of(app.get("/ready", None).await, 503).await;
    assert_eq!(error["code"], "unavailable");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Liveness does no I/O.
    assert_eq!(app.get("/health", None).await.status(), 200);
    // Other routes answer 503 too, not 500 and not a hang.
    let user = app.user();
    let error = helpers::error_of(app.get("/connections", Some(&user)).await, 503).await;
    assert_eq!(error["code"], "unavailable");
}

async fn exchanges_and_egress_need_no_token(app: TestApp) {
    let exchanges: Value = app.get("/exchanges", None).await.json().await.unwrap();
    let exchanges = exchanges.as_array().unwrap();
    let ids: Vec<_> = exchanges.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["binance", "coinbase", "kraken", "zerodha"]);
    for exchange in exchanges {
        assert!(exchange["docs_url"].as_str().unwrap().starts_with("https://"));
        let fields: Vec<_> =
            exchange["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert!(fields.starts_with(&["api_key", "api_secret"]), "{fields:?}");
    }
    assert_eq!(exchanges[3]["connect_flow"], "oauth");
    let egress: Value = app.get("/egress", None).await.json().await.unwrap();
    assert_eq!(egress, json!({ "ips": ["52.1.2.3", "2600:1f18::1"] }));
}

async fn metrics_count_requests_and_jobs(app: TestApp) {
    let user = app.user();
    app.connect_binance(&user, "KEY0001").await;
    app.get("/connections", None).await;
    app.get("/definitely/not/here", None).await;
    let response = app.metrics().await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for needle in [
        r#"tradeeon_http_requests_total{method="POST",route="/connections",status="202"} 1"#,
        r#"tradeeon_http_requests_total{method="GET",route="/connections",status="401"} 1"#,
        r#"tradeeon_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"tradeeon_http_request_duration_seconds_bucket{method="POST",route="/connections",le="+Inf"} 1"#,
        r#"tradeeon_jobs_enqueued_total{kind="verify"} 1"#,
        r#"tradeeon_jobs_enqueued_total{kind="test"} 0"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    // The registry in AppState is the one rendered.
    assert!(!app.metrics_registry.gather().is_empty());
}

/// The public port (the one the load balancer forwards to) has no `/metrics`; the metrics
/// listener has nothing else.
async fn metrics_are_not_served_on_the_public_port(app: TestApp) {
    for path in ["/metrics", "/metrics/", "/metrics?format=text", "/Metrics"] {
        let response = app.get(path, None).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 404, "public {path}: {body}");
        assert!(!body.contains("tradeeon_http_requests_total"), "public {path} showed metrics: {body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "not_found", "{body}");
    }
    let user = app.user();
    let error = helpers::error_of(app.get("/metrics", Some(&user)).await, 404).await;
    assert_eq!(error["code"], "not_found");

    let response = app.metrics().await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    // The public requests above are counted there, as unmatched.
    assert!(text.contains(r#"tradeeon_http_requests_total{method="GET",route="unmatched",status="404"} 5"#), "{text}");
    for path in ["/health", "/connections", "/openapi.json", "/"] {
        let response = app.client.get(format!("{}{path}", app.metrics_base)).send().await.unwrap();
        assert_eq!(response.status(), 404, "the metrics listener answered {path}");
    }
}

fn series(app: &TestApp) -> usize {
    app.metrics_registry.gather().iter().map(|family| family.get_metric().len()).sum()
}

async fn odd_requests_add_no_metric_series(app: TestApp) {
    let send = |method: &str, path: String, header: (String, String)| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        app.client.request(method, app.url(&path)).header(header.0, header.1).send()
    };
    // One request of each shape first: the series they need exist from then on.
    for (method, path) in [("BREW", "/connections"), ("BREW", "/nowhere"), ("GET", "/nowhere"), ("GET", "/connections")]
    {
        send(method, path.to_owned(), ("x-first".into(), "1".into())).await.unwrap();
    }
    let before = series(&app);
    // A caller choosing every method, path and header it likes cannot add a series.
    for i in 0..300 {
        let method = format!("M{i:03}X");
        for path in [format!("/p{i}/{}", i * 7919), "/connections".to_owned(), format!("/jobs/{i}")] {
            let response = send(&method, path, (format!("x-odd-{i}"), format!("v{i}"))).await.unwrap();
            assert!(response.status().is_client_error(), "{}", response.status());
        }
        send("GET", format!("/q{i}?a={i}"), (format!("x-odd-{i}"), "v".into())).await.unwrap();
    }
    assert_eq!(series(&app), before, "the flood added series");
    let text = app.metrics().await.text().await.unwrap();
    assert!(
        text.contains(r#"tradeeon_http_requests_total{method="other",route="unmatched",status="404"} 301"#),
        "{text}"
    );
    assert!(!text.contains("M000X"), "a caller's method became a label");
}

async fn cors_allows_only_configured_origins(app: TestApp) {
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/connections"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let allowed = preflight("https://app.tradeeon.test").await.unwrap();
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.tradeeon.test");
    let denied = preflight("https://evil.example").await.unwrap();
    assert!(denied.headers().get("access-control-allow-origin").is_none());
    // The CORS layer answers a preflight itself; it gets an id all the same.
    assert!(allowed.headers().contains_key("x-request-id"));
    // The web UI may read the id of an answer to quote it.
    let answer = app.client.get(app.url("/health")).header("origin", "https://app.tradeeon.test").send().await.unwrap();
    let exposed = answer.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.split(',').any(|h| h.trim() == "x-request-id"), "{exposed}");
}

async fn audit_ip(app: &TestApp, forwarded: &str) -> Value {
    let user = app.user();
    let response = app
        .client
        .post(app.url("/connections/test"))
        .bearer_auth(&user.token)
        .header("x-forwarded-for", forwarded)
        .json(&json!({ "exchange": "binance", "api_key": "k", "api_secret": "s" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    // The test's audit entry, with the request's client, is written when the job settles.
    let body: Value = response.json().await.unwrap();
    app.finish_job(body["job"]["id"].as_str().unwrap()).await;
    let audit: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    audit[0]["ip_address"].clone()
}

async fn forwarded_for_is_trusted_only_with_trust_proxy(app: TestApp) {
    // The last entry is the one the load balancer appended; earlier ones are the client's word.
    assert_eq!(audit_ip(&app, "6.6.6.6, 203.0.113.9").await, "203.0.113.9");
    assert_eq!(audit_ip(&app, "garbage").await, "127.0.0.1");
}

async fn forwarded_for_is_ignored_by_default(app: TestApp) {
    assert_eq!(audit_ip(&app, "203.0.113.9").await, "127.0.0.1");
}

async fn hsts(app: &TestApp, path: &str, proto: Option<&str>) -> Option<String> {
    let mut request = app.client.get(app.url(path));
    if let Some(proto) = proto {
        request = request.header("x-forwarded-proto", proto);
    }
    let response = request.send().await.unwrap();
    response.headers().get("strict-transport-security").map(|v| v.to_str().unwrap().to_owned())
}

async fn hsts_only_for_requests_the_proxy_received_over_https(app: TestApp) {
    for path in ["/", "/health", "/connections", "/no/such/route"] {
        assert_eq!(
            hsts(&app, path, Some("https")).await.as_deref(),
            Some("max-age=63072000; includeSubDomains"),
            "{path}"
        );
        assert_eq!(hsts(&app, path, Some("HTTPS")).await.as_deref(), Some("max-age=63072000; includeSubDomains"));
        assert_eq!(hsts(&app, path, Some("http")).await, None, "{path}");
        assert_eq!(hsts(&app, path, None).await, None, "{path}");
    }
}

async fn hsts_needs_a_trusted_proxy(app: TestApp) {
    // Without TRUST_PROXY the header is the client's word, and this process serves plain HTTP.
    assert_eq!(hsts(&app, "/", Some("https")).await, None);
}

async fn ui_config_names_the_portal(app: TestApp) {
    let config: Value = app.get("/ui/config", None).await.json().await.unwrap();
    assert_eq!(config["portal_signin_url"], "https://portal.tradeeon.test/connect/signin");
    assert_eq!(config["local_sign_in"], false);
}
fn request_id(response: &reqwest::Response) -> String {
    let id = response.headers().get_all("x-request-id").iter().collect::<Vec<_>>();
    assert_eq!(id.len(), 1, "one x-request-id on {}: {id:?}", response.url());
    id[0].to_str().unwrap().to_owned()
}

async fn every_answer_carries_a_request_id(app: TestApp) {
    // Generated when absent: a fresh UUID per request, on handled and unmatched paths alike.
    let first = request_id(&app.get("/health", None).await);
    let second = request_id(&app.get("/health", None).await);
    let unmatched = request_id(&app.get("/definitely/not/here", None).await);
    for id in [&first, &second, &unmatched] {
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    assert_ne!(first, second);
    assert_ne!(second, unmatched);

    let with_id = |id: &str| app.client.get(app.url("/exchanges")).header("x-request-id", id).send();
    // A short plain token from the client (its own id, a proxy's) is kept and echoed.
    for id in ["client-chosen-0001", "01J9ZQ4M5X8Y7W6V5T4S3R2Q1P", "Root=1-5759e988-bd862e3fe1be46a9"] {
        assert_eq!(request_id(&with_id(id).await.unwrap()), id);
    }
    // Anything else is replaced, so a client cannot write arbitrary text into the logs.
    for id in ["two words", "x".repeat(65).as_str(), "quote\"d", "semi;colon"] {
        let answered = request_id(&with_id(id).await.unwrap());
        assert!(uuid::Uuid::parse_str(&answered).is_ok(), "{id:?} was answered with {answered:?}");
    }
    let twice = app
        .client
        .get(app.url("/exchanges"))
        .header("x-request-id", "first-0001")
        .header("x-request-id", "second-0002")
        .send()
        .await
        .unwrap();
    assert!(uuid::Uuid::parse_str(&request_id(&twice)).is_ok());
}

mod request_ids_are_in_their_log_lines {
    #[tokio::test]
    async fn postgres() {
        super::request_ids_are_in_their_log_lines(crate::helpers::Backend::Postgres).await;
    }
    #[tokio::test]
    async fn sqlite() {
        super::request_ids_are_in_their_log_lines(crate::helpers::Backend::Sqlite).await;
    }
}

/// Logs as production writes them (JSON, the default verbosity): every line a request's handler
/// writes carries that request's id.
async fn request_ids_are_in_their_log_lines(backend: Backend) {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber =
        telemetry::subscriber(LogFormat::Json, EnvFilter::new(telemetry::DEFAULT_FILTER), move || writer.clone());
    // #[tokio::test] runs everything (the app's tasks included) on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let ids = Arc::new(Mutex::new(Vec::new()));
    let answered = ids.clone();
    helpers::run(backend, &[], move |app| async move {
        let user = app.user();
        // An unknown job: its handler logs the 404 at info.
        let path = format!("/jobs/{}", JobId::new());
        let supplied = app
            .client
            .get(app.url(&path))
            .bearer_auth(&user.token)
            .header("x-request-id", "client-chosen-0002")
            .send()
            .await
            .unwrap();
        assert_eq!(supplied.status(), 404);
        let generated = app.get(&path, Some(&user)).await;
        assert_eq!(generated.status(), 404);
        answered.lock().unwrap().extend([request_id(&supplied), request_id(&generated)]);
    })
    .await;

    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids[0], "client-chosen-0002");
    let lines: Vec<Value> =
        logs.text().lines().map(|line| serde_json::from_str(line).expect("a JSON log line")).collect();
    let spans = |line: &Value| -> Vec<Value> { line["spans"].as_array().cloned().unwrap_or_default() };
    let request_id_of = |line: &Value| -> Option<String> {
        spans(line).iter().find(|s| s["name"] == "request").and_then(|s| s["request_id"].as_str().map(str::to_owned))
    };
    let handler_lines: Vec<&Value> =
        lines.iter().filter(|line| spans(line).iter().any(|s| s["name"] == "get_job")).collect();
    for id in &ids {
        assert!(
            handler_lines.iter().any(|line| request_id_of(line).as_ref() == Some(id)),
            "no log line of the handler carries the request id {id}:\n{lines:#?}"
        );
    }
    for line in handler_lines {
        assert!(
            request_id_of(line).is_some_and(|id| ids.contains(&id)),
            "a handler line without its request id: {line}"
        );
    }
}
