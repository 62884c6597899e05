//! PostgreSQL only: Row Level Security, and the migrations' Supabase compatibility.

use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use tradeeon_shared::domain::{AuditAction, ConnectionId, Exchange, Features, UserId};
use tradeeon_shared::store::{AuditEntryInput, HealthRecord, Store, StoreError, UserContext};

use crate::harness::{new_connection, user, with_postgres_database};

/// What the store's user scope does (`begin_user`), on a raw connection.
async fn as_user(pool: &PgPool, user: Option<UserId>) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE tradeeon_user").execute(&mut *tx).await.unwrap();
    if let Some(user) = user {
        let claims = format!(r#"{{"sub":"{user}","role":"authenticated"}}"#);
        sqlx::query("SELECT set_config('request.jwt.claims', $1, true)").bind(claims).execute(&mut *tx).await.unwrap();
    }
    tx
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned())
}

/// Alice and Bob each with a connection, an audit row and a health record.
async fn seed(store: &Store) -> (UserContext, UserContext, ConnectionId, ConnectionId) {
    let alice = user(store).await;
    let bob = user(store).await;
    let mut ids = Vec::new();
    for u in [&alice, &bob] {
        let c = store
            .upsert_connection(
                u,
                new_connection(Exchange::Binance, "x"),
                Some(AuditEntryInput::new(AuditAction::Connected)),
            )
            .await
            .unwrap();
        store
            .record_health(HealthRecord {
                connection_id: c.id,
                checked_at: chrono::Utc::now(),
                status: tradeeon_shared::domain::ConnectionStatus::Connected,
                code: None,
                latency_ms: None,
                message: None,
            })
            .await
            .unwrap();
        ids.push(c.id);
    }
    (alice, bob, ids[0], ids[1])
}

async fn rls_limits_reads_to_the_claimed_user(store: Store) {
    let (alice, _bob, alice_conn, _) = seed(&store).await;
    let pool = store.pg_pool().unwrap();
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    for table in ["exchange_keys", "connection_audit_log"] {
        let owners: Vec<uuid::Uuid> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT user_id FROM public.{table}")))
                .fetch_all(&mut *tx)
                .await
                .unwrap();
        assert_eq!(owners, vec![alice.user_id.0], "{table}");
    }
    let users: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM public.users").fetch_all(&mut *tx).await.unwrap();
    assert_eq!(users, vec![alice.user_id.0]);
    let history: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT connection_id FROM public.connection_health_history")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(history, vec![alice_conn.0]);
    drop(tx);

    // With the role but without claims, nothing is visible.
    let mut tx = as_user(pool, None).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.exchange_keys").fetch_one(&mut *tx).await.unwrap();
    assert_eq!(n, 0);
}

async fn rls_rejects_writes_for_another_user(store: Store) {
    let (alice, bob, alice_conn, bob_conn) = seed(&store).await;
    let pool = store.pg_pool().unwrap();

    // Alice cannot create a connection for Bob...
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    let err = sqlx::query(
        "INSERT INTO public.exchange_keys (user_id, exchange, api_key_encrypted, api_secret_encrypted)
         VALUES ($1, 'kraken', 'k', 's')",
    )
    .bind(bob.user_id.0)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    drop(tx);

    // ...nor give him one of hers...
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    let err = sqlx::query("UPDATE public.exchange_keys SET user_id = $1 WHERE id = $2")
        .bind(bob.user_id.0)
        .bind(alice_conn.0)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    drop(tx);

    // ...and Bob's rows are invisible to her updates; nobody deletes (connections are
    // soft-deleted).
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    let touched = sqlx::query("UPDATE public.exchange_keys SET nickname = 'mine' WHERE id = $1")
        .bind(bob_conn.0)
        .execute(&mut *tx)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(touched, 0);
    tx.commit().await.unwrap();
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    let err = sqlx::query("DELETE FROM public.exchange_keys WHERE id = $1")
        .bind(alice_conn.0)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "no DELETE privilege: {err}");
    drop(tx);

    // Audit rows: not for Bob, not about Bob's connection, and her own are append-only.
    for (user_id, connection_id) in [(bob.user_id.0, None), (alice.user_id.0, Some(bob_conn.0))] {
        let mut tx = as_user(pool, Some(alice.user_id)).await;
        let err = sqlx::query(
            "INSERT INTO public.connection_audit_log (user_id, connection_id, action) VALUES ($1, $2, 'tested')",
        )
        .bind(user_id)
        .bind(connection_id)
        .execute(&mut *tx)
        .await
        .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    }
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    sqlx::query("INSERT INTO public.connection_audit_log (user_id, connection_id, action) VALUES ($1, $2, 'tested')")
        .bind(alice.user_id.0)
        .bind(alice_conn.0)
        .execute(&mut *tx)
        .await
        .expect("own audit row");
    let err = sqlx::query("DELETE FROM public.connection_audit_log").execute(&mut *tx).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "no DELETE privilege: {err}");
    drop(tx);

    // Health history is read-only for users.
    let mut tx = as_user(pool, Some(alice.user_id)).await;
    let err =
        sqlx::query("INSERT INTO public.connection_health_history (connection_id, status) VALUES ($1, 'connected')")
            .bind(alice_conn.0)
            .execute(&mut *tx)
            .await
            .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    drop(tx);

    // The store still sees everything as it was.
    assert_eq!(store.list_connections(&bob).await.unwrap().len(), 1);
    assert_eq!(store.list_audit(&bob, 10, None).await.unwrap().len(), 1);
}

/// The store's user-scoped methods really run as `tradeeon_user` under RLS: take the role's
/// privilege away and they fail; make the policy deny everything and they see nothing — while the
/// service path (here a superuser, which RLS never restricts) is unaffected.
async fn store_user_path_runs_under_rls(store: Store) {
    let (alice, _bob, alice_conn, _) = seed(&store).await;
    let pool = store.pg_pool().unwrap();

    sqlx::query("ALTER POLICY exchange_keys_own_rows ON public.exchange_keys USING (false)")
        .execute(pool)
        .await
        .unwrap();
    assert!(store.list_connections(&alice).await.unwrap().is_empty());
    assert_eq!(store.get_connection(&alice, alice_conn).await.unwrap(), None);
    let err =
        store.revoke_connection(&alice, alice_conn, AuditEntryInput::new(AuditAction::Revoked)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(store.load_credentials(alice_conn).await.unwrap().is_some(), "service path bypasses RLS");

    sqlx::query("REVOKE SELECT ON public.connection_audit_log FROM tradeeon_user").execute(pool).await.unwrap();
    let err = store.list_audit(&alice, 10, None).await.unwrap_err();
    let StoreError::Database(db) = &err else { panic!("{err:?}") };
    assert_eq!(sqlstate(db).as_deref(), Some("42501"), "{db}");
}

/// On Supabase `auth.users`, `auth.uid()` and the roles already exist (and are not ours): the
/// migration must use them as they are.
#[tokio::test]
async fn migrations_leave_existing_supabase_objects_alone() {
    with_postgres_database(|url| async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE SCHEMA auth;
             CREATE TABLE auth.users (id uuid PRIMARY KEY, email text, aud varchar(255),
                                      raw_app_meta_data jsonb);
             CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
                 SELECT coalesce(
                     nullif(current_setting('request.jwt.claim.sub', true), ''),
                     (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
                 )::uuid $$;
             COMMENT ON FUNCTION auth.uid() IS 'supabase original';",
        )
        .execute(&mut conn)
        .await
        .unwrap();

        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let pool = store.pg_pool().unwrap();
        let comment: Option<String> =
            sqlx::query_scalar("SELECT obj_description('auth.uid()'::regprocedure)").fetch_one(pool).await.unwrap();
        assert_eq!(comment.as_deref(), Some("supabase original"));
        let columns: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'auth' AND table_name = 'users'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(columns, 4);

        // The legacy claim setting is honoured too, as on Supabase.
        let alice = user(&store).await;
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
            .bind(alice.user_id.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        let uid: Option<uuid::Uuid> = sqlx::query_scalar("SELECT auth.uid()").fetch_one(&mut *tx).await.unwrap();
        assert_eq!(uid, Some(alice.user_id.0));
        drop(tx);

        // ensure_user does not write auth.users on Supabase when the row is there already.
        let bob = crate::harness::new_user();
        sqlx::query("INSERT INTO auth.users (id, email, aud) VALUES ($1, $2, 'authenticated')")
            .bind(bob.user_id.0)
            .bind(bob.email.as_deref())
            .execute(pool)
            .await
            .unwrap();
        store.ensure_user(&bob).await.unwrap();
        let aud: Option<String> = sqlx::query_scalar("SELECT aud FROM auth.users WHERE id = $1")
            .bind(bob.user_id.0)
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(aud.as_deref(), Some("authenticated"));
        store.upsert_connection(&bob, new_connection(Exchange::Kraken, "b"), None).await.unwrap();
        store.close().await;
        conn.close().await.unwrap();
    })
    .await;
}

/// A database created by the seed (Python) app: `users` and `exchange_keys` exist with the seed's
/// columns, features kept in `permissions`. The migration adopts and extends them.
#[tokio::test]
async fn migrations_adopt_the_seed_schema() {
    with_postgres_database(|url| async move {
        let user_id = uuid::Uuid::new_v4();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA auth;
             CREATE TABLE auth.users (id uuid PRIMARY KEY, email text);
             CREATE TABLE public.users (
                 id UUID REFERENCES auth.users(id) PRIMARY KEY,
                 email TEXT UNIQUE NOT NULL, full_name TEXT, avatar_url TEXT,
                 timezone TEXT DEFAULT 'UTC',
                 created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
                 updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW());
             CREATE TABLE public.exchange_keys (
                 id UUID DEFAULT gen_random_uuid() PRIMARY KEY,
                 user_id UUID REFERENCES public.users(id) ON DELETE CASCADE NOT NULL,
                 exchange TEXT NOT NULL CHECK (exchange IN ('binance', 'zerodha', 'coinbase', 'kraken')),
                 api_key_encrypted TEXT NOT NULL, api_secret_encrypted TEXT NOT NULL,
                 passphrase_encrypted TEXT, is_active BOOLEAN DEFAULT true,
                 permissions JSONB DEFAULT '{{}}',
                 created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
                 updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
                 UNIQUE(user_id, exchange));
             INSERT INTO auth.users (id, email) VALUES ('{user_id}', 'seed@example.com');
             INSERT INTO public.users (id, email) VALUES ('{user_id}', 'seed@example.com');
             INSERT INTO public.exchange_keys (user_id, exchange, api_key_encrypted, api_secret_encrypted, permissions)
             VALUES ('{user_id}', 'binance', 'gAAAA-k', 'gAAAA-s', '{{\"trading\": true, \"wallet\": false, \"paper\": true}}');"
        )))
        .execute(&mut conn)
        .await
        .unwrap();

        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let seed_user = UserContext { user_id: UserId(user_id), email: Some("seed@example.com".into()) };
        let listed = store.list_connections(&seed_user).await.unwrap();
        assert_eq!(listed.len(), 1);
        let record = &listed[0];
        assert_eq!(record.features, Features { trading: true, wallet: false, paper: true });
        assert_eq!(record.permissions, None);
        assert_eq!(record.credentials_version, 1);
        assert_eq!(record.api_key_hint, None);
        assert_eq!(record.status, tradeeon_shared::domain::ConnectionStatus::Pending);
        let (_, creds, _) = store.load_credentials(record.id).await.unwrap().unwrap();
        assert_eq!(creds.api_key, "gAAAA-k");
        store.close().await;
        conn.close().await.unwrap();
    })
    .await;
}

postgres_only!(
    rls_limits_reads_to_the_claimed_user,
    rls_rejects_writes_for_another_user,
    store_user_path_runs_under_rls,
);

/// Supabase's `postgres` user is not a superuser. A non-superuser owner without CREATEROLE can
/// migrate when an administrator created the service's roles beforehand; the service then
/// refuses to run as that owner, which forced RLS would show no rows.
#[tokio::test]
async fn non_superuser_owner_can_migrate_when_the_roles_exist() {
    let role = format!("tradeeon_test_{}", ulid::Ulid::generate().to_string().to_lowercase());
    let admin_url = crate::harness::admin_url();
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    // The roles are cluster-wide; make sure they exist (other tests may not have run yet).
    sqlx::raw_sql(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
                 CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
                 CREATE ROLE service_role NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
                 CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tradeeon_user') THEN
                 CREATE ROLE tradeeon_user NOLOGIN NOINHERIT; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tradeeon_service') THEN
                 CREATE ROLE tradeeon_service NOLOGIN; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             IF NOT pg_has_role('tradeeon_service', 'tradeeon_user', 'MEMBER') THEN
                 GRANT tradeeon_user TO tradeeon_service; END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN"))).execute(&mut admin).await.unwrap();

    let role_in_body = role.clone();
    let outcome = tokio::spawn(with_postgres_database(move |url| async move {
        let role = role_in_body;
        let mut url = url::Url::parse(&url).unwrap();
        let db = url.path().trim_start_matches('/').to_owned();
        let mut superuser = PgConnection::connect(url.as_str()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {db} OWNER TO {role}")))
            .execute(&mut superuser)
            .await
            .unwrap();
        url.set_username(&role).unwrap();
        url.set_password(None).unwrap();

        let store = Store::connect(url.as_str(), 2).await.unwrap();
        store.migrate().await.expect("a non-superuser owner can migrate");
        store.migrate().await.expect("re-run is a no-op");
        store.migrate_on_start().await.expect("the owner may migrate on start");
        let err = store.check_service_role().await.unwrap_err();
        assert!(matches!(err, StoreError::ConnectsAsOwner { .. }), "{err:?}");
        let err = store.ensure_user(&crate::harness::new_user()).await.unwrap_err();
        let StoreError::Database(db_err) = &err else { panic!("{err:?}") };
        assert_eq!(sqlstate(db_err).as_deref(), Some("42501"), "forced RLS: {db_err}");
        store.close().await;
        superuser.close().await.unwrap();
    }))
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}"))).execute(&mut admin).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}
