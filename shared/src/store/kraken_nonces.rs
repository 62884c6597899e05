//! Kraken nonces shared by several worker processes (PostgreSQL).
//!
//! Kraken rejects a nonce that is not larger than every nonce it has accepted for the API key, so
//! when several processes check keys, they must agree on the next nonce *and* send their requests
//! with one key one at a time (otherwise a larger nonce can overtake a smaller one on the wire).
//! A [`KrakenNonceLease`] provides both: it holds a session advisory lock for the key on a pooled
//! connection of its own until it is dropped, and its nonce comes from the `kraken_nonces` table:
//! `GREATEST(last_nonce + 1, now in microseconds)`, committed before the lease is handed out.
//!
//! On SQLite there is one worker process, which hands out nonces in memory: the methods here
//! return `None` there.

use std::fmt;

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, Postgres};

use super::{Inner, Result, Store};
use crate::exchanges::kraken::next_nonce;

/// Advisory-lock keys are derived from this prefix and the key fingerprint, so they cannot
/// collide with locks other code takes on the same database.
const LOCK_NAMESPACE: &str = "tradeeon.kraken_nonce:";

impl Store {
    /// Waits until no other lease for `key_fingerprint` is held by any process on this database,
    /// then returns the next nonce for it under a lease that keeps the key locked until dropped.
    /// Hold it until the exchange's answer is in. `Ok(None)` on SQLite (single process: use
    /// in-memory nonces).
    ///
    /// The lease holds one pooled connection; callers should serialize requests per key within
    /// the process first, so that waiting for a busy key costs one connection, not one per job.
    #[tracing::instrument(skip_all, fields(key = %key_fingerprint), err)]
    pub async fn lease_kraken_nonce(&self, key_fingerprint: &str) -> Result<Option<KrakenNonceLease>> {
        let Inner::Postgres(pg) = &*self.inner else { return Ok(None) };
        let lock_name = format!("{LOCK_NAMESPACE}{key_fingerprint}");
        // From here on, a cancelled future or an error drops the guard, which closes the
        // connection unless it is known to hold no lock: the server then releases whatever
        // the session held, and no pooled connection is left holding a lock.
        let mut guard = LockGuard { conn: Some(pg.pool.acquire().await?), lock_name, state: LockState::Unknown };
        let conn = guard.conn.as_mut().expect("set above");
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(&guard.lock_name)
            .execute(&mut **conn)
            .await?;
        guard.state = LockState::Held;
        let candidate = i64::try_from(next_nonce(0)).unwrap_or(i64::MAX);
        let nonce: i64 = sqlx::query_scalar(
            "INSERT INTO public.kraken_nonces (key_fingerprint, last_nonce) VALUES ($1, $2)
             ON CONFLICT (key_fingerprint)
             DO UPDATE SET last_nonce = GREATEST(kraken_nonces.last_nonce + 1, EXCLUDED.last_nonce)
             RETURNING last_nonce",
        )
        .bind(key_fingerprint)
        .bind(candidate)
        .fetch_one(&mut **conn)
        .await?;
        Ok(Some(KrakenNonceLease { nonce: u64::try_from(nonce).unwrap_or(0), _guard: guard }))
    }

    /// The last nonce handed out for `key_fingerprint` (PostgreSQL; `None` if there was none, and
    /// always on SQLite). For tests and diagnostics.
    #[tracing::instrument(skip_all, fields(key = %key_fingerprint), err)]
    pub async fn last_kraken_nonce(&self, key_fingerprint: &str) -> Result<Option<u64>> {
        let Inner::Postgres(pg) = &*self.inner else { return Ok(None) };
        let last: Option<i64> =
            sqlx::query_scalar("SELECT last_nonce FROM public.kraken_nonces WHERE key_fingerprint = $1")
                .bind(key_fingerprint)
                .fetch_optional(&pg.pool)
                .await?;
        Ok(last.and_then(|n| u64::try_from(n).ok()))
    }
}

/// A nonce for one Kraken API key, and the lock that keeps every other process's requests with
/// that key waiting until this lease is dropped (the lock is released in a spawned task).
pub struct KrakenNonceLease {
    nonce: u64,
    _guard: LockGuard,
}

impl KrakenNonceLease {
    pub fn nonce(&self) -> u64 {
        self.nonce
    }
}

impl fmt::Debug for KrakenNonceLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KrakenNonceLease").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LockState {
    /// The lock query may or may not have run (cancelled or failed mid-way).
    Unknown,
    Held,
}

/// A pooled connection that may hold the advisory lock `lock_name`.
struct LockGuard {
    conn: Option<PoolConnection<Postgres>>,
    lock_name: String,
    state: LockState,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let runtime = tokio::runtime::Handle::try_current();
        match (self.state, runtime) {
            (LockState::Held, Ok(runtime)) => {
                let lock_name = std::mem::take(&mut self.lock_name);
                runtime.spawn(async move {
                    let mut conn = conn;
                    let unlocked: std::result::Result<bool, sqlx::Error> =
                        sqlx::query_scalar("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
                            .bind(&lock_name)
                            .fetch_one(&mut *conn)
                            .await;
                    if !matches!(unlocked, Ok(true)) {
                        // Never return a connection that might still hold the lock to the pool.
                        tracing::warn!("could not release a Kraken nonce lock; closing its connection");
                        let _ = conn.detach().close().await;
                    }
                });
            }
            (LockState::Unknown, Ok(runtime)) => {
                runtime.spawn(async move {
                    let _ = conn.detach().close().await;
                });
            }
            // No runtime (process shutting down): dropping the connection closes its socket, and
            // the server releases the session's locks.
            (_, Err(_)) => drop(conn.detach()),
        }
    }
}
