//! Job records and their apalis tickets: atomic enqueue, one change per connection, claiming,
//! settling, rescheduling.

use std::time::Duration;

use chrono::{Duration as ChronoDuration, Utc};
use tradeeon_shared::domain::{AuditAction, Exchange, Permissions};
use tradeeon_shared::exchanges::{CheckCode, CheckResult, Failure, Verdict};
use tradeeon_shared::jobs::{JobId, JobKind, JobOutcome, JobPayload, JobStatus, NewJob, Requester, TicketId};
use tradeeon_shared::store::{AuditEntryInput, REVOKED_REASON, Store, StoreError, TicketState};

use crate::harness::{creds, new_connection, user};

/// Tickets on the apalis queue, read straight from its table.
async fn tickets(store: &Store) -> i64 {
    if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = 'tradeeon'")
            .fetch_one(pool)
            .await
            .unwrap()
    } else {
        let pool = store.sqlite_pool().unwrap();
        sqlx::query_scalar("SELECT count(*) FROM Jobs WHERE job_type = 'tradeeon'").fetch_one(pool).await.unwrap()
    }
}

/// Enqueues `n` Binance `test` jobs for a new user, keys named after `tag`; their ids.
async fn enqueue_tests(store: &Store, tag: &str, n: usize) -> Vec<JobId> {
    let alice = user(store).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let credentials = creds(&format!("{tag}{i}"));
        let job = NewJob::new(
            alice.user_id,
            Exchange::Binance,
            JobPayload::Test { exchange: Exchange::Binance, credentials, requested_by: None },
        );
        store.enqueue_job(&job).await.unwrap();
        ids.push(job.id);
    }
    ids
}

/// The raw payload column (to prove it is wiped and never holds plaintext).
async fn raw_payload(store: &Store, id: &str) -> Option<String> {
    if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar("SELECT payload::text FROM tradeeon_jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    } else {
        let pool = store.sqlite_pool().unwrap();
        sqlx::query_scalar("SELECT payload FROM tradeeon_jobs WHERE id = ?1").bind(id).fetch_one(pool).await.unwrap()
    }
}

fn verify_job(
    user: &tradeeon_shared::store::UserContext,
    connection: &tradeeon_shared::store::ConnectionRecord,
) -> NewJob {
    NewJob::new(
        user.user_id,
        connection.exchange,
        JobPayload::Verify { connection_id: connection.id, credentials_version: connection.credentials_version },
    )
}

fn ok_result() -> CheckResult {
    CheckResult::new(Ok(Verdict { permissions: Permissions::default(), warnings: vec![] }), Duration::from_millis(42))
}

async fn enqueue_is_atomic_with_the_connection_write(store: Store) {
    let alice = user(&store).await;

    // Committed: connection, audit row, job record and ticket all exist.
    let mut tx = store.begin_user(&alice).await.unwrap();
    let connection = tx.upsert_connection(&new_connection(Exchange::Binance, "a")).await.unwrap();
    tx.insert_audit(&AuditEntryInput::new(AuditAction::Connected)).await.unwrap();
    let mut tx = tx.into_service().await.unwrap();
    let job = verify_job(&alice, &connection);
    let record = tx.enqueue_job(&job).await.unwrap().expect("inserted");
    tx.commit().await.unwrap();
    assert_eq!(record.id, job.id);
    assert_eq!(record.kind, JobKind::Verify);
    assert_eq!(record.status, JobStatus::Queued);
    assert_eq!(record.connection_id, Some(connection.id));
    assert_eq!(record.attempts, 0);
    assert_eq!(tickets(&store).await, 1);
    assert_eq!(store.get_job(&alice, job.id).await.unwrap().unwrap(), record);

    // Rolled back: nothing of either survives.
    let mut tx = store.begin_user(&alice).await.unwrap();
    let other = tx.upsert_connection(&new_connection(Exchange::Kraken, "k")).await.unwrap();
    let mut tx = tx.into_service().await.unwrap();
    let job = verify_job(&alice, &other);
    tx.enqueue_job(&job).await.unwrap();
    drop(tx);
    assert_eq!(tickets(&store).await, 1);
    assert!(store.get_job(&alice, job.id).await.unwrap().is_none());
    assert!(store.get_connection(&alice, other.id).await.unwrap().is_none());
}

async fn one_credential_change_per_connection(store: Store) {
    let alice = user(&store).await;
    let connection = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    let first = store.enqueue_job(&verify_job(&alice, &connection)).await.unwrap().unwrap();

    let rotate = NewJob::new(
        alice.user_id,
        connection.exchange,
        JobPayload::Rotate {
            connection_id: connection.id,
            expected_version: connection.credentials_version,
            credentials: creds("new"),
            api_key_hint: "…new".into(),
        },
    );
    let err = store.enqueue_job(&rotate).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(store.active_change_job(connection.id).await.unwrap(), Some(first.id));
    assert_eq!(tickets(&store).await, 1, "the refused job pushed no ticket");

    // Health checks are not credential changes: they may run alongside.
    let health =
        NewJob::new(alice.user_id, connection.exchange, JobPayload::HealthCheck { connection_id: connection.id });
    assert!(store.enqueue_job(&health).await.unwrap().is_some());

    // Once the first settles, a rotation is accepted.
    store.claim_job(first.id).await.unwrap().unwrap();
    store.finish_job(first.id, &JobOutcome::Done(ok_result()), None).await.unwrap();
    assert_eq!(store.active_change_job(connection.id).await.unwrap(), None);
    assert!(store.enqueue_job(&rotate).await.unwrap().is_some());
}

async fn idempotency_key_enqueues_once(store: Store) {
    let alice = user(&store).await;
    let connection = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "a"), None).await.unwrap();
    let mut job =
        NewJob::new(alice.user_id, connection.exchange, JobPayload::HealthCheck { connection_id: connection.id });
    job.idempotency_key = Some(format!("sweep:1700000000:{}", connection.id));
    assert!(store.enqueue_job(&job).await.unwrap().is_some());
    let mut again = job.clone();
    again.id = tradeeon_shared::jobs::JobId::new();
    assert!(store.enqueue_job(&again).await.unwrap().is_none());
    assert_eq!(tickets(&store).await, 1);
}

async fn jobs_are_private_to_their_user(store: Store) {
    let alice = user(&store).await;
    let bob = user(&store).await;
    let connection = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    let job = store.enqueue_job(&verify_job(&alice, &connection)).await.unwrap().unwrap();
    assert!(store.get_job(&alice, job.id).await.unwrap().is_some());
    assert!(store.get_job(&bob, job.id).await.unwrap().is_none());
}

async fn claim_finish_and_requeue(store: Store) {
    let alice = user(&store).await;
    let test = NewJob::new(
        alice.user_id,
        Exchange::Coinbase,
        JobPayload::Test { exchange: Exchange::Coinbase, credentials: creds("t"), requested_by: None },
    );
    store.enqueue_job(&test).await.unwrap();
    let id = test.id.to_string();
    assert!(raw_payload(&store, &id).await.unwrap().contains("gAAAA-secret-t"), "payload holds the ciphertext");

    let claimed = store.claim_job(test.id).await.unwrap().unwrap();
    assert_eq!(claimed.record.status, JobStatus::Running);
    assert_eq!(claimed.record.attempts, 1);
    assert!(claimed.record.started_at.is_some());
    assert_eq!(claimed.user_id, alice.user_id);
    assert_eq!(claimed.payload, test.payload);

    // A transient failure: back in the queue for later, with a new ticket.
    let later = Utc::now() + ChronoDuration::seconds(30);
    assert!(store.requeue_job(test.id, later, None).await.unwrap());
    assert!(!store.requeue_job(test.id, later, None).await.unwrap(), "only a running job is requeued");
    assert_eq!(tickets(&store).await, 2);
    let stats = store.queue_stats().await.unwrap();
    assert_eq!((stats.queued, stats.running, stats.scheduled), (0, 0, 1));

    // Claimed again (the retry, or an orphaned ticket re-delivered): the attempt is counted.
    let again = store.claim_job(test.id).await.unwrap().unwrap();
    assert_eq!(again.record.attempts, 2);
    let result = CheckResult::new(Err(Failure::new(CheckCode::InvalidSignature, "bad")), Duration::from_millis(5));
    assert!(store.finish_job(test.id, &JobOutcome::Done(result.clone()), None).await.unwrap());
    assert!(!store.finish_job(test.id, &JobOutcome::Failed("late".into()), None).await.unwrap(), "settled once");
    assert!(store.claim_job(test.id).await.unwrap().is_none(), "a late ticket finds nothing to run");

    let done = store.get_job(&alice, test.id).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Done);
    assert_eq!(done.result, Some(result));
    assert!(done.finished_at.is_some());
    assert_eq!(raw_payload(&store, &id).await, None, "finished jobs keep no ciphertext");

    // Settled jobs are pruned by age.
    assert_eq!(store.prune_jobs(Utc::now() - ChronoDuration::hours(1)).await.unwrap(), 0);
    assert_eq!(store.prune_jobs(Utc::now() + ChronoDuration::seconds(1)).await.unwrap(), 1);
    assert!(store.get_job(&alice, test.id).await.unwrap().is_none());
}

async fn failed_jobs_carry_their_error(store: Store) {
    let alice = user(&store).await;
    let connection = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    let job = store.enqueue_job(&verify_job(&alice, &connection)).await.unwrap().unwrap();
    store.claim_job(job.id).await.unwrap().unwrap();
    store.finish_job(job.id, &JobOutcome::Failed("superseded".into()), None).await.unwrap();
    let failed = store.get_job(&alice, job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("superseded"));
    assert_eq!(failed.result, None);
}

async fn revoke_cancels_pending_changes_and_wipes_their_keys(store: Store) {
    let alice = user(&store).await;
    let connection = store.upsert_connection(&alice, new_connection(Exchange::Binance, "a"), None).await.unwrap();
    let rotate = NewJob::new(
        alice.user_id,
        connection.exchange,
        JobPayload::Rotate {
            connection_id: connection.id,
            expected_version: connection.credentials_version,
            credentials: creds("pending"),
            api_key_hint: "…ding".into(),
        },
    );
    store.enqueue_job(&rotate).await.unwrap().unwrap();

    let mut tx = store.begin_user(&alice).await.unwrap();
    tx.revoke_connection(connection.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    let mut tx = tx.into_service().await.unwrap();
    assert_eq!(tx.cancel_connection_jobs(connection.id, REVOKED_REASON).await.unwrap(), 1);
    tx.commit().await.unwrap();

    let cancelled = store.get_job(&alice, rotate.id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Failed);
    assert_eq!(cancelled.error.as_deref(), Some(REVOKED_REASON));
    assert_eq!(raw_payload(&store, &rotate.id.to_string()).await, None);
    assert!(store.claim_job(rotate.id).await.unwrap().is_none());
}

async fn queue_stats_report_depth_and_age(store: Store) {
    let alice = user(&store).await;
    assert_eq!(store.queue_stats().await.unwrap(), Default::default());
    for tag in ["a", "b", "c"] {
        let mut job = NewJob::new(
            alice.user_id,
            Exchange::Kraken,
            JobPayload::Test { exchange: Exchange::Kraken, credentials: creds(tag), requested_by: None },
        );
        job.run_at = Some(Utc::now() - ChronoDuration::seconds(90));
        store.enqueue_job(&job).await.unwrap();
    }
    let stats = store.queue_stats().await.unwrap();
    assert_eq!(stats.queued, 3);
    let age = stats.oldest_queued_age.unwrap();
    assert!(age >= std::time::Duration::from_secs(89) && age < std::time::Duration::from_secs(150), "{age:?}");
}

/// A rotation's expected version is read inside its enqueueing transaction, so it is the
/// version current when the job is inserted, not one read earlier.
async fn credentials_version_is_read_in_the_enqueueing_transaction(store: Store) {
    let alice = user(&store).await;
    let conn = store.upsert_connection(&alice, new_connection(Exchange::Kraken, "v1"), None).await.unwrap();
    let hint = tradeeon_shared::domain::ApiKeyHint::from_api_key("NEWKEY123456");
    let rotated = AuditEntryInput::new(AuditAction::Rotated);
    assert!(store.swap_credentials(conn.id, conn.credentials_version, creds("v2"), hint, rotated).await.unwrap());

    let mut tx = store.begin_service().await.unwrap();
    assert_eq!(tx.credentials_version(conn.id).await.unwrap(), Some(conn.credentials_version + 1));
    assert_eq!(tx.credentials_version(tradeeon_shared::domain::ConnectionId::new_random()).await.unwrap(), None);
    drop(tx);
    store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    let mut tx = store.begin_service().await.unwrap();
    assert_eq!(tx.credentials_version(conn.id).await.unwrap(), None, "revoked");
}

/// A sweep's page is enqueued at once (one statement on PostgreSQL): every new job gets its
/// record and its ticket, due when its own `run_at` says, and keys used before — or twice in the
/// page — enqueue nothing.
async fn a_page_of_jobs_is_enqueued_at_once(store: Store) {
    let alice = user(&store).await;
    let mut page = Vec::new();
    for (i, exchange) in [Exchange::Binance, Exchange::Coinbase, Exchange::Kraken].into_iter().enumerate() {
        let connection =
            store.upsert_connection(&alice, new_connection(exchange, &format!("c{i}")), None).await.unwrap();
        let mut job = NewJob::new(alice.user_id, exchange, JobPayload::HealthCheck { connection_id: connection.id });
        job.idempotency_key = Some(format!("sweep:1700000000:{}", connection.id));
        job.run_at = Some(Utc::now() + ChronoDuration::seconds(if i == 2 { 60 } else { 0 }));
        page.push(job);
    }
    // The first key was used by an earlier enqueue; the last job repeats the second's key.
    let mut used = page[0].clone();
    used.id = tradeeon_shared::jobs::JobId::new();
    assert!(store.enqueue_job(&used).await.unwrap().is_some());
    let mut repeated = page[1].clone();
    repeated.id = tradeeon_shared::jobs::JobId::new();
    page.push(repeated);

    assert_eq!(store.enqueue_jobs(&page).await.unwrap(), 2);
    assert_eq!(tickets(&store).await, 3, "one ticket per enqueued job");
    assert!(store.get_job(&alice, page[0].id).await.unwrap().is_none(), "key used before");
    assert!(store.get_job(&alice, page[3].id).await.unwrap().is_none(), "key repeated in the page");
    for job in &page[1..3] {
        let record = store.get_job(&alice, job.id).await.unwrap().expect("enqueued");
        assert_eq!(record.status, JobStatus::Queued);
        assert_eq!(record.connection_id, job.payload.connection_id());
    }
    // Only the one due now is due; the ticket carries the record's run_at.
    let due = store.due_jobs(10).await.unwrap();
    assert!(due.contains(&page[1].id) && !due.contains(&page[2].id), "{due:?}");
    if let Some(pool) = store.pg_pool() {
        let lag: f64 = sqlx::query_scalar(
            "SELECT abs(extract(epoch FROM t.run_at - j.run_at))::float8
               FROM apalis.jobs t JOIN tradeeon_jobs j USING (id) WHERE j.id = $1",
        )
        .bind(page[2].id.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(lag < 0.001, "ticket and record disagree on run_at by {lag} s");
    }
    let claimed = store.claim_job(page[1].id).await.unwrap().expect("claimable");
    assert_eq!(claimed.record.kind, JobKind::HealthCheck);
    assert_eq!(store.enqueue_jobs(&[]).await.unwrap(), 0);
}

/// A retry's ticket is never due before the delay it was given (an exchange's `Retry-After`,
/// say): on PostgreSQL it carries the record's exact `run_at`; apalis-sqlite counts whole
/// seconds, so there it is rounded up — at most a second late, never early.
async fn a_retry_is_never_due_before_its_time(store: Store) {
    let alice = user(&store).await;
    let job = NewJob::new(
        alice.user_id,
        Exchange::Binance,
        JobPayload::Test { exchange: Exchange::Binance, credentials: creds("r"), requested_by: None },
    );
    store.enqueue_job(&job).await.unwrap();
    store.claim_job(job.id).await.unwrap().unwrap();
    // A delay with a fractional second, as retry delays and Retry-After headers have.
    let mut later = Utc::now() + ChronoDuration::milliseconds(4_560);
    if later.timestamp_subsec_millis() == 0 {
        later += ChronoDuration::milliseconds(250);
    }
    assert!(store.requeue_job(job.id, later, None).await.unwrap());
    let due_at = later.timestamp_micros() as f64 / 1e6;
    let newest: f64 = if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar(
            "SELECT extract(epoch FROM run_at)::float8 FROM apalis.jobs
              WHERE job_type = 'tradeeon' AND id <> $1 ORDER BY run_at DESC LIMIT 1",
        )
        .bind(job.id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
    } else {
        let pool = store.sqlite_pool().unwrap();
        let second: i64 = sqlx::query_scalar(
            "SELECT run_at FROM Jobs WHERE job_type = 'tradeeon' AND id <> ?1 ORDER BY run_at DESC LIMIT 1",
        )
        .bind(job.id.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
        second as f64
    };
    assert!(newest >= due_at - 1e-6, "the retry's ticket is due at {newest}, before {due_at}");
    assert!(newest - due_at < 1.0, "the retry's ticket is due at {newest}, more than a second after {due_at}");
    assert_eq!(store.queue_stats().await.unwrap().scheduled, 1);
}

/// A worker stopping for good hands back the tickets it still holds: fetched and never run, or
/// settled with the acknowledgement cut short. Not one whose job is still running, and none of
/// another worker's.
async fn a_stopped_workers_tickets_go_back_to_the_queue(store: Store) {
    let ids = enqueue_tests(&store, "release", 4).await;
    // The first ticket's job ran and settled; the second's is still running; the third is merely
    // fetched. All three are locked by "stopping", as apalis's fetch leaves them. The fourth is
    // another worker's.
    store.claim_job(ids[0]).await.unwrap().unwrap();
    store.finish_job(ids[0], &JobOutcome::Failed("x".into()), None).await.unwrap();
    store.claim_job(ids[1]).await.unwrap().unwrap();
    // Lock a job's ticket to a worker, as apalis's fetch (Queued) and its lock (Running) do.
    let lock = |job_id: String, worker: &'static str, status: &'static str| {
        let store = store.clone();
        async move {
            if let Some(pool) = store.pg_pool() {
                let sql = "UPDATE apalis.jobs SET lock_by = $2, lock_at = now(), status = $3
                            WHERE convert_from(job, 'UTF8')::jsonb ->> 'job_id' = $1";
                sqlx::query(sql).bind(job_id).bind(worker).bind(status).execute(pool).await.unwrap();
            } else {
                let sql = "UPDATE Jobs SET lock_by = ?2, lock_at = strftime('%s', 'now'), status = ?3
                            WHERE json_extract(CAST(job AS TEXT), '$.job_id') = ?1";
                let pool = store.sqlite_pool().unwrap();
                sqlx::query(sql).bind(job_id).bind(worker).bind(status).execute(pool).await.unwrap();
            }
        }
    };
    let workers = "VALUES ('stopping', 'tradeeon', 't'), ('other', 'tradeeon', 't')";
    if let Some(pool) = store.pg_pool() {
        let insert = format!("INSERT INTO apalis.workers (id, worker_type, storage_name) {workers}");
        sqlx::query(sqlx::AssertSqlSafe(insert)).execute(pool).await.unwrap();
    } else {
        let insert = format!("INSERT INTO Workers (id, worker_type, storage_name) {workers}");
        sqlx::query(sqlx::AssertSqlSafe(insert)).execute(store.sqlite_pool().unwrap()).await.unwrap();
    }
    lock(ids[0].to_string(), "stopping", "Running").await;
    lock(ids[1].to_string(), "stopping", "Running").await;
    lock(ids[2].to_string(), "stopping", "Queued").await;
    lock(ids[3].to_string(), "other", "Running").await;

    assert_eq!(store.release_tickets("stopping").await.unwrap(), 2);
    let held: Vec<(Option<String>, String)> = if let Some(pool) = store.pg_pool() {
        sqlx::query_as("SELECT lock_by, status FROM apalis.jobs ORDER BY convert_from(job, 'UTF8')::jsonb ->> 'job_id'")
            .fetch_all(pool)
            .await
            .unwrap()
    } else {
        sqlx::query_as("SELECT lock_by, status FROM Jobs ORDER BY json_extract(CAST(job AS TEXT), '$.job_id')")
            .fetch_all(store.sqlite_pool().unwrap())
            .await
            .unwrap()
    };
    let mut expected = vec![
        (ids[0], (None, "Pending".to_string())),
        (ids[1], (Some("stopping".to_string()), "Running".to_string())),
        (ids[2], (None, "Pending".to_string())),
        (ids[3], (Some("other".to_string()), "Running".to_string())),
    ];
    expected.sort_by_key(|(id, _)| id.to_string());
    assert_eq!(held, expected.into_iter().map(|(_, t)| t).collect::<Vec<_>>());
    // Once released, a ticket is no one's: a second call finds nothing.
    assert_eq!(store.release_tickets("stopping").await.unwrap(), 0);
}

/// The tickets naming `job`.
async fn tickets_of(store: &Store, job: JobId) -> Vec<TicketState> {
    store.tickets_of_job(job).await.unwrap()
}

/// The worker acknowledges a ticket in the statement that settles or reschedules its job: the
/// ticket is gone whether that call settled the job or it was settled before, and a rescheduled
/// job has a new ticket instead. A ticket for a settled job is dropped on its own; one handed
/// back after a database failure is due again later, its attempt counted, the delay doubling.
async fn the_worker_acknowledges_tickets_with_its_writes(store: Store) {
    let ids = enqueue_tests(&store, "acknowledge", 12).await;
    // A job's first ticket carries the job's own id.
    let ticket = |i: usize| TicketId(ids[i].to_string());
    assert_eq!(tickets(&store).await, 12);

    store.claim_job(ids[0]).await.unwrap().unwrap();
    assert!(store.finish_job(ids[0], &JobOutcome::Done(ok_result()), Some(&ticket(0))).await.unwrap());
    assert_eq!(tickets_of(&store, ids[0]).await, vec![]);
    assert!(store.claim_job(ids[0]).await.unwrap().is_none(), "settled");
    // A late duplicate settles nothing and still acknowledges its own ticket.
    store.claim_job(ids[1]).await.unwrap().unwrap();
    assert!(store.finish_job(ids[1], &JobOutcome::Failed("first".into()), None).await.unwrap());
    assert_eq!(tickets_of(&store, ids[1]).await.len(), 1, "no ticket named, none touched");
    assert!(!store.finish_job(ids[1], &JobOutcome::Failed("late".into()), Some(&ticket(1))).await.unwrap());
    assert_eq!(tickets_of(&store, ids[1]).await, vec![]);

    // Rescheduled: the old ticket goes, a new one is due at the new time.
    store.claim_job(ids[2]).await.unwrap().unwrap();
    assert!(store.requeue_job(ids[2], Utc::now() + ChronoDuration::seconds(60), Some(&ticket(2))).await.unwrap());
    let requeued = tickets_of(&store, ids[2]).await;
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].status, "Pending");
    assert!(requeued[0].due_in_seconds > 55.0, "{requeued:?}");
    store.claim_job(ids[3]).await.unwrap().unwrap();
    assert!(store.defer_job(ids[3], Utc::now(), Some(&ticket(3))).await.unwrap());
    assert_eq!(tickets_of(&store, ids[3]).await.len(), 1);
    assert_eq!(tickets(&store).await, 10, "rescheduling replaces a ticket one for one");

    // A ticket whose job needs nothing done goes alone; its job record is untouched.
    store.drop_ticket(&ticket(4)).await.unwrap();
    assert_eq!(tickets_of(&store, ids[4]).await, vec![]);
    assert_eq!(store.due_jobs(100).await.unwrap().iter().filter(|id| **id == ids[4]).count(), 1);

    // Handed back: failed with its attempt counted, no one's, due in 2 s, then 4 s.
    store.retry_ticket(&ticket(5)).await.unwrap();
    let handed = tickets_of(&store, ids[5]).await;
    assert_eq!((handed[0].status.as_str(), handed[0].attempts, handed[0].lock_by.as_deref()), ("Failed", 1, None));
    assert!((1.0..=2.5).contains(&handed[0].due_in_seconds), "{handed:?}");
    store.retry_ticket(&ticket(5)).await.unwrap();
    let handed = tickets_of(&store, ids[5]).await;
    assert_eq!(handed[0].attempts, 2);
    assert!((3.0..=4.5).contains(&handed[0].due_in_seconds), "{handed:?}");

    // Settled together (one statement on PostgreSQL), each ticket acknowledged.
    use futures::future::join_all;
    let rest: Vec<usize> = (6..12).collect();
    for i in &rest {
        store.claim_job(ids[*i]).await.unwrap().unwrap();
    }
    let done = JobOutcome::Done(ok_result());
    let tickets_named: Vec<TicketId> = rest.iter().map(|i| ticket(*i)).collect();
    let settled =
        join_all(rest.iter().zip(&tickets_named).map(|(i, t)| store.finish_job(ids[*i], &done, Some(t)))).await;
    assert!(settled.into_iter().all(|s| s.unwrap()));
    assert_eq!(tickets(&store).await, 3, "left: the two rescheduled jobs' new tickets and the one handed back");
}

/// A ticket handed back again and again waits at most 30 s, and its 25th hand-back is its last:
/// it stays failed, with no attempts left for the queue's fetch (`attempts < max_attempts`). A
/// ticket that is gone already is not an error.
async fn handed_back_tickets_wait_at_most_30_s_for_25_attempts(store: Store) {
    let ids = enqueue_tests(&store, "hand-back", 1).await;
    let ticket = TicketId(ids[0].to_string());
    for _ in 0..5 {
        store.retry_ticket(&ticket).await.unwrap();
    }
    let handed = tickets_of(&store, ids[0]).await;
    assert_eq!(handed[0].attempts, 5);
    assert!((29.0..=30.5).contains(&handed[0].due_in_seconds), "capped at 30 s: {handed:?}");
    for _ in 5..25 {
        store.retry_ticket(&ticket).await.unwrap();
    }
    let handed = tickets_of(&store, ids[0]).await;
    assert_eq!((handed[0].status.as_str(), handed[0].attempts), ("Failed", 25));
    assert!((29.0..=30.5).contains(&handed[0].due_in_seconds), "{handed:?}");
    let max_attempts: i64 = if let Some(pool) = store.pg_pool() {
        sqlx::query_scalar("SELECT max_attempts::int8 FROM apalis.jobs WHERE id = $1")
            .bind(&ticket.0)
            .fetch_one(pool)
            .await
            .unwrap()
    } else {
        sqlx::query_scalar("SELECT max_attempts FROM Jobs WHERE id = ?1")
            .bind(&ticket.0)
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap()
    };
    assert_eq!(max_attempts, 25, "no attempt left");

    store.drop_ticket(&ticket).await.unwrap();
    store.retry_ticket(&ticket).await.unwrap();
    assert_eq!(tickets_of(&store, ids[0]).await, vec![], "nothing to hand back, nothing written");
}

contract!(
    the_worker_acknowledges_tickets_with_its_writes,
    handed_back_tickets_wait_at_most_30_s_for_25_attempts,
    a_stopped_workers_tickets_go_back_to_the_queue,
    a_retry_is_never_due_before_its_time,
    a_page_of_jobs_is_enqueued_at_once,
    credentials_version_is_read_in_the_enqueueing_transaction,
    enqueue_is_atomic_with_the_connection_write,
    one_credential_change_per_connection,
    idempotency_key_enqueues_once,
    jobs_are_private_to_their_user,
    claim_finish_and_requeue,
    failed_jobs_carry_their_error,
    revoke_cancels_pending_changes_and_wipes_their_keys,
    queue_stats_report_depth_and_age,
);

/// Workers are woken after the enqueue commits, never from inside it (apalis's per-row NOTIFY
/// trigger serialized every enqueueing commit): the trigger is gone, a committed ticket that is
/// due is announced once with the payload apalis's listener reads, and a rolled-back or
/// future ticket is not announced at all.
async fn workers_are_woken_after_commit(store: Store) {
    use sqlx::postgres::PgListener;
    let pool = store.pg_pool().unwrap();
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'notify_workers' AND NOT tgisinternal")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(triggers, 0, "apalis's notify_workers trigger must stay dropped");

    let mut listener = PgListener::connect_with(pool).await.unwrap();
    listener.listen("apalis::job::insert").await.unwrap();
    let alice = user(&store).await;
    let test_job = |tag: &str| {
        NewJob::new(
            alice.user_id,
            Exchange::Binance,
            JobPayload::Test { exchange: Exchange::Binance, credentials: creds(tag), requested_by: None },
        )
    };

    // Rolled back and scheduled for later: no wake-up.
    let mut tx = store.begin_service().await.unwrap();
    tx.enqueue_job(&test_job("rolled-back")).await.unwrap();
    drop(tx);
    let mut later = test_job("later");
    later.run_at = Some(Utc::now() + ChronoDuration::minutes(5));
    store.enqueue_job(&later).await.unwrap();

    // Committed and due: exactly one wake-up naming its ticket.
    let due = test_job("due");
    let mut tx = store.begin_service().await.unwrap();
    tx.enqueue_job(&due).await.unwrap();
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv()).await;
    assert!(early.is_err(), "woken before the commit: {early:?}");
    tx.commit().await.unwrap();

    let note = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
        .await
        .expect("a wake-up within 10 s")
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
    assert_eq!(payload["job_type"], "tradeeon");
    assert_eq!(payload["id"], due.id.to_string());
    let more = tokio::time::timeout(std::time::Duration::from_millis(500), listener.recv()).await;
    assert!(more.is_err(), "only the committed, due ticket is announced: {more:?}");
}

postgres_only!(workers_are_woken_after_commit);

/// Concurrent calls of the hot statements are coalesced into shared statements (see
/// `store::coalesce`), and each caller still gets exactly its own answer: its own job record,
/// nobody else's job, its own claim and settle, and its own error when its row is bad.
async fn concurrent_calls_share_statements_and_keep_their_own_answers(store: Store) {
    use futures::future::join_all;
    let alice = user(&store).await;
    let bob = user(&store).await;
    let test_job = |owner: &tradeeon_shared::store::UserContext, i: usize| {
        NewJob::new(
            owner.user_id,
            Exchange::Kraken,
            JobPayload::Test {
                exchange: Exchange::Kraken,
                credentials: creds(&format!("{i}")),
                requested_by: Some(Requester {
                    ip_address: Some(std::net::IpAddr::from([10, 0, 0, (i % 250) as u8])),
                    user_agent: Some(format!("agent {i}")),
                }),
            },
        )
    };
    // 150 submissions at once, one of them by a user who has no profile row (its foreign keys
    // fail): that one gets its error, the others are written.
    let stranger = crate::harness::new_user();
    let mut submissions: Vec<(tradeeon_shared::store::UserContext, NewJob)> = (0..150)
        .map(|i| if i % 2 == 0 { (alice.clone(), test_job(&alice, i)) } else { (bob.clone(), test_job(&bob, i)) })
        .collect();
    submissions[75] = (stranger.clone(), test_job(&stranger, 75));
    let enqueued = join_all(submissions.iter().map(|(_, job)| store.enqueue_job(job))).await;
    for (i, ((_, job), answer)) in submissions.iter().zip(&enqueued).enumerate() {
        if i == 75 {
            assert!(answer.is_err(), "a job for a user with no profile must fail: {answer:?}");
        } else {
            assert_eq!(
                answer.as_ref().unwrap().as_ref().unwrap().id,
                job.id,
                "submission {i} got another job's record"
            );
        }
    }
    assert_eq!(tickets(&store).await, 149);
    assert!(store.list_audit(&alice, 200, None).await.unwrap().is_empty(), "a test is audited when it settles");

    // Reads: every owner sees their own job; the other user sees nothing.
    let reads = join_all(submissions.iter().enumerate().filter(|(i, _)| *i != 75).flat_map(|(_, (who, job))| {
        let other = if who.user_id == alice.user_id { &bob } else { &alice };
        [store.get_job(who, job.id), store.get_job(other, job.id)]
    }))
    .await;
    for pair in reads.chunks(2) {
        assert!(pair[0].as_ref().unwrap().is_some(), "the owner reads the job");
        assert!(pair[1].as_ref().unwrap().is_none(), "another user does not");
    }

    // Claims and settles at once: each claim returns its own payload, each settle its own.
    let ids: Vec<_> = submissions.iter().enumerate().filter(|(i, _)| *i != 75).map(|(_, (_, job))| job.id).collect();
    let claims = join_all(ids.iter().map(|id| store.claim_job(*id))).await;
    for ((id, claim), (_, job)) in
        ids.iter().zip(&claims).zip(submissions.iter().enumerate().filter(|(i, _)| *i != 75).map(|(_, s)| s))
    {
        let claimed = claim.as_ref().unwrap().as_ref().expect("claimable");
        assert_eq!(claimed.record.id, *id);
        assert_eq!(claimed.user_id, job.user_id);
        assert_eq!(serde_json::to_value(&claimed.payload).unwrap(), serde_json::to_value(&job.payload).unwrap());
    }
    let outcomes: Vec<JobOutcome> = (0..ids.len())
        .map(|i| if i % 3 == 0 { JobOutcome::Failed(format!("failure {i}")) } else { JobOutcome::Done(ok_result()) })
        .collect();
    let settled = join_all(ids.iter().zip(&outcomes).map(|(id, outcome)| store.finish_job(*id, outcome, None))).await;
    assert!(settled.iter().all(|s| *s.as_ref().unwrap()), "every job settles once");
    let done = JobOutcome::Done(ok_result());
    let again = join_all(ids.iter().take(10).map(|id| store.finish_job(*id, &done, None))).await;
    assert!(again.iter().all(|s| !*s.as_ref().unwrap()), "settling twice is refused");
    for ((id, outcome), (who, _)) in
        ids.iter().zip(&outcomes).zip(submissions.iter().enumerate().filter(|(i, _)| *i != 75).map(|(_, s)| s))
    {
        let record = store.get_job(who, *id).await.unwrap().unwrap();
        match outcome {
            JobOutcome::Failed(error) => {
                assert_eq!(record.status, JobStatus::Failed);
                assert_eq!(record.error.as_ref(), Some(error));
            }
            JobOutcome::Done(_) => assert_eq!(record.status, JobStatus::Done),
        }
        assert_eq!(raw_payload(&store, &id.to_string()).await, None, "payload wiped");
    }
    // Each settled test is audited once, for its owner, with its requester and its verdict.
    let audited = store.list_audit(&alice, 200, None).await.unwrap();
    assert_eq!(audited.len(), 75, "one entry per settled test of alice's, none for settling twice");
    let settled_jobs = submissions.iter().enumerate().filter(|(i, _)| *i != 75);
    for ((i, (who, job)), outcome) in
        settled_jobs.zip(&outcomes).filter(|((_, (who, _)), _)| who.user_id == alice.user_id)
    {
        let entry = audited.iter().find(|e| e.details["job_id"] == job.id.to_string()).expect("audited");
        assert_eq!(who.user_id, alice.user_id);
        assert_eq!(entry.action, AuditAction::Tested);
        assert_eq!(entry.connection_id, None);
        assert_eq!(entry.ip_address, Some(std::net::IpAddr::from([10, 0, 0, (i % 250) as u8])));
        assert_eq!(entry.user_agent.as_deref(), Some(format!("agent {i}").as_str()));
        assert_eq!(entry.details["exchange"], "kraken");
        match outcome {
            JobOutcome::Failed(_) => {
                assert_eq!(entry.details["outcome"], "failed");
                assert!(entry.details.get("ok").is_none() && entry.details.get("code").is_none());
            }
            JobOutcome::Done(result) => {
                assert_eq!(entry.details["outcome"], "done");
                assert_eq!(entry.details["ok"], result.ok);
                assert_eq!(entry.details["code"], serde_json::to_value(result.code).unwrap());
            }
        }
    }

    // And they did share statements (`record_check` is not exercised here: see the store test
    // `service::concurrent_checks_are_written_together_each_with_its_own_answer`).
    for stats in store.coalesced_statements() {
        if stats.kind != "record_check" {
            assert!(
                stats.statements < stats.calls,
                "{}: {} calls in {} statements",
                stats.kind,
                stats.calls,
                stats.statements
            );
            assert!(!stats.ran.is_zero(), "{}: statements are timed", stats.kind);
        }
    }
}

postgres_only!(concurrent_calls_share_statements_and_keep_their_own_answers);

/// The job tables keep their per-job index work down (migration `lean_job_indexes`): claiming a
/// job changes no column any index of `tradeeon_jobs` reads — in its key or its predicate — so
/// the claim can be a HOT update; and `apalis.jobs` carries no index twice.
async fn job_tables_keep_index_work_down(store: Store) {
    let pool = store.pg_pool().unwrap();
    // What a claim writes (claim_jobs): status, attempts, started_at.
    let reading_claimed_columns: Vec<String> = sqlx::query_scalar(
        "SELECT i.indexrelid::regclass::text
           FROM pg_index i
          WHERE i.indrelid = 'public.tradeeon_jobs'::regclass
            AND (EXISTS (SELECT 1 FROM pg_attribute a
                          WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                            AND a.attname IN ('status', 'attempts', 'started_at'))
                 OR pg_get_expr(i.indpred, i.indrelid) ~ '\\m(status|attempts|started_at)\\M'
                 OR pg_get_expr(i.indexprs, i.indrelid) ~ '\\m(status|attempts|started_at)\\M')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(reading_claimed_columns.is_empty(), "indexes that make claims non-HOT: {reading_claimed_columns:?}");

    let duplicated: Vec<String> = sqlx::query_scalar(
        "SELECT string_agg(indexrelid::regclass::text, ', ')
           FROM pg_index WHERE indrelid = 'apalis.jobs'::regclass
          GROUP BY indkey::text, coalesce(pg_get_expr(indpred, indrelid), ''), coalesce(pg_get_expr(indexprs, indrelid), '')
         HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(duplicated.is_empty(), "apalis.jobs indexes maintained twice: {duplicated:?}");

    // Indexes only ever searched for a value hold no entry for the NULL that every queued ticket
    // and every `tested` audit row has there (migration `skip_null_index_entries`).
    let holding_nulls: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM unnest(ARRAY['apalis.idx_apalis_jobs_lock_by', 'apalis.idx_jobs_idempotency_key',
                                      'connection_audit_log_connection_idx']) AS name
          WHERE NOT EXISTS (SELECT 1 FROM pg_index
                             WHERE indexrelid = to_regclass(name)
                               AND pg_get_expr(indpred, indrelid) LIKE '%IS NOT NULL%')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(holding_nulls.is_empty(), "indexes that hold an entry for every NULL: {holding_nulls:?}");

    // A claimed job is still "active" for the one-change-per-connection rule and the queue
    // depth, and a settled one is not.
    let alice = user(&store).await;
    let job = NewJob::new(
        alice.user_id,
        Exchange::Binance,
        JobPayload::Test { exchange: Exchange::Binance, credentials: creds("hot"), requested_by: None },
    );
    store.enqueue_job(&job).await.unwrap();
    let active = || async {
        sqlx::query_scalar::<_, bool>("SELECT active FROM public.tradeeon_jobs WHERE id = $1")
            .bind(job.id.to_string())
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert!(active().await);
    store.claim_job(job.id).await.unwrap().expect("claimed");
    assert!(active().await);
    assert_eq!(store.queue_stats().await.unwrap().running, 1);
    assert!(store.finish_job(job.id, &JobOutcome::Done(ok_result()), None).await.unwrap());
    assert!(!active().await);
    assert_eq!(store.queue_stats().await.unwrap().running, 0);
}

postgres_only!(job_tables_keep_index_work_down);

/// apalis acknowledges finished tickets with one statement (apalis-postgres 1.0,
/// `queries/task/handle_result.sql`, copied here) that finds them through the `lock_by` index:
/// every ticket the worker still holds *or ever finished*. Acknowledged tickets are therefore
/// deleted at once (migration `drop_acknowledged_tickets`); the ones that failed for good stay.
async fn acknowledged_tickets_are_dropped(store: Store) {
    const ACK: &str = "WITH j AS (
            SELECT (value ->> 'task_id')::text AS task_id, (value ->> 'attempt')::integer AS attempt,
                   value -> 'result' AS result, value ->> 'status' AS status
              FROM jsonb_array_elements($1::jsonb) AS value
        ),
        locked AS (
            SELECT jobs.id FROM apalis.jobs AS jobs INNER JOIN j ON j.task_id = jobs.id
             WHERE jobs.lock_by = $2 ORDER BY jobs.id FOR UPDATE
        )
        UPDATE apalis.jobs AS jobs
           SET status = j.status, attempts = j.attempt, last_result = j.result, done_at = NOW()
          FROM j INNER JOIN locked ON locked.id = j.task_id
         WHERE jobs.id = locked.id";
    let pool = store.pg_pool().unwrap();
    enqueue_tests(&store, "ack", 3).await;
    sqlx::query("INSERT INTO apalis.workers (id, worker_type, storage_name) VALUES ('w', 'tradeeon', 'test')")
        .execute(pool)
        .await
        .unwrap();
    // apalis's own fetch, then its lock: neither deletes anything.
    let fetched: Vec<String> =
        sqlx::query_scalar("SELECT id FROM apalis.get_jobs('w', 'tradeeon', 10)").fetch_all(pool).await.unwrap();
    assert_eq!(fetched.len(), 3);
    sqlx::query("UPDATE apalis.jobs SET status = 'Running' WHERE lock_by = 'w'").execute(pool).await.unwrap();
    assert_eq!(tickets(&store).await, 3);

    // Two done, one failed for good.
    let ack =
        |id: &String, status: &str| serde_json::json!({"task_id": id, "attempt": 1, "result": null, "status": status});
    let acked = serde_json::json!([ack(&fetched[0], "Done"), ack(&fetched[1], "Done"), ack(&fetched[2], "Killed")]);
    let updated = sqlx::query(ACK).bind(&acked).bind("w").execute(pool).await.unwrap().rows_affected();
    assert_eq!(updated, 3);
    let left: Vec<(String, String)> =
        sqlx::query_as("SELECT id, status FROM apalis.jobs").fetch_all(pool).await.unwrap();
    assert_eq!(left, vec![(fetched[2].clone(), "Killed".to_string())]);
    // The one that failed for good goes with the settled job records.
    store.prune_jobs(Utc::now() + ChronoDuration::seconds(1)).await.unwrap();
    assert_eq!(tickets(&store).await, 0);
}

postgres_only!(acknowledged_tickets_are_dropped);

/// The same on SQLite, where apalis acknowledges a ticket by updating its status.
async fn acknowledged_tickets_are_dropped_embedded(store: Store) {
    let pool = store.sqlite_pool().unwrap();
    let ids: Vec<String> = enqueue_tests(&store, "ack", 2).await.iter().map(JobId::to_string).collect();
    let ack = |id: &String, status: &'static str| {
        sqlx::query("UPDATE Jobs SET status = ?2, done_at = strftime('%s', 'now') WHERE id = ?1")
            .bind(id.clone())
            .bind(status)
    };
    ack(&ids[0], "Running").execute(pool).await.unwrap();
    assert_eq!(tickets(&store).await, 2);
    ack(&ids[0], "Done").execute(pool).await.unwrap();
    ack(&ids[1], "Killed").execute(pool).await.unwrap();
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM Jobs").fetch_all(pool).await.unwrap();
    assert_eq!(left, vec![ids[1].clone()]);
    store.prune_jobs(Utc::now() + ChronoDuration::seconds(1)).await.unwrap();
    assert_eq!(tickets(&store).await, 0);
}

sqlite_only!(acknowledged_tickets_are_dropped_embedded);
