//! Worker-side methods: rotation CAS, status, health history, sweeps, sessions.

use chrono::{DateTime, Duration, TimeZone, Utc};
use tradeeon_shared::domain::{ApiKeyHint, AuditAction, ConnectionId, ConnectionStatus, Exchange, Permissions};
use tradeeon_shared::store::{
    AuditEntryInput, DecidedFrom, HealthEntry, HealthRecord, PageCursor, StatusUpdate, Store, StoreError,
};

use crate::harness::{creds, new_connection, record_check, user};

/// Whole seconds, so both backends store the value exactly.
fn at(secs_ago: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(Utc::now().timestamp() - secs_ago, 0).unwrap()
}

async fn swap_credentials_is_compare_and_swap(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "old"), None).await.unwrap();
    store.store_session(conn.id, "gAAAA-token".into(), at(0), None).await.unwrap();
    let (record, current, version) = store.load_credentials(conn.id).await.unwrap().unwrap();
    assert_eq!(record, store.get_connection(&alice, conn.id).await.unwrap().unwrap());
    assert_eq!(current, creds("old"));
    assert_eq!(version, 1);

    let hint = ApiKeyHint::from_api_key("brand-new-key-NEW1");
    let rotate = || AuditEntryInput::new(AuditAction::Rotated);
    assert!(store.swap_credentials(conn.id, version, creds("new"), hint.clone(), rotate()).await.unwrap());
    let (record, current, version2) = store.load_credentials(conn.id).await.unwrap().unwrap();
    assert_eq!(current, creds("new"));
    assert_eq!(version2, 2);
    assert_eq!(record.api_key_hint, Some(hint.clone()));
    assert_eq!(record.session_expires_at, None, "a new key drops the old session");
    assert_eq!(store.load_access_token(conn.id).await.unwrap(), None);

    // The retried job carries the old version: nothing changes, no second audit row.
    assert!(!store.swap_credentials(conn.id, version, creds("newer"), hint.clone(), rotate()).await.unwrap());
    assert_eq!(store.load_credentials(conn.id).await.unwrap().unwrap().1, creds("new"));
    let log = store.list_audit(&alice, 10, None).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].action, AuditAction::Rotated);
    assert_eq!(log[0].connection_id, Some(conn.id));

    // Revoked or unknown connections are never swapped.
    store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    assert!(!store.swap_credentials(conn.id, version2, creds("x"), hint.clone(), rotate()).await.unwrap());
    assert!(!store.swap_credentials(ConnectionId::new_random(), 1, creds("x"), hint, rotate()).await.unwrap());
}

async fn a_check_records_the_connection_state(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "s"), None).await.unwrap();
    let permissions = Permissions { read: true, trade: true, withdraw: false, ip_restricted: true };
    let checked_at = at(5);
    assert!(
        record_check(
            &store,
            conn.id,
            StatusUpdate {
                status: ConnectionStatus::Connected,
                status_message: None,
                latency_ms: Some(123),
                permissions: Some(permissions),
                consecutive_failures: 0,
                checked_at,
                credentials_version: conn.credentials_version,
            },
        )
        .await
    );
    let record = store.get_connection(&alice, conn.id).await.unwrap().unwrap();
    assert_eq!(record.status, ConnectionStatus::Connected);
    assert_eq!(record.last_latency_ms, Some(123));
    assert_eq!(record.last_checked_at, Some(checked_at));
    assert_eq!(record.permissions, Some(permissions));
    assert_eq!(record.updated_at, conn.updated_at, "a check is not a user change");

    // A failed check without permission info keeps the last known permissions.
    assert!(
        record_check(
            &store,
            conn.id,
            StatusUpdate {
                status: ConnectionStatus::Degraded,
                status_message: Some("timeout".into()),
                latency_ms: None,
                permissions: None,
                consecutive_failures: 2,
                checked_at: at(1),
                credentials_version: conn.credentials_version,
            },
        )
        .await
    );
    let record = store.get_connection(&alice, conn.id).await.unwrap().unwrap();
    assert_eq!(record.status, ConnectionStatus::Degraded);
    assert_eq!(record.status_message.as_deref(), Some("timeout"));
    assert_eq!(record.last_latency_ms, None);
    assert_eq!(record.consecutive_failures, 2);
    assert_eq!(record.permissions, Some(permissions));

    // A check of credentials that a rotation replaced meanwhile is not applied.
    let version = conn.credentials_version;
    let hint = ApiKeyHint::from_api_key("NEWKEY123456");
    let rotated = AuditEntryInput::new(AuditAction::Rotated);
    assert!(store.swap_credentials(conn.id, version, creds("rotated"), hint, rotated).await.unwrap());
    let stale = StatusUpdate {
        status: ConnectionStatus::Error,
        status_message: Some("old keys rejected".into()),
        latency_ms: Some(9),
        permissions: None,
        consecutive_failures: 3,
        checked_at: at(0),
        credentials_version: version,
    };
    assert!(!record_check(&store, conn.id, stale).await, "stale credentials_version");
    let record = store.get_connection(&alice, conn.id).await.unwrap().unwrap();
    assert_ne!(record.status, ConnectionStatus::Error);
    let conn = record;

    store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    let update = StatusUpdate {
        status: ConnectionStatus::Connected,
        status_message: None,
        latency_ms: None,
        permissions: None,
        consecutive_failures: 0,
        checked_at: at(0),
        credentials_version: conn.credentials_version,
    };
    assert!(!record_check(&store, conn.id, update.clone()).await, "revoked");
    assert!(!record_check(&store, ConnectionId::new_random(), update).await, "unknown");
}

/// A check's status and its history row are written together or not at all: a stale credentials
/// version or a revoked connection gets neither.
async fn record_check_writes_status_and_history_together(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "rc"), None).await.unwrap();
    let update = |version: i32, status: ConnectionStatus| StatusUpdate {
        status,
        status_message: None,
        latency_ms: Some(42),
        permissions: None,
        consecutive_failures: 0,
        checked_at: at(3),
        credentials_version: version,
    };
    let health = |status: ConnectionStatus| HealthRecord {
        connection_id: conn.id,
        checked_at: at(3),
        status,
        code: Some("ok".into()),
        latency_ms: Some(42),
        message: None,
    };
    let history = || async { store.list_health_history(&alice, conn.id, 10, None).await.unwrap() };

    let version = conn.credentials_version;
    assert!(
        store
            .record_check(
                conn.id,
                update(version, ConnectionStatus::Connected),
                health(ConnectionStatus::Connected),
                None
            )
            .await
            .unwrap()
    );
    let record = store.get_connection(&alice, conn.id).await.unwrap().unwrap();
    assert_eq!(record.status, ConnectionStatus::Connected);
    assert_eq!(record.last_latency_ms, Some(42));
    let rows = history().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, ConnectionStatus::Connected);
    assert_eq!(rows[0].latency_ms, Some(42));

    // Stale version: neither the status nor a history row.
    assert!(
        !store
            .record_check(conn.id, update(version + 1, ConnectionStatus::Error), health(ConnectionStatus::Error), None)
            .await
            .unwrap()
    );
    assert_eq!(store.get_connection(&alice, conn.id).await.unwrap().unwrap().status, ConnectionStatus::Connected);
    assert_eq!(history().await.len(), 1);

    // Revoked: the same.
    store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    assert!(
        !store
            .record_check(conn.id, update(version, ConnectionStatus::Error), health(ConnectionStatus::Error), None)
            .await
            .unwrap()
    );
    assert_eq!(history().await.len(), 1);
}

/// A check decides from the connection as it read it before calling the exchange; its write
/// applies only while nothing has checked the connection or given it a new session since.
async fn a_check_applies_only_to_the_state_it_was_decided_from(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "df"), None).await.unwrap();
    let version = conn.credentials_version;
    let update = |status: ConnectionStatus, secs_ago: i64| StatusUpdate {
        status,
        status_message: None,
        latency_ms: Some(7),
        permissions: None,
        consecutive_failures: 0,
        checked_at: at(secs_ago),
        credentials_version: version,
    };
    let health = |status: ConnectionStatus, secs_ago: i64| HealthRecord {
        connection_id: conn.id,
        checked_at: at(secs_ago),
        status,
        code: Some("ok".into()),
        latency_ms: Some(7),
        message: None,
    };
    let stored = || async { store.load_credentials(conn.id).await.unwrap().unwrap().0 };
    let history = || async { store.list_health_history(&alice, conn.id, 10, None).await.unwrap().len() };
    // One check's write: its status at `secs_ago`, decided from `from`; whether it applied.
    let write = |status: ConnectionStatus, secs_ago: i64, from: DecidedFrom| {
        let (update, health) = (update(status, secs_ago), health(status, secs_ago));
        let store = store.clone();
        async move { store.record_check(conn.id, update, health, Some(from)).await.unwrap() }
    };

    // Two checks read the never-checked connection; the first to write wins.
    let read_by_both = DecidedFrom::of(&stored().await);
    assert_eq!(read_by_both.last_checked_at, None);
    assert!(write(ConnectionStatus::Connected, 20, read_by_both).await);
    assert!(!write(ConnectionStatus::Error, 19, read_by_both).await, "decided from a state another check has replaced");
    assert_eq!(stored().await.status, ConnectionStatus::Connected);
    assert_eq!(history().await, 1);

    // Decided again from what is stored now, it applies.
    let fresh = DecidedFrom::of(&stored().await);
    assert!(fresh.last_checked_at.is_some());
    assert!(write(ConnectionStatus::Degraded, 10, fresh).await);
    assert_eq!(history().await, 2);

    // A new Kite session since the read makes the decision stale too.
    let before_session = DecidedFrom::of(&stored().await);
    assert!(store.store_session(conn.id, "token".into(), at(-3600), None).await.unwrap());
    assert!(!write(ConnectionStatus::Expired, 5, before_session).await);
    assert_eq!(stored().await.status, ConnectionStatus::Degraded);
    assert_eq!(history().await, 2);
    let after_session = DecidedFrom::of(&stored().await);
    assert!(write(ConnectionStatus::Connected, 4, after_session).await);
    assert_eq!(history().await, 3);
}

/// Many checks' writes at once (as a sweep makes them) are coalesced on PostgreSQL, and each
/// still gets its own answer: applied, or refused because its decision is stale — including two
/// decisions about one connection in the same batch, of which exactly one applies.
async fn concurrent_checks_are_written_together_each_with_its_own_answer(store: Store) {
    use futures::future::join_all;
    let mut owners = Vec::new();
    let mut connections = Vec::new();
    for i in 0..20 {
        let owner = user(&store).await;
        for exchange in [Exchange::Binance, Exchange::Kraken] {
            let conn =
                store.upsert_connection(&owner, new_connection(exchange, &format!("cc{i}")), None).await.unwrap();
            connections.push((owner.clone(), conn));
        }
        owners.push(owner);
    }
    let write =
        |conn: &tradeeon_shared::store::ConnectionRecord, status: ConnectionStatus, version: i32, failures: i32| {
            let update = StatusUpdate {
                status,
                status_message: Some(format!("{status}")),
                latency_ms: Some(failures + 10),
                permissions: None,
                consecutive_failures: failures,
                checked_at: at(1),
                credentials_version: version,
            };
            let health = HealthRecord {
                connection_id: conn.id,
                checked_at: at(1),
                status,
                code: Some("ok".into()),
                latency_ms: Some(failures + 10),
                message: None,
            };
            store.record_check(conn.id, update, health, Some(DecidedFrom::of(conn)))
        };
    // Connection 10 gets two decisions made from the same state, issued one after the other so
    // that they most likely share a batch; the last connection a check of keys it never had.
    const TWICE: usize = 10;
    let (_, twice) = &connections[TWICE];
    let (_, last) = &connections[connections.len() - 1];
    let mut writes: Vec<_> = connections
        .iter()
        .enumerate()
        .map(|(i, (_, conn))| write(conn, ConnectionStatus::Connected, conn.credentials_version, i as i32))
        .collect();
    writes.insert(TWICE + 1, write(twice, ConnectionStatus::Error, twice.credentials_version, 99));
    writes.push(write(last, ConnectionStatus::Error, last.credentials_version + 1, 98));
    let mut answers: Vec<bool> = join_all(writes).await.into_iter().map(Result::unwrap).collect();
    let stale = answers.pop().unwrap();
    let second = answers.remove(TWICE + 1);

    assert!(
        answers.iter().enumerate().all(|(i, a)| *a || i == TWICE),
        "every other connection's check applies: {answers:?}"
    );
    assert!(answers[TWICE] != second, "exactly one of two decisions from the same state applies");
    assert!(!stale, "a check of keys the connection never had does not apply");
    let n = connections.len();
    for (i, (owner, conn)) in connections.iter().enumerate() {
        let stored = store.get_connection(owner, conn.id).await.unwrap().unwrap();
        let history = store.list_health_history(owner, conn.id, 10, None).await.unwrap();
        assert_eq!(history.len(), 1, "connection {i}: one history row");
        let expected =
            if i == TWICE && second { (ConnectionStatus::Error, 99) } else { (ConnectionStatus::Connected, i as i32) };
        assert_eq!((stored.status, stored.consecutive_failures), expected, "connection {i}");
        assert_eq!((history[0].status, history[0].latency_ms), (expected.0, Some(expected.1 + 10)), "connection {i}");
    }
    if store.pg_pool().is_some() {
        let stats = store.coalesced_statements().into_iter().find(|s| s.kind == "record_check").expect("record_check");
        let (calls, statements) = (stats.calls, stats.statements);
        assert_eq!(calls, n as u64 + 2);
        assert!(statements < calls, "{calls} checks written in {statements} statements");
    }
}

async fn health_history_is_recorded_and_pruned_by_age(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Coinbase, "h"), None).await.unwrap();
    let record = |secs_ago: i64, status| HealthRecord {
        connection_id: conn.id,
        checked_at: at(secs_ago),
        status,
        code: Some("ok".into()),
        latency_ms: Some(10),
        message: None,
    };
    // What a listed entry says of the record it came from.
    let said = |entries: Vec<HealthEntry>| {
        entries.into_iter().map(|e| (e.checked_at, e.status, e.code, e.latency_ms, e.message)).collect::<Vec<_>>()
    };
    let recorded = |records: &[&HealthRecord]| {
        records
            .iter()
            .map(|r| (r.checked_at, r.status, r.code.clone(), r.latency_ms, r.message.clone()))
            .collect::<Vec<_>>()
    };
    let day = 86_400;
    let old = record(10 * day, ConnectionStatus::Error);
    let recent = record(2 * day, ConnectionStatus::Degraded);
    let newest = record(3600, ConnectionStatus::Connected);
    for r in [&recent, &old, &newest] {
        store.record_health(r.clone()).await.unwrap();
    }
    let history = |limit, before| store.list_health_history(&alice, conn.id, limit, before);
    assert_eq!(said(history(10, None).await.unwrap()), recorded(&[&newest, &recent, &old]));
    assert!(store.list_health_history(&bob, conn.id, 10, None).await.unwrap().is_empty(), "not bob's");

    // Pages of one through the cursor's string form reproduce the list.
    let mut paged = Vec::new();
    let mut before: Option<PageCursor> = None;
    loop {
        let page = history(1, before).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(PageCursor::from(last).to_string().parse().unwrap());
        paged.extend(page);
        assert!(paged.len() <= 3);
    }
    assert_eq!(said(paged), recorded(&[&newest, &recent, &old]));

    assert_eq!(store.prune_health_history(Utc::now() - Duration::days(3)).await.unwrap(), 1);
    assert_eq!(said(history(10, None).await.unwrap()), recorded(&[&newest, &recent]));
    assert_eq!(store.prune_health_history(Utc::now() - Duration::days(3)).await.unwrap(), 0);
    assert_eq!(said(history(1, None).await.unwrap()), recorded(&[&newest]));
}

/// Checks of the same instant page by id: none is skipped or repeated at a page boundary.
async fn health_history_pages_through_checks_of_one_instant(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "same"), None).await.unwrap();
    let when = at(60);
    for latency in 0..5 {
        let record = HealthRecord {
            connection_id: conn.id,
            checked_at: when,
            status: ConnectionStatus::Connected,
            code: Some("ok".into()),
            latency_ms: Some(latency),
            message: None,
        };
        store.record_health(record).await.unwrap();
    }
    let all = store.list_health_history(&alice, conn.id, 10, None).await.unwrap();
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store.list_health_history(&alice, conn.id, 2, before).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(PageCursor::from(last));
        paged.extend(page);
        assert!(paged.len() <= 5);
    }
    assert_eq!(paged, all);
    let mut latencies: Vec<_> = paged.iter().map(|e| e.latency_ms.unwrap()).collect();
    latencies.sort();
    assert_eq!(latencies, [0, 1, 2, 3, 4]);
}

async fn active_connection_ids_page_in_id_order(store: Store) {
    let mut active = Vec::new();
    let mut revoked = None;
    for _ in 0..2 {
        let u = user(&store).await;
        for exchange in [Exchange::Binance, Exchange::Coinbase, Exchange::Kraken] {
            let c = store.upsert_connection(&u, new_connection(exchange, "p"), None).await.unwrap();
            if revoked.is_none() {
                store.revoke_connection(&u, c.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
                revoked = Some(c.id);
            } else {
                active.push(c.id);
            }
        }
    }
    active.sort();
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page: Vec<_> = store.sweep_targets(after, 2).await.unwrap().into_iter().map(|t| t.id).collect();
        assert!(page.len() <= 2);
        let Some(last) = page.last().copied() else { break };
        after = Some(last);
        seen.extend(page);
    }
    assert_eq!(seen, active);
}

async fn sessions_are_stored_audited_and_cleared_by_new_keys(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "z"), None).await.unwrap();
    let expires = at(-6 * 3600);
    assert!(
        store
            .store_session(
                conn.id,
                "gAAAA-access".into(),
                expires,
                Some(AuditEntryInput::new(AuditAction::SessionCreated))
            )
            .await
            .unwrap()
    );
    assert_eq!(store.load_access_token(conn.id).await.unwrap().as_deref(), Some("gAAAA-access"));
    let record = store.get_connection(&alice, conn.id).await.unwrap().unwrap();
    assert_eq!(record.session_expires_at, Some(expires));
    let log = store.list_audit(&alice, 10, None).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].action, log[0].connection_id), (AuditAction::SessionCreated, Some(conn.id)));

    store.upsert_connection(&alice, new_connection(Exchange::Zerodha, "z2"), None).await.unwrap();
    assert_eq!(store.load_access_token(conn.id).await.unwrap(), None);
    assert!(!store.store_session(ConnectionId::new_random(), "t".into(), expires, None).await.unwrap());
}

async fn worker_audit_rows_belong_to_the_connection_owner(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Binance, "w"), None).await.unwrap();
    let entry = store
        .insert_connection_audit(
            conn.id,
            AuditEntryInput {
                details: serde_json::json!({"code": "invalid_credentials"}),
                ..AuditEntryInput::new(AuditAction::RotateFailed)
            },
        )
        .await
        .unwrap();
    assert_eq!(entry.connection_id, Some(conn.id));
    assert_eq!(store.list_audit(&alice, 10, None).await.unwrap(), vec![entry]);
    let err = store
        .insert_connection_audit(ConnectionId::new_random(), AuditEntryInput::new(AuditAction::Tested))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

contract!(
    swap_credentials_is_compare_and_swap,
    a_check_records_the_connection_state,
    record_check_writes_status_and_history_together,
    a_check_applies_only_to_the_state_it_was_decided_from,
    concurrent_checks_are_written_together_each_with_its_own_answer,
    health_history_is_recorded_and_pruned_by_age,
    health_history_pages_through_checks_of_one_instant,
    active_connection_ids_page_in_id_order,
    sessions_are_stored_audited_and_cleared_by_new_keys,
    worker_audit_rows_belong_to_the_connection_owner,
);
