//! Everything the API and the workers share: domain types, configuration, the credential vault
//! and the storage layer.
//!
//! This crate owns all SQL (in [`store`]) and all cryptography on credentials (in [`vault`]).
//! It must not depend on HTTP frameworks or on the job runner's worker side.

pub mod config;
pub mod domain;
pub mod encryption_key;
pub mod exchanges;
pub mod jobs;
pub mod retry;
pub mod rewrap;
pub mod schedule;
pub mod store;
pub mod telemetry;
pub mod vault;
