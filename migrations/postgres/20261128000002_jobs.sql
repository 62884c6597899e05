-- Tradeeon Connect: job records.
--
-- Every job the API or the scheduler enqueues has a row here — the source of truth for
-- GET /jobs/{id} — and a ticket on the apalis queue (apalis.jobs) that only carries this row's
-- id. The payload holds credentials as Fernet tokens, never plaintext, and is set to NULL when
-- the job finishes so finished jobs keep no ciphertext.
CREATE TABLE IF NOT EXISTS public.tradeeon_jobs (
    id              TEXT PRIMARY KEY,                       -- ULID
    kind            TEXT NOT NULL
        CHECK (kind IN ('test', 'verify', 'rotate', 'health_check', 'kite_session')),
    status          TEXT NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'failed')),
    user_id         UUID NOT NULL REFERENCES public.users(id) ON DELETE CASCADE,
    connection_id   UUID REFERENCES public.exchange_keys(id) ON DELETE CASCADE,
    exchange        TEXT NOT NULL CHECK (exchange IN ('binance', 'zerodha', 'coinbase', 'kraken')),
    payload         JSONB,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- One job per key, ever: scheduled sweeps use (connection, slot) so several schedulers
    -- enqueue each check once.
    idempotency_key TEXT UNIQUE,
    run_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at      TIMESTAMPTZ,
    finished_at     TIMESTAMPTZ,
    result          JSONB,
    error           TEXT
);

-- At most one credential-changing job queued or running per connection: a second rotate while
-- one is pending is a conflict, not a race between two swaps.
CREATE UNIQUE INDEX IF NOT EXISTS tradeeon_jobs_one_change_per_connection
    ON public.tradeeon_jobs (connection_id)
    WHERE status IN ('queued', 'running') AND kind IN ('verify', 'rotate', 'kite_session');

-- Queue depth and the oldest queued job's age are read on every metrics scrape.
CREATE INDEX IF NOT EXISTS tradeeon_jobs_queued_run_at
    ON public.tradeeon_jobs (run_at) WHERE status IN ('queued', 'running');

-- Pruning finished jobs by age.
CREATE INDEX IF NOT EXISTS tradeeon_jobs_finished_at
    ON public.tradeeon_jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS tradeeon_jobs_user_created
    ON public.tradeeon_jobs (user_id, created_at DESC);

-- Users may read their own jobs; only the service writes them.
GRANT SELECT ON public.tradeeon_jobs TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.tradeeon_jobs TO service_role;
ALTER TABLE public.tradeeon_jobs ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tradeeon_jobs_select_own ON public.tradeeon_jobs;
CREATE POLICY tradeeon_jobs_select_own ON public.tradeeon_jobs
    FOR SELECT TO authenticated
    USING (user_id = auth.uid());
