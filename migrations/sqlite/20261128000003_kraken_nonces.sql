-- Tradeeon Connect: the last Kraken nonce handed out per API key (SQLite). Same table as
-- migrations/postgres; see there for why. On SQLite a single process runs the workers and hands
-- out nonces in memory, so this table stays empty; it exists so that both schemas match.
CREATE TABLE kraken_nonces (
    key_fingerprint TEXT PRIMARY KEY NOT NULL,
    last_nonce      INTEGER NOT NULL
);
