//! Per-user caps: jobs in flight (`MAX_JOBS_IN_FLIGHT_PER_USER`), the connection-test quota
//! (`API_TEST_RATE_LIMIT_PER_MINUTE`) and the write budget (`API_USER_RATE_LIMIT_PER_MINUTE`),
//! the last two kept in the database so that they hold across API instances.

use futures::future::join_all;
use serde_json::{Value, json};
use tradeeon_shared::domain::{ConnectionId, Exchange};
use tradeeon_shared::jobs::{JobPayload, NewJob};

use crate::helpers::{self, TestApp, TestUser};

both!(
    the_eleventh_job_in_flight_is_refused_and_nothing_is_enqueued,
    a_user_can_enqueue_again_once_a_job_finishes,
    parallel_requests_never_exceed_the_cap,
    the_schedulers_health_checks_are_neither_counted_nor_refused,
);
both_with!([("API_TEST_RATE_LIMIT_PER_MINUTE", "3")], connection_tests_have_their_own_quota_per_minute);
both_with!([("API_USER_RATE_LIMIT_PER_MINUTE", "4")], the_write_budget_holds_across_api_instances);

/// The default cap.
const CAP: usize = 10;

fn test_body(n: usize) -> Value {
    json!({ "exchange": "binance", "api_key": format!("key{n}"), "api_secret": "s3cr3t" })
}

async fn test_connection(app: &TestApp, user: &TestUser, n: usize) -> reqwest::Response {
    app.post("/connections/test", Some(user), &test_body(n)).await
}

/// The 429 of a full cap: its code and a `Retry-After` of a few seconds.
async fn assert_too_many_jobs(response: reqwest::Response) {
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let error = helpers::error_of(response, 429).await;
    assert_eq!(error["code"], "too_many_jobs", "{error}");
}

async fn jobs_of(app: &TestApp, user: &TestUser) -> usize {
    let id = user.id;
    app.texts(
        &format!("SELECT id FROM public.tradeeon_jobs WHERE user_id = '{id}'"),
        &format!("SELECT id FROM tradeeon_jobs WHERE user_id = '{id}'"),
    )
    .await
    .len()
}

async fn tickets(app: &TestApp) -> i64 {
    app.count(if app.backend == helpers::Backend::Postgres { "apalis.jobs" } else { "Jobs" }).await
}

async fn the_eleventh_job_in_flight_is_refused_and_nothing_is_enqueued(app: TestApp) {
    let user = app.user();
    for n in 0..CAP {
        assert_eq!(test_connection(&app, &user, n).await.status(), 202);
    }
    let tickets = tickets(&app).await;
    assert_too_many_jobs(test_connection(&app, &user, CAP).await).await;
    assert_eq!(jobs_of(&app, &user).await, CAP);
    assert_eq!(self::tickets(&app).await, tickets);
    // Connecting enqueues a verification: refused too, and the connection is not saved.
    assert_too_many_jobs(
        app.post("/connections", Some(&user), &json!({ "exchange": "binance", "api_key": "k", "api_secret": "s" }))
            .await,
    )
    .await;
    assert_eq!(jobs_of(&app, &user).await, CAP);
    assert_eq!(self::tickets(&app).await, tickets);
    let mine = app.get("/connections", Some(&user)).await.json::<Vec<Value>>().await.unwrap();
    assert!(mine.is_empty(), "{mine:?}");
}

async fn a_user_can_enqueue_again_once_a_job_finishes(app: TestApp) {
    let (user, other) = (app.user(), app.user());
    let mut ids = Vec::new();
    for n in 0..CAP {
        let accepted: Value = test_connection(&app, &user, n).await.json().await.unwrap();
        ids.push(accepted["job"]["id"].as_str().unwrap().to_owned());
    }
    assert_too_many_jobs(test_connection(&app, &user, CAP).await).await;
    // Another user is not held to the first one's cap.
    assert_eq!(test_connection(&app, &other, 0).await.status(), 202);

    app.finish_job(&ids[3]).await;
    assert_eq!(test_connection(&app, &user, CAP + 1).await.status(), 202);
    assert_too_many_jobs(test_connection(&app, &user, CAP + 2).await).await;
    app.finish_job(&ids[0]).await;
    app.finish_job(&ids[9]).await;
    assert_eq!(test_connection(&app, &user, CAP + 3).await.status(), 202);
    assert_eq!(test_connection(&app, &user, CAP + 4).await.status(), 202);
    assert_too_many_jobs(test_connection(&app, &user, CAP + 5).await).await;
    assert_eq!(jobs_of(&app, &user).await, CAP + 3);
}

/// Requests of one user at the same moment, half of them to a second API instance (its own
/// pool and batching, so its statements run beside the first one's): however they interleave,
/// no more than the cap get through.
async fn parallel_requests_never_exceed_the_cap(app: TestApp) {
    let user = app.user();
    let other = app.other_instance().await;
    let body = test_body(0);
    let requests = (0..3 * CAP).map(|n| {
        let url = if n % 2 == 0 { app.url("/connections/test") } else { other.url("/connections/test") };
        app.client.post(url).bearer_auth(&user.token).json(&body).send()
    });
    let mut accepted = 0;
    for response in join_all(requests).await {
        let response = response.expect("POST");
        match response.status().as_u16() {
            202 => accepted += 1,
            _ => assert_too_many_jobs(response).await,
        }
    }
    assert!(accepted <= CAP, "{accepted} accepted");
    assert!(accepted > 0);
    assert_eq!(jobs_of(&app, &user).await, accepted);
    // Whatever the race, the cap is full or fills up now, and holds.
    for n in accepted..CAP {
        assert_eq!(test_connection(&app, &user, n).await.status(), 202);
    }
    assert_too_many_jobs(test_connection(&app, &user, CAP).await).await;
    assert_eq!(jobs_of(&app, &user).await, CAP);
}

/// The scheduler enqueues health checks for users' connections (no user asked for them): they
/// neither take the user's slots nor are refused when the user's slots are full.
async fn the_schedulers_health_checks_are_neither_counted_nor_refused(app: TestApp) {
    let user = app.user();
    let connection = app.connect_binance(&user, "my-key").await; // a verification: one in flight
    let connection_id = ConnectionId(connection["connection"]["id"].as_str().unwrap().parse().unwrap());
    for n in 1..CAP - 1 {
        assert_eq!(test_connection(&app, &user, n).await.status(), 202);
    }
    let health_checks = |round: usize| -> Vec<NewJob> {
        (0..5)
            .map(|slot| {
                let mut job = NewJob::new(
                    tradeeon_shared::domain::UserId(user.id),
                    Exchange::Binance,
                    JobPayload::HealthCheck { connection_id },
                );
                job.idempotency_key = Some(format!("sweep-{round}-{slot}"));
                job
            })
            .collect()
    };
    assert_eq!(app.store.enqueue_jobs(&health_checks(0)).await.unwrap(), 5);
    // Nine of the user's own jobs are in flight, and five checks: the tenth is the user's.
    assert_eq!(test_connection(&app, &user, CAP).await.status(), 202);
    assert_too_many_jobs(test_connection(&app, &user, CAP + 1).await).await;
    // With the user's slots full, the scheduler's checks still go in.
    assert_eq!(app.store.enqueue_jobs(&health_checks(1)).await.unwrap(), 5);
    assert_eq!(jobs_of(&app, &user).await, CAP + 10);
}

async fn connection_tests_have_their_own_quota_per_minute(app: TestApp) {
    let (user, other) = (app.user(), app.user());
    for n in 0..3 {
        assert_eq!(test_connection(&app, &user, n).await.status(), 202);
    }
    let response = test_connection(&app, &user, 3).await;
    // Three a minute: the next one in about 20 s.
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    let error = helpers::error_of(response, 429).await;
    assert_eq!(error["code"], "too_many_tests", "{error}");
    assert_eq!(jobs_of(&app, &user).await, 3);
    // Other writes have their own budget; other users their own quota.
    app.connect_binance(&user, "my-key").await;
    assert_eq!(test_connection(&app, &other, 0).await.status(), 202);
}

/// With two API instances behind the load balancer, a user still gets the figure a minute in
/// all, not the figure per instance.
async fn the_write_budget_holds_across_api_instances(app: TestApp) {
    let (user, other) = (app.user(), app.user());
    let second = app.other_instance().await;
    let revoke = |base_url: String| {
        let request = app.client.delete(base_url).bearer_auth(&user.token);
        async move { request.send().await.expect("DELETE") }
    };
    let path = format!("/connections/{}", uuid::Uuid::new_v4());
    for n in 0..4 {
        let url = if n % 2 == 0 { app.url(&path) } else { second.url(&path) };
        assert_eq!(revoke(url).await.status(), 404, "request {n}");
    }
    for url in [app.url(&path), second.url(&path)] {
        let response = revoke(url).await;
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(helpers::error_of(response, 429).await["code"], "rate_limited");
    }
    // POST /connections/test spends the same budget (charged in its enqueue).
    let refused = app.client.post(second.url("/connections/test")).bearer_auth(&user.token).json(&test_body(0));
    assert_eq!(helpers::error_of(refused.send().await.unwrap(), 429).await["code"], "rate_limited");
    assert_eq!(jobs_of(&app, &user).await, 0);
    assert_eq!(app.delete(&path, Some(&other)).await.status(), 404);
}
