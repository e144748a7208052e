//! The listener manager: makes the set of bound sockets match the snapshot's listeners.
//!
//! Applying a snapshot is two-phase so that a bind failure can be NACKed with nothing changed:
//! [`ListenerManager::prepare`] binds every address the snapshot has and we do not (SO_REUSEADDR),
//! then, after the snapshot is swapped in, [`ListenerManager::commit`] starts accepting on them and
//! drains listeners whose address is gone. Listeners are keyed by address: one whose address is
//! unchanged keeps its socket and open connections (its config is read from the snapshot per
//! connection / request); one whose address changed is bound anew before the old one drains.
//! Draining stops accepting at once; open HTTP connections shut down gracefully and TCP
//! connections get `drain_timeout` before being cut.
//!
//! A `captured` listener (transparent mode) hands connections whose original destination is
//! not their own address to `crate::transparent`; the others take the path below.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;

use crate::conn_limit::ConnectionLimit;
use crate::drain::{DrainSignal, DrainWatch};
use crate::http;
use crate::pipeline::HttpProxy;
use crate::snapshot::{Direction, ListenerKind, Rejection, Snapshot};
use crate::tcp;
use crate::tls::inbound;
use crate::tls::io::ServerIo;

pub use crate::plane::DataPlane;

/// Listen backlog for every listener.
const BACKLOG: i32 = 1024;

struct Running {
    name: Arc<str>,
    signal: DrainSignal,
}

/// Sockets bound by [`ListenerManager::prepare`], not yet accepting.
#[derive(Debug, Default)]
pub struct Prepared {
    bound: Vec<(SocketAddr, TcpListener)>,
}

/// Owns the running listeners.
pub struct ListenerManager {
    runtime: Handle,
    plane: DataPlane,
    running: HashMap<SocketAddr, Running>,
    shut_down: bool,
}

/// Binds `addr` with SO_REUSEADDR, as a non-blocking std listener.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]:port` is IPv6 only, whatever net.ipv6.bindv6only says: a captured listener's
        // IPv6 twin must not take the IPv4 port of its sibling (`snapshot::ipv6_twin`).
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl ListenerManager {
    /// A manager whose accept loops and connections run on `runtime` (the data path).
    pub fn new(runtime: Handle, plane: DataPlane) -> Self {
        Self {
            runtime,
            plane,
            running: HashMap::new(),
            shut_down: false,
        }
    }

    /// Binds the listeners of `snapshot` that are not bound yet; any failure is a rejection
    /// naming the listener, and nothing stays bound.
    pub fn prepare(&self, snapshot: &Snapshot) -> Result<Prepared, Vec<Rejection>> {
        let mut prepared = Prepared::default();
        let mut errors = Vec::new();
        // Registering a socket with tokio needs the data runtime's context.
        let _in_data_runtime = self.runtime.enter();
        for (addr, l) in &snapshot.listeners {
            if self.running.contains_key(addr) {
                continue;
            }
            match bind(*addr).and_then(TcpListener::from_std) {
                Ok(sock) => prepared.bound.push((*addr, sock)),
                Err(e) => errors.push(Rejection::new(
                    format!("listener {:?}", l.name),
                    "address",
                    format!("cannot bind {addr}: {e}"),
                )),
            }
        }
        if errors.is_empty() {
            Ok(prepared)
        } else {
            Err(errors)
        }
    }

    /// Starts accepting on `prepared` sockets and drains listeners `snapshot` no longer has.
    /// Call after `snapshot` is the current one.
    pub fn commit(&mut self, prepared: Prepared, snapshot: &Snapshot) {
        if self.shut_down {
            return;
        }
        for (addr, sock) in prepared.bound {
            let name = snapshot.listeners.get(&addr).map(|l| Arc::clone(&l.name));
            let name = name.unwrap_or_else(|| addr.to_string().into());
            let (signal, watch) = DrainSignal::new();
            tracing::info!(listener = %name, %addr, "listening");
            let direction = snapshot
                .listeners
                .get(&addr)
                .map_or("outbound", |l| l.direction.as_str());
            let limit = self
                .plane
                .limits
                .limit(direction, self.plane.max_connections);
            self.runtime.spawn(accept_loop(
                sock,
                addr,
                self.plane.clone(),
                watch,
                limit,
                Arc::clone(&name),
            ));
            self.running.insert(addr, Running { name, signal });
        }
        let gone: Vec<SocketAddr> = self
            .running
            .keys()
            .filter(|a| !snapshot.listeners.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(r) = self.running.remove(&addr) {
                tracing::info!(listener = %r.name, %addr, "listener removed; draining");
                r.signal.start();
                self.runtime.spawn(async move {
                    r.signal.drained().await;
                    tracing::info!(listener = %r.name, %addr, "listener drained");
                });
            }
        }
        for (addr, r) in &mut self.running {
            if let Some(l) = snapshot.listeners.get(addr) {
                r.name = Arc::clone(&l.name);
            }
        }
    }

    /// Stops every listener and returns a future that resolves when all their connections are
    /// closed; later commits start nothing.
    pub fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shut_down = true;
        let signals: Vec<DrainSignal> = self.running.drain().map(|(_, r)| r.signal).collect();
        for s in &signals {
            s.start();
        }
        async move {
            for s in &signals {
                s.drained().await;
            }
        }
    }

    /// Addresses currently accepting (for tests and `/config_dump`).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.running.keys().copied().collect()
    }
}

async fn accept_loop(
    sock: TcpListener,
    addr: SocketAddr,
    plane: DataPlane,
    mut drain: DrainWatch,
    limit: ConnectionLimit,
    name: Arc<str>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            () = drain.signaled() => return,
            a = sock.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Past the cap the connection is closed here (dropped), before any task exists.
                if let Some(slot) = limit.try_acquire(&name) {
                    dispatch(stream, peer, addr, &plane, &drain, slot, &limit);
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn dispatch(
    stream: TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    plane: &DataPlane,
    drain: &DrainWatch,
    slot: OwnedSemaphorePermit,
    limit: &ConnectionLimit,
) {
    let listener = plane
        .store
        .load()
        .as_ref()
        .and_then(|s| s.listeners.get(&addr))
        .cloned();
    let Some(listener) = listener else {
        // Accepted in the instant the listener was removed: nothing to serve it with.
        return;
    };
    let _ = stream.set_nodelay(true);
    let drain = drain.clone();
    let timeout = plane.drain_timeout;
    // Transparent mode: a connection the capture rules redirected here goes where it was sent.
    if listener.capture.is_some() {
        if let Some(original) = crate::transparent::captured_destination(&stream) {
            let captured = crate::transparent::Captured {
                stream,
                peer,
                original,
                listener,
                limit: limit.clone(),
            };
            let plane = plane.clone();
            tokio::spawn(async move {
                let _slot = slot;
                crate::transparent::serve(captured, plane, drain, timeout).await;
            });
            return;
        }
    }
    if listener.direction == Direction::Inbound {
        // Peers' sidecars (mTLS) or plaintext clients, as the listener's mode allows.
        let plane = plane.clone();
        let limit = limit.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Some(conn) =
                inbound::accept(stream, listener.mtls, &plane.tls, inbound::DETECT_TIMEOUT).await
            else {
                return;
            };
            if conn.tunnel {
                // A peer sidecar's pooled tunnel connection: each stream is one TCP
                // connection of this listener (its own slot of the cap, like one accepted).
                serve_tunnel(conn, peer, listener, &plane, limit, drain, timeout).await;
                return;
            }
            match &listener.kind {
                ListenerKind::Http(_) => {
                    let service = HttpProxy::new(Arc::clone(&plane.store), Arc::clone(&listener))
                        .with_peer(conn.peer)
                        .with_source(peer);
                    let builder = Arc::clone(&plane.http);
                    http::serve_connection(conn.io, builder, service, drain, timeout).await;
                }
                ListenerKind::Tcp { .. } => {
                    tcp::proxy_connection(conn.io, conn.peer, listener, drain, timeout).await;
                }
            }
        });
        return;
    }
    // Outbound: the local app, always plaintext.
    match &listener.kind {
        ListenerKind::Http(_) => {
            let service =
                HttpProxy::new(Arc::clone(&plane.store), Arc::clone(&listener)).with_source(peer);
            let builder = Arc::clone(&plane.http);
            tokio::spawn(async move {
                let _slot = slot;
                http::serve_connection(stream, builder, service, drain, timeout).await;
            });
        }
        ListenerKind::Tcp { .. } => {
            tokio::spawn(async move {
                let _slot = slot;
                tcp::proxy_connection(ServerIo::Plain(stream), None, listener, drain, timeout)
                    .await;
            });
        }
    }
}

/// Serves a tunnel connection (`conn` negotiated `weft-tunnel`) accepted by `listener` from
/// `source`: each stream goes where the listener's TCP connections go in the snapshot current
/// when it opens. An HTTP listener carries no tunnel (callers tunnel only to TCP clusters'
/// endpoints): the connection is closed.
async fn serve_tunnel(
    conn: inbound::InboundConn,
    source: SocketAddr,
    listener: Arc<crate::snapshot::Listener>,
    plane: &DataPlane,
    limit: ConnectionLimit,
    drain: DrainWatch,
    drain_timeout: Duration,
) {
    let (ListenerKind::Tcp { .. }, Some(peer)) = (&listener.kind, conn.peer) else {
        tracing::info!(listener = %listener.name, "tunnel connection to a listener that is not TCP; closing");
        return;
    };
    let (store, addr) = (Arc::clone(&plane.store), listener.addr);
    let resolve: crate::tunnel::server::Resolve = Arc::new(move || {
        let listener = store.load().as_ref()?.listeners.get(&addr)?.clone();
        let ListenerKind::Tcp { cluster, metrics } = &listener.kind else {
            return None;
        };
        Some(crate::tunnel::server::StreamTarget {
            upstream: tcp::Upstream::Cluster(Arc::clone(cluster)),
            metrics: metrics.clone(),
            listener: Arc::clone(&listener),
        })
    });
    let limit = Some((limit, Arc::clone(&listener.name)));
    crate::tunnel::server::serve(
        conn.io,
        peer,
        Arc::clone(plane.tls.trust()),
        Some(source),
        resolve,
        limit,
        drain,
        drain_timeout,
    )
    .await;
}
