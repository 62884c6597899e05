//! The scale-out and failure suite (issue 7): real `tradeeon api` and `tradeeon worker`
//! processes on PostgreSQL, the exchange simulator, and what production does to them — crashes,
//! deploys, a database restart, exchange faults — with nothing lost and no secret leaked.
//!
//! Each scenario bounds its run time and request count, prints its figures (run with
//! `-- --nocapture` to see them; they are also written to `target/tmp/scenario-figures/`) and ends
//! with a scan for the canary secrets it used. `RELIABILITY.md` lists them with their commands.
//! The scenarios run one at a time (see `support::exclusive`).
//!
//! In CI (`cargo test --workspace`): worker crash, graceful deploy, database restart, exchange
//! faults, secrets. Documented, run on demand (`--ignored`): scale-out, health sweep at scale.

mod support;

mod database_restart;
mod exchange_faults;
mod graceful_deploy;
mod scale_out;
mod secrets;
mod sweep_at_scale;
mod worker_crash;
