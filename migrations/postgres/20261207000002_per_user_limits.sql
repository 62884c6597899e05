-- Per-user caps that hold across API processes (issue 24, "Per-user caps").
--
-- 1. Jobs in flight. A job the API enqueues for a user takes one of the user's
--    MAX_JOBS_IN_FLIGHT_PER_USER slots (0, 1, …) while it is queued or running; the unique index
--    below allows each slot once per user among active jobs, so two concurrent enqueues cannot
--    both take the last one (the loser's `ON CONFLICT … DO NOTHING` skips it, whatever process
--    it came from). Settling a job (active -> false) frees its slot without any write of ours,
--    and a claim changes neither column, so it stays a HOT update. The index holds only the
--    active jobs that took a slot — at most the cap per user — and is what the enqueue reads to
--    find the free slots. The scheduler's health checks take none (NULL: not in the index).
--    `tradeeon_jobs_user_created` (user_id, created_at) would serve the count too, but it holds
--    every job a user ever had until pruning, and the cap needs the unique constraint anyway.
ALTER TABLE public.tradeeon_jobs ADD COLUMN IF NOT EXISTS in_flight_slot INTEGER;

CREATE UNIQUE INDEX IF NOT EXISTS tradeeon_jobs_user_in_flight_slot
    ON public.tradeeon_jobs (user_id, in_flight_slot) WHERE active AND in_flight_slot IS NOT NULL;

-- 2. Per-minute budgets (API_USER_RATE_LIMIT_PER_MINUTE, API_TEST_RATE_LIMIT_PER_MINUTE), one
--    row per user, as GCRA "theoretical arrival times": a request is let through when the
--    time after it stays within a minute of now, and moves the time on by a minute / the
--    figure. The row is updated in place (HOT) under its row lock, so concurrent charges from
--    any number of API processes see each other. Only the service reads or writes it, as
--    `tradeeon_service` (20261207000001_service_roles.sql): forced RLS with that role's policy
--    alone, and nothing for the REST roles, whatever Supabase's default privileges granted.
CREATE TABLE IF NOT EXISTS public.tradeeon_user_budgets (
    user_id   UUID PRIMARY KEY REFERENCES public.users(id) ON DELETE CASCADE,
    writes_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    tests_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- How many of the requests in the last charging statement were let through (it charges a
    -- batch of concurrent requests at once).
    admitted  INTEGER NOT NULL DEFAULT 0
);
REVOKE ALL ON public.tradeeon_user_budgets FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT, INSERT, UPDATE ON public.tradeeon_user_budgets TO tradeeon_service;
ALTER TABLE public.tradeeon_user_budgets ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.tradeeon_user_budgets FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tradeeon_user_budgets_service ON public.tradeeon_user_budgets;
CREATE POLICY tradeeon_user_budgets_service ON public.tradeeon_user_budgets
    FOR ALL TO tradeeon_service USING (true) WITH CHECK (true);
