-- Tradeeon Connect: one row per health-sweep slot (see migrations/postgres for why).
CREATE TABLE health_sweeps (
    slot          TEXT PRIMARY KEY NOT NULL,
    owner         TEXT NOT NULL,
    started_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    enqueued      INTEGER,
    spread_until  TEXT,
    completed_at  TEXT
);
