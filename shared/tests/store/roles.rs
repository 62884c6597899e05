//! PostgreSQL only: who may do what once migrated as on Supabase.
//!
//! Each case builds a database the way a Supabase project looks before our first migration:
//! `anon`, `authenticated` and `service_role` exist, and default privileges give them ALL on
//! every table, sequence and function created in `public`. The tables' owner is a login role
//! that is not a superuser (Supabase's `postgres`, RDS's master user are not), and it migrates.
//! The service then connects as a second login role that `tradeeon migrate` provisions from
//! DATABASE_APP_URL. Superusers bypass every check below, so no case acts as one.

use std::future::Future;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};
use tradeeon_shared::domain::{AuditAction, ConnectionId, ConnectionStatus, Exchange, UserId};
use tradeeon_shared::jobs::{JobPayload, NewJob};
use tradeeon_shared::store::{AuditEntryInput, HealthRecord, StatusUpdate, Store, StoreError, UserContext};

use crate::harness::{admin_url, creds, new_connection, new_user, with_postgres_database};

/// Everything a case gets: the owner's and the service's stores, a superuser pool to look
/// behind RLS, and two users with a connection, audit rows and health history each.
struct Supabase {
    owner: Store,
    app: Store,
    superuser: PgPool,
    /// The database's URL as the owner (no password: the test cluster trusts loopback).
    url: url::Url,
    owner_role: String,
    app_role: String,
    alice: UserContext,
    bob: UserContext,
    alice_conn: ConnectionId,
    bob_conn: ConnectionId,
}

fn unique_role() -> String {
    // `tradeeon_test_<ulid>`: the harness drops such roles left behind by a killed run.
    format!("tradeeon_test_{}", ulid::Ulid::generate().to_string().to_lowercase())
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned())
}

fn store_sqlstate(err: &StoreError) -> Option<String> {
    match err {
        StoreError::Database(db) => sqlstate(db),
        _ => None,
    }
}

/// Creates the owner login role (CREATEROLE, as Supabase's `postgres` and RDS's master user
/// have), runs `case` on a Supabase-like database it owns, then drops the roles again.
async fn supabase_like<F, Fut>(case: F)
where
    F: FnOnce(Supabase) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let owner_role = unique_role();
    let app_role = unique_role();
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    // Cluster-wide and shared with tests running in parallel: created once, race-safe.
    sqlx::raw_sql(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
                 CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
                 CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
                 CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE ROLE {owner_role} LOGIN CREATEROLE"))).execute(&mut admin).await.unwrap();

    let (owner_in_body, app_in_body) = (owner_role.clone(), app_role.clone());
    let outcome = tokio::spawn(with_postgres_database(move |url| async move {
        let (owner_role, app_role) = (owner_in_body, app_in_body);
        let mut url = url::Url::parse(&url).unwrap();
        let db = url.path().trim_start_matches('/').to_owned();
        let superuser = PgPool::connect(url.as_str()).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER DATABASE {db} OWNER TO {owner_role};
             GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
             ALTER DEFAULT PRIVILEGES FOR ROLE {owner_role} IN SCHEMA public
                 GRANT ALL ON TABLES TO anon, authenticated, service_role;
             ALTER DEFAULT PRIVILEGES FOR ROLE {owner_role} IN SCHEMA public
                 GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
             ALTER DEFAULT PRIVILEGES FOR ROLE {owner_role} IN SCHEMA public
                 GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;"
        )))
        .execute(&superuser)
        .await
        .unwrap();

        url.set_username(&owner_role).unwrap();
        let owner = Store::connect(url.as_str(), 2).await.unwrap();
        owner.migrate().await.expect("the owner migrates");
        let mut app_url = url.clone();
        app_url.set_username(&app_role).unwrap();
        app_url.set_password(Some("App-pass-1234")).unwrap();
        let provisioned = owner.provision_service_login(app_url.as_str()).await.expect("provision the service login");
        assert_eq!(provisioned, app_role);
        let app = Store::connect(app_url.as_str(), 3).await.unwrap();

        let mut users = Vec::new();
        for tag in ["a", "b"] {
            let user = new_user();
            app.ensure_user(&user).await.unwrap();
            let conn = app
                .upsert_connection(
                    &user,
                    new_connection(Exchange::Binance, tag),
                    Some(AuditEntryInput::new(AuditAction::Connected)),
                )
                .await
                .unwrap();
            app.record_health(HealthRecord {
                connection_id: conn.id,
                checked_at: chrono::Utc::now(),
                status: ConnectionStatus::Connected,
                code: None,
                latency_ms: Some(5),
                message: None,
            })
            .await
            .unwrap();
            users.push((user, conn.id));
        }
        let (bob, bob_conn) = users.pop().unwrap();
        let (alice, alice_conn) = users.pop().unwrap();
        let setup = Supabase {
            owner: owner.clone(),
            app: app.clone(),
            superuser: superuser.clone(),
            url: url.clone(),
            owner_role,
            app_role,
            alice,
            bob,
            alice_conn,
            bob_conn,
        };
        case(setup).await;
        app.close().await;
        owner.close().await;
        superuser.close().await;
    }))
    .await;
    for role in [&app_role, &owner_role] {
        let _ = sqlx::query(AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}"))).execute(&mut admin).await;
    }
    let _ = admin.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// What PostgREST does for a request: `SET LOCAL ROLE` and, for a signed-in user, the claims.
async fn as_rest(pool: &PgPool, role: &str, user: Option<UserId>) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("SET LOCAL ROLE {role}"))).execute(&mut *tx).await.unwrap();
    if let Some(user) = user {
        let claims = format!(r#"{{"sub":"{user}","role":"{role}"}}"#);
        sqlx::query("SELECT set_config('request.jwt.claims', $1, true)").bind(claims).execute(&mut *tx).await.unwrap();
    }
    tx
}

/// Runs `sql` as a REST role and returns the SQLSTATE it failed with (`None`: it succeeded).
async fn rest_attempt(pool: &PgPool, role: &str, user: Option<UserId>, sql: &str) -> Option<String> {
    let mut tx = as_rest(pool, role, user).await;
    let outcome = sqlx::query(AssertSqlSafe(sql.to_owned())).execute(&mut *tx).await;
    drop(tx); // rolled back: an attempt that succeeded changes nothing for the next one
    outcome.err().map(|e| sqlstate(&e).unwrap_or_else(|| e.to_string()))
}

/// Every table in `public` and `apalis`: what our and apalis's migrations created.
async fn all_tables(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname IN ('public', 'apalis') AND c.relkind IN ('r', 'p') ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `anon` and a signed-in `authenticated` can neither INSERT, UPDATE, DELETE nor TRUNCATE any
/// table our migrations (or apalis's) created, although Supabase's default privileges granted
/// them ALL; `anon` cannot even read.
async fn rest_roles_cannot_write_any_table(s: Supabase) {
    let tables = all_tables(&s.superuser).await;
    let names: Vec<&str> = tables.iter().map(|(_, t)| t.as_str()).collect();
    for expected in [
        "users",
        "exchange_keys",
        "connection_audit_log",
        "connection_health_history",
        "tradeeon_jobs",
        "kraken_nonces",
        "health_sweeps",
        "_tradeeon_migrations",
        "jobs",
        "workers",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    for (schema, table) in &tables {
        let table = format!("{schema}.{table}");
        for (role, user) in [("anon", None), ("authenticated", Some(s.alice.user_id))] {
            for privilege in ["INSERT", "UPDATE", "DELETE", "TRUNCATE"] {
                let held: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2, $3)")
                    .bind(role)
                    .bind(&table)
                    .bind(privilege)
                    .fetch_one(&s.superuser)
                    .await
                    .unwrap();
                assert!(!held, "{role} holds {privilege} on {table}");
            }
            // And the statements themselves, as PostgREST would send them.
            for sql in [
                format!("INSERT INTO {table} DEFAULT VALUES"),
                format!("DELETE FROM {table}"),
                format!("TRUNCATE {table}"),
            ] {
                let failed = rest_attempt(&s.superuser, role, user, &sql).await;
                // 42501 insufficient_privilege; for `apalis`, 42501 on the schema already.
                assert_eq!(failed.as_deref(), Some("42501"), "{role}: {sql}");
            }
        }
        let failed = rest_attempt(&s.superuser, "anon", None, &format!("SELECT 1 FROM {table}")).await;
        assert_eq!(failed.as_deref(), Some("42501"), "anon reads {table}");
    }
    for sql in [
        "UPDATE public.exchange_keys SET status = 'connected', permissions = '{\"withdraw\": false}'",
        "UPDATE public.users SET email = 'taken@example.com'",
        "UPDATE public.tradeeon_jobs SET status = 'done'",
    ] {
        let failed = rest_attempt(&s.superuser, "authenticated", Some(s.alice.user_id), sql).await;
        assert_eq!(failed.as_deref(), Some("42501"), "{sql}");
    }
    // Functions in `public` are REST endpoints (/rpc/…): none of ours is callable.
    let callable: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND (has_function_privilege('anon', p.oid, 'EXECUTE')
                                         OR has_function_privilege('authenticated', p.oid, 'EXECUTE'))
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')",
    )
    .fetch_all(&s.superuser)
    .await
    .unwrap();
    assert_eq!(callable, Vec::<String>::new());
}

/// The attacks the review named, through the REST roles: reserve someone else's email, forge
/// an audit row, erase a connection's audit trail; and the portal's reads that remain.
async fn rest_roles_cannot_take_emails_forge_or_erase_audit(s: Supabase) {
    let pool = &s.superuser;
    let alice = s.alice.user_id;
    let victim = new_user();
    let reserve = format!(
        "INSERT INTO public.users (id, email) VALUES ('{alice}', '{}')
         ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email",
        victim.email.as_deref().unwrap()
    );
    let forge = format!(
        "INSERT INTO public.connection_audit_log (user_id, connection_id, action) VALUES ('{alice}', '{}', 'rotated')",
        s.alice_conn
    );
    let erase = format!("DELETE FROM public.exchange_keys WHERE id = '{}'", s.alice_conn);
    let erase_audit = "DELETE FROM public.connection_audit_log".to_owned();
    for sql in [&reserve, &forge, &erase, &erase_audit] {
        let failed = rest_attempt(pool, "authenticated", Some(alice), sql).await;
        assert_eq!(failed.as_deref(), Some("42501"), "{sql}");
    }
    // The victim can still sign up with their email.
    s.app.ensure_user(&victim).await.expect("the email is still free");

    // Reads: her own rows, without ciphertext.
    let mut tx = as_rest(pool, "authenticated", Some(alice)).await;
    let own: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT user_id FROM public.exchange_keys")
        .fetch_all(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("column-limited SELECT * must fail, but a listed column not: {e}"));
    assert_eq!(own, vec![alice.0]);
    let audit: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT user_id FROM public.connection_audit_log").fetch_all(&mut *tx).await.unwrap();
    assert_eq!(audit, vec![alice.0]);
    drop(tx);
    for sql in [
        "SELECT api_key_encrypted FROM public.exchange_keys",
        "SELECT * FROM public.exchange_keys",
        "SELECT payload FROM public.tradeeon_jobs",
    ] {
        let mut tx = as_rest(pool, "authenticated", Some(alice)).await;
        let err = sqlx::query(sql).fetch_all(&mut *tx).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err}");
    }

    // Nothing changed behind RLS.
    let trail: i64 = sqlx::query_scalar("SELECT count(*) FROM public.connection_audit_log WHERE connection_id = $1")
        .bind(s.alice_conn.0)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(trail, 1);
    assert!(s.app.get_connection(&s.alice, s.alice_conn).await.unwrap().is_some());
}

/// RLS is forced: a connection as the tables' owner (say, DATABASE_URL left at the migration
/// user) sees no row and writes none, and the service refuses to start as it.
async fn owner_connection_sees_no_rows(s: Supabase) {
    let pool = s.owner.pg_pool().unwrap();
    for table in [
        "users",
        "exchange_keys",
        "connection_audit_log",
        "connection_health_history",
        "tradeeon_jobs",
        "kraken_nonces",
        "health_sweeps",
    ] {
        let behind: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM public.{table}")))
            .fetch_one(&s.superuser)
            .await
            .unwrap();
        let seen: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM public.{table}")))
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(seen, 0, "the owner sees {table} (it holds {behind})");
    }
    assert!(s.owner.load_credentials(s.alice_conn).await.unwrap().is_none());
    let updated = sqlx::query("UPDATE public.exchange_keys SET status = 'error'").execute(pool).await.unwrap();
    assert_eq!(updated.rows_affected(), 0);
    let err = s.owner.ensure_user(&new_user()).await.unwrap_err();
    assert_eq!(store_sqlstate(&err).as_deref(), Some("42501"), "row level security refuses the row: {err:?}");

    let err = s.owner.check_service_role().await.unwrap_err();
    assert!(matches!(&err, StoreError::ConnectsAsOwner { role } if *role == s.owner_role), "{err:?}");
    assert!(err.to_string().contains("tradeeon_service"), "{err}");
}

/// The service's login role: a member of tradeeon_service, owner of nothing. It serves users
/// (under RLS, as tradeeon_user) and the workers (every row), and cannot change the schema.
async fn service_login_serves_users_and_workers_but_not_the_schema(s: Supabase) {
    let app = &s.app;
    app.check_service_role().await.expect("the service role passes the start check");
    app.migrate_on_start().await.expect("MIGRATE_ON_START with nothing to apply is fine as a non-owner");

    // User path: each user sees their own.
    let kraken = app.upsert_connection(&s.alice, new_connection(Exchange::Kraken, "k"), None).await.unwrap();
    let listed: Vec<ConnectionId> = app.list_connections(&s.alice).await.unwrap().iter().map(|c| c.id).collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&kraken.id) && listed.contains(&s.alice_conn));
    assert_eq!(app.get_connection(&s.alice, s.bob_conn).await.unwrap(), None);
    assert_eq!(app.list_audit(&s.bob, 10, None).await.unwrap().len(), 1);
    assert_eq!(app.list_health_history(&s.alice, s.alice_conn, 10, None).await.unwrap().len(), 1);
    app.revoke_connection(&s.alice, kraken.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();

    // Worker path: every user's rows.
    for id in [s.alice_conn, s.bob_conn] {
        let (record, _, version) = app.load_credentials(id).await.unwrap().expect("the worker sees it");
        let update = StatusUpdate {
            status: ConnectionStatus::Degraded,
            status_message: Some("slow".into()),
            latency_ms: Some(900),
            permissions: None,
            consecutive_failures: 1,
            checked_at: chrono::Utc::now(),
            credentials_version: version,
        };
        assert!(crate::harness::record_check(app, record.id, update).await);
    }
    let job = NewJob::new(
        s.bob.user_id,
        Exchange::Binance,
        JobPayload::Test { exchange: Exchange::Binance, credentials: creds("j"), requested_by: None },
    );
    app.enqueue_job(&job).await.unwrap().expect("enqueued");
    assert!(app.claim_job(job.id).await.unwrap().is_some(), "claimed");
    let slot = chrono::Utc::now();
    assert!(app.claim_sweep(slot, "worker-1").await.unwrap());
    assert!(app.complete_sweep(slot).await.unwrap());
    let lease = app.lease_kraken_nonce("0123456789abcdef").await.unwrap().expect("a lease on PostgreSQL");
    assert!(lease.nonce() > 0);
    drop(lease);
    assert_eq!(app.prune_health_history(chrono::Utc::now() - chrono::Duration::days(1)).await.unwrap(), 0);

    // Not the schema.
    let pool = app.pg_pool().unwrap();
    for sql in [
        "ALTER TABLE public.exchange_keys ADD COLUMN sneaky text",
        "ALTER TABLE public.connection_audit_log DISABLE ROW LEVEL SECURITY",
        "DROP POLICY exchange_keys_service ON public.exchange_keys",
        "DROP TABLE public.connection_audit_log",
        "CREATE TABLE public.sneaky (id int)",
        "DELETE FROM public.connection_audit_log",
        "DELETE FROM public.exchange_keys",
    ] {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{sql}: {err}");
    }

    // With the service's policies gone, its rows are gone: the policy, not ownership or
    // BYPASSRLS, is what shows them.
    sqlx::query("DROP POLICY exchange_keys_service ON public.exchange_keys").execute(&s.superuser).await.unwrap();
    assert!(app.load_credentials(s.alice_conn).await.unwrap().is_none());
    let _ = &s.app_role;
}

/// A login role that is neither the owner nor in tradeeon_service is told what to grant, and
/// MIGRATE_ON_START as a non-owner with a migration pending says to run `tradeeon migrate`.
async fn start_checks_name_the_fix(s: Supabase) {
    let stranger = unique_role();
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE ROLE {stranger} LOGIN"))).execute(&mut admin).await.unwrap();
    let mut url = s.url.clone();
    url.set_username(&stranger).unwrap();
    let stranger_in_body = stranger.clone();
    let outcome = async move {
        let stranger = stranger_in_body;
        let store = Store::connect(url.as_str(), 1).await.unwrap();
        let err = store.check_service_role().await.unwrap_err();
        assert!(matches!(&err, StoreError::NotServiceMember { role } if *role == stranger), "{err:?}");
        store.close().await;

        // The last migration is "not applied yet".
        sqlx::query("DELETE FROM public._tradeeon_migrations WHERE version = (SELECT max(version) FROM public._tradeeon_migrations)")
            .execute(&s.superuser)
            .await
            .unwrap();
        let err = s.app.migrate_on_start().await.unwrap_err();
        assert!(matches!(&err, StoreError::MigrationsPending { role } if *role == s.app_role), "{err:?}");
        assert!(err.to_string().contains("tradeeon migrate"), "{err}");
    };
    let result = tokio::spawn(outcome).await;
    let _ = sqlx::query(AssertSqlSafe(format!("DROP ROLE IF EXISTS {stranger}"))).execute(&mut admin).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}

/// The provisioned login's password is stored as a SCRAM verifier, never in clear text, and a
/// second provisioning (the next deploy) only resets it. DATABASE_APP_URL may not name the owner.
async fn provisioning_stores_a_verifier_and_refuses_the_owner(s: Supabase) {
    let stored: Option<String> = sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
        .bind(&s.app_role)
        .fetch_one(&s.superuser)
        .await
        .unwrap();
    let stored = stored.expect("a password is set");
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    assert!(!stored.contains("App-pass-1234"));

    let mut url = s.url.clone();
    url.set_password(Some("Other-pass-5678")).unwrap();
    url.set_username(&s.app_role).unwrap();
    s.owner.provision_service_login(url.as_str()).await.expect("again, new password");
    let again: Option<String> = sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
        .bind(&s.app_role)
        .fetch_one(&s.superuser)
        .await
        .unwrap();
    assert_ne!(again.as_deref(), Some(stored.as_str()));

    url.set_username(&s.owner_role).unwrap();
    let err = s.owner.provision_service_login(url.as_str()).await.unwrap_err();
    assert!(matches!(err, StoreError::AppRole(_)), "{err:?}");
}

macro_rules! supabase_cases {
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn postgres() {
                super::supabase_like(super::$case).await;
            }
        }
    )+};
}

supabase_cases!(
    rest_roles_cannot_write_any_table,
    rest_roles_cannot_take_emails_forge_or_erase_audit,
    owner_connection_sees_no_rows,
    service_login_serves_users_and_workers_but_not_the_schema,
    start_checks_name_the_fix,
    provisioning_stores_a_verifier_and_refuses_the_owner,
);

/// Deleting a connection keeps its audit rows (naming no connection now); a user with audit
/// rows cannot be deleted. Both backends; done behind the service's back, as an operator would.
async fn audit_rows_outlive_their_connection_and_user(store: Store) {
    let alice = crate::harness::user(&store).await;
    let conn = store
        .upsert_connection(
            &alice,
            new_connection(Exchange::Coinbase, "c"),
            Some(AuditEntryInput::new(AuditAction::Connected)),
        )
        .await
        .unwrap();
    store.revoke_connection(&alice, conn.id, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap();
    let id = conn.id.to_string();
    let user = alice.user_id.to_string();
    if let Some(pool) = store.pg_pool() {
        sqlx::query("DELETE FROM public.exchange_keys WHERE id = $1").bind(conn.id.0).execute(pool).await.unwrap();
        let err = sqlx::query("DELETE FROM public.users WHERE id = $1").bind(alice.user_id.0).execute(pool).await;
        assert_eq!(sqlstate(&err.unwrap_err()).as_deref(), Some("23503"), "a user with audit rows stays");
    } else {
        let pool = store.sqlite_pool().unwrap();
        sqlx::query("DELETE FROM exchange_keys WHERE id = ?1").bind(&id).execute(pool).await.unwrap();
        let err = sqlx::query("DELETE FROM users WHERE id = ?1").bind(&user).execute(pool).await.unwrap_err();
        assert!(err.to_string().contains("FOREIGN KEY"), "a user with audit rows stays: {err}");
    }
    let trail = store.list_audit(&alice, 10, None).await.unwrap();
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert!(trail.iter().any(|e| e.action == AuditAction::Connected), "{trail:?}");
    assert!(trail.iter().any(|e| e.action == AuditAction::Revoked), "{trail:?}");
    assert!(trail.iter().all(|e| e.connection_id.is_none()), "{trail:?}");
}

contract!(audit_rows_outlive_their_connection_and_user);
