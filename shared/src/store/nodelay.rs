//! TCP_NODELAY on the PostgreSQL connections.
//!
//! sqlx 0.9.0 stopped setting TCP_NODELAY on its sockets (sqlx issue #4335; fixed upstream after
//! 0.9.0, not yet released) and offers no option to set it. Without it, Nagle's algorithm holds
//! back the tail of any message that leaves in two writes — a statement whose parameters exceed
//! the socket's send buffer, e.g. a coalesced batch of a few dozen jobs — until the server
//! acknowledges the first part, which it delays by up to 40 ms. Under load that made every large
//! batch take ~45 ms instead of ~3 ms (the POST /connections/test p99 sat at ~55 ms).
//!
//! Until sqlx sets it again, each new connection (`after_connect`) sets TCP_NODELAY on the
//! process's TCP sockets whose peer is the database's port. Setting it is harmless on any socket,
//! so the match need not be exact. Linux 5.6+ only (it reads /proc/self/fd and uses
//! `pidfd_getfd`); elsewhere it does nothing. Container runtimes' default seccomp profiles
//! (Docker, containerd, so ECS) allow `pidfd_getfd` only with CAP_SYS_PTRACE: without it the
//! workaround cannot act, and the first connection logs one warning saying so.
//! Remove this module, and its test, once sqlx sets TCP_NODELAY itself; nothing else depends on it.

/// Sets TCP_NODELAY on every TCP socket of this process connected to `port`; returns how many
/// such sockets there are (all of them have it set afterwards, unless the call failed).
#[cfg(target_os = "linux")]
pub(super) fn set_on_sockets_to(port: u16) -> usize {
    for_sockets_to(port, |socket| {
        if let Err(err) = rustix::net::sockopt::set_tcp_nodelay(socket, true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY on a database connection");
        }
    })
}

#[cfg(not(target_os = "linux"))]
pub(super) fn set_on_sockets_to(_port: u16) -> usize {
    0
}

/// How many TCP sockets of this process connected to `port` do not have TCP_NODELAY set.
#[cfg(all(test, target_os = "linux"))]
pub(super) fn sockets_without_nodelay(port: u16) -> usize {
    let mut without = 0;
    for_sockets_to(port, |socket| {
        if !rustix::net::sockopt::tcp_nodelay(socket).unwrap_or(true) {
            without += 1;
        }
    });
    without
}

/// Says once per process that the workaround cannot act here (see the module docs).
#[cfg(target_os = "linux")]
fn refused(call: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            call,
            "cannot set TCP_NODELAY on database connections (the call was refused; in a container \
             it needs CAP_SYS_PTRACE): statements larger than the socket buffer may wait up to 40 ms"
        );
    });
}

#[cfg(target_os = "linux")]
fn for_sockets_to(port: u16, mut f: impl FnMut(&std::os::fd::OwnedFd)) -> usize {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    // A duplicate of each descriptor, taken through a pidfd of this very process, is a safe
    // handle on the same socket (options belong to the socket, not the descriptor); borrowing
    // the raw number instead would need `unsafe`, which this workspace forbids.
    let Ok(this_process) = pidfd_open(getpid(), PidfdFlags::empty()) else {
        refused("pidfd_open");
        return 0;
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        refused("/proc/self/fd");
        return 0;
    };
    let mut found = 0;
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        if !std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // Closed meanwhile: skipped. Reused meanwhile for another socket: the port check below
        // still decides, and TCP_NODELAY would be harmless anyway.
        let socket = match pidfd_getfd(&this_process, fd, PidfdGetfdFlags::empty()) {
            Ok(socket) => socket,
            Err(rustix::io::Errno::BADF) => continue,
            Err(_) => {
                refused("pidfd_getfd");
                return found;
            }
        };
        let stream = rustix::net::sockopt::socket_type(&socket).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
        let to_port = rustix::net::getpeername(&socket)
            .ok()
            .flatten()
            .and_then(|peer| std::net::SocketAddr::try_from(peer).ok())
            .is_some_and(|peer| peer.port() == port);
        if stream && to_port {
            f(&socket);
            found += 1;
        }
    }
    found
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// Every connection the store opens to PostgreSQL has TCP_NODELAY. Fails if sqlx's sockets
    /// are left as they come (or if the workaround stops finding them).
    #[tokio::test]
    async fn database_connections_do_not_wait_for_delayed_acks() {
        let url = std::env::var("TEST_DATABASE_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let port = url::Url::parse(&url).ok().and_then(|u| u.port()).unwrap_or(5432);
        let store = crate::store::Store::connect(&url, 4).await.expect("PostgreSQL for tests");
        // Several connections at once, so the pool opens more than one.
        let pings = (0..4).map(|_| store.ping());
        for ping in futures::future::join_all(pings).await {
            ping.expect("ping");
        }
        let without = super::sockets_without_nodelay(port);
        let with = super::set_on_sockets_to(port);
        store.close().await;
        assert!(with > 0, "no database sockets found");
        assert_eq!(without, 0, "{without} of {with} database connections lack TCP_NODELAY");
    }
}
