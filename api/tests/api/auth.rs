//! Supabase token verification: HS256 and JWKS (ES256, RS256) over real HTTP, the rejection
//! corpus, and the JWKS refetch rate limit.

use secrecy::SecretString;
use serde_json::json;
use tradeeon_api::auth::{AuthError, Authenticator};
use uuid::Uuid;

use crate::helpers::{
    self, AUDIENCE, EC_KID, JWT_SECRET, JwksServer, Keys, RSA_KID, RSA_PUBLIC_PEM, TestApp, claims, es256, hs256,
    raw_token, rs256,
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
    for token in [hs256(&claims(user), JWT_SECRET), es256(&claims(user), &keys, EC_KID), rs256(&claims(user), RSA_KID)]
    {
        let verified = auth.verify(&token).await.expect("valid token");
        assert_eq!(verified.id.0, user);
        assert_eq!(verified.email.as_deref(), Some(format!("{user}@example.com").as_str()));
    }
    assert_eq!(jwks.hits(), 1, "the JWKS is fetched once and cached");
}

#[tokio::test]
async fn rejection_corpus() {
    let (auth, keys, _jwks) = authenticator().await;
    let user = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let with = |patch: serde_json::Value| {
        let mut c = claims(user);
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
        ("alg none", raw_token(&json!({"alg": "none", "typ": "JWT"}), &claims(user), None), AuthError::Malformed),
        ("alg None spelled oddly", raw_token(&json!({"alg": "None"}), &claims(user), None), AuthError::Malformed),
        (
            "HS256 signed with the RSA public key (algorithm confusion)",
            raw_token(&json!({"alg": "HS256", "kid": RSA_KID}), &claims(user), Some(RSA_PUBLIC_PEM.as_bytes())),
            AuthError::BadSignature,
        ),
        (
            "HS256 signed with the EC public key (algorithm confusion)",
            raw_token(&json!({"alg": "HS256", "kid": EC_KID}), &claims(user), Some(keys.ec_public_pem.as_bytes())),
            AuthError::BadSignature,
        ),
        ("RS256 with the HS kid of the JWKS", rs256(&claims(user), "hs-key"), AuthError::UnknownKey),
        ("RS256 naming the EC key", rs256(&claims(user), EC_KID), AuthError::Algorithm),
        (
            "HS384",
            raw_token(&json!({"alg": "HS384"}), &claims(user), Some(JWT_SECRET.as_bytes())),
            AuthError::Algorithm,
        ),
        ("expired", hs256(&with(json!({"exp": now - 3600})), JWT_SECRET), AuthError::Expired),
        ("nbf in the future", hs256(&with(json!({"nbf": now + 3600})), JWT_SECRET), AuthError::NotYetValid),
        ("wrong aud", hs256(&with(json!({"aud": "anon"})), JWT_SECRET), AuthError::Audience),
        ("missing aud", hs256(&with(json!({"aud": null})), JWT_SECRET), AuthError::Malformed),
        ("missing exp", hs256(&with(json!({"exp": null})), JWT_SECRET), AuthError::Malformed),
        ("missing sub", hs256(&with(json!({"sub": null})), JWT_SECRET), AuthError::Subject),
        ("non-UUID sub", hs256(&with(json!({"sub": "admin"})), JWT_SECRET), AuthError::Subject),
        ("wrong secret", hs256(&claims(user), "not-the-secret"), AuthError::BadSignature),
        ("unknown kid", es256(&claims(user), &keys, "rotated-away"), AuthError::UnknownKey),
        (
            "ES256 without kid",
            {
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                h.kid = None;
                jsonwebtoken::encode(
                    &h,
                    &claims(user),
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
                let token = hs256(&claims(user), JWT_SECRET);
                let parts: Vec<&str> = token.split('.').collect();
                let other = hs256(&claims(Uuid::new_v4()), JWT_SECRET);
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
    auth.verify(&es256(&claims(user), &keys, EC_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1);
    // A flood of forged kids right after: no more fetches.
    for i in 0..20 {
        let err = auth.verify(&es256(&claims(user), &keys, &format!("forged-{i}"))).await.unwrap_err();
        assert_eq!(err, AuthError::UnknownKey);
    }
    assert_eq!(jwks.hits(), 1, "refetches are limited to one per minute");
    // Known keys keep working from the cache.
    auth.verify(&rs256(&claims(user), RSA_KID)).await.unwrap();
    assert_eq!(jwks.hits(), 1);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_fetch() {
    let (auth, keys, jwks) = authenticator().await;
    let auth = std::sync::Arc::new(auth);
    let tokens: Vec<String> = (0..16).map(|_| es256(&claims(Uuid::new_v4()), &keys, EC_KID)).collect();
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
    assert_eq!(auth.verify(&es256(&claims(user), &keys, EC_KID)).await.unwrap_err(), AuthError::UnknownKey);
    assert!(auth.verify(&hs256(&claims(user), JWT_SECRET)).await.is_ok());
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

both!(
    refused_tokens_get_401_with_www_authenticate,
    all_three_token_kinds_work_over_http,
    first_sight_creates_the_user_row
);

async fn refused_tokens_get_401_with_www_authenticate(app: TestApp) {
    let user = Uuid::new_v4();
    let now = chrono::Utc::now().timestamp();
    let mut expired = claims(user);
    expired["exp"] = json!(now - 3600);

    // No credentials: plain `Bearer` challenge.
    let response = app.get("/connections", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let error = helpers::error_of(response, 401).await;
    assert_eq!(error["code"], "unauthenticated");

    for (header, code) in [
        (format!("Bearer {}", hs256(&expired, JWT_SECRET)), "token_expired"),
        (format!("Bearer {}", raw_token(&json!({"alg": "none"}), &claims(user), None)), "invalid_token"),
        (format!("Bearer {}", hs256(&claims(user), "wrong")), "invalid_token"),
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
    for token in
        [hs256(&claims(user), JWT_SECRET), es256(&claims(user), &app.keys, EC_KID), rs256(&claims(user), RSA_KID)]
    {
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
