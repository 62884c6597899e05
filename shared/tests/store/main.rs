//! Contract suite for `tradeeon_shared::store`: every case runs against PostgreSQL and SQLite,
//! each on a database of its own (see `harness`). PostgreSQL-only cases check Row Level
//! Security, the Supabase compatibility of the migrations and the database roles (`roles`).
//!
//! Run: `cargo test -p tradeeon-shared --test store` (needs PostgreSQL at
//! `TEST_DATABASE_ADMIN_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).

#[macro_use]
mod harness;

mod audit;
mod connect;
mod connections;
mod jobs;
mod pool;
mod rewrap;
mod rewrap_command;
mod rls;
mod roles;
mod service;
mod setup;
#[cfg(target_os = "linux")]
mod tls;
mod users;
