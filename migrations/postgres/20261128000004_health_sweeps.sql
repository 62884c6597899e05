-- Tradeeon Connect: one row per health-sweep slot.
--
-- Every worker process runs the scheduler, so every process sees each slot arrive. The first to
-- insert the slot's row owns the sweep; the others skip it. The health checks a sweep enqueues
-- also carry an idempotency key per (slot, connection), so a second owner taking over a sweep
-- whose owner died mid-way cannot enqueue a check twice.
CREATE TABLE IF NOT EXISTS public.health_sweeps (
    slot          TIMESTAMPTZ PRIMARY KEY,
    owner         TEXT NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    enqueued      INTEGER,
    -- When the sweep's spread (and any stretch for rate budgets) ends.
    spread_until  TIMESTAMPTZ,
    completed_at  TIMESTAMPTZ
);

-- Internal bookkeeping: no API role may read or write it.
ALTER TABLE public.health_sweeps ENABLE ROW LEVEL SECURITY;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.health_sweeps TO service_role;
