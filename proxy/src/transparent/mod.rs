//! Transparent mode's data path: connections the capture rules (`weft-proxy init`,
//! [`crate::capture`]) redirected to a `captured` listener, routed by where the app sent them.
//!
//! ```text
//! accept on a captured listener (listen.rs)
//!   -> original destination (SO_ORIGINAL_DST, detect::original_destination)
//!      == the socket's own address: not redirected, today's explicit path
//!   outbound: destination (destinations.rs): service VIP / registered instance / unknown
//!     -> protocol detection (sniff.rs), skipped for server-first and opaque ports and
//!        destinations without HTTP routing; weft_protocol_detections_total
//!     -> HTTP/1.x or h2 to a mesh service: the HTTP pipeline, routed with the destination's
//!        per-port route table (pipeline::CapturedRouting)
//!     -> anything else to a mesh service: TCP to its cluster (mTLS, balancing)
//!     -> unknown destination: egress policy (mesh.egress; denied: closed,
//!        weft_egress_denied_total{via="passthrough"}, flag ED), then plain TCP to it
//!   inbound: detection -> mTLS terminated (or plaintext, as the listener's mode allows)
//!     -> HTTP (the peer sidecar's ALPN, or detected plaintext HTTP) on an HTTP listener:
//!        the pipeline with the app port's `inbound:<port>` cluster as catch-all
//!     -> else TCP to `inbound:<port>`; a port the node did not announce: TCP to the
//!        original destination (`inbound-passthrough`)
//! ```
//!
//! The snapshot knows nothing of this module: it holds the listeners' `capture` settings, the
//! clusters (with their VIPs and ports) and the detached per-port route tables; the lookup
//! tables are built from it here, lazily, once per snapshot.

mod destinations;
pub mod dump;
pub mod metrics;
pub mod shared;
pub mod sniff;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::conn_limit::ConnectionLimit;
use crate::drain::DrainWatch;
use crate::http::connect::{decide, ConnectTarget, CONNECT_TIMEOUT};
use crate::http::{self, ProtocolHint, ServerStream};
use crate::pipeline::{CapturedRouting, HttpProxy, Routing};
use crate::plane::DataPlane;
use crate::snapshot::{Direction, Listener, ListenerKind, Snapshot};
use crate::tcp::{self, TcpTarget, Upstream};
use crate::tls::inbound::{self, Detected, MtlsMode};
use crate::tls::io::ServerIo;

use destinations::Outbound;
pub use destinations::{Destinations, INBOUND_PASSTHROUGH, PASSTHROUGH};
pub use shared::Transparent;
use sniff::{sniff, Sniffed};

/// Where a connection accepted on a captured listener was sent before the capture rules
/// redirected it; `None` when it was not redirected (its original destination is the socket's
/// own address, or there is no NAT entry): the explicit path serves it.
pub fn captured_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    match crate::detect::original_destination(stream) {
        Ok(original) if original != local => Some(original),
        _ => None,
    }
}

/// One captured connection, as accepted.
pub struct Captured {
    /// The client's socket.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Where it was sent (SO_ORIGINAL_DST).
    pub original: SocketAddr,
    /// The listener it was redirected to (a captured one).
    pub listener: Arc<Listener>,
    /// The listener's connection cap. The accepted connection already holds one slot; each
    /// stream of a peer sidecar's tunnel connection takes one more, as a direct connection would.
    pub limit: ConnectionLimit,
}

/// Serves a captured connection until it ends (see the module docs).
pub async fn serve(c: Captured, plane: DataPlane, drain: DrainWatch, drain_timeout: Duration) {
    let Some(snapshot) = plane.store.load_full() else {
        return;
    };
    let tables = plane.transparent.destinations(&snapshot);
    drop(snapshot);
    match c.listener.direction {
        Direction::Outbound => outbound(c, &plane, &tables, drain, drain_timeout).await,
        Direction::Inbound => inbound(c, &plane, &tables, drain, drain_timeout).await,
    }
}

/// Detection for a connection to `port`: skipped when the listener says so or the destination
/// has no HTTP routing (`opaque`).
async fn detect(stream: &TcpStream, listener: &Listener, port: u16, opaque: bool) -> Sniffed {
    match &listener.capture {
        Some(cap) if !opaque && !cap.skips(port) => sniff(stream, cap.detect_timeout).await,
        Some(_) => Sniffed::Skipped,
        // Not a captured listener (not reached): detect as an explicit listener would.
        None => sniff(stream, inbound::DETECT_TIMEOUT).await,
    }
}

async fn outbound(
    c: Captured,
    plane: &DataPlane,
    tables: &Arc<Destinations>,
    drain: DrainWatch,
    drain_timeout: Duration,
) {
    let destination = tables.outbound(c.original);
    let opaque = match &destination {
        Outbound::Mesh(d) => d.http.is_none(),
        Outbound::Passthrough => false,
    };
    let sniffed = detect(&c.stream, &c.listener, c.original.port(), opaque).await;
    plane
        .transparent
        .metrics()
        .record(Direction::Outbound, &sniffed);
    if sniffed == Sniffed::Closed {
        return;
    }
    let authority = sniffed.sni();
    match destination {
        Outbound::Mesh(d) => match (&d.http, sniffed.is_http()) {
            (Some(routing), true) => {
                let routing = Arc::new(OutboundRouting {
                    transparent: Arc::clone(&plane.transparent),
                    original: c.original,
                    fallback: routing.clone(),
                });
                let service = HttpProxy::new(Arc::clone(&plane.store), Arc::clone(&c.listener))
                    .with_source(c.peer)
                    .with_captured(routing);
                let builder = Arc::clone(&plane.http);
                http::serve_connection(c.stream, builder, service, drain, drain_timeout).await;
            }
            _ => {
                let target = TcpTarget {
                    upstream: Upstream::Cluster(Arc::clone(&d.cluster)),
                    metrics: &d.tcp,
                    authority,
                };
                let client = ServerIo::Plain(c.stream);
                tcp::proxy_to(client, None, &c.listener, target, drain, drain_timeout).await;
            }
        },
        Outbound::Passthrough => {
            if !egress_allows(plane, &c.listener, c.original, authority) {
                crate::http::tunnel_metrics::get()
                    .egress_denied_passthrough()
                    .inc();
                tracing::debug!(original = %c.original, sni = ?authority, "captured connection to an unknown destination denied by the egress policy; closing");
                crate::observe::log_tcp_connection(
                    &c.listener,
                    &crate::observe::TcpConnectionLog {
                        start: std::time::SystemTime::now(),
                        duration: Duration::ZERO,
                        flags: crate::observe::ResponseFlags::EGRESS_DENIED,
                        upstream: Some(c.original),
                        cluster: PASSTHROUGH,
                        peer_identity: None,
                        bytes_received: 0,
                        bytes_sent: 0,
                        authority,
                    },
                );
                return;
            }
            let target = TcpTarget {
                upstream: Upstream::Direct {
                    addr: c.original,
                    name: Arc::from(PASSTHROUGH),
                    connect_timeout: CONNECT_TIMEOUT,
                },
                metrics: &tables.passthrough,
                authority,
            };
            let client = ServerIo::Plain(c.stream);
            tcp::proxy_to(client, None, &c.listener, target, drain, drain_timeout).await;
        }
    }
}

/// The outbound listener's egress policy on a captured connection to an unknown destination:
/// its address (a declared external endpoint, an `allow_hosts` IP) or, for TLS, its SNI (an
/// `allow_hosts` name, a declared external service's name).
fn egress_allows(
    plane: &DataPlane,
    listener: &Listener,
    original: SocketAddr,
    sni: Option<&str>,
) -> bool {
    let Some(snapshot) = plane.store.load_full() else {
        return false;
    };
    let by_address = ConnectTarget {
        host: original.ip().to_string(),
        port: original.port(),
    };
    if decide(&snapshot, &listener.name, &by_address).is_ok() {
        return true;
    }
    sni.is_some_and(|name| {
        let by_name = ConnectTarget {
            host: name.to_ascii_lowercase(),
            port: original.port(),
        };
        decide(&snapshot, &listener.name, &by_name).is_ok()
    })
}

async fn inbound(
    c: Captured,
    plane: &DataPlane,
    tables: &Arc<Destinations>,
    drain: DrainWatch,
    drain_timeout: Duration,
) {
    let sniffed = inbound_detection(&c).await;
    plane
        .transparent
        .metrics()
        .record(Direction::Inbound, &sniffed);
    let detected = match &sniffed {
        Sniffed::Closed => return,
        Sniffed::Tls { .. } => Detected::Tls,
        Sniffed::Timeout => Detected::Silent,
        // Not looked at: a strict listener takes it as mTLS (the handshake reads the peer
        // sidecar's ClientHello; a plaintext client fails it), a disabled one as plaintext.
        Sniffed::Skipped if c.listener.mtls == MtlsMode::Strict => Detected::Tls,
        _ => Detected::Plaintext,
    };
    let Some(conn) =
        inbound::accept_detected(c.stream, detected, c.listener.mtls, &plane.tls).await
    else {
        return;
    };
    if conn.tunnel {
        // A peer sidecar's pooled tunnel connection: each stream is one TCP connection to this
        // port, as a direct mTLS connection to it would be.
        let Some(peer) = conn.peer else {
            return;
        };
        let (store, transparent) = (Arc::clone(&plane.store), Arc::clone(&plane.transparent));
        let (addr, original) = (c.listener.addr, c.original);
        let resolve: crate::tunnel::server::Resolve = Arc::new(move || {
            let snapshot = store.load_full()?;
            let listener = Arc::clone(snapshot.listeners.get(&addr)?);
            let tables = transparent.destinations(&snapshot);
            let (upstream, metrics) = match tables.inbound(original.port()) {
                Some(d) => (Upstream::Cluster(Arc::clone(&d.cluster)), d.tcp.clone()),
                None => (
                    Upstream::Direct {
                        addr: original,
                        name: Arc::from(INBOUND_PASSTHROUGH),
                        connect_timeout: CONNECT_TIMEOUT,
                    },
                    tables.inbound_passthrough.clone(),
                ),
            };
            Some(crate::tunnel::server::StreamTarget {
                listener,
                upstream,
                metrics,
            })
        });
        crate::tunnel::server::serve(
            conn.io,
            peer,
            Arc::clone(plane.tls.trust()),
            Some(c.peer),
            resolve,
            Some((c.limit.clone(), Arc::clone(&c.listener.name))),
            drain,
            drain_timeout,
        )
        .await;
        return;
    }
    // Inside mTLS the caller's sidecar said what it carries (ALPN h2 / http/1.1 = HTTP, none =
    // TCP); in plaintext, detection did.
    let is_http = match conn.io.protocol_hint() {
        ProtocolHint::Alpn(alpn) => alpn.is_some_and(|p| p == b"h2" || p == b"http/1.1"),
        ProtocolHint::Peek(_) => sniffed.is_http(),
    };
    let http_listener = matches!(c.listener.kind, ListenerKind::Http(_));
    let port = c.original.port();
    match tables.inbound(port) {
        Some(d) if is_http && http_listener => {
            let routing = Arc::new(InboundRouting {
                transparent: Arc::clone(&plane.transparent),
                port,
                fallback: d.http.clone().unwrap_or_default(),
            });
            let service = HttpProxy::new(Arc::clone(&plane.store), Arc::clone(&c.listener))
                .with_peer(conn.peer)
                .with_source(c.peer)
                .with_captured(routing);
            let builder = Arc::clone(&plane.http);
            http::serve_connection(conn.io, builder, service, drain, drain_timeout).await;
        }
        Some(d) => {
            let target = TcpTarget {
                upstream: Upstream::Cluster(Arc::clone(&d.cluster)),
                metrics: &d.tcp,
                authority: None,
            };
            tcp::proxy_to(
                conn.io,
                conn.peer,
                &c.listener,
                target,
                drain,
                drain_timeout,
            )
            .await;
        }
        None => {
            let target = TcpTarget {
                upstream: Upstream::Direct {
                    addr: c.original,
                    name: Arc::from(INBOUND_PASSTHROUGH),
                    connect_timeout: CONNECT_TIMEOUT,
                },
                metrics: &tables.inbound_passthrough,
                authority: None,
            };
            tcp::proxy_to(
                conn.io,
                conn.peer,
                &c.listener,
                target,
                drain,
                drain_timeout,
            )
            .await;
        }
    }
}

/// Detection of a captured inbound connection. Whether it is mesh mTLS decides how it is
/// accepted, and a peer sidecar sends its ClientHello at once, so it is looked at, whatever
/// the port, except where the answer is known without it: `mtls: disabled` (plaintext, bytes
/// passed as they come), and a server-first or opaque port of a strict listener (nothing but
/// mTLS is accepted, so the handshake itself reads the ClientHello; sniffing a server-first
/// port would add nothing). A permissive listener must tell the two apart: there a plaintext
/// client of a server-first port waits the detection timeout before it is served.
async fn inbound_detection(c: &Captured) -> Sniffed {
    match c.listener.mtls {
        MtlsMode::Disabled => Sniffed::Skipped,
        MtlsMode::Strict => detect(&c.stream, &c.listener, c.original.port(), false).await,
        MtlsMode::Permissive => match &c.listener.capture {
            Some(cap) => sniff(&c.stream, cap.detect_timeout).await,
            None => sniff(&c.stream, inbound::DETECT_TIMEOUT).await,
        },
    }
}

/// A captured outbound HTTP connection's routing: its destination's per-port table in the
/// snapshot of each request (endpoints and routes follow pushes), else the one it was accepted
/// with (the destination left the configuration while the connection lives).
struct OutboundRouting {
    transparent: Arc<Transparent>,
    original: SocketAddr,
    fallback: Routing,
}

impl CapturedRouting for OutboundRouting {
    fn resolve(&self, snapshot: Option<&Arc<Snapshot>>) -> Routing {
        let found =
            snapshot.and_then(
                |s| match self.transparent.destinations(s).outbound(self.original) {
                    Outbound::Mesh(d) => d.http.clone(),
                    Outbound::Passthrough => None,
                },
            );
        found.unwrap_or_else(|| self.fallback.clone())
    }
}

/// A captured inbound HTTP connection's routing: the app port's catch-all, per request.
struct InboundRouting {
    transparent: Arc<Transparent>,
    port: u16,
    fallback: Routing,
}

impl CapturedRouting for InboundRouting {
    fn resolve(&self, snapshot: Option<&Arc<Snapshot>>) -> Routing {
        snapshot
            .and_then(|s| {
                let tables = self.transparent.destinations(s);
                tables.inbound(self.port).and_then(|d| d.http.clone())
            })
            .unwrap_or_else(|| self.fallback.clone())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_is_not_captured() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        // No NAT: the original destination is the socket's own address (or unknown).
        assert_eq!(captured_destination(&s), None);
    }
}
