//! Supabase token verification: HS256 and JWKS (ES256, RS256) over real HTTP, the rejection
//! corpus, the issuer and anonymous users, and when the JWKS is fetched again.

use secrecy::SecretString;
use serde_json::json;
use tradeeon_api::auth::{AuthError, Authenticator};
use uuid::Uuid;

use crate::helpers::{
    self, AUDIENCE, EC_KID, JWT_SECRET, JwksServer, Keys, RSA_KID, RSA_PUBLIC_PEM, TestApp, claims, es256, hs256,
    project_claims, raw_token, rs256,
};

async fn authenticator() -> (Authenticator, Keys, JwksServer) {
    let keys = Keys::generate();
    let jwks = JwksServer::start(keys.jwks()).await;
    let auth = Authenticator::new(
        AUDIENCE.to_owned(),
        Some(SecretString::from(JWT_SECRET)),
        Some(&jwks.url),
        reqwest::Client::new(),
    );
    (auth, keys, jwks)
}

#[tokio::test]
async fn accepts_hs256_es256_and_rs256_tokens() {
    let (auth, keys, jwks) = authenticator().await;
    let user = Uuid::new_v4();
    for token in [
        hs256(&jwks.claims(user), JWT_SECRET),
        es256(&jwks.claims(user), &keys, EC_KID),
        rs256(&jwks.claims(user), RSA_KID),
    ] {
        let verified = auth.verify(&token).await.expect("valid token");
        assert_eq!(verified.id.0, user);
        assert_eq!(verified.email.as_deref(), Some(format!("{user}@example.com").as_str()));
    }
    assert_eq!(jwks.hits(), 1, "the JWKS is fetched once and cached");
}

#[tokio::test]
async fn rejection_corpus() {
    let (auth, keys, jwks) = authenticator().await;
    let user = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let with = |patch: serde_json::Value| {
        let mut c = jwks.claims(user);
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };

    let cases: Vec<(&str, String, AuthError)> = vec![
        ("alg none", raw_token(&json!({"alg": "none", "typ": "JWT"}), &jwks.claims(user), None), AuthError::Malformed),
        ("alg None spelled oddly", raw_token(&json!({"alg": "None"}), &jwks.claims(user), None), AuthError::Malformed),
        (
            "HS256 signed with the RSA public key (algorithm confusion)",
            raw_token(&json!({"alg": "HS256", "kid": RSA_KID}), &jwks.claims(user), Some(RSA_PUBLIC_PEM.as_bytes())),
            AuthError::BadSignature,
        ),
        (
            "HS256 signed with the EC public key (algorithm confusion)",
            raw_token(&json!({"alg": "HS256", "kid": EC_KID}), &jwks.claims(user), Some(keys.ec_public_pem.as_bytes())),
            AuthError::BadSignature,
        ),
        ("RS256 with the HS kid of the JWKS", rs256(&jwks.claims(user), "hs-key"), AuthError::UnknownKey),
        ("RS256 naming the EC key", rs256(&jwks.claims(user), EC_KID), AuthError::Algorithm),
        (
            "HS384",
            raw_token(&json!({"alg": "HS384"}), &jwks.claims(user), Some(JWT_SECRET.as_bytes())),
            AuthError::Algorithm,
        ),
        ("expired", hs256(&with(json!({"exp": now - 3600})), JWT_SECRET), AuthError::Expired),
        ("nbf in the future", hs256(&with(json!({"nbf": now + 3600})), JWT_SECRET), AuthError::NotYetValid),
        ("wrong aud", hs256(&with(json!({"aud": "anon"})), JWT_SECRET), AuthError::Audience),
        ("missing aud", hs256(&with(json!({"aud": null})), JWT_SECRET), AuthError::Malformed),
        ("missing exp", hs256(&with(json!({"exp": null})), JWT_SECRET), AuthError::Malformed),
        ("missing sub", hs256(&with(json!({"sub": null})), JWT_SECRET), AuthError::Subject),
        ("non-UUID sub", hs256(&with(json!({"sub": "admin"})), JWT_SECRET), AuthError::Subject),
        ("wrong secret", hs256(&jwks.claims(user), "not-the-secret"), AuthError::BadSignature),
        ("unknown kid", es256(&jwks.claims(user), &keys, "rotated-away"), AuthError::UnknownKey),
        (
            "ES256 without kid",
            {
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                h.kid = None;
                jsonwebtoken::encode(
                    &h,
                    &jwks.claims(user),
                    &jsonwebtoken::EncodingKey::from_ec_pem(keys.ec_pem.as_bytes()).unwrap(),
                )
                .unwrap()
            },
            AuthError::UnknownKey,
        ),
        ("garbage", "not-a-jwt".into(), AuthError::Malformed),
        ("three garbage parts", "abc.def.ghi".into(), AuthError::Malformed),
        ("empty", String::new(), AuthError::Malformed),
        (
            "tampered payload",
            {
                let token = hs256(&jwks.claims(user), JWT_SECRET);
                let parts: Vec<&str> = token.split('.').collect();
                let other = hs256(&jwks.claims(Uuid::new_v4()), JWT_SECRET);
                format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2])
            },
            AuthError::BadSignature,
        ),
    ];
    for (name, token, expected) in cases {
        assert_eq!(auth.verify(&token).await.err(), Some(expected.clone()), "{name}");
    }
}

#[tokio::test]
async fn unknown_kids_refetch_the_jwks_at_most_once_per_minute() {
    let (auth, keys, jwks) = authenticator().await;
    let user = Uuid::new_v4();
    // First asymmetric token: one fetch.
    auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1);
    // A flood of forged kids right after: no more fetches.
    for i in 0..20 {
        let err = auth.verify(&es256(&jwks.claims(user), &keys, &format!("forged-{i}"))).await.unwrap_err();
        assert_eq!(err, AuthError::UnknownKey);
    }
    assert_eq!(jwks.hits(), 1, "refetches are limited to one per minute");
    // Known keys keep working from the cache.
    auth.verify(&rs256(&jwks.claims(user), RSA_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1);
}

#[tokio::test]
async fn only_this_projects_tokens_are_accepted() {
    let (auth, keys, jwks) = authenticator().await;
    let user = Uuid::new_v4();
    let mut foreign = jwks.claims(user);
    foreign["iss"] = json!("https://another-project.supabase.co/auth/v1");
    let mut missing = jwks.claims(user);
    missing.as_object_mut().unwrap().remove("iss");
    for claims in [&foreign, &missing] {
        assert_eq!(auth.verify(&hs256(claims, JWT_SECRET)).await.unwrap_err(), AuthError::Issuer);
        assert_eq!(auth.verify(&es256(claims, &keys, EC_KID)).await.unwrap_err(), AuthError::Issuer);
    }
    assert_eq!(jwks.claims(user)["iss"], format!("{}auth/v1", jwks.url));
    assert!(auth.verify(&hs256(&jwks.claims(user), JWT_SECRET)).await.is_ok());
    // Without SUPABASE_URL there is no project to compare with: HS256 tokens need no `iss`.
    let auth = Authenticator::new(AUDIENCE.into(), Some(SecretString::from(JWT_SECRET)), None, reqwest::Client::new());
    assert!(auth.verify(&hs256(&missing, JWT_SECRET)).await.is_ok());
}

#[tokio::test]
async fn anonymous_sign_ins_are_refused() {
    let (auth, keys, jwks) = authenticator().await;
    let mut anonymous = jwks.claims(Uuid::new_v4());
    anonymous["is_anonymous"] = json!(true);
    assert_eq!(auth.verify(&hs256(&anonymous, JWT_SECRET)).await.unwrap_err(), AuthError::Anonymous);
    assert_eq!(auth.verify(&es256(&anonymous, &keys, EC_KID)).await.unwrap_err(), AuthError::Anonymous);
    anonymous["is_anonymous"] = json!(false);
    assert!(auth.verify(&hs256(&anonymous, JWT_SECRET)).await.is_ok());
}

#[tokio::test]
async fn a_revoked_signing_key_stops_verifying_when_the_jwks_expires() {
    let (auth, keys, jwks) = authenticator().await;
    jwks.set_cache_control(Some("public, max-age=1"));
    let user = Uuid::new_v4();
    auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1);
    // The project revokes its EC key; the RSA key stays.
    jwks.publish(json!({ "keys": [keys.rsa_jwk] }));
    auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1, "within max-age the cached set is used");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap_err(), AuthError::UnknownKey);
    assert_eq!(jwks.hits(), 2);
    auth.verify(&rs256(&jwks.claims(user), RSA_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 2);
}

#[tokio::test]
async fn keys_stay_in_use_while_the_jwks_is_down_and_are_not_refetched_in_a_loop() {
    let (auth, keys, jwks) = authenticator().await;
    jwks.set_cache_control(Some("no-cache"));
    let user = Uuid::new_v4();
    auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap();
    jwks.set_failing(true);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for _ in 0..10 {
        auth.verify(&es256(&jwks.claims(user), &keys, EC_KID)).await.unwrap();
    }
    assert_eq!(jwks.hits(), 2, "one failed refetch, then a pause");
}

#[test]
fn the_max_age_is_read_from_cache_control() {
    use tradeeon_api::auth::max_age_of;
    let secs = |value: &str| max_age_of(value).map(|d| d.as_secs());
    assert_eq!(secs("public, max-age=600"), Some(600));
    assert_eq!(secs("Max-Age=30, must-revalidate"), Some(30));
    assert_eq!(secs("no-cache"), Some(0));
    assert_eq!(secs("public"), None);
    assert_eq!(secs("max-age=soon"), None);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_fetch() {
    let (auth, keys, jwks) = authenticator().await;
    let auth = std::sync::Arc::new(auth);
    let tokens: Vec<String> = (0..16).map(|_| es256(&jwks.claims(Uuid::new_v4()), &keys, EC_KID)).collect();
    let results = futures::future::join_all(tokens.iter().map(|t| {
        let auth = auth.clone();
        let t = t.clone();
        async move { auth.verify(&t).await }
    }))
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(jwks.hits(), 1);
}

#[tokio::test]
async fn an_unreachable_jwks_refuses_asymmetric_tokens_but_not_hs256() {
    let keys = Keys::generate();
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = url::Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
    drop(listener);
    let auth =
        Authenticator::new(AUDIENCE.into(), Some(SecretString::from(JWT_SECRET)), Some(&url), reqwest::Client::new());
    let user = Uuid::new_v4();
    assert_eq!(
        auth.verify(&es256(&project_claims(user, &url), &keys, EC_KID)).await.unwrap_err(),
        AuthError::UnknownKey
    );
    assert!(auth.verify(&hs256(&project_claims(user, &url), JWT_SECRET)).await.is_ok());
}

#[tokio::test]
async fn without_configuration_every_token_is_refused() {
    let auth = Authenticator::new(AUDIENCE.into(), None, None, reqwest::Client::new());
    assert_eq!(auth.verify(&hs256(&claims(Uuid::new_v4()), JWT_SECRET)).await.unwrap_err(), AuthError::NotConfigured);
    let auth = Authenticator::new(AUDIENCE.into(), Some(SecretString::from(JWT_SECRET)), None, reqwest::Client::new());
    let keys = Keys::generate();
    assert_eq!(auth.verify(&es256(&claims(Uuid::new_v4()), &keys, EC_KID)).await.unwrap_err(), AuthError::Algorithm);
}

// ---------------------------------------------------------------------------------------------
// Over HTTP
// ---------------------------------------------------------------------------------------------

both_with!([("REQUIRE_AAL2", "true")], with_require_aal2_writes_need_a_second_factor);
both!(
    anonymous_users_get_401_anonymous_user,
    refused_tokens_get_401_with_www_authenticate,
    all_three_token_kinds_work_over_http,
    first_sight_creates_the_user_row
);

async fn refused_tokens_get_401_with_www_authenticate(app: TestApp) {
    let user = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let mut expired = app.jwks.claims(user);
    expired["exp"] = json!(now - 3600);

    // No credentials: plain `Bearer` challenge.
    let response = app.get("/connections", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let error = helpers::error_of(response, 401).await;
    assert_eq!(error["code"], "unauthenticated");

    for (header, code) in [
        (format!("Bearer {}", hs256(&expired, JWT_SECRET)), "token_expired"),
        (format!("Bearer {}", raw_token(&json!({"alg": "none"}), &app.jwks.claims(user), None)), "invalid_token"),
        (format!("Bearer {}", hs256(&app.jwks.claims(user), "wrong")), "invalid_token"),
        (format!("Bearer {}", "x".repeat(10_000)), "invalid_token"),
        ("Basic dXNlcjpwYXNz".to_owned(), "unauthenticated"),
        ("Bearer ".to_owned(), "unauthenticated"),
    ] {
        let response = app.client.get(app.url("/connections")).header("authorization", &header).send().await.unwrap();
        let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        let error = helpers::error_of(response, 401).await;
        assert_eq!(error["code"], code, "{header:.40}");
    }
    // A refused token never creates a user.
    assert_eq!(app.count("users").await, 0);
}

async fn all_three_token_kinds_work_over_http(app: TestApp) {
    let user = Uuid::new_v4();
    for token in [
        hs256(&app.jwks.claims(user), JWT_SECRET),
        es256(&app.jwks.claims(user), &app.keys, EC_KID),
        rs256(&app.jwks.claims(user), RSA_KID),
    ] {
        let response = app.client.get(app.url("/connections")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(app.jwks.hits(), 1);
}

async fn first_sight_creates_the_user_row(app: TestApp) {
    let user = app.user();
    assert_eq!(app.get("/connections", Some(&user)).await.status(), 200);
    let emails = app
        .texts(
            &format!("SELECT email FROM public.users WHERE id = '{}'", user.id),
            &format!("SELECT email FROM users WHERE id = '{}'", user.id),
        )
        .await;
    assert_eq!(emails, vec![Some(format!("{}@example.com", user.id))]);
    // Again: still one row.
    assert_eq!(app.get("/connections", Some(&user)).await.status(), 200);
    assert_eq!(app.count("users").await, 1);
}

async fn anonymous_users_get_401_anonymous_user(app: TestApp) {
    let mut claims = app.jwks.claims(Uuid::new_v4());
    claims["is_anonymous"] = json!(true);
    let response =
        app.client.get(app.url("/connections")).bearer_auth(hs256(&claims, JWT_SECRET)).send().await.unwrap();
    let error = helpers::error_of(response, 401).await;
    assert_eq!(error["code"], "anonymous_user");
    assert_eq!(app.count("users").await, 0);
}

async fn with_require_aal2_writes_need_a_second_factor(app: TestApp) {
    let user = Uuid::new_v4();
    let token = |aal: Option<&str>| {
        let mut claims = app.jwks.claims(user);
        if let Some(aal) = aal {
            claims["aal"] = json!(aal);
        }
        hs256(&claims, JWT_SECRET)
    };
    let test_keys = json!({ "exchange": "binance", "api_key": "k", "api_secret": "s" });
    for aal in [None, Some("aal1"), Some("AAL2 ")] {
        let token = token(aal);
        let read = app.client.get(app.url("/connections")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(read.status(), 200, "{aal:?}: reads stay open");
        for (method, path) in
            [("POST", "/connections/test"), ("DELETE", "/connections/00000000-0000-4000-8000-000000000001")]
        {
            let response = app
                .client
                .request(method.parse().unwrap(), app.url(path))
                .bearer_auth(&token)
                .json(&test_keys)
                .send()
                .await
                .unwrap();
            let error = helpers::error_of(response, 403).await;
            assert_eq!(error["code"], "mfa_required", "{aal:?} {method} {path}");
        }
    }
    assert_eq!(app.count("tradeeon_jobs").await, 0, "nothing was enqueued");
    let response = app
        .client
        .post(app.url("/connections/test"))
        .bearer_auth(token(Some("aal2")))
        .json(&test_keys)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}
