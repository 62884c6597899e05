//! Worker job tests: every job against the exchange simulator over real HTTP, on both database
//! backends, driven deterministically (claim, run, settle or requeue; no sleeping for retries).
//!
//! Run: `cargo test -p tradeeon-worker --test jobs` (needs PostgreSQL at
//! `TEST_DATABASE_ADMIN_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).

#[macro_use]
mod harness;
mod helpers;

mod checks;
mod health;
mod kite_session;
mod limits;
mod nonces;
mod queue;
mod rotate;
mod sweeps;
mod verify;
