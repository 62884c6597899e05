//! `GET /connections/{id}/history`: newest first, keyset pagination through `Link`, only the
//! owner's active connections, bad queries.

use chrono::{Duration, DurationRound, Utc};
use serde_json::Value;
use tradeeon_shared::domain::{ConnectionId, ConnectionStatus};
use tradeeon_shared::store::HealthRecord;
use uuid::Uuid;

use crate::helpers::{self, TestApp};

both!(history_is_newest_first_and_paginates, history_is_the_owners_only, history_rejects_bad_queries);

/// Records `n` checks of the connection, one a minute up to a minute ago; the oldest first.
async fn record_checks(app: &TestApp, connection: &Value, n: i64) -> ConnectionId {
    let id = ConnectionId(connection["connection"]["id"].as_str().unwrap().parse().unwrap());
    let now = Utc::now().duration_trunc(Duration::milliseconds(1)).unwrap();
    for i in 0..n {
        let failed = i % 2 == 1;
        app.store
            .record_health(HealthRecord {
                connection_id: id,
                checked_at: now - Duration::minutes(n - i),
                status: if failed { ConnectionStatus::Degraded } else { ConnectionStatus::Connected },
                code: Some(if failed { "timeout" } else { "ok" }.into()),
                latency_ms: Some(i as i32),
                message: failed.then(|| "The exchange did not answer in time.".into()),
            })
            .await
            .unwrap();
    }
    id
}

async fn history_is_newest_first_and_paginates(app: TestApp) {
    let user = app.user();
    let connection = app.connect_binance(&user, "history-key").await;
    let id = record_checks(&app, &connection, 5).await;

    let mut latencies = Vec::new();
    let mut next = Some(format!("/connections/{}/history?limit=2", id.0));
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
            assert_eq!(keys, ["checked_at", "code", "latency_ms", "message", "status"]);
            let latency = entry["latency_ms"].as_i64().unwrap();
            let failed = latency % 2 == 1;
            assert_eq!(entry["status"], if failed { "degraded" } else { "connected" });
            assert_eq!(entry["code"], if failed { "timeout" } else { "ok" });
            assert_eq!(entry["message"].is_null(), !failed);
            latencies.push(latency);
        }
        pages += 1;
        assert!(pages < 10);
    }
    assert_eq!(latencies, [4, 3, 2, 1, 0], "every check once, newest first");
    assert_eq!(pages, 3, "two full pages and the rest");

    // The default page holds all five, and no Link: there is nothing more.
    let response = app.get(&format!("/connections/{}/history", id.0), Some(&user)).await;
    assert!(response.headers().get("link").is_none());
    let all: Value = response.json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 5);
    let first: chrono::DateTime<Utc> = all[0]["checked_at"].as_str().unwrap().parse().unwrap();
    assert!(first > Utc::now() - Duration::minutes(2) && first < Utc::now());
}

async fn history_is_the_owners_only(app: TestApp) {
    let (alice, mallory) = (app.user(), app.user());
    let connection = app.connect_binance(&alice, "alice-key").await;
    let id = record_checks(&app, &connection, 3).await;
    let path = format!("/connections/{}/history", id.0);

    let error = helpers::error_of(app.get(&path, Some(&mallory)).await, 404).await;
    assert_eq!(error["code"], "not_found");
    assert_eq!(app.get(&path, None).await.status(), 401);
    let unknown = format!("/connections/{}/history", Uuid::new_v4());
    assert_eq!(helpers::error_of(app.get(&unknown, Some(&alice)).await, 404).await["code"], "not_found");
    // A connection without checks yet is there, with an empty history.
    let fresh = app.connect_binance(&mallory, "mallory-key").await;
    let fresh_path = format!("/connections/{}/history", fresh["connection"]["id"].as_str().unwrap());
    let response = app.get(&fresh_path, Some(&mallory)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), serde_json::json!([]));

    // Revoked: gone for its owner, history included.
    assert_eq!(app.delete(&format!("/connections/{}", id.0), Some(&alice)).await.status(), 200);
    assert_eq!(helpers::error_of(app.get(&path, Some(&alice)).await, 404).await["code"], "not_found");
}

async fn history_rejects_bad_queries(app: TestApp) {
    let user = app.user();
    let connection = app.connect_binance(&user, "history-query-key").await;
    let id = record_checks(&app, &connection, 1).await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("before=yesterday", "before"),
        ("before=123.not-a-uuid", "before"),
    ] {
        let response = app.get(&format!("/connections/{}/history?{query}", id.0), Some(&user)).await;
        let error = helpers::error_of(response, 400).await;
        assert_eq!(error["code"], "invalid_query", "{query}");
        assert_eq!(error["field"], field, "{query}");
    }
    let error = helpers::error_of(app.get("/connections/not-a-uuid/history", Some(&user)).await, 400).await;
    assert_eq!(error["field"], "id");
    assert_eq!(app.get(&format!("/connections/{}/history?limit=200", id.0), Some(&user)).await.status(), 200);
}
