//! Coalescing concurrent one-row statements into one statement per batch (PostgreSQL).
//!
//! The hot paths — `POST /connections/test` and `GET /jobs/{id}` in the API, claiming and
//! settling in the worker — are many small, identical statements issued at the same time. On a
//! database host, a one-row statement costs far more in per-statement work (a round trip,
//! parse/bind/execute, a backend wake-up, a commit and its WAL flush) than in the row itself. So
//! each of those calls is handed to a [`Coalescer`], which runs whatever has queued meanwhile as
//! one statement over arrays.
//!
//! Nothing waits for a timer ("natural batching"): a call that finds a lane free runs at once, as
//! a batch of one; calls that arrive while every lane is busy queue, and the next free lane takes
//! them all. An idle store therefore answers as fast as before, and a busy one spends one
//! statement on many calls, with each call waiting about one statement time more at most.
//!
//! Every caller still gets its own answer and its own error. A lane takes a pooled connection
//! *before* it takes the calls waiting, so when the database is unreachable every call waits at
//! most one pool acquire timeout — as it would on its own — and all calls that queued meanwhile
//! get the same kind of error at once. A batch that fails because the connection was lost fails
//! all its calls alike; one that fails for any other reason is run again call by call, so one bad
//! row cannot fail its neighbours. A batch is one statement, so a failed batch wrote nothing and
//! running its calls again is safe.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Result, StoreError};

/// Calls waiting for a lane; beyond this, callers wait to queue (backpressure, not loss).
const BACKLOG: usize = 4096;

type BatchFuture<O> = Pin<Box<dyn Future<Output = Result<Vec<O>>> + Send>>;

/// Runs one batch on the connection given: the outputs in the order of the inputs, one each.
pub(super) type BatchFn<I, O> = Arc<dyn Fn(PoolConnection<sqlx::Postgres>, Vec<I>) -> BatchFuture<O> + Send + Sync>;

struct Call<I, O> {
    /// When the call was made: the wait for a statement is counted from here.
    made: std::time::Instant,
    input: I,
    reply: oneshot::Sender<Result<O>>,
}

/// Hands calls to lanes that run them in batches. Cheap to clone; the dispatcher stops when the
/// last clone is dropped.
pub(super) struct Coalescer<I, O> {
    tx: mpsc::Sender<Call<I, O>>,
    pool: PgPool,
    run: BatchFn<I, O>,
    counts: Arc<Counts>,
}

/// Calls made and statements (batches) run, since start, and where their time went.
#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    batches: AtomicU64,
    /// Microseconds, summed over calls, from each call to its statement being sent (a free lane,
    /// a pooled connection and its liveness check).
    waited_us: AtomicU64,
    /// Microseconds, summed over statements, each statement took (round trip included).
    ran_us: AtomicU64,
}

/// One kind of coalesced statement's calls and statements since start (for benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescedStats {
    pub kind: &'static str,
    pub calls: u64,
    pub statements: u64,
    /// Summed over calls: from the call to its statement being sent.
    pub waited: std::time::Duration,
    /// Summed over statements: how long each took.
    pub ran: std::time::Duration,
}

impl CoalescedStats {
    /// `calls per statement, wait per call, time per statement` as a benchmark prints it.
    pub fn summary(&self) -> String {
        let per = |total: std::time::Duration, n: u64| total.as_secs_f64() * 1e3 / n.max(1) as f64;
        format!(
            "{} {:.1} calls/statement, {:.2} ms waited per call, {:.2} ms per statement",
            self.kind,
            self.calls as f64 / self.statements.max(1) as f64,
            per(self.waited, self.calls),
            per(self.ran, self.statements)
        )
    }
}

impl<I, O> Clone for Coalescer<I, O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), pool: self.pool.clone(), run: self.run.clone(), counts: self.counts.clone() }
    }
}

impl<I, O> std::fmt::Debug for Coalescer<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// Starts the dispatcher on the current Tokio runtime: at most `lanes` batches run at once
    /// (each holds one pooled connection), each of at most `max_batch` calls.
    pub(super) fn start(pool: &PgPool, lanes: usize, max_batch: usize, run: BatchFn<I, O>) -> Self {
        let (tx, rx) = mpsc::channel(BACKLOG);
        let counts = Arc::new(Counts::default());
        let lanes =
            Lanes { pool: pool.clone(), free: Arc::new(Semaphore::new(lanes.max(1))), max_batch: max_batch.max(1) };
        tokio::spawn(dispatch(rx, lanes, run.clone(), counts.clone()));
        Self { tx, pool: pool.clone(), run, counts }
    }

    /// Calls and statements so far: how well calls are being coalesced, and what they waited.
    pub(super) fn stats(&self, kind: &'static str) -> CoalescedStats {
        let micros = |n: &AtomicU64| std::time::Duration::from_micros(n.load(Ordering::Relaxed));
        CoalescedStats {
            kind,
            calls: self.counts.calls.load(Ordering::Relaxed),
            statements: self.counts.batches.load(Ordering::Relaxed),
            waited: micros(&self.counts.waited_us),
            ran: micros(&self.counts.ran_us),
        }
    }

    /// Runs `input` in the next batch and returns its own output.
    pub(super) async fn call(&self, input: I) -> Result<O> {
        let (reply, answer) = oneshot::channel();
        match self.tx.send(Call { made: std::time::Instant::now(), input, reply }).await {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(gone())),
            // The dispatcher's runtime is gone (a test or tool that outlived it): run it alone.
            Err(mpsc::error::SendError(call)) => single(&self.pool, &self.run, call.input).await,
        }
    }
}

/// Where batches run: at most `free` at once, each on a connection of `pool`.
struct Lanes {
    pool: PgPool,
    free: Arc<Semaphore>,
    max_batch: usize,
}

async fn dispatch<I: Clone + Send + 'static, O: Send + 'static>(
    mut rx: mpsc::Receiver<Call<I, O>>,
    lanes: Lanes,
    run: BatchFn<I, O>,
    counts: Arc<Counts>,
) {
    loop {
        // A free lane, a first call, a connection, and then everything that queued meanwhile:
        // that is what makes batches form, and what fails a whole queue at once when no
        // connection can be had.
        let Ok(lane) = lanes.free.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let connection = lanes.pool.acquire().await;
        let mut calls = vec![first];
        while calls.len() < lanes.max_batch {
            match rx.try_recv() {
                Ok(call) => calls.push(call),
                Err(_) => break,
            }
        }
        counts.calls.fetch_add(calls.len() as u64, Ordering::Relaxed);
        counts.batches.fetch_add(1, Ordering::Relaxed);
        let connection = match connection {
            Ok(connection) => connection,
            Err(err) => {
                let err = StoreError::Database(err);
                for call in calls {
                    let _ = call.reply.send(Err(unavailable_again(&err).unwrap_or_else(gone)));
                }
                continue;
            }
        };
        let (pool, run, counts) = (lanes.pool.clone(), run.clone(), counts.clone());
        tokio::spawn(async move {
            let sent = std::time::Instant::now();
            let waited: u128 = calls.iter().map(|c| sent.duration_since(c.made).as_micros()).sum();
            counts.waited_us.fetch_add(waited as u64, Ordering::Relaxed);
            run_batch(&pool, &run, connection, calls).await;
            counts.ran_us.fetch_add(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
            drop(lane);
        });
    }
}

async fn run_batch<I: Clone + Send + 'static, O: Send + 'static>(
    pool: &PgPool,
    run: &BatchFn<I, O>,
    connection: PoolConnection<sqlx::Postgres>,
    calls: Vec<Call<I, O>>,
) {
    let inputs: Vec<I> = calls.iter().map(|c| c.input.clone()).collect();
    match run(connection, inputs).await {
        Ok(outputs) if outputs.len() == calls.len() => {
            for (call, output) in calls.into_iter().zip(outputs) {
                let _ = call.reply.send(Ok(output));
            }
        }
        Ok(outputs) => {
            // A batch function must answer every input; if one does not, no caller can be
            // told which answer is theirs.
            tracing::error!(
                inputs = calls.len(),
                outputs = outputs.len(),
                "batched statement answered the wrong number of rows"
            );
            for call in calls {
                let _ = call.reply.send(Err(mismatch()));
            }
        }
        Err(err) if calls.len() == 1 => {
            let _ = calls.into_iter().next().map(|call| call.reply.send(Err(err)));
        }
        Err(err) => match unavailable_again(&err) {
            Some(_) => {
                for call in calls {
                    let _ = call.reply.send(Err(unavailable_again(&err).unwrap_or_else(gone)));
                }
            }
            None => {
                tracing::debug!(calls = calls.len(), error = %err, "batched statement failed; running its calls one by one");
                let answers = futures::future::join_all(calls.iter().map(|c| single(pool, run, c.input.clone()))).await;
                for (call, answer) in calls.into_iter().zip(answers) {
                    let _ = call.reply.send(answer);
                }
            }
        },
    }
}

async fn single<I, O>(pool: &PgPool, run: &BatchFn<I, O>, input: I) -> Result<O> {
    let connection = pool.acquire().await?;
    let mut outputs = run(connection, vec![input]).await?;
    outputs.pop().ok_or_else(mismatch)
}

/// The same error again, for another caller of a batch that failed because the database could
/// not be reached; `None` for every other error (those calls are run again one by one).
fn unavailable_again(err: &StoreError) -> Option<StoreError> {
    let StoreError::Database(db) = err else { return None };
    let again = match db {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        // The server ended the session (a restart or failover mid-statement): class 08
        // "connection exception", 57P01-03 shutting down or not accepting connections yet. Its
        // error cannot be copied; to every caller it is a lost connection.
        sqlx::Error::Database(e)
            if e.code().is_some_and(|c| c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")) =>
        {
            sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.message().to_string()))
        }
        _ => return None,
    };
    Some(StoreError::Database(again))
}

fn gone() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

fn mismatch() -> StoreError {
    StoreError::Database(sqlx::Error::Protocol("batched statement answered the wrong number of rows".into()))
}

/// Puts `rows` (keyed by `key`) back in the order of `keys`: what a batch function returns for
/// statements whose rows come back in no particular order, with `None` for a key with no row.
pub(super) fn in_order<K: Eq + Hash, R: Clone>(keys: &[K], rows: Vec<(K, R)>) -> Vec<Option<R>> {
    let rows: HashMap<K, R> = rows.into_iter().collect();
    keys.iter().map(|k| rows.get(k).cloned()).collect()
}
