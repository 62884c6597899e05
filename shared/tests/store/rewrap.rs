//! Re-encryption under a new vault key: listing and compare-and-swap.

use chrono::Utc;
use tradeeon_shared::domain::{ApiKeyHint, AuditAction, Exchange};
use tradeeon_shared::store::{AuditEntryInput, EncryptedCredentials, Store, StoredSecrets};

use crate::harness::{creds, new_connection, user};

fn rewrapped(secrets: &StoredSecrets) -> (EncryptedCredentials, Option<String>) {
    let c = &secrets.credentials;
    (
        EncryptedCredentials {
            api_key: format!("{}-v2", c.api_key),
            api_secret: format!("{}-v2", c.api_secret),
            passphrase: c.passphrase.as_ref().map(|p| format!("{p}-v2")),
        },
        secrets.access_token.as_ref().map(|t| format!("{t}-v2")),
    )
}

async fn list_all(store: &Store, page: u32) -> Vec<StoredSecrets> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let batch = store.list_encrypted_secrets(after, page).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = Some(last.id);
        all.extend(batch);
    }
    all
}

async fn rewrap_lists_every_secret_and_replaces_it_once(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let a1 = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a1"), None).await.unwrap();
    let a2 = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "a2"), None).await.unwrap();
    let b1 = store.upsert_connection(&bob, new_connection(Exchange::Kraken, "b1"), None).await.unwrap();
    let gone = store.upsert_connection(&bob, new_connection(Exchange::Coinbase, "gone"), None).await.unwrap();
    store.revoke_connection(&bob, gone.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    store.store_session(a2.id, "gAAAA-token".into(), Utc::now(), None).await.unwrap();

    let listed = list_all(&store, 2).await;
    let mut expected = vec![a1.id, a2.id, b1.id];
    expected.sort();
    assert_eq!(listed.iter().map(|s| s.id).collect::<Vec<_>>(), expected, "wiped rows are skipped");
    let token_row = listed.iter().find(|s| s.id == a2.id).unwrap();
    assert_eq!(token_row.access_token.as_deref(), Some("gAAAA-token"));
    assert_eq!(token_row.credentials, creds("a2"));

    for secrets in &listed {
        let (new, token) = rewrapped(secrets);
        assert!(store.replace_encrypted_secrets(secrets, new.clone(), token.clone()).await.unwrap());
        // A re-run with the stale listing changes nothing.
        assert!(!store.replace_encrypted_secrets(secrets, creds("stale"), None).await.unwrap());
        let (record, current, version) = store.load_credentials(secrets.id).await.unwrap().unwrap();
        assert_eq!(current, new);
        assert_eq!(version, secrets.credentials_version, "a rewrap is not a rotation");
        assert_eq!(store.load_access_token(secrets.id).await.unwrap(), token);
        let before = [&a1, &a2, &b1].into_iter().find(|c| c.id == secrets.id).unwrap();
        assert_eq!(record.updated_at, before.updated_at);
    }
    // An interrupted run starts over from the top: rows now hold the new ciphertexts.
    let relisted = list_all(&store, 100).await;
    assert!(relisted.iter().all(|s| s.credentials.api_key.ends_with("-v2")));
}

/// Changes that happen between listing and replacing win over the re-encryption.
async fn rewrap_loses_to_rotation_revoke_and_new_session(store: Store) {
    let alice = user(&store).await;
    let rotated = store.upsert_connection(&alice, new_connection(Exchange::Binance, "r"), None).await.unwrap();
    let revoked = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "v"), None).await.unwrap();
    let session = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "s"), None).await.unwrap();
    store.store_session(session.id, "gAAAA-t1".into(), Utc::now(), None).await.unwrap();
    let listed = list_all(&store, 100).await;
    let find = |id| listed.iter().find(|s| s.id == id).unwrap();

    assert!(
        store
            .swap_credentials(
                rotated.id,
                1,
                creds("rotated"),
                ApiKeyHint::from_api_key("k"),
                AuditEntryInput::new(AuditAction::Rotated)
            )
            .await
            .unwrap()
    );
    store.revoke_connection(&alice, revoked.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    store.store_session(session.id, "gAAAA-t2".into(), Utc::now(), None).await.unwrap();

    for id in [rotated.id, revoked.id, session.id] {
        let stale = find(id);
        let (new, token) = rewrapped(stale);
        assert!(!store.replace_encrypted_secrets(stale, new, token).await.unwrap(), "{id}");
    }
    assert_eq!(store.load_credentials(rotated.id).await.unwrap().unwrap().1, creds("rotated"));
    assert!(list_all(&store, 100).await.iter().all(|s| s.id != revoked.id), "revoked stays wiped");
    assert_eq!(store.load_access_token(session.id).await.unwrap().as_deref(), Some("gAAAA-t2"));
}

contract!(rewrap_lists_every_secret_and_replaces_it_once, rewrap_loses_to_rotation_revoke_and_new_session,);
