//! Waking idle PostgreSQL workers after an enqueue has committed.
//!
//! apalis-postgres wakes its workers with `NOTIFY` from a per-row trigger on `apalis.jobs`, i.e.
//! inside the enqueueing transaction. PostgreSQL serializes the commits of all transactions that
//! issued a `NOTIFY` (they hold one global lock through their commit's WAL flush), which capped
//! every enqueueing request at about one fsync each — a few hundred per second however many
//! connections the API had. Our migration drops that trigger and the store sends the same
//! notification itself, *after* the enqueue committed, from a background task that batches them
//! into one statement with `synchronous_commit = off`: a wake-up needs no durability, so its
//! commit does not wait for a flush and the lock is held only for microseconds.
//!
//! Wake-ups are only a shortcut: workers also poll, so a wake-up lost to a crash, a full channel
//! or a database error delays a job by at most one poll interval and loses nothing.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;

/// The channel apalis-postgres's listener subscribes to, and the payload it expects.
const CHANNEL: &str = "apalis::job::insert";

/// Wake-ups waiting to be sent; more than this and new ones are dropped (workers poll anyway).
const BACKLOG: usize = 10_000;

/// Most notifications sent in one statement.
const BATCH: usize = 500;

/// Hands wake-ups to the background sender. Cheap to clone; the sender stops when the last
/// clone is dropped.
#[derive(Clone, Debug)]
pub(super) struct Wakeups {
    tx: mpsc::Sender<String>,
}

impl Wakeups {
    /// Starts the sender on the current Tokio runtime.
    pub(super) fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(send_wakeups(pool, rx));
        Self { tx }
    }

    /// Queues the wake-ups of tickets whose enqueue has just committed. Never blocks.
    pub(super) fn send(&self, tickets: Vec<String>) {
        for payload in tickets {
            if self.tx.try_send(payload).is_err() {
                // Full (or the runtime that owned the sender is gone): polling covers it.
                tracing::debug!("worker wake-up dropped; workers will find the job by polling");
                return;
            }
        }
    }
}

/// The payload apalis-postgres's listener reads for a ticket (its `InsertEvent`: `job_type`, the
/// queue, and `id`); only tickets already due are announced. Its trigger also sent `run_at`,
/// which the listener ignores. Written with `format!`: one is built per enqueued job, and both
/// values are plain tokens (our queue name, a ULID) that need no JSON escaping.
pub(super) fn wakeup_payload(queue: &str, ticket_id: ulid::Ulid, run_at: DateTime<Utc>) -> Option<String> {
    debug_assert!(queue.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{queue}");
    (run_at <= Utc::now()).then(|| format!(r#"{{"job_type":"{queue}","id":"{ticket_id}"}}"#))
}

async fn send_wakeups(pool: PgPool, mut rx: mpsc::Receiver<String>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // One implicit transaction: `set_config(.., true)` is `SET LOCAL`, read at its commit;
        // in a FROM item of its own it runs once per statement, not once per notification.
        let sent = sqlx::query(
            "SELECT pg_notify($1, payload)
               FROM unnest($2::text[]) AS payload, (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush",
        )
        .bind(CHANNEL)
        .bind(&batch)
        .execute(&pool)
        .await;
        if let Err(err) = sent {
            tracing::debug!(error = %err, wakeups = batch.len(), "worker wake-ups not sent; workers will poll");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wakeup_is_what_apalis_listener_reads() {
        let id = ulid::Ulid::generate();
        let payload = wakeup_payload("tradeeon", id, Utc::now()).expect("due now");
        let event: apalis_postgres::InsertEvent = serde_json::from_str(&payload).unwrap();
        assert_eq!(event.job_type, "tradeeon");
        assert_eq!(event.id.to_string(), id.to_string());
        assert_eq!(wakeup_payload("tradeeon", id, Utc::now() + chrono::Duration::seconds(5)), None, "not due yet");
    }
}
