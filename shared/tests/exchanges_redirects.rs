//! No exchange client follows a redirect: an API key and its signature travel in custom headers,
//! which an HTTP client keeps when it follows a redirect to another host. Each client is pointed
//! at a server that answers every request with `307` to a second server, which must see nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tradeeon_shared::exchanges::binance::BinanceClient;
use tradeeon_shared::exchanges::coinbase::CoinbaseClient;
use tradeeon_shared::exchanges::kite::KiteClient;
use tradeeon_shared::exchanges::kraken::{KrakenClient, LocalNonces};
use tradeeon_shared::exchanges::{
    CheckCode, CheckResult, ClientContext, Credentials, ExchangeClient, Unlimited, http_client,
};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::coinbase::{
    SEEDED_ES256_KEY_NAME, SEEDED_EXCHANGE_KEY, SEEDED_EXCHANGE_PASSPHRASE, seeded_es256_pem, seeded_exchange_secret,
};

/// Accepts connections and counts them; answers each request with `response(port)`.
async fn serve(response: impl Fn() -> String + Send + Sync + 'static) -> (url::Url, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let response = Arc::new(response);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // One read holds these small requests' head; the answer does not depend on it.
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response().as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url::Url::parse(&format!("http://{addr}/")).unwrap(), seen)
}

fn credentials(key: &str, secret: &str, passphrase: Option<&str>, access_token: Option<&str>) -> Credentials {
    Credentials {
        api_key: SecretValue::new(key.to_owned()),
        api_secret: SecretValue::new(secret.to_owned()),
        passphrase: passphrase.map(|p| SecretValue::new(p.to_owned())),
        access_token: access_token.map(|t| SecretValue::new(t.to_owned())),
    }
}

#[tokio::test]
async fn no_client_follows_a_redirect() {
    let (elsewhere, stolen) = serve(|| "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_owned()).await;
    let target = elsewhere.join("steal").unwrap();
    let (base, asked) = serve(move || {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    })
    .await;
    let ctx = || ClientContext { http: http_client(Duration::from_secs(5)).unwrap(), gate: Arc::new(Unlimited) };
    let kraken_secret = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let cases: Vec<(&str, Box<dyn ExchangeClient>, Credentials)> = vec![
        ("binance", Box::new(BinanceClient::new(ctx(), base.clone())), credentials("k", "s", None, None)),
        (
            "coinbase advanced trade",
            Box::new(CoinbaseClient::new(ctx(), base.clone(), base.clone())),
            credentials(SEEDED_ES256_KEY_NAME, &seeded_es256_pem(), None, None),
        ),
        (
            "coinbase exchange",
            Box::new(CoinbaseClient::new(ctx(), base.clone(), base.clone())),
            credentials(SEEDED_EXCHANGE_KEY, &seeded_exchange_secret(), Some(SEEDED_EXCHANGE_PASSPHRASE), None),
        ),
        (
            "kraken",
            Box::new(KrakenClient::new(ctx(), base.clone(), Arc::new(LocalNonces::new()))),
            credentials("k", &kraken_secret, None, None),
        ),
        (
            "kite",
            Box::new(KiteClient::new(ctx(), base.clone(), base.join("connect/login").unwrap())),
            credentials("k", "s", None, Some("t")),
        ),
    ];
    for (name, client, creds) in cases {
        let before = asked.load(Ordering::SeqCst);
        let result = CheckResult::new(client.check(&creds).await, Duration::ZERO);
        assert!(asked.load(Ordering::SeqCst) > before, "{name}: the client did not call the exchange");
        assert_eq!(result.code, CheckCode::BadResponse, "{name}: {result:?}");
        assert!(result.message.contains("redirect"), "{name}: {}", result.message);
    }
    assert_eq!(stolen.load(Ordering::SeqCst), 0, "a client followed the redirect");
}
