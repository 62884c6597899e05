//! `DATABASE_URL` with `sslmode=verify-full`, against a PostgreSQL that speaks TLS: a throwaway
//! cluster of the installed server on a free loopback port, with a certificate authority and a
//! server certificate for `localhost` made here. Its `pg_hba.conf` admits TLS connections only,
//! so every pool the store opens that works at all is encrypted.
//!
//! Needs the PostgreSQL server binaries (`/usr/lib/postgresql/<version>/bin`, as `scripts/test`
//! installs them) and, when the tests run as root, the `postgres` user (`initdb` refuses root).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tradeeon_shared::domain::Exchange;
use tradeeon_shared::store::{Backend, Store, StoreError};

use crate::harness::{new_connection, user};

/// A certificate authority: its certificate (PEM) and what it takes to sign with it.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Authority { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate naming `host` (a DNS name), and its private key, both PEM.
    fn server_certificate(&self, host: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key.serialize_pem())
    }
}

/// A PostgreSQL cluster in a temporary directory, stopped (immediately) when dropped.
struct TlsPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl TlsPostgres {
    /// `initdb`, TLS with `certificate` and `key`, TLS-only `pg_hba.conf`, then start.
    fn start(certificate: &str, key: &str) -> TlsPostgres {
        let bin = server_binaries();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::write(dir.path().join("server.crt"), certificate).unwrap();
        fs::write(dir.path().join("server.key"), key).unwrap();
        fs::set_permissions(dir.path().join("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
        if running_as_root() {
            // initdb refuses root: the cluster (and the files it reads) belong to `postgres`.
            let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "could not give the cluster directory to the postgres user");
        }
        let initdb = as_cluster_owner(&bin.join("initdb"))
            .args(["--auth=trust", "--username=postgres", "--encoding=UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert_success("initdb", &initdb);

        let port = free_port();
        let dir_text = dir.path().display();
        let mut conf = fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir_text}'\n\
             ssl = on\nssl_cert_file = '{dir_text}/server.crt'\nssl_key_file = '{dir_text}/server.key'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 40\n"
        ));
        fs::write(data.join("postgresql.conf"), conf).unwrap();
        // TLS or nothing: a connection without it finds no matching line and is refused.
        fs::write(data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.1/32 trust\n").unwrap();

        let server = TlsPostgres { dir, bin, port };
        let started = as_cluster_owner(&server.bin.join("pg_ctl"))
            .args(["-w", "-t", "30", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(server.dir.path().join("server.log"))
            .arg("start")
            .output()
            .expect("run pg_ctl start");
        if !started.status.success() {
            let log = fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default();
            panic!("pg_ctl start failed: {}\n{log}", String::from_utf8_lossy(&started.stderr));
        }
        server
    }

    /// `DATABASE_URL` for `host` (which must reach loopback) with the given TLS parameters. The
    /// password is unused (trust) and must never show in an error.
    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres:hunter2@{host}:{}/postgres?{query}", self.port)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_cluster_owner(&self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

/// The newest installed server's `bin` directory.
fn server_binaries() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect(
            "the PostgreSQL server binaries are not installed under /usr/lib/postgresql (scripts/test installs them)",
        )
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().expect("no /usr/lib/postgresql/<version>/bin/initdb").1
}

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program` as the user that may own a cluster: ourselves, or `postgres` when we are root.
fn as_cluster_owner(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The error and all its causes on one line.
fn chain(err: &StoreError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Whether the connection a pool hands out is encrypted, by the server's account.
async fn encrypted(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn verify_full_connects_only_to_a_server_certified_for_the_host_by_the_trusted_authority() {
    let authority = Authority::new("Tradeeon test database CA");
    let (certificate, key) = authority.server_certificate("localhost");
    let server = TlsPostgres::start(&certificate, &key);
    let ca_file = server.dir.path().join("ca.pem");
    fs::write(&ca_file, authority.pem()).unwrap();
    let other_authority = Authority::new("Some other CA");
    let other_ca_file = server.dir.path().join("other-ca.pem");
    fs::write(&other_ca_file, other_authority.pem()).unwrap();

    // The server refuses connections without TLS, so whatever connects below is encrypted.
    let plain = Store::connect(&server.url("localhost", "sslmode=disable"), 2).await.unwrap_err();
    assert!(chain(&plain).contains("no pg_hba.conf entry"), "{}", chain(&plain));

    // verify-full with the authority that signed the certificate, to the host it names: the
    // store connects, migrates and works, and each of its pools (the store's, the job queue's)
    // is encrypted.
    let good = server.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()));
    let store = Store::connect(&good, 2).await.unwrap_or_else(|err| panic!("verify-full: {}", chain(&err)));
    store.migrate().await.unwrap();
    let owner = user(&store).await;
    let record = store.upsert_connection(&owner, new_connection(Exchange::Binance, "tls"), None).await.unwrap();
    assert_eq!(store.list_connections(&owner).await.unwrap(), vec![record]);
    assert!(encrypted(store.pg_pool().unwrap()).await, "the store's pool is not encrypted");
    assert!(encrypted(store.queue_pg_pool().unwrap()).await, "the job queue's pool is not encrypted");
    store.close().await;

    // Another authority: the server's certificate is not trusted.
    let wrong_ca = server.url("localhost", &format!("sslmode=verify-full&sslrootcert={}", other_ca_file.display()));
    let err = Store::connect(&wrong_ca, 2).await.unwrap_err();
    assert!(matches!(err, StoreError::Connect { backend: Backend::Postgres, .. }), "{err:?}");
    let message = chain(&err);
    assert!(message.contains("certificate") && message.contains("UnknownIssuer"), "{message}");
    assert!(message.contains("DATABASE_URL") && !message.contains("hunter2"), "{message}");
    // Without an authority that signed it, only the built-in public ones: not trusted either.
    let no_ca = Store::connect(&server.url("localhost", "sslmode=verify-full"), 2).await.unwrap_err();
    assert!(chain(&no_ca).contains("UnknownIssuer"), "{}", chain(&no_ca));

    // The right authority, but the certificate names `localhost` and the URL another host (the
    // same server, by its address): refused.
    let wrong_host = server.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()));
    let err = Store::connect(&wrong_host, 2).await.unwrap_err();
    let message = chain(&err);
    assert!(message.contains("certificate not valid for name"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    // verify-ca checks the authority but not the name, as in libpq: the same URL connects.
    let verify_ca = server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={}", ca_file.display()));
    Store::connect(&verify_ca, 1).await.unwrap_or_else(|err| panic!("verify-ca: {}", chain(&err))).close().await;
}
