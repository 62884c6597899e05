-- Three indexes stop holding an entry for every NULL.
--
-- Each request to POST /connections/test added a NULL entry to three indexes that are only ever
-- searched for a value: a queued apalis ticket has no `lock_by` and no idempotency key, and a
-- `tested` audit row names no connection. Those entries were work on the endpoint's hot path
-- (three of its eleven index entries) and space in every index, for nothing: no query looks for
-- NULL there.
--
-- * `apalis.idx_apalis_jobs_lock_by`: apalis-postgres 1.0 searches it with `lock_by = $1` or a
--   join on `lock_by = workers.id` (acknowledging, heartbeats, orphan handover), which imply
--   NOT NULL, so the planner still uses the partial index.
-- * `apalis.idx_jobs_idempotency_key`: a unique index. NULLs never conflicted in it, so the
--   partial one enforces exactly the same rule; apalis names it in no ON CONFLICT.
-- * `connection_audit_log_connection_idx`: it serves the ON DELETE CASCADE from `exchange_keys`
--   (`connection_id = $1`, which implies NOT NULL).
--
-- A rolling deploy is safe: the previous release names none of them. Each keeps its name, so
-- apalis's own `CREATE INDEX IF NOT EXISTS` does not add the full index back. The indexes are
-- rebuilt in this migration's transaction, which blocks writes to each table while its index
-- builds: nothing on `apalis.jobs` (acknowledged tickets are deleted, so it holds the queue and
-- little else), about a second per few million audit rows on `connection_audit_log`.
-- (CREATE INDEX CONCURRENTLY cannot run in a transaction, nor in a migration of several
-- statements.)

DROP INDEX IF EXISTS apalis.idx_apalis_jobs_lock_by;
CREATE INDEX idx_apalis_jobs_lock_by ON apalis.jobs (lock_by) WHERE lock_by IS NOT NULL;

DROP INDEX IF EXISTS apalis.idx_jobs_idempotency_key;
CREATE UNIQUE INDEX idx_jobs_idempotency_key
    ON apalis.jobs (job_type, idempotency_key) WHERE idempotency_key IS NOT NULL;

DROP INDEX IF EXISTS public.connection_audit_log_connection_idx;
CREATE INDEX connection_audit_log_connection_idx
    ON public.connection_audit_log (connection_id) WHERE connection_id IS NOT NULL;
