-- Tradeeon Connect: the service gets roles of its own; Supabase's REST roles can only read.
--
-- Supabase serves the `public` schema over its REST API (PostgREST) to `anon` (no sign-in) and
-- `authenticated` (any signed-in user), and its default privileges give both — and
-- `service_role` — ALL on every table created in `public`. Until now the service itself also
-- acted as `authenticated` for user-scoped queries, which needed INSERT/UPDATE/DELETE on
-- `users` and `exchange_keys`: through the REST API a user could reserve someone else's email,
-- write their own status or permissions without our checks, forge audit rows, or delete a
-- connection and, by cascade, its audit trail. From here on:
--
-- * `anon` has no privilege on anything of ours; `authenticated` and `service_role` may only
--   read (their own rows, by RLS), and never the encrypted columns or a job's payload. Every
--   privilege is REVOKEd explicitly: Supabase's default privileges granted them when each table
--   was created. Every later migration that creates a table must do the same (the store test
--   `rest_roles_cannot_write_any_table` checks every table in `public` and `apalis`).
-- * `tradeeon_user` (NOLOGIN) is what the service switches to for user-scoped transactions
--   (`SET LOCAL ROLE`), with the JWT claims set as before so that `auth.uid()` works and the
--   same USING + WITH CHECK policies apply.
-- * `tradeeon_service` (NOLOGIN) is the worker/system path: policies `USING (true) WITH CHECK
--   (true)` let it see every row. The login role the API and workers connect with is a member
--   of it (`CREATE ROLE tradeeon_app LOGIN PASSWORD '…' IN ROLE tradeeon_service`, or
--   `tradeeon migrate` with DATABASE_APP_URL) and owns nothing, so it cannot change the schema.
--   Not BYPASSRLS (RDS cannot grant it) and not ownership: a policy is what lets it see rows.
--   It is a member of `tradeeon_user`, so its members may SET ROLE to it.
-- * Row Level Security is FORCEd: the tables' owner (who runs `tradeeon migrate`) is filtered
--   like anyone else and, having no policy, sees and changes no rows. Superusers bypass RLS
--   regardless.
--
-- Data migrations after this one: the migrator is the owner and sees no rows of a FORCEd table.
-- A migration that reads or changes rows of table t wraps those statements in
--     ALTER TABLE t NO FORCE ROW LEVEL SECURITY;
--     ... UPDATE / INSERT / DELETE ...;
--     ALTER TABLE t FORCE ROW LEVEL SECURITY;
-- inside its own file. sqlx runs each migration in one transaction and ALTER TABLE holds an
-- ACCESS EXCLUSIVE lock until it commits, so no other session ever sees the table unforced.
-- DDL (ADD COLUMN … DEFAULT, CREATE INDEX, constraint validation) is not subject to RLS, nor are
-- the referential actions of foreign keys. The migrations table itself (`_tradeeon_migrations`)
-- keeps RLS enabled but not forced: sqlx's migrator reads it as the owner, and a forced table
-- would look empty, so every migration would run again.

------------------------------------------------------------------------------------------------
-- Roles (cluster-wide; created once, race-safe as in the first migration)
------------------------------------------------------------------------------------------------

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tradeeon_user') THEN
        -- NOINHERIT: acting for a user never carries another role's privileges along.
        CREATE ROLE tradeeon_user NOLOGIN NOINHERIT;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'role tradeeon_user is missing and % may not create roles', current_user
            USING HINT = 'Run the migration as a role with CREATEROLE, or have an administrator run '
                         '"CREATE ROLE tradeeon_user NOLOGIN NOINHERIT; CREATE ROLE tradeeon_service NOLOGIN; '
                         'GRANT tradeeon_user TO tradeeon_service" first.';
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tradeeon_service') THEN
        CREATE ROLE tradeeon_service NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
        RAISE EXCEPTION 'role tradeeon_service is missing and % may not create roles', current_user
            USING HINT = 'Run the migration as a role with CREATEROLE, or have an administrator create it first.';
END
$$;

-- Members of tradeeon_service may SET ROLE tradeeon_user (membership is transitive), so an
-- operator grants the login role one role only.
DO $$
BEGIN
    IF NOT pg_has_role('tradeeon_service', 'tradeeon_user', 'MEMBER') THEN
        GRANT tradeeon_user TO tradeeon_service;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- Supabase's `anon` is missing on plain PostgreSQL; make it exist so the statements below (and
-- the checks that it can do nothing) read the same everywhere.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

------------------------------------------------------------------------------------------------
-- Privileges
------------------------------------------------------------------------------------------------

-- Everything the REST roles held on our tables goes first, then each gets back what it needs.
-- (Our tables only: a Supabase project may keep tables of its own in `public`.)
REVOKE ALL ON public.users, public.exchange_keys, public.connection_audit_log,
              public.connection_health_history, public.tradeeon_jobs, public.kraken_nonces,
              public.health_sweeps
    FROM PUBLIC, anon, authenticated, service_role;

DO $$
BEGIN
    IF to_regclass('public._tradeeon_migrations') IS NOT NULL THEN
        REVOKE ALL ON public._tradeeon_migrations FROM PUBLIC, anon, authenticated, service_role;
        GRANT SELECT ON public._tradeeon_migrations TO tradeeon_service;
    END IF;
END
$$;

-- Functions in `public` are callable through the REST API (`/rpc/…`) by whoever may EXECUTE them.
REVOKE ALL ON FUNCTION public.tradeeon_drop_acknowledged_tickets() FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.tradeeon_drop_acknowledged_tickets() TO tradeeon_service;
-- An old apalis release created generate_ulid() in `public`; nothing of ours calls it.
DO $$
BEGIN
    IF to_regprocedure('public.generate_ulid()') IS NOT NULL THEN
        REVOKE ALL ON FUNCTION public.generate_ulid() FROM PUBLIC, anon, authenticated, service_role;
    END IF;
END
$$;

-- The job queue's schema is not served by the REST API unless an operator adds it; should one
-- do so, the REST roles still get nothing.
REVOKE ALL ON SCHEMA apalis FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL TABLES IN SCHEMA apalis FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA apalis FROM PUBLIC, anon, authenticated, service_role;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA apalis FROM PUBLIC, anon, authenticated, service_role;

-- The portal (Supabase client, signed in) may read its own rows, never ciphertext.
GRANT SELECT ON public.users, public.connection_audit_log, public.connection_health_history
    TO authenticated, service_role;
GRANT SELECT (id, user_id, exchange, nickname, is_active, permissions, features, status, status_message,
              last_checked_at, last_latency_ms, consecutive_failures, api_key_hint, session_expires_at,
              created_at, updated_at, credentials_version)
    ON public.exchange_keys TO authenticated, service_role;
GRANT SELECT (id, kind, status, user_id, connection_id, exchange, attempts, run_at, created_at, started_at,
              finished_at, result, error)
    ON public.tradeeon_jobs TO authenticated, service_role;

-- What the service does for a user (shared/src/store/postgres.rs, `begin_user`): read and
-- upsert/soft-delete their connections, append to their audit log, read their health history.
GRANT USAGE ON SCHEMA public TO tradeeon_user, tradeeon_service;
-- The policies call auth.uid(). On Supabase `auth` belongs to Supabase and the grant may be
-- refused; then an operator grants it once (the service refuses to start until then, naming
-- the statement).
DO $$
BEGIN
    GRANT USAGE ON SCHEMA auth TO tradeeon_user, tradeeon_service;
    GRANT EXECUTE ON FUNCTION auth.uid() TO tradeeon_user, tradeeon_service;
EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
    RAISE WARNING 'could not grant the use of auth.uid() to tradeeon_user: %; run '
        '"GRANT USAGE ON SCHEMA auth TO tradeeon_user, tradeeon_service; '
        'GRANT EXECUTE ON FUNCTION auth.uid() TO tradeeon_user, tradeeon_service" as an administrator', SQLERRM;
END
$$;
GRANT SELECT ON public.users TO tradeeon_user;
GRANT SELECT, INSERT, UPDATE ON public.exchange_keys TO tradeeon_user;
GRANT SELECT, INSERT ON public.connection_audit_log TO tradeeon_user;
GRANT SELECT ON public.connection_health_history TO tradeeon_user;

-- What the workers and the service's own bookkeeping do. Audit rows stay append-only, and
-- connections are soft-deleted, so neither gets DELETE.
GRANT SELECT, INSERT, UPDATE ON public.users, public.exchange_keys, public.kraken_nonces TO tradeeon_service;
GRANT SELECT, INSERT ON public.connection_audit_log TO tradeeon_service;
GRANT SELECT, INSERT, DELETE ON public.connection_health_history TO tradeeon_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.tradeeon_jobs, public.health_sweeps TO tradeeon_service;
GRANT USAGE ON SCHEMA apalis TO tradeeon_service;
GRANT SELECT, INSERT, UPDATE, DELETE ON apalis.jobs, apalis.workers TO tradeeon_service;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA apalis TO tradeeon_service;
-- A later apalis release may add tables or functions when `tradeeon migrate` runs its setup.
ALTER DEFAULT PRIVILEGES IN SCHEMA apalis GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO tradeeon_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA apalis GRANT USAGE, SELECT ON SEQUENCES TO tradeeon_service;
ALTER DEFAULT PRIVILEGES IN SCHEMA apalis GRANT EXECUTE ON FUNCTIONS TO tradeeon_service;

-- On plain PostgreSQL the first migration created the `auth.users` stand-in, and the service
-- adds a user's row there on first sight (the store inserts it only when the profile's foreign
-- key says it is missing). On Supabase the table is not ours and the row always exists.
DO $$
BEGIN
    IF (SELECT relowner FROM pg_class WHERE oid = 'auth.users'::regclass)
       = (SELECT oid FROM pg_roles WHERE rolname = current_user) THEN
        GRANT SELECT, INSERT ON auth.users TO tradeeon_service;
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Row Level Security
------------------------------------------------------------------------------------------------

-- The policies that served the service's user-scoped path now name tradeeon_user; the REST
-- role keeps read-only ones.
ALTER POLICY users_own_row ON public.users TO tradeeon_user;
ALTER POLICY exchange_keys_own_rows ON public.exchange_keys TO tradeeon_user;
ALTER POLICY connection_audit_log_insert_own ON public.connection_audit_log TO tradeeon_user;
ALTER POLICY connection_audit_log_select_own ON public.connection_audit_log TO authenticated, tradeeon_user;
ALTER POLICY connection_health_history_select_own ON public.connection_health_history
    TO authenticated, tradeeon_user;

DROP POLICY IF EXISTS users_read_own ON public.users;
CREATE POLICY users_read_own ON public.users
    FOR SELECT TO authenticated
    USING (id = auth.uid());

DROP POLICY IF EXISTS exchange_keys_read_own ON public.exchange_keys;
CREATE POLICY exchange_keys_read_own ON public.exchange_keys
    FOR SELECT TO authenticated
    USING (user_id = auth.uid());

-- tradeeon_jobs_select_own (authenticated) stays as it was.

-- The service's worker path sees and writes every row (within its privileges above).
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'exchange_keys', 'connection_audit_log', 'connection_health_history',
                             'tradeeon_jobs', 'kraken_nonces', 'health_sweeps']
    LOOP
        EXECUTE format('DROP POLICY IF EXISTS %I ON public.%I', t || '_service', t);
        EXECUTE format('CREATE POLICY %I ON public.%I FOR ALL TO tradeeon_service USING (true) WITH CHECK (true)',
                       t || '_service', t);
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE public.%I FORCE ROW LEVEL SECURITY', t);
    END LOOP;
END
$$;

-- The service reads which migrations are applied (MIGRATE_ON_START as a non-owner).
DO $$
BEGIN
    IF to_regclass('public._tradeeon_migrations') IS NOT NULL THEN
        DROP POLICY IF EXISTS tradeeon_migrations_service_read ON public._tradeeon_migrations;
        CREATE POLICY tradeeon_migrations_service_read ON public._tradeeon_migrations
            FOR SELECT TO tradeeon_service USING (true);
    END IF;
END
$$;

------------------------------------------------------------------------------------------------
-- Audit rows outlive what they describe
------------------------------------------------------------------------------------------------

-- Deleting a connection row (connections are soft-deleted; only an operator would) keeps its
-- audit trail, which then names no connection. A user with audit rows cannot be deleted until
-- an operator removes those rows deliberately (e.g. for an erasure request, as the owner with
-- RLS unforced as above).
--
-- Health history and job records still go with their connection or user: they are operational
-- data, pruned by age anyway (HEALTH_HISTORY_RETENTION_DAYS, JOB_RETENTION_DAYS), and what
-- happened to a connection is in the audit log (connected, tested, rotated, revoked, ...).
ALTER TABLE public.connection_audit_log
    DROP CONSTRAINT IF EXISTS connection_audit_log_connection_id_fkey,
    DROP CONSTRAINT IF EXISTS connection_audit_log_user_id_fkey,
    ADD CONSTRAINT connection_audit_log_connection_id_fkey
        FOREIGN KEY (connection_id) REFERENCES public.exchange_keys (id) ON DELETE SET NULL,
    ADD CONSTRAINT connection_audit_log_user_id_fkey
        FOREIGN KEY (user_id) REFERENCES public.users (id) ON DELETE RESTRICT;
