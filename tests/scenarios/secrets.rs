//! Scenario 7, secrets never leak. Every other scenario ends with the same scan of its own
//! canaries; this one pushes canaries through every route that takes a secret, on every exchange,
//! through successes and failures (wrong secrets, refused shapes, malformed bodies, missing
//! tokens, a Zerodha login), with the processes logging at TRACE and the workers sweeping, then
//! scans every process log, every HTTP response (headers and bodies), and every row of every
//! table (jobs and their queue tickets, audit log, health history, connections): zero hits.

use std::time::Duration;

use serde_json::json;
use tradeeon_simulator::kite::KiteUser;

use crate::support::{self, Creds, Figures, Scenario, User};

/// Our crates at TRACE; dependencies that would print raw HTTP traffic at info (production never
/// runs those at trace either).
const TRACE: &str = "trace,hyper=info,hyper_util=info,h2=info,rustls=info,tokio=info,runtime=info,mio=info,\
                     want=info,sqlx=info,apalis=debug,apalis_core=debug,apalis_postgres=debug";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leak() {
    let _serial = support::exclusive().await;
    let s = Scenario::start("secrets").await;
    let mut figures = Figures::default();
    let (mut api_proc, api) = s.spawn_api("api", &[("RUST_LOG", TRACE)]).await;
    let mut worker = s
        .spawn_worker(
            "worker",
            &[("RUST_LOG", TRACE), ("HEALTH_SWEEP_INTERVAL", "2s"), ("EXCHANGE_TIMEOUT_MS", "3000")],
        )
        .await;
    // Every job with the user who may read it.
    let mut jobs: Vec<(User, String)> = Vec::new();
    let mut requests = 0u64;

    type NewKey = fn(&Scenario) -> Creds;
    let kinds: [(&str, NewKey); 4] = [
        ("binance", Scenario::binance_key),
        ("kraken", Scenario::kraken_key),
        ("coinbase (CDP)", Scenario::coinbase_cdp_key),
        ("coinbase (Exchange)", Scenario::coinbase_exchange_key),
    ];
    let mut connections = Vec::new();
    for (label, make) in kinds {
        let user = s.user();
        let creds = make(&s);
        // Test, connect, rotate to new keys, rotate to a wrong secret, test a wrong secret.
        jobs.push((user.clone(), api.test_credentials(&user, &creds).await));
        let (id, verify) = api.connect(&user, &creds).await;
        requests += 2;
        settle_ok(&s, &verify, label).await;
        let new = make(&s);
        let rotate = api.rotate(&user, &id, &new).await;
        settle_ok(&s, &rotate, label).await;
        let mut wrong = make(&s);
        wrong.api_key = new.api_key.clone();
        let rotate_wrong = api.rotate(&user, &id, &wrong).await;
        let rows = s.wait_settled(std::slice::from_ref(&rotate_wrong), Duration::from_secs(30)).await;
        assert_ne!(rows[&rotate_wrong].code(), Some("ok"), "{label}: a rotation to a wrong secret failed");
        jobs.push((user.clone(), api.test_credentials(&user, &wrong).await));
        requests += 3;
        for job in [verify, rotate, rotate_wrong] {
            jobs.push((user.clone(), job));
        }
        connections.push((user, id));
    }

    // Refused requests carrying canaries: shapes, unknown fields, malformed JSON, no token.
    let user = s.user();
    let canary = |tag: &str| s.extra_canary(format!("CanaryRefused{tag}{}", ulid::Ulid::generate()));
    let refused = [
        json!({ "exchange": "kraken", "api_key": canary("KrakenKey"), "api_secret": format!("{}!!not-base64", canary("KrakenSecret")) }),
        json!({ "exchange": "binance", "api_key": canary("Key"), "api_secret": canary("Secret"), "passphrase": canary("Pass") }),
        json!({ "exchange": "coinbase", "api_key": canary("CdpName"), "api_secret": canary("CdpPem") }),
        json!({ "exchange": "binance", "api_key": canary("Key2"), "api_secret": canary("Secret2"), "unexpected": canary("Extra") }),
        json!({ "exchange": canary("Exchange"), "api_key": canary("Key3"), "api_secret": canary("Secret3") }),
        json!({ "exchange": "zerodha", "api_key": canary("Key4"), "api_secret": canary("Secret4") }),
    ];
    for body in &refused {
        for path in ["/connections", "/connections/test"] {
            let reply = api.post(path, &user, body).await;
            assert!(matches!(reply.status, 400 | 422), "{path} refused {body}: {} {}", reply.status, reply.text);
            requests += 1;
        }
    }
    let malformed = format!(
        "{{\"exchange\": \"binance\", \"api_key\": \"{}\", \"api_secret\": \"{}\"",
        canary("Mal"),
        canary("Formed")
    );
    let reply = api.post_raw("/connections", &user, malformed).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    let creds = s.binance_key();
    let reply = api.send(reqwest::Method::POST, "/connections", None, Some(&creds.body())).await.expect("no token");
    assert_eq!(reply.status, 401);
    requests += 2;

    // Zerodha: a Kite app of our own, a login, a session; the access token becomes a canary too.
    let kite_key = format!("canarykite{}", ulid::Ulid::generate().to_string().to_lowercase());
    let kite_secret = s.extra_canary(format!("canarykitesecret{}", ulid::Ulid::generate().to_string().to_lowercase()));
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    s.sim.state.kite.add_app(
        &kite_key,
        &kite_secret,
        KiteUser {
            user_id: "CX1234".into(),
            user_name: "Canary".into(),
            email: "canary@example.com".into(),
            exchanges: strings(&["NSE"]),
            products: strings(&["CNC"]),
            order_types: strings(&["LIMIT"]),
        },
    );
    let kite_user = s.user();
    let login = api
        .post("/connections/zerodha/login", &kite_user, &json!({ "api_key": kite_key, "api_secret": kite_secret }))
        .await;
    assert_eq!(login.status, 200, "{}", login.text);
    let state = login.body["state"].as_str().expect("state").to_string();
    let request_token = s.extra_canary(
        s.sim.state.kite.issue_request_token(&kite_key, chrono::Utc::now().timestamp_millis()).expect("request token"),
    );
    let session = api
        .post("/connections/zerodha/session", &kite_user, &json!({ "request_token": request_token, "state": state }))
        .await;
    assert_eq!(session.status, 202, "{}", session.text);
    let kite_job = session.job_id().expect("job");
    settle_ok(&s, &kite_job, "zerodha").await;
    jobs.push((kite_user.clone(), kite_job));
    requests += 2;
    let token: Option<String> = sqlx::query_scalar(
        "SELECT access_token_encrypted FROM public.exchange_keys WHERE exchange = 'zerodha' AND is_active",
    )
    .fetch_one(&s.db.pool)
    .await
    .expect("access token");
    s.extra_canary(s.decrypt(&token.expect("an access token was stored")));

    // Reads, then a revoke; the sweeps keep checking the rest meanwhile.
    let readers: Vec<&User> = connections.iter().map(|(user, _)| user).chain([&kite_user]).collect();
    for user in readers {
        assert_eq!(api.get("/connections", Some(user)).await.status, 200);
        assert_eq!(api.get("/connections/audit?limit=100", Some(user)).await.status, 200);
        requests += 2;
    }
    for (user, job) in &jobs {
        let reply = api.get(&format!("/jobs/{job}"), Some(user)).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        requests += 1;
    }
    let (first_user, first_id) = &connections[0];
    let reply = api.delete(&format!("/connections/{first_id}"), first_user).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    requests += 1;
    let history: i64 =
        support::wait_until("health history rows", Duration::from_secs(30), Duration::from_millis(200), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.connection_health_history")
                .fetch_one(&s.db.pool)
                .await
                .expect("history");
            (n >= 12).then_some(n)
        })
        .await;
    let ids: Vec<String> = jobs.iter().map(|(_, job)| job.clone()).collect();
    let rows = s.wait_settled(&ids, Duration::from_secs(60)).await;
    figures.requests_sent = requests;
    figures.jobs_sent = jobs.len() as u64;
    figures.completed = rows.values().filter(|r| r.status == "done").count() as u64;
    for row in rows.values() {
        if let Some(code) = row.code().filter(|c| *c != "ok") {
            figures.error(format!("{} {code} (expected: wrong secrets)", row.kind));
        }
    }
    figures.note(format!("health history rows written meanwhile: {history}"));
    assert!(rows.values().all(|r| r.status == "done"), "{rows:?}");

    worker.sigterm();
    assert!(worker.wait_exit(Duration::from_secs(30)).await.success());
    api_proc.sigterm();
    assert!(api_proc.wait_exit(Duration::from_secs(20)).await.success());
    let scan = s.assert_no_leaks().await;
    figures.note(format!("secret scan: {scan}"));
    figures.print(&s);
}

async fn settle_ok(s: &Scenario, job: &str, label: &str) {
    let rows = s.wait_settled(&[job.to_string()], Duration::from_secs(30)).await;
    assert_eq!(rows[job].code(), Some("ok"), "{label}: {:?}", rows[job]);
}
