//! Connections: upsert, list/get, revoke, user transactions.

use std::net::IpAddr;

use chrono::Utc;
use serde_json::json;
use tradeeon_shared::domain::{
    ApiKeyHint, AuditAction, ConnectionId, ConnectionStatus, Exchange, Features, Permissions,
};
use tradeeon_shared::store::{AuditEntryInput, NewConnection, StatusUpdate, Store, StoreError};

use crate::harness::{creds, new_connection, record_check, text, user};

async fn upsert_inserts_then_updates_the_same_row(store: Store) {
    let alice = user(&store).await;
    let first = store.upsert_connection(&alice, new_connection(Exchange::Binance, "1"), None).await.unwrap();
    assert_eq!(first.user_id, alice.user_id);
    assert_eq!(first.exchange, Exchange::Binance);
    assert_eq!(first.status, ConnectionStatus::Pending);
    assert_eq!(first.credentials_version, 1);
    assert_eq!(first.consecutive_failures, 0);
    assert_eq!(first.permissions, None);
    assert_eq!(first.features, Features::default());
    assert_eq!(first.nickname.as_deref(), Some("nick-1"));
    assert_eq!(first.api_key_hint, Some(ApiKeyHint::from_api_key("plain-key-1")));
    assert!(first.is_active);
    assert!(first.last_checked_at.is_none());

    // A health check happens...
    let checked = record_check(
        &store,
        first.id,
        StatusUpdate {
            status: ConnectionStatus::Error,
            status_message: Some("bad key".into()),
            latency_ms: Some(40),
            permissions: Some(Permissions { read: true, ..Default::default() }),
            consecutive_failures: 3,
            checked_at: Utc::now(),
            credentials_version: first.credentials_version,
        },
    )
    .await;
    assert!(checked);

    // ...then the user submits new keys for the same exchange: same row, fresh state.
    let second = store
        .upsert_connection(&alice, NewConnection { nickname: None, ..new_connection(Exchange::Binance, "2") }, None)
        .await
        .unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(second.credentials_version, 2);
    assert_eq!(second.status, ConnectionStatus::Pending);
    assert_eq!(second.status_message, None);
    assert_eq!(second.consecutive_failures, 0);
    assert_eq!(second.permissions, None);
    assert_eq!(second.last_checked_at, None);
    assert_eq!(second.last_latency_ms, None);
    assert_eq!(second.nickname.as_deref(), Some("nick-1"), "no nickname given keeps the old one");
    assert_eq!(second.api_key_hint, Some(ApiKeyHint::from_api_key("plain-key-2")));
    assert_eq!(second.created_at, first.created_at);
    assert!(second.updated_at >= first.updated_at);
    let (_, stored, version) = store.load_credentials(first.id).await.unwrap().unwrap();
    assert_eq!(stored, creds("2"));
    assert_eq!(version, 2);

    // A different exchange is a different connection; newest first.
    let kraken = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "k"), None).await.unwrap();
    assert_ne!(kraken.id, first.id);
    let listed: Vec<ConnectionId> = store.list_connections(&alice).await.unwrap().iter().map(|c| c.id).collect();
    assert_eq!(listed, vec![kraken.id, first.id]);
}

/// Concurrent submissions for the same (user, exchange) all succeed on one row: the upsert never
/// surfaces the UNIQUE(user_id, exchange) violation.
async fn concurrent_upserts_share_one_row(store: Store) {
    let alice = user(&store).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let alice = alice.clone();
            tokio::spawn(async move {
                store.upsert_connection(&alice, new_connection(Exchange::Coinbase, &i.to_string()), None).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().expect("upsert").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    let record = store.get_connection(&alice, ids[0]).await.unwrap().unwrap();
    assert_eq!(record.credentials_version, 8);
}

async fn upsert_reactivates_a_revoked_connection(store: Store) {
    let alice = user(&store).await;
    let first = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "1"), None).await.unwrap();
    store.revoke_connection(&alice, first.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    assert_eq!(store.get_connection(&alice, first.id).await.unwrap(), None);

    let again = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "2"), None).await.unwrap();
    assert_eq!(again.id, first.id);
    assert!(again.is_active);
    assert_eq!(again.credentials_version, 2);
    assert_eq!(store.get_connection(&alice, first.id).await.unwrap(), Some(again));
    let (_, stored, _) = store.load_credentials(first.id).await.unwrap().unwrap();
    assert_eq!(stored, creds("2"));
}

async fn list_and_get_return_only_active_own_rows(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let a_binance = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a1"), None).await.unwrap();
    let a_kraken = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "a2"), None).await.unwrap();
    let b_binance = store.upsert_connection(&bob, new_connection(Exchange::Binance, "b1"), None).await.unwrap();
    store.revoke_connection(&alice, a_kraken.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();

    assert_eq!(store.list_connections(&alice).await.unwrap(), vec![a_binance.clone()]);
    assert_eq!(store.list_connections(&bob).await.unwrap(), vec![b_binance.clone()]);
    assert_eq!(store.get_connection(&alice, a_binance.id).await.unwrap(), Some(a_binance.clone()));
    assert_eq!(store.get_connection(&alice, a_kraken.id).await.unwrap(), None, "revoked");
    assert_eq!(store.get_connection(&bob, a_binance.id).await.unwrap(), None, "not bob's");
    assert_eq!(store.get_connection(&alice, b_binance.id).await.unwrap(), None, "not alice's");
    assert_eq!(store.get_connection(&alice, ConnectionId::new_random()).await.unwrap(), None);
}

async fn revoke_wipes_secrets_and_audits_in_one_transaction(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Coinbase, "r"), None).await.unwrap();
    store.store_session(conn.id, "gAAAA-token".into(), Utc::now(), None).await.unwrap();
    let audit = AuditEntryInput {
        connection_id: None,
        action: AuditAction::Revoked,
        ip_address: Some("203.0.113.9".parse().unwrap()),
        user_agent: Some("test-agent".into()),
        details: json!({"reason": "user"}),
    };
    store.revoke_connection(&alice, conn.id, audit).await.unwrap();

    let id = conn.id.to_string();
    let secret = |col: &str| {
        (
            format!("SELECT {col} FROM public.exchange_keys WHERE id = $1"),
            format!("SELECT {col} FROM exchange_keys WHERE id = ?1"),
        )
    };
    for col in ["api_key_encrypted", "api_secret_encrypted"] {
        let (pg, lite) = secret(col);
        assert_eq!(text(&store, &pg, &lite, &id).await.as_deref(), Some(""), "{col}");
    }
    for col in ["passphrase_encrypted", "access_token_encrypted"] {
        let (pg, lite) = secret(col);
        assert_eq!(text(&store, &pg, &lite, &id).await, None, "{col}");
    }
    assert!(store.load_credentials(conn.id).await.unwrap().is_none());
    assert!(store.load_access_token(conn.id).await.unwrap().is_none());
    assert!(store.list_encrypted_secrets(None, 100).await.unwrap().iter().all(|s| s.id != conn.id));

    let log = store.list_audit(&alice, 10, None).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].action, AuditAction::Revoked);
    assert_eq!(log[0].connection_id, Some(conn.id));
    assert_eq!(log[0].ip_address, Some("203.0.113.9".parse::<IpAddr>().unwrap()));
    assert_eq!(log[0].user_agent.as_deref(), Some("test-agent"));
    assert_eq!(log[0].details, json!({"reason": "user"}));

    // Already revoked: NotFound, and no second audit row.
    let err = store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_eq!(store.list_audit(&alice, 10, None).await.unwrap().len(), 1);
}

async fn revoke_of_unknown_or_foreign_connection_is_not_found(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    for (who, id) in [(&bob, conn.id), (&alice, ConnectionId::new_random())] {
        let err = store.revoke_connection(who, id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{err:?}");
    }
    assert!(store.get_connection(&alice, conn.id).await.unwrap().is_some());
    assert!(store.load_credentials(conn.id).await.unwrap().is_some());
    assert!(store.list_audit(&bob, 10, None).await.unwrap().is_empty());
    assert!(store.list_audit(&alice, 10, None).await.unwrap().is_empty());
}

/// The upsert's audit row is written with it and points at the new connection.
async fn upsert_with_audit_writes_both(store: Store) {
    let alice = user(&store).await;
    let audit = AuditEntryInput {
        connection_id: None,
        action: AuditAction::Connected,
        ip_address: Some("2001:db8::1".parse().unwrap()),
        user_agent: Some("curl/8".into()),
        details: json!({"exchange": "kraken"}),
    };
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "a"), Some(audit)).await.unwrap();
    let log = store.list_audit(&alice, 10, None).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].connection_id, Some(conn.id));
    assert_eq!(log[0].action, AuditAction::Connected);
    assert_eq!(log[0].ip_address, Some("2001:db8::1".parse::<IpAddr>().unwrap()));
}

/// A user transaction is all-or-nothing, and can be handed over (out of the user scope) to write
/// something else in the same transaction.
async fn user_transaction_commits_or_rolls_back_as_a_whole(store: Store) {
    let alice = user(&store).await;

    let mut tx = store.begin_user(&alice).await.unwrap();
    let conn = tx.upsert_connection(&new_connection(Exchange::Binance, "t")).await.unwrap();
    tx.insert_audit(&AuditEntryInput { connection_id: Some(conn.id), ..AuditEntryInput::new(AuditAction::Connected) })
        .await
        .unwrap();
    drop(tx);
    assert!(store.list_connections(&alice).await.unwrap().is_empty());
    assert!(store.list_audit(&alice, 10, None).await.unwrap().is_empty());

    let mut tx = store.begin_user(&alice).await.unwrap();
    let conn = tx.upsert_connection(&new_connection(Exchange::Binance, "t")).await.unwrap();
    let service = tx.into_service().await.unwrap();
    let service = match service {
        tradeeon_shared::store::ServiceTx::Postgres(mut tx) => {
            // Back to the service's own role: it sees the whole table.
            let role: String =
                sqlx::query_scalar("SELECT current_user::text").fetch_one(tx.connection()).await.unwrap();
            assert_ne!(role, "authenticated");
            let claims: Option<String> =
                sqlx::query_scalar("SELECT auth.uid()::text").fetch_one(tx.connection()).await.unwrap();
            assert_eq!(claims, None);
            tradeeon_shared::store::ServiceTx::Postgres(tx)
        }
        other => other,
    };
    service.commit().await.unwrap();
    assert_eq!(store.list_connections(&alice).await.unwrap(), vec![conn]);

    // A revoke that is rolled back leaves the connection and writes no audit row.
    let id = store.list_connections(&alice).await.unwrap()[0].id;
    let mut tx = store.begin_user(&alice).await.unwrap();
    tx.revoke_connection(id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    drop(tx);
    assert!(store.get_connection(&alice, id).await.unwrap().is_some());
    assert!(store.list_audit(&alice, 10, None).await.unwrap().is_empty());
}

/// What the API serializes for clients carries no ciphertext.
async fn connection_record_holds_no_secrets(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Coinbase, "s"), None).await.unwrap();
    let json = serde_json::to_string(&conn).unwrap();
    assert!(!json.contains("gAAAA"), "{json}");
    assert!(!json.contains("encrypted"), "{json}");
    let debug = format!("{:?}", creds("s"));
    assert!(!debug.contains("gAAAA"), "{debug}");
}

contract!(
    upsert_inserts_then_updates_the_same_row,
    concurrent_upserts_share_one_row,
    upsert_reactivates_a_revoked_connection,
    list_and_get_return_only_active_own_rows,
    revoke_wipes_secrets_and_audits_in_one_transaction,
    revoke_of_unknown_or_foreign_connection_is_not_found,
    upsert_with_audit_writes_both,
    user_transaction_commits_or_rolls_back_as_a_whole,
    connection_record_holds_no_secrets,
);
