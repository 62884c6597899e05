//! User B can neither see nor change user A's connections, jobs or audit rows (404, not 403).

use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

both!(another_user_sees_and_changes_nothing);

async fn another_user_sees_and_changes_nothing(app: TestApp) {
    let (a, b) = (app.user(), app.user());
    let created = app.connect_binance(&a, "AKEY0001").await;
    let connection_id = created["connection"]["id"].as_str().unwrap().to_owned();
    let verify_job = created["job"]["id"].as_str().unwrap().to_owned();
    let tested: Value = app
        .post("/connections/test", Some(&a), &json!({ "exchange": "binance", "api_key": "k", "api_secret": "s" }))
        .await
        .json()
        .await
        .unwrap();
    let test_job = tested["job"]["id"].as_str().unwrap().to_owned();
    // Settled, the test has its `tested` audit entry, which B must not see either.
    app.finish_job(&test_job).await;

    // Reads.
    assert_eq!(app.get("/connections", Some(&b)).await.json::<Value>().await.unwrap(), json!([]));
    assert_eq!(app.get("/connections/audit", Some(&b)).await.json::<Value>().await.unwrap(), json!([]));
    for path in [format!("/connections/{connection_id}"), format!("/connections/{connection_id}/history")] {
        assert_eq!(helpers::error_of(app.get(&path, Some(&b)).await, 404).await["code"], "not_found", "{path}");
    }
    for job in [&verify_job, &test_job] {
        let error = helpers::error_of(app.get(&format!("/jobs/{job}"), Some(&b)).await, 404).await;
        assert_eq!(error["code"], "not_found");
    }
    // Writes.
    let rotate = json!({ "api_key": "BKEY", "api_secret": "s" });
    helpers::error_of(app.post(&format!("/connections/{connection_id}/rotate"), Some(&b), &rotate).await, 404).await;
    helpers::error_of(app.delete(&format!("/connections/{connection_id}"), Some(&b)).await, 404).await;
    // B connecting the same exchange makes B's own connection, not a change to A's.
    let b_created = app.connect_binance(&b, "BKEY0002").await;
    assert_ne!(b_created["connection"]["id"], connection_id.as_str());

    // A's world is unchanged.
    let a_list: Value = app.get("/connections", Some(&a)).await.json().await.unwrap();
    assert_eq!(a_list.as_array().unwrap().len(), 1);
    assert_eq!(a_list[0]["api_key_hint"], "…0001");
    assert_eq!(a_list[0]["id"], connection_id.as_str());
    let a_job: Value = app.get(&format!("/jobs/{verify_job}"), Some(&a)).await.json().await.unwrap();
    assert_eq!(a_job["status"], "queued");
    let a_audit: Value = app.get("/connections/audit", Some(&a)).await.json().await.unwrap();
    assert_eq!(a_audit.as_array().unwrap().len(), 2);
    let b_audit: Value = app.get("/connections/audit", Some(&b)).await.json().await.unwrap();
    assert_eq!(b_audit.as_array().unwrap().len(), 1);
    // And A can still revoke it.
    assert_eq!(app.delete(&format!("/connections/{connection_id}"), Some(&a)).await.status(), 200);
}
