//! `GET /jobs/{id}`.

use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

both!(a_job_reads_back_in_the_documented_shape, unknown_and_malformed_job_ids);

async fn a_job_reads_back_in_the_documented_shape(app: TestApp) {
    let user = app.user();
    let created = app.connect_binance(&user, "KEY0001").await;
    let id = created["job"]["id"].as_str().unwrap();
    let job: Value = app.get(&format!("/jobs/{id}"), Some(&user)).await.json().await.unwrap();
    assert_eq!(job["status"], "queued");
    assert_eq!(job["kind"], "verify");

    app.finish_job(id).await;
    let response = app.get(&format!("/jobs/{id}"), Some(&user)).await;
    assert_eq!(response.status(), 200);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "done");
    assert_eq!(job["attempts"], 1);
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    assert_eq!(
        job["result"],
        json!({ "ok": true, "code": "ok", "message": "Credentials are valid.", "latency_ms": 12, "permissions": null, "warnings": [] })
    );
    assert_eq!(job["error"], Value::Null);
}

async fn unknown_and_malformed_job_ids(app: TestApp) {
    let user = app.user();
    let error =
        helpers::error_of(app.get(&format!("/jobs/{}", tradeeon_shared::jobs::JobId::new()), Some(&user)).await, 404)
            .await;
    assert_eq!(error["code"], "not_found");
    let error = helpers::error_of(app.get("/jobs/not-a-ulid", Some(&user)).await, 400).await;
    assert_eq!((error["code"].as_str(), error["field"].as_str()), (Some("invalid_id"), Some("id")));
    helpers::error_of(app.get(&format!("/jobs/{}", uuid::Uuid::new_v4()), Some(&user)).await, 400).await;
}
