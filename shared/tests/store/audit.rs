//! The audit log: per user, newest first, keyset pagination.

use std::collections::HashSet;

use serde_json::{Value, json};
use tradeeon_shared::domain::{AuditAction, Exchange};
use tradeeon_shared::store::{AuditEntryInput, PageCursor, Store, StoreError};

use crate::harness::{new_connection, user};

async fn audit_pages_newest_first_with_a_cursor(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    let actions = [
        AuditAction::Connected,
        AuditAction::Tested,
        AuditAction::StatusChanged,
        AuditAction::Rotated,
        AuditAction::RotateFailed,
        AuditAction::SessionCreated,
        AuditAction::Tested,
    ];
    for (i, action) in actions.iter().enumerate() {
        store
            .insert_audit(
                &alice,
                AuditEntryInput {
                    connection_id: (i % 2 == 0).then_some(conn.id),
                    details: json!({ "n": i }),
                    ..AuditEntryInput::new(*action)
                },
            )
            .await
            .unwrap();
    }

    let all = store.list_audit(&alice, 100, None).await.unwrap();
    assert_eq!(all.len(), actions.len());
    for pair in all.windows(2) {
        assert!((pair[0].created_at, pair[0].id) > (pair[1].created_at, pair[1].id), "strictly newest first");
    }
    // Inserted one after another, so also in reverse insertion order (ties are broken by id,
    // which is random, so only check where timestamps differ).
    let ns: Vec<u64> = all.iter().map(|e| e.details["n"].as_u64().unwrap()).collect();
    for (pair, entries) in ns.windows(2).zip(all.windows(2)) {
        if entries[0].created_at != entries[1].created_at {
            assert!(pair[0] > pair[1], "{ns:?}");
        }
    }

    // Pages of 3 through the cursor's string form reproduce the whole list.
    let mut paged = Vec::new();
    let mut before: Option<PageCursor> = None;
    loop {
        let page = store.list_audit(&alice, 3, before).await.unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        let cursor = PageCursor::from(last);
        let parsed: PageCursor = cursor.to_string().parse().unwrap();
        assert_eq!(parsed, cursor);
        before = Some(parsed);
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert!("garbage".parse::<PageCursor>().is_err());
    assert!("123.not-a-uuid".parse::<PageCursor>().is_err());
}

async fn audit_is_private_to_its_user(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    store
        .insert_audit(
            &alice,
            AuditEntryInput { connection_id: Some(conn.id), ..AuditEntryInput::new(AuditAction::Tested) },
        )
        .await
        .unwrap();
    store.insert_audit(&bob, AuditEntryInput::new(AuditAction::Tested)).await.unwrap();

    let bobs = store.list_audit(&bob, 100, None).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].connection_id, None);
    let alices: HashSet<_> = store.list_audit(&alice, 100, None).await.unwrap().iter().map(|e| e.id).collect();
    assert_eq!(alices.len(), 1);
    assert!(!alices.contains(&bobs[0].id));

    // Bob cannot attach an entry to Alice's connection.
    let err = store
        .insert_audit(
            &bob,
            AuditEntryInput { connection_id: Some(conn.id), ..AuditEntryInput::new(AuditAction::Tested) },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert_eq!(store.list_audit(&bob, 100, None).await.unwrap().len(), 1);
}

async fn audit_entry_round_trips(store: Store) {
    let alice = user(&store).await;
    let written = store
        .insert_audit(
            &alice,
            AuditEntryInput {
                ip_address: Some("::ffff:192.0.2.1".parse().unwrap()),
                user_agent: Some("Mozilla/5.0".into()),
                ..AuditEntryInput::new(AuditAction::SessionCreated)
            },
        )
        .await
        .unwrap();
    assert_eq!(written.details, Value::Null);
    let read = store.list_audit(&alice, 1, None).await.unwrap();
    assert_eq!(read, vec![written]);
    assert!(store.list_audit(&alice, 0, None).await.unwrap().is_empty());
}

contract!(audit_pages_newest_first_with_a_cursor, audit_is_private_to_its_user, audit_entry_round_trips,);
