//! PostgreSQL only: what the database driver does to the store's pooled connections — their
//! socket options, and what a caller cancelled during `BEGIN` leaves on them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tradeeon_shared::store::Store;

use crate::harness::{new_user, with_postgres_database};

#[cfg(target_os = "linux")]
postgres_only!(every_pooled_connection_has_tcp_nodelay);

/// Every connection of the store's pools has TCP_NODELAY. Without it, Nagle's algorithm holds
/// back the tail of a message that leaves in two writes (a batch larger than the socket's send
/// buffer) until the server's delayed ACK, up to 40 ms later (bench/README.md).
#[cfg(target_os = "linux")]
async fn every_pooled_connection_has_tcp_nodelay(store: Store) {
    // All held at once, so each pool opens as many connections as it may.
    let mut held = Vec::new();
    for pool in [store.pg_pool().unwrap(), store.queue_pg_pool().unwrap()] {
        let max = pool.options().get_max_connections() as usize;
        let acquired = futures::future::join_all((0..max).map(|_| pool.acquire())).await;
        held.extend(acquired.into_iter().map(|conn| conn.expect("acquire")));
    }
    let mut ports = Vec::new();
    for conn in &mut held {
        let (client, server): (Option<i32>, Option<i32>) =
            sqlx::query_as("SELECT inet_client_port(), inet_server_port()").fetch_one(&mut **conn).await.unwrap();
        let (Some(client), Some(server)) = (client, server) else {
            panic!("the test database must be reached over TCP (TEST_DATABASE_ADMIN_URL)");
        };
        ports.push((u16::try_from(client).unwrap(), u16::try_from(server).unwrap()));
    }
    let nodelay = own_tcp_sockets_nodelay();
    for (client, server) in ports {
        let socket = nodelay.get(&(client, server));
        assert_eq!(socket, Some(&true), "the connection from port {client} to {server} lacks TCP_NODELAY");
    }
}

/// TCP_NODELAY of each TCP socket this process holds, by (local port, peer port).
#[cfg(target_os = "linux")]
fn own_tcp_sockets_nodelay() -> std::collections::HashMap<(u16, u16), bool> {
    use rustix::net::{SocketType, getpeername, getsockname, sockopt};
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let port = |addr: rustix::net::SocketAddrAny| std::net::SocketAddr::try_from(addr).ok().map(|a| a.port());
    // A duplicate of each descriptor, taken through a pidfd of this very process, is a safe
    // handle on the same socket (options belong to the socket, not the descriptor); borrowing
    // the raw number instead would need `unsafe`, which the workspace forbids.
    let this_process = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
    let mut sockets = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        if !std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // Closed meanwhile (another test's connection): skipped; reused meanwhile: the ports
        // below still say which connection it is.
        let socket = match pidfd_getfd(&this_process, fd, PidfdGetfdFlags::empty()) {
            Ok(socket) => socket,
            Err(rustix::io::Errno::BADF) => continue,
            Err(err) => panic!("pidfd_getfd: {err}"),
        };
        if sockopt::socket_type(&socket).ok() != Some(SocketType::STREAM) {
            continue;
        }
        let local = getsockname(&socket).ok().and_then(port);
        let peer = getpeername(&socket).ok().flatten().and_then(port);
        if let (Some(local), Some(peer)) = (local, peer)
            && let Ok(nodelay) = sockopt::tcp_nodelay(&socket)
        {
            sockets.insert((local, peer), nodelay);
        }
    }
    sockets
}

/// A caller that goes away while the answer to its `BEGIN` is on its way (an HTTP client
/// disconnecting, a timeout, a stopping apalis worker) leaves no transaction open on the
/// pooled connection: the pool's next borrower runs on its own, and the database shows no
/// session idle in a transaction. The server holds back its answers from the moment the
/// `BEGIN` is sent, so every cancellation lands inside that round trip.
#[tokio::test]
async fn a_begin_cancelled_during_its_round_trip_leaves_no_connection_idle_in_transaction() {
    with_postgres_database(|url| async move {
        let slow = SlowBegin::start(&url).await;
        // One connection, so the cancelled caller's is the one every later statement runs on.
        let store = Store::connect(&slow.url, 1).await.expect("connect through the proxy");
        store.migrate().await.expect("migrate");
        let mut direct = PgConnection::connect(&url).await.expect("connect");
        let user = new_user();

        slow.cancel_during_begin(store.begin_user(&user)).await;
        assert_no_transaction_left(&store, &mut direct, "begin_user").await;
        slow.cancel_during_begin(store.ensure_user(&user)).await;
        assert_no_transaction_left(&store, &mut direct, "ensure_user").await;

        store.close().await;
        let _ = direct.close().await;
    })
    .await;
}

/// `what`, cancelled during its `BEGIN`, left no transaction on the store's one connection.
async fn assert_no_transaction_left(store: &Store, direct: &mut PgConnection, what: &str) {
    // Waits for the connection to come back to the pool, then uses it.
    store.ping().await.expect("the connection is usable");
    let idle_in_transaction: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity
          WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_all(&mut *direct)
    .await
    .unwrap();
    assert_eq!(idle_in_transaction, Vec::<String>::new(), "{what}: sessions idle in a transaction");
    assert_runs_on_its_own(store, what).await;
}

/// The store's next statement runs, and commits, on its own. `now()` is the start of the
/// current transaction: two statements apart in time see the same one only if they ran inside
/// one transaction.
async fn assert_runs_on_its_own(store: &Store, what: &str) {
    let pool = store.pg_pool().unwrap();
    let now = || async { sqlx::query_scalar::<_, DateTime<Utc>>("SELECT now()").fetch_one(pool).await };
    let first = now().await.expect("the connection is usable");
    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = now().await.expect("the connection is usable");
    assert_ne!(first, second, "{what}: the connection came back inside a transaction");
}

/// Callers cut short at every point of opening a transaction — before the connection is
/// acquired, during `BEGIN`'s round trip, during the statements after it — leave none behind.
#[tokio::test]
async fn a_begin_cancelled_midway_leaves_no_transaction_behind() {
    with_postgres_database(|url| async move {
        // One connection, so every attempt and every check use the same session.
        let store = Store::connect(&url, 1).await.expect("connect");
        store.migrate().await.expect("migrate");
        let user = new_user();
        let mut cancelled_midway = 0;
        for attempt in 0..600 {
            // Polled a growing number of times and then dropped: some attempts are cancelled
            // before the connection is acquired, some during the round trip, some after.
            let mut begin = Box::pin(store.begin_user(&user));
            let mut finished = false;
            let answer_time = Duration::from_micros([10, 30, 60, 120][attempt / 6 % 4]);
            for _ in 0..=(attempt % 6) {
                if futures::poll!(&mut begin).is_ready() {
                    finished = true;
                    break;
                }
                // Time for the server to answer, then a turn of the runtime to read it.
                std::thread::sleep(answer_time);
                tokio::task::yield_now().await;
            }
            drop(begin);
            cancelled_midway += usize::from(!finished);
            assert_runs_on_its_own(&store, &format!("attempt {attempt}")).await;
        }
        assert!(cancelled_midway > 50, "only {cancelled_midway} attempts were cut short");
        store.close().await;
    })
    .await;
}

/// A TCP proxy in front of the test database that, once armed, holds back the server's
/// answers from the moment a client sends `BEGIN` until the caller has been cancelled.
struct SlowBegin {
    /// The test database's URL, through the proxy.
    url: String,
    stall: Arc<watch::Sender<Stall>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stall {
    Off,
    Armed,
    Holding,
}

impl SlowBegin {
    async fn start(database_url: &str) -> Self {
        let mut url = url::Url::parse(database_url).expect("database URL");
        let server = (url.host_str().expect("host").to_owned(), url.port().unwrap_or(5432));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port())).unwrap();
        // In plain text, so the proxy can see the `BEGIN`.
        url.query_pairs_mut().append_pair("sslmode", "disable");
        let stall = Arc::new(watch::channel(Stall::Off).0);
        let proxy_stall = stall.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&server).await else { continue };
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                tokio::spawn(forward_queries(from_client, to_server, proxy_stall.clone()));
                tokio::spawn(forward_answers(from_server, to_client, proxy_stall.subscribe()));
            }
        });
        Self { url: url.to_string(), stall }
    }

    /// Runs `op` until its `BEGIN` has gone to the server, then drops it before the answer
    /// comes back, and lets the answers through again.
    async fn cancel_during_begin<T>(&self, op: impl Future<Output = T>) {
        self.stall.send_replace(Stall::Armed);
        let mut stall = self.stall.subscribe();
        tokio::select! {
            biased;
            held = stall.wait_for(|s| *s == Stall::Holding) => drop(held.expect("proxy running")),
            _ = op => panic!("finished although the answer to its BEGIN was held back"),
        }
        self.stall.send_replace(Stall::Off);
    }
}

/// Client to server; an armed proxy starts holding answers as a `BEGIN` goes by.
async fn forward_queries(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: Arc<watch::Sender<Stall>>,
) {
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if buf[..n].windows(5).any(|w| w == b"BEGIN") {
            // Before the `BEGIN` reaches the server, so its answer cannot slip through.
            stall.send_if_modified(|s| {
                let arm = *s == Stall::Armed;
                if arm {
                    *s = Stall::Holding;
                }
                arm
            });
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Server to client, except while holding.
async fn forward_answers(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stall: watch::Receiver<Stall>,
) {
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if stall.wait_for(|s| *s != Stall::Holding).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
