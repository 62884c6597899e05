//! `tradeeon rewrap` end to end on real Fernet tokens: moving every secret to a new primary key,
//! idempotence, and rows no configured key can read.

use chrono::Utc;
use tradeeon_shared::domain::{ApiKeyHint, Exchange};
use tradeeon_shared::rewrap::{RewrapReport, rewrap_all};
use tradeeon_shared::store::{EncryptedCredentials, NewConnection, Store};
use tradeeon_shared::vault::{EncryptedSecret, Keyring, SecretValue};

use crate::harness::user;

fn encrypt(ring: &Keyring, plaintext: &str) -> String {
    ring.encrypt(&SecretValue::new(plaintext.to_string())).into_inner()
}

fn connection(ring: &Keyring, exchange: Exchange, tag: &str) -> NewConnection {
    NewConnection {
        exchange,
        credentials: EncryptedCredentials {
            api_key: encrypt(ring, &format!("{tag}-key")),
            api_secret: encrypt(ring, &format!("{tag}-secret")),
            passphrase: Some(encrypt(ring, &format!("{tag}-pass"))),
        },
        nickname: None,
        api_key_hint: ApiKeyHint::from_api_key(&format!("{tag}-key")),
    }
}

fn decrypt_on(ring: &Keyring, token: &str) -> (String, usize) {
    let d = ring.decrypt(&EncryptedSecret::from(token.to_string())).expect("decrypts");
    (d.value.expose().to_string(), d.key_index)
}

async fn rewrap_moves_everything_to_the_primary_key_once(store: Store) {
    let old_key = Keyring::generate_key();
    let old = Keyring::parse(&old_key).unwrap();
    let new_key = Keyring::generate_key();
    let alice = user(&store).await;
    let a = store.upsert_connection(&alice, connection(&old, Exchange::Binance, "a"), None).await.unwrap();
    let z = store.upsert_connection(&alice, connection(&old, Exchange::Zerodha, "z"), None).await.unwrap();
    store.store_session(z.id, encrypt(&old, "z-access"), Utc::now(), None).await.unwrap();

    // Rotation step 2: the new key first, the old one still accepted.
    let both = Keyring::parse(&format!("{new_key},{old_key}")).unwrap();
    let first = rewrap_all(&store, &both).await.unwrap();
    assert_eq!(
        first,
        RewrapReport { scanned: 2, rewrapped: 2, already_current: 0, skipped_concurrent: 0, undecryptable: 0 }
    );

    // Every field, the Zerodha access token included, now decrypts with the new key alone.
    let only_new = Keyring::parse(&new_key).unwrap();
    for (id, tag) in [(a.id, "a"), (z.id, "z")] {
        let (_, creds, _) = store.load_credentials(id).await.unwrap().unwrap();
        assert_eq!(decrypt_on(&only_new, &creds.api_key), (format!("{tag}-key"), 0));
        assert_eq!(decrypt_on(&only_new, &creds.api_secret), (format!("{tag}-secret"), 0));
        assert_eq!(decrypt_on(&only_new, creds.passphrase.as_deref().unwrap()), (format!("{tag}-pass"), 0));
    }
    let token = store.load_access_token(z.id).await.unwrap().unwrap();
    assert_eq!(decrypt_on(&only_new, &token), ("z-access".to_string(), 0));

    // A second run (or a re-run after an interruption) finds nothing to do.
    let second = rewrap_all(&store, &both).await.unwrap();
    assert_eq!(second.rewrapped, 0);
    assert_eq!(second.already_current, 2);
}

async fn rewrap_leaves_rows_no_key_can_read(store: Store) {
    let stranger = Keyring::parse(&Keyring::generate_key()).unwrap();
    let ours = Keyring::parse(&Keyring::generate_key()).unwrap();
    let alice = user(&store).await;
    let lost = store.upsert_connection(&alice, connection(&stranger, Exchange::Kraken, "lost"), None).await.unwrap();
    let (_, before, _) = store.load_credentials(lost.id).await.unwrap().unwrap();

    let report = rewrap_all(&store, &ours).await.unwrap();
    assert_eq!(report.undecryptable, 1);
    assert_eq!(report.rewrapped, 0);
    let (_, after, _) = store.load_credentials(lost.id).await.unwrap().unwrap();
    assert_eq!(before, after, "an undecryptable row is never rewritten");
}

contract!(rewrap_moves_everything_to_the_primary_key_once, rewrap_leaves_rows_no_key_can_read);
