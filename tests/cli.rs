//! The `tradeeon` binary as a user runs it: real processes, real SQLite files, real HTTP.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tradeeon_shared::config::Config;
use tradeeon_shared::vault::Keyring;

/// `tradeeon` run in `dir` (so `./data` and `.env` are the test's own) with a clean config: every
/// variable the service reads is removed so the developer's environment cannot leak in.
fn tradeeon(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tradeeon"));
    cmd.current_dir(dir).env("RUST_LOG", "info");
    for (var, _default) in Config::variables() {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run tradeeon")
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr).lines().map(str::to_owned).collect()
}

/// A user error is one line on stderr, a non-zero exit, and no panic or backtrace.
fn assert_one_line_error(output: &Output, must_mention: &str) {
    assert!(!output.status.success(), "expected failure, got {:?}", output.status);
    let lines = stderr_lines(output);
    assert_eq!(lines.len(), 1, "expected one line on stderr, got {lines:#?}");
    assert!(lines[0].contains(must_mention), "{:?} does not mention {must_mention:?}", lines[0]);
    assert!(!lines[0].contains("panicked"), "{lines:?}");
}

#[test]
fn keygen_prints_a_valid_fernet_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("keygen"));
    assert!(output.status.success());
    let key = String::from_utf8(output.stdout).unwrap();
    let key = key.trim();
    assert_eq!(key.len(), 44, "{key}");
    Keyring::parse(key).expect("keygen output is a valid key");
    let again = run(tradeeon(dir.path()).arg("keygen"));
    assert_ne!(String::from_utf8(again.stdout).unwrap().trim(), key, "keys are random");
}

#[test]
fn unknown_subcommand_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("frobnicate"));
    assert_eq!(output.status.code(), Some(2));
    assert_one_line_error(&output, "frobnicate");
}

#[test]
fn help_lists_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("--help"));
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for sub in ["serve", "api", "worker", "migrate", "keygen", "rewrap", "simulate"] {
        assert!(help.contains(sub), "help lacks {sub}:\n{help}");
    }
}

#[test]
fn unsupported_database_url_is_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("migrate").env("DATABASE_URL", "mysql://root:hunter2@db/x"));
    assert_one_line_error(&output, "DATABASE_URL");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("hunter2"));
}

#[test]
fn malformed_encryption_key_is_one_line_and_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path())
        .arg("worker")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        .env("ENCRYPTION_KEY", "definitely-not-a-key"));
    assert_one_line_error(&output, "ENCRYPTION_KEY");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("definitely-not-a-key"));
}

#[test]
fn postgres_without_encryption_key_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let output =
        run(tradeeon(dir.path()).arg("api").env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"));
    assert_one_line_error(&output, "ENCRYPTION_KEY is required with PostgreSQL");
}

#[test]
fn unreachable_database_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let output = run(tradeeon(dir.path()).arg("migrate").env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x"));
    assert_one_line_error(&output, "DATABASE_URL");
}

#[test]
fn migrate_creates_the_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("migrate"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("migrations applied (SQLite)"));
    assert!(dir.path().join("data/tradeeon.db").exists());
    // Migrating an up-to-date database is a no-op, not an error.
    assert!(run(tradeeon(dir.path()).arg("migrate")).status.success());
}

#[test]
fn rewrap_on_sqlite_needs_the_key_file_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tradeeon(dir.path()).arg("rewrap"));
    assert_one_line_error(&output, "encryption.key");

    let key = String::from_utf8(run(tradeeon(dir.path()).arg("keygen")).stdout).unwrap();
    assert!(run(tradeeon(dir.path()).arg("migrate")).status.success());
    let output = run(tradeeon(dir.path()).arg("rewrap").env("ENCRYPTION_KEY", key.trim()));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("0 scanned, 0 rewrapped"));
}

/// A running `tradeeon serve`, stopped with SIGTERM when dropped.
struct Server {
    child: Child,
    base: String,
    /// The metrics listener (`API_METRICS_PORT`), e.g. `http://127.0.0.1:41234/metrics`.
    metrics_url: String,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = tradeeon(dir)
            .env("API_PORT", "0")
            .env("API_METRICS_PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tradeeon");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for announcement in ["API listening on ", "metrics listening on "] {
                    if let Some(at) = line.find(&format!("{announcement}http://")) {
                        let _ = tx.send((announcement, line[at + announcement.len()..].trim().to_string()));
                    }
                }
            }
        });
        let (mut base, mut metrics_url) = (None, None);
        while base.is_none() || metrics_url.is_none() {
            let (announcement, url) = rx.recv_timeout(Duration::from_secs(60)).expect("server announced its addresses");
            if announcement.starts_with("API") { base = Some(url) } else { metrics_url = Some(url) }
        }
        Server { child, base: base.unwrap(), metrics_url: metrics_url.unwrap() }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[test]
fn a_taken_metrics_port_is_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = run(tradeeon(dir.path())
        .arg("serve")
        .env("RUST_LOG", "error")
        .env("API_PORT", "0")
        .env("API_METRICS_PORT", &port));
    assert_one_line_error(&output, "API_METRICS_PORT");
}

#[tokio::test]
async fn serve_runs_with_no_configuration_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let http = reqwest::Client::new();

    let health = http.get(format!("{}/health", server.base)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<serde_json::Value>().await.unwrap()["status"], "ok");
    let ready = http.get(format!("{}/ready", server.base)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let missing = http.get(format!("{}/no-such-route", server.base)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<serde_json::Value>().await.unwrap()["error"]["code"], "not_found");

    // The metrics have a listener of their own (the load balancer forwards only API_PORT): the
    // API's port has no /metrics, and one registry shows the workers' metrics beside the API's.
    let public = http.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(public.status(), 404);
    assert_ne!(server.metrics_url, format!("{}/metrics", server.base));
    let response = http.get(&server.metrics_url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let metrics = response.text().await.unwrap();
    for name in ["tradeeon_http_requests_total", "tradeeon_queue_depth", "tradeeon_sweeps_completed_total"] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert!(
        metrics.contains(r#"tradeeon_http_requests_total{method="GET",route="unmatched",status="404"} 2"#),
        "{metrics}"
    );

    // The embedded default generated its key privately, beside the database.
    let key_file = dir.path().join("data/encryption.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    Keyring::parse(key.trim()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // The container HEALTHCHECK command agrees.
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let check = run(tradeeon(dir.path()).arg("healthcheck").env("API_PORT", &port));
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let status = server.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    let check = run(tradeeon(dir.path()).arg("healthcheck").env("API_PORT", &port));
    assert_one_line_error(&check, "did not answer");

    // A restart reuses the same key rather than making a new one.
    let mut again = Server::start(dir.path());
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key);
    assert!(again.terminate().success());
}
