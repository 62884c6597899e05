//! Kraken nonces shared through PostgreSQL by several worker processes (two `Store`s with their
//! own pools stand for two processes on one database).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tradeeon_shared::config::{RateLimitConfig, WorkerConfig};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::exchanges::{Credentials, key_fingerprint};
use tradeeon_shared::vault::SecretValue;
use tradeeon_simulator::{SimState, Simulator};
use tradeeon_worker::exchanges::ExchangeClients;

use crate::harness::connect;
use crate::helpers::*;

async fn concurrent_checks_from_two_processes_never_reuse_a_nonce(url: String) {
    let sim = Simulator::start(Arc::new(SimState::seeded())).await.unwrap();
    // Room for all 20 calls in Kraken's counter, and none of our own budgets.
    sim.state.kraken.set_rate_limit(1_000.0, 1_000.0);
    let config = WorkerConfig {
        rate_limits: RateLimitConfig { enabled: false, ..test_config().rate_limits },
        exchange_timeout: Duration::from_secs(10),
        ..test_config()
    };
    let first = connect(&url).await;
    let second = connect(&url).await;
    let processes = [
        ExchangeClients::for_store(&endpoints(&sim), &config, &first).unwrap(),
        ExchangeClients::for_store(&endpoints(&sim), &config, &second).unwrap(),
    ];
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let credentials = Credentials {
        api_key: SecretValue::new(sim_kraken::SEEDED_FULL_KEY.to_string()),
        api_secret: SecretValue::new(secret),
        passphrase: None,
        access_token: None,
    };
    let checks = (0..20).map(|i| processes[i % 2].check(Exchange::Kraken, &credentials));
    let results = join_all(checks).await;
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    assert_eq!(sim.state.kraken.invalid_nonce_count(), 0);
    let fingerprint = key_fingerprint(sim_kraken::SEEDED_FULL_KEY);
    assert_eq!(
        first.last_kraken_nonce(&fingerprint).await.unwrap(),
        sim.state.kraken.last_nonce(sim_kraken::SEEDED_FULL_KEY),
        "the last nonce Kraken accepted is the last one handed out"
    );
    first.close().await;
    second.close().await;
}

async fn a_lease_holds_the_key_across_processes_and_nonces_increase(url: String) {
    let first = connect(&url).await;
    let second = connect(&url).await;
    let lease = first.lease_kraken_nonce("fp").await.unwrap().expect("PostgreSQL leases");
    // The other process waits while the lease is held…
    let waiting = tokio::spawn({
        let second = second.clone();
        async move { second.lease_kraken_nonce("fp").await.unwrap().unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second lease must wait for the first");
    // …but not for another key.
    let other = second.lease_kraken_nonce("other").await.unwrap().unwrap();
    let held = lease.nonce();
    drop(lease);
    let next = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("released on drop").unwrap();
    assert!(next.nonce() > held);
    drop((next, other));
    // A stored nonce ahead of our clock (a host whose clock ran fast) still increases by one.
    let ahead = chrono::Utc::now().timestamp_micros() + 3_600_000_000;
    sqlx::query("UPDATE kraken_nonces SET last_nonce = $1 WHERE key_fingerprint = 'fp'")
        .bind(ahead)
        .execute(first.pg_pool().unwrap())
        .await
        .unwrap();
    for step in 1..=3 {
        let n = [&first, &second][step % 2].lease_kraken_nonce("fp").await.unwrap().unwrap().nonce();
        assert_eq!(n, ahead as u64 + step as u64);
    }
    first.close().await;
    second.close().await;
}

postgres_url_only!(
    concurrent_checks_from_two_processes_never_reuse_a_nonce,
    a_lease_holds_the_key_across_processes_and_nonces_increase,
);

async fn sqlite_uses_in_memory_nonces(store: tradeeon_shared::store::Store) {
    assert!(store.lease_kraken_nonce("fp").await.unwrap().is_none());
    let app = spawn_app(store).await;
    app.sim.state.kraken.set_rate_limit(1_000.0, 1_000.0);
    let secret = sim_kraken::seeded_secret(sim_kraken::SEEDED_FULL_KEY);
    let credentials = Credentials {
        api_key: SecretValue::new(sim_kraken::SEEDED_FULL_KEY.to_string()),
        api_secret: SecretValue::new(secret),
        passphrase: None,
        access_token: None,
    };
    let results = join_all((0..10).map(|_| app.env.exchanges.check(Exchange::Kraken, &credentials))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(app.sim.state.kraken.invalid_nonce_count(), 0);
}

mod sqlite_uses_in_memory_nonces {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        crate::harness::run_sqlite(super::sqlite_uses_in_memory_nonces).await;
    }
}
