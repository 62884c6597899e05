//! `GET /connections/audit`: newest first, keyset pagination through `Link`, bad queries.

use serde_json::{Value, json};

use crate::helpers::{self, TestApp};

both!(audit_is_newest_first_and_paginates, audit_rejects_bad_queries);

async fn audit_is_newest_first_and_paginates(app: TestApp) {
    let user = app.user();
    let mut job_ids = Vec::new();
    for i in 0..5 {
        let response = app
            .post(
                "/connections/test",
                Some(&user),
                &json!({ "exchange": "binance", "api_key": format!("k{i}"), "api_secret": "s" }),
            )
            .await;
        let body: Value = response.json().await.unwrap();
        // A test's entry is written when it settles (playing the worker here).
        app.finish_job(body["job"]["id"].as_str().unwrap()).await;
        job_ids.push(body["job"]["id"].clone());
    }
    job_ids.reverse();

    let mut seen = Vec::new();
    let mut next = Some("/connections/audit?limit=2".to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let response = app.get(&path, Some(&user)).await;
        assert_eq!(response.status(), 200);
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            link.trim_start_matches('<').split('>').next().unwrap().to_owned()
        });
        let page: Value = response.json().await.unwrap();
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2);
        for entry in page {
            let mut keys: Vec<_> = entry.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            assert_eq!(keys, ["action", "connection_id", "created_at", "details", "id", "ip_address", "user_agent"]);
            assert_eq!(entry["action"], "tested");
            seen.push(entry["details"]["job_id"].clone());
        }
        pages += 1;
        assert!(pages < 10);
    }
    assert_eq!(seen, job_ids, "every entry once, newest first");
    // Default page size covers them all.
    let all: Value = app.get("/connections/audit", Some(&user)).await.json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 5);
}

async fn audit_rejects_bad_queries(app: TestApp) {
    let user = app.user();
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("before=yesterday", "before"),
        ("before=123.not-a-uuid", "before"),
    ] {
        let error = helpers::error_of(app.get(&format!("/connections/audit?{query}"), Some(&user)).await, 400).await;
        assert_eq!(error["code"], "invalid_query", "{query}");
        assert_eq!(error["field"], field, "{query}");
    }
    assert_eq!(app.get("/connections/audit?limit=1000", Some(&user)).await.status(), 200);
}
