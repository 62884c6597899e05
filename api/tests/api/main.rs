//! Integration tests of the HTTP API over real HTTP, each case on a fresh database of each
//! backend (see `helpers`). No worker runs: tests check the responses, the database through the
//! store, and the job records the API left queued (playing the worker where a case needs a job
//! settled).
//!
//! Run: `cargo test -p tradeeon-api --test api` (needs PostgreSQL at `TEST_DATABASE_ADMIN_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`).

#[macro_use]
mod helpers;

mod audit;
mod auth;
mod canary;
mod connections;
mod cross_user;
mod history;
mod jobs;
mod openapi;
mod public;
mod validation;
mod zerodha;
