-- Fewer index writes per job.
--
-- A job writes its record three times (enqueued, claimed, settled) and its apalis ticket three
-- times (enqueued, fetched, acknowledged). Each insert, and each update that changes an indexed
-- column or a column an index predicate reads, adds an entry to every index of the table; an
-- update that changes neither can be HOT (no index work at all) when its page has room. On the
-- hot paths (POST /connections/test, the workers' claim and settle) that index work was most of
-- what the database spent per job.
--
-- Both changes keep the previous release working during a rolling deploy: it names neither
-- dropped index, and its queries on `status` still run (they just no longer match the partial
-- indexes). For that reason the idempotency key keeps its full unique constraint (a partial
-- one would break the previous release's `ON CONFLICT (idempotency_key)`), although most jobs
-- index a NULL there.

-- 1. apalis-postgres's first migration created two indexes that later ones duplicated: `lidx`
--    is `idx_apalis_jobs_lock_by`, `unique_job_id` is the primary key. Every ticket write
--    maintained both twice over. (apalis-postgres 1.0 never names either again.)
DROP INDEX IF EXISTS apalis.lidx;
DROP INDEX IF EXISTS apalis.unique_job_id;

-- 2. Claiming a job (queued -> running) changed `status`, which the partial indexes' predicates
--    read, so every claim wrote new entries into all of them. They now read `active`, which a
--    claim does not change, so a claim can be a HOT update; settling (active -> false) still
--    maintains them, as it must. The free space per page (fillfactor) leaves room for the
--    claimed version of a row next to it. Adding a stored column rewrites the table under an
--    exclusive lock: quick here, since finished jobs are pruned (JOB_RETENTION_DAYS), but it
--    blocks enqueues for that moment.
ALTER TABLE public.tradeeon_jobs
    ADD COLUMN IF NOT EXISTS active BOOLEAN GENERATED ALWAYS AS (status IN ('queued', 'running')) STORED;

DROP INDEX IF EXISTS public.tradeeon_jobs_one_change_per_connection;
CREATE UNIQUE INDEX IF NOT EXISTS tradeeon_jobs_one_change_per_connection
    ON public.tradeeon_jobs (connection_id)
    WHERE active AND kind IN ('verify', 'rotate', 'kite_session');

DROP INDEX IF EXISTS public.tradeeon_jobs_queued_run_at;
CREATE INDEX IF NOT EXISTS tradeeon_jobs_active_run_at
    ON public.tradeeon_jobs (run_at) WHERE active;

ALTER TABLE public.tradeeon_jobs SET (fillfactor = 75);
