//! PostgreSQL only: what the database driver does to the store's pooled connections.

#[cfg(target_os = "linux")]
postgres_only!(every_pooled_connection_has_tcp_nodelay);

/// Every connection of the store's pools has TCP_NODELAY. Without it, Nagle's algorithm holds
/// back the tail of a message that leaves in two writes (a batch larger than the socket's send
/// buffer) until the server's delayed ACK, up to 40 ms later (bench/README.md).
#[cfg(target_os = "linux")]
async fn every_pooled_connection_has_tcp_nodelay(store: tradeeon_shared::store::Store) {
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
