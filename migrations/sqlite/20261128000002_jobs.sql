-- Tradeeon Connect: job records (SQLite). Same table as migrations/postgres; see there for why.
-- Named tradeeon_jobs because apalis-sqlite owns `Jobs` (table names are case-insensitive here).
CREATE TABLE tradeeon_jobs (
    id              TEXT PRIMARY KEY NOT NULL,
    kind            TEXT NOT NULL
        CHECK (kind IN ('test', 'verify', 'rotate', 'health_check', 'kite_session')),
    status          TEXT NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'failed')),
    user_id         TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    connection_id   TEXT REFERENCES exchange_keys(id) ON DELETE CASCADE,
    exchange        TEXT NOT NULL CHECK (exchange IN ('binance', 'zerodha', 'coinbase', 'kraken')),
    payload         TEXT CHECK (payload IS NULL OR json_valid(payload)),
    attempts        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    run_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at      TEXT,
    finished_at     TEXT,
    result          TEXT CHECK (result IS NULL OR json_valid(result)),
    error           TEXT
);

CREATE UNIQUE INDEX tradeeon_jobs_one_change_per_connection
    ON tradeeon_jobs (connection_id)
    WHERE status IN ('queued', 'running') AND kind IN ('verify', 'rotate', 'kite_session');

CREATE INDEX tradeeon_jobs_queued_run_at
    ON tradeeon_jobs (run_at) WHERE status IN ('queued', 'running');

CREATE INDEX tradeeon_jobs_finished_at
    ON tradeeon_jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE INDEX tradeeon_jobs_user_created
    ON tradeeon_jobs (user_id, created_at DESC);
