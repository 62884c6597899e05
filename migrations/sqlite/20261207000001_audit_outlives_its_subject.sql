-- Audit rows outlive what they describe.
--
-- Deleting a connection row used to delete its audit trail (ON DELETE CASCADE), and deleting a
-- user deleted theirs. Connections are soft-deleted, so only an operator's hand would do
-- either; the trail must survive it all the same. Now a deleted connection leaves its rows
-- naming no connection (SET NULL), and a user with audit rows cannot be deleted (RESTRICT)
-- until those rows are removed deliberately.
--
-- SQLite cannot change a foreign key in place: the table is rebuilt (the procedure of
-- https://www.sqlite.org/lang_altertable.html, section 7). Nothing references the audit log,
-- so it can be dropped with foreign keys on; the migration runs in one transaction.
CREATE TABLE connection_audit_log_new (
    id            TEXT PRIMARY KEY NOT NULL,
    connection_id TEXT REFERENCES exchange_keys(id) ON DELETE SET NULL,
    user_id       TEXT NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
    action        TEXT NOT NULL
        CHECK (action IN ('connected', 'tested', 'rotated', 'rotate_failed', 'revoked',
                          'status_changed', 'session_created')),
    ip_address    TEXT,
    user_agent    TEXT,
    details       TEXT CHECK (details IS NULL OR json_valid(details)),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

INSERT INTO connection_audit_log_new
    (id, connection_id, user_id, action, ip_address, user_agent, details, created_at)
SELECT id, connection_id, user_id, action, ip_address, user_agent, details, created_at
FROM connection_audit_log;

DROP TABLE connection_audit_log;
ALTER TABLE connection_audit_log_new RENAME TO connection_audit_log;

CREATE INDEX connection_audit_log_user_created_idx
    ON connection_audit_log (user_id, created_at DESC, id DESC);
CREATE INDEX connection_audit_log_connection_idx ON connection_audit_log (connection_id);
