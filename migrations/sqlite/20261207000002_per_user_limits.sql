-- Per-user caps (see migrations/postgres for why). SQLite has one writer at a time, so the
-- enqueue's count of free slots cannot race; the unique index keeps the rule all the same.
ALTER TABLE tradeeon_jobs ADD COLUMN in_flight_slot INTEGER;

CREATE UNIQUE INDEX tradeeon_jobs_user_in_flight_slot
    ON tradeeon_jobs (user_id, in_flight_slot)
    WHERE status IN ('queued', 'running') AND in_flight_slot IS NOT NULL;

CREATE TABLE tradeeon_user_budgets (
    user_id   TEXT PRIMARY KEY NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- RFC 3339 text, as every timestamp of this schema.
    writes_at TEXT NOT NULL,
    tests_at  TEXT NOT NULL
);
