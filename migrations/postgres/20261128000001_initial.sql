-- Tradeeon Connect: initial schema (PostgreSQL >= 13, plain or Supabase).
--
-- Runs with sqlx's migrator under the table `_tradeeon_migrations` (apalis keeps its own in
-- `apalis._sqlx_migrations`). Released migrations are never edited; add a new file instead.
--
-- The same file must work on
--   * plain PostgreSQL, where nothing of Supabase exists: we create a minimal `auth` schema,
--     `auth.users`, `auth.uid()` and the `authenticated` / `service_role` roles;
--   * Supabase, where all of those already exist and belong to Supabase: we create them only
--     when missing and never replace them;
--   * a Supabase project that already has the seed's `users` / `exchange_keys` tables: those are
--     created only if missing and then extended column by column.

------------------------------------------------------------------------------------------------
-- Supabase compatibility shims
------------------------------------------------------------------------------------------------

-- Roles are cluster-wide and several databases may be migrated at the same time (tests, or the
-- API and the worker starting together), so two sessions can both see "role missing" and race on
-- CREATE ROLE; the loser gets duplicate_object or unique_violation, which is fine.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
DECLARE
    is_superuser boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        -- On Supabase service_role bypasses RLS; only a superuser may grant BYPASSRLS.
        IF is_superuser THEN
            CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
        ELSE
            CREATE ROLE service_role NOLOGIN NOINHERIT;
        END IF;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- The service switches to `authenticated` for user-scoped queries (`SET LOCAL ROLE`), which
-- needs membership. Superusers need none; on Supabase `postgres` is already a member. When the
-- grant is impossible (no ADMIN on the role) we warn instead of failing: an operator can run
-- `GRANT authenticated TO <service user>` once.
DO $$
DECLARE
    -- `SET` privilege (PostgreSQL 16+) is what SET ROLE needs; before 16 membership is enough.
    needed text := CASE WHEN current_setting('server_version_num')::int >= 160000
                        THEN 'SET' ELSE 'MEMBER' END;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT pg_has_role(current_user, 'authenticated', needed) THEN
        EXECUTE format('GRANT authenticated TO %I', current_user);
    END IF;
EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
    RAISE WARNING 'could not GRANT authenticated TO %: %; user-scoped queries will fail until it is granted',
        current_user, SQLERRM;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
    END IF;
END
$$;

-- A stand-in for Supabase's `auth.users` with just what we reference. On Supabase the real table
-- (owned by supabase_auth_admin) is left alone.
DO $$
BEGIN
    IF to_regclass('auth.users') IS NULL THEN
        CREATE TABLE auth.users (
            id         UUID PRIMARY KEY,
            email      TEXT,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
    END IF;
END
$$;

-- Supabase's definition, verbatim in behaviour: the caller's user id from the JWT claims of the
-- current transaction (`request.jwt.claim.sub` is the legacy PostgREST setting). A setting that
-- was set locally in an earlier transaction reads back as '', hence the NULLIFs.
DO $$
BEGIN
    IF to_regprocedure('auth.uid()') IS NULL THEN
        CREATE FUNCTION auth.uid() RETURNS uuid
        LANGUAGE sql STABLE
        AS $fn$
            SELECT coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
            )::uuid
        $fn$;
    END IF;
END
$$;

-- On Supabase these are granted already and we may not own the objects.
DO $$
BEGIN
    GRANT USAGE ON SCHEMA auth TO authenticated, service_role;
    GRANT EXECUTE ON FUNCTION auth.uid() TO authenticated, service_role;
EXCEPTION WHEN insufficient_privilege THEN NULL;
END
$$;

------------------------------------------------------------------------------------------------
-- public.users: profile row per auth user (the seed's definition)
------------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS public.users (
    id UUID REFERENCES auth.users(id) PRIMARY KEY,
    email TEXT UNIQUE NOT NULL,
    full_name TEXT,
    avatar_url TEXT,
    timezone TEXT DEFAULT 'UTC',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

------------------------------------------------------------------------------------------------
-- public.exchange_keys: one connection per user and exchange
------------------------------------------------------------------------------------------------

-- The seed's definition (with gen_random_uuid(), built in since PostgreSQL 13, instead of
-- uuid-ossp's uuid_generate_v4()).
CREATE TABLE IF NOT EXISTS public.exchange_keys (
    id UUID DEFAULT gen_random_uuid() PRIMARY KEY,
    user_id UUID REFERENCES public.users(id) ON DELETE CASCADE NOT NULL,
    exchange TEXT NOT NULL CHECK (exchange IN ('binance', 'zerodha', 'coinbase', 'kraken')),
    api_key_encrypted TEXT NOT NULL,
    api_secret_encrypted TEXT NOT NULL,
    passphrase_encrypted TEXT,
    is_active BOOLEAN DEFAULT true,
    permissions JSONB DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE(user_id, exchange)
);

-- A table adopted from the seed may still default to uuid_generate_v4().
ALTER TABLE public.exchange_keys ALTER COLUMN id SET DEFAULT gen_random_uuid();

-- The store never writes NULL into these; tightening them lets it decode without guessing.
UPDATE public.exchange_keys SET is_active = true WHERE is_active IS NULL;
UPDATE public.exchange_keys SET permissions = '{}' WHERE permissions IS NULL;
UPDATE public.exchange_keys SET created_at = now() WHERE created_at IS NULL;
UPDATE public.exchange_keys SET updated_at = created_at WHERE updated_at IS NULL;
ALTER TABLE public.exchange_keys
    ALTER COLUMN is_active SET NOT NULL,
    ALTER COLUMN permissions SET NOT NULL,
    ALTER COLUMN created_at SET NOT NULL,
    ALTER COLUMN updated_at SET NOT NULL;

ALTER TABLE public.exchange_keys
    ADD COLUMN IF NOT EXISTS nickname TEXT,
    ADD COLUMN IF NOT EXISTS status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'connected', 'degraded', 'error', 'expired')),
    ADD COLUMN IF NOT EXISTS status_message TEXT,
    ADD COLUMN IF NOT EXISTS last_checked_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS last_latency_ms INTEGER,
    ADD COLUMN IF NOT EXISTS consecutive_failures INTEGER NOT NULL DEFAULT 0,
    -- "…WXYZ": what the UI may show of the key; computed before encryption.
    ADD COLUMN IF NOT EXISTS api_key_hint TEXT,
    -- Zerodha: daily access token (Fernet, like the other secrets) and when it lapses.
    ADD COLUMN IF NOT EXISTS session_expires_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS access_token_encrypted TEXT,
    -- What the user enabled the connection for. The seed kept these flags in `permissions`;
    -- here `permissions` is what the exchange reports the key may do.
    ADD COLUMN IF NOT EXISTS features JSONB NOT NULL
        DEFAULT '{"trading": true, "wallet": true, "paper": false}',
    -- Bumped on every key swap (upsert of new keys, rotation) and never by a re-encryption, so
    -- a rotation job can compare-and-swap and a retried rotation is a no-op.
    ADD COLUMN IF NOT EXISTS credentials_version INTEGER NOT NULL DEFAULT 1;

-- Rows adopted from the seed kept the trading/wallet/paper flags in `permissions`: move them.
UPDATE public.exchange_keys
SET features = jsonb_build_object(
        'trading', coalesce((permissions ->> 'trading')::boolean, true),
        'wallet', coalesce((permissions ->> 'wallet')::boolean, true),
        'paper', coalesce((permissions ->> 'paper')::boolean, false)),
    permissions = '{}'
WHERE permissions ?| ARRAY['trading', 'wallet', 'paper'];

-- Health sweeps page through active connections by id.
CREATE INDEX IF NOT EXISTS exchange_keys_active_id_idx
    ON public.exchange_keys (id) WHERE is_active;

------------------------------------------------------------------------------------------------
-- public.connection_audit_log: append-only trail of what happened to a connection
------------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS public.connection_audit_log (
    id UUID DEFAULT gen_random_uuid() PRIMARY KEY,
    connection_id UUID REFERENCES public.exchange_keys(id) ON DELETE CASCADE,
    user_id UUID REFERENCES public.users(id) ON DELETE CASCADE NOT NULL,
    action TEXT NOT NULL,
    ip_address INET,
    user_agent TEXT,
    details JSONB,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'connection_audit_log_action_check'
                     AND conrelid = 'public.connection_audit_log'::regclass) THEN
        ALTER TABLE public.connection_audit_log ADD CONSTRAINT connection_audit_log_action_check
            CHECK (action IN ('connected', 'tested', 'rotated', 'rotate_failed', 'revoked',
                              'status_changed', 'session_created'));
    END IF;
END
$$;

-- Serves "newest first" keyset pagination: WHERE user_id = $1 AND (created_at, id) < ($2, $3)
-- ORDER BY created_at DESC, id DESC.
CREATE INDEX IF NOT EXISTS connection_audit_log_user_created_idx
    ON public.connection_audit_log (user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS connection_audit_log_connection_idx
    ON public.connection_audit_log (connection_id);

------------------------------------------------------------------------------------------------
-- public.connection_health_history: one row per health check, pruned by age
------------------------------------------------------------------------------------------------

CREATE TABLE public.connection_health_history (
    id UUID DEFAULT gen_random_uuid() PRIMARY KEY,
    connection_id UUID NOT NULL REFERENCES public.exchange_keys(id) ON DELETE CASCADE,
    checked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'connected', 'degraded', 'error', 'expired')),
    code TEXT,
    latency_ms INTEGER,
    message TEXT
);

CREATE INDEX connection_health_history_checked_at_idx
    ON public.connection_health_history (checked_at);
CREATE INDEX connection_health_history_connection_idx
    ON public.connection_health_history (connection_id, checked_at DESC);

------------------------------------------------------------------------------------------------
-- Privileges and Row Level Security
------------------------------------------------------------------------------------------------

-- The service connects as the tables' owner (or a superuser) and uses that identity only for
-- worker jobs, which must see every row. Everything done on behalf of a user runs after
-- `SET LOCAL ROLE authenticated` with the user's JWT claims set, so the policies below apply even
-- if a query forgot its `WHERE user_id = ...`. RLS is ENABLEd, not FORCEd, precisely so that the
-- owner keeps seeing all rows.
--
-- Privileges are the least each table needs: the audit log is append-only for users, and health
-- history is written by workers only.
GRANT USAGE ON SCHEMA public TO authenticated, service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.users, public.exchange_keys TO authenticated;
GRANT SELECT, INSERT ON public.connection_audit_log TO authenticated;
GRANT SELECT ON public.connection_health_history TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON public.users, public.exchange_keys, public.connection_audit_log,
       public.connection_health_history
    TO service_role;

ALTER TABLE public.users ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.exchange_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.connection_audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.connection_health_history ENABLE ROW LEVEL SECURITY;

-- Each policy has USING (which rows are visible / may be changed) and WITH CHECK (what a written
-- row must look like), so a user can neither read another user's rows nor move a row to, or
-- create one for, another user.
DROP POLICY IF EXISTS users_own_row ON public.users;
CREATE POLICY users_own_row ON public.users
    FOR ALL TO authenticated
    USING (id = auth.uid())
    WITH CHECK (id = auth.uid());

DROP POLICY IF EXISTS exchange_keys_own_rows ON public.exchange_keys;
CREATE POLICY exchange_keys_own_rows ON public.exchange_keys
    FOR ALL TO authenticated
    USING (user_id = auth.uid())
    WITH CHECK (user_id = auth.uid());

-- Append-only: only SELECT and INSERT policies exist, so UPDATE and DELETE match no rows even
-- if the privileges were granted. A row may reference only one of the user's own connections
-- (foreign keys are checked without RLS, so the policy has to say it).
DROP POLICY IF EXISTS connection_audit_log_select_own ON public.connection_audit_log;
CREATE POLICY connection_audit_log_select_own ON public.connection_audit_log
    FOR SELECT TO authenticated
    USING (user_id = auth.uid());

DROP POLICY IF EXISTS connection_audit_log_insert_own ON public.connection_audit_log;
CREATE POLICY connection_audit_log_insert_own ON public.connection_audit_log
    FOR INSERT TO authenticated
    WITH CHECK (
        user_id = auth.uid()
        AND (connection_id IS NULL OR EXISTS (
            SELECT 1 FROM public.exchange_keys k
            WHERE k.id = connection_id AND k.user_id = auth.uid()))
    );

-- History has no user_id of its own; it belongs to whoever owns the connection. Read-only.
CREATE POLICY connection_health_history_select_own ON public.connection_health_history
    FOR SELECT TO authenticated
    USING (EXISTS (
        SELECT 1 FROM public.exchange_keys k
        WHERE k.id = connection_id AND k.user_id = auth.uid()));

-- Supabase's REST API exposes tables in `public`; our migrations table lives there too (sqlx
-- creates it before this file runs). RLS without policies hides it from every API role while
-- the owner, who runs migrations, is unaffected.
DO $$
BEGIN
    IF to_regclass('public._tradeeon_migrations') IS NOT NULL THEN
        ALTER TABLE public._tradeeon_migrations ENABLE ROW LEVEL SECURITY;
    END IF;
END
$$;
