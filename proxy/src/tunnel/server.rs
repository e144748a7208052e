//! The inbound side of the tunnel: a mesh mTLS connection that negotiated `weft-tunnel` is
//! served as an HTTP/2 server that takes only CONNECT. Each stream is one TCP connection of
//! the listener that accepted the tunnel connection and goes through `crate::tcp::proxy_to`
//! like a TCP connection accepted there: the peer identity is the tunnel connection's verified
//! certificate, the listener's rate limit, authorization, connection cap, metrics (with the
//! peer's identity), idle timeout and access log apply per stream. A stream turned away gets
//! a status on that stream (403 denied, 429 rate limited, 503 over the connection cap or
//! listener gone, 502
//! upstream unreachable, 405 not a CONNECT) and the tunnel connection stays up for the others.
//! [`MAX_STREAMS_PER_CONNECTION`] streams at once per connection, and per-stream flow-control
//! windows a sixteenth of the connection's, so one bulk flow cannot take a connection's whole
//! window from the others.
//!
//! A tunnel connection lives longer than one TCP connection, so what was verified at its
//! handshake is re-checked per stream ([`Credentials`]): once the trust bundle changed since the
//! handshake, or the peer's certificate expired, a new stream is refused (421, counted as
//! `refused`, logged) and the connection is told to go away (GOAWAY: its open streams finish);
//! the peer's next connection is verified against the bundle in force. The caller's own pool
//! moves to a new connection on such changes anyway; this is the callee not relying on that.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

use super::{CONNECTION_WINDOW, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW};
use crate::conn_limit::ConnectionLimit;
use crate::drain::DrainWatch;
use crate::metrics::TcpMetrics;
use crate::snapshot::Listener;
use crate::tcp::{Downstream, Refusal, TcpTarget, Upstream};
use crate::tls::io::ServerIo;
use crate::tls::spiffe::SpiffeId;
use crate::tls::trust::TrustStore;

/// What a tunnel connection's handshake verified, re-checked for every stream.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The trust bundle; its generation at the handshake.
    trust: Arc<TrustStore>,
    generation: u64,
    /// The peer certificate's `notAfter` (Unix seconds).
    not_after: i64,
}

impl Credentials {
    /// The credentials of `io`'s handshake (`None`: not TLS, or no readable peer certificate:
    /// such a connection is not served), under `trust`.
    pub fn of(io: &ServerIo, trust: Arc<TrustStore>) -> Option<Self> {
        let crate::tls::io::MaybeTls::Tls(tls) = io else {
            return None;
        };
        let leaf = tls.get_ref().1.peer_certificates()?.first()?;
        let (_, not_after) = crate::tls::spiffe::validity(leaf).ok()?;
        Some(Self {
            generation: trust.generation(),
            trust,
            not_after,
        })
    }

    /// Why a new stream may no longer use this connection, if so.
    fn stale(&self, now_unix: i64) -> Option<&'static str> {
        if self.trust.generation() != self.generation {
            Some("the trust bundle changed since the handshake")
        } else if now_unix >= self.not_after {
            Some("the peer certificate expired")
        } else {
            None
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Where one stream goes: what a TCP connection accepted on the same listener now would get.
#[derive(Debug)]
pub struct StreamTarget {
    /// The listener that accepted the tunnel connection, as the current snapshot has it.
    pub listener: Arc<Listener>,
    /// Its destination.
    pub upstream: Upstream,
    /// Its `weft_tcp_*` handles.
    pub metrics: TcpMetrics,
}

/// Finds a stream's [`StreamTarget`] in the current snapshot (so a policy change applies to
/// the next stream of a long-lived tunnel connection, as it does to the next TCP connection);
/// `None`: the listener is gone.
pub type Resolve = Arc<dyn Fn() -> Option<StreamTarget> + Send + Sync>;

struct Ctx {
    resolve: Resolve,
    /// The listener's connection cap (each stream takes a slot), if it has one.
    limit: Option<ConnectionLimit>,
    /// The listener's name (the cap's log lines).
    name: Arc<str>,
    peer: SpiffeId,
    source: Option<SocketAddr>,
    drain: DrainWatch,
    drain_timeout: Duration,
    credentials: Credentials,
    /// Set when a stream found the credentials stale: the connection sends GOAWAY.
    go_away: Arc<tokio::sync::Notify>,
}

/// Serves the tunnel connection `io` from `peer` (verified against `trust`) at `source` until
/// it closes, until a drain started and its streams finished (each within `drain_timeout`), or
/// until its credentials went stale and its streams finished.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    io: ServerIo,
    peer: SpiffeId,
    trust: Arc<TrustStore>,
    source: Option<SocketAddr>,
    resolve: Resolve,
    limit: Option<(ConnectionLimit, Arc<str>)>,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    let metrics = super::metrics::get();
    let Some(credentials) = Credentials::of(&io, trust) else {
        tracing::info!(peer = %peer, "tunnel: no readable peer certificate; closing");
        return;
    };
    let go_away = Arc::new(tokio::sync::Notify::new());
    metrics.inbound_connections.inc();
    let (limit, name) = match limit {
        Some((l, n)) => (Some(l), n),
        None => (None, Arc::from("")),
    };
    let ctx = Arc::new(Ctx {
        resolve,
        limit,
        name,
        peer,
        source,
        drain: drain.clone(),
        drain_timeout,
        credentials,
        go_away: Arc::clone(&go_away),
    });
    let service = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(stream(ctx, req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_frame_size(super::MAX_FRAME)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(crate::tls::sliced::Sliced(io)), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel: inbound connection ended with error");
            }
        }
        () = drain.signaled() => {
            // GOAWAY: the peer opens new streams elsewhere; these finish (or are cut).
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        () = go_away.notified() => {
            // Stale credentials: no new streams here; the open ones finish.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
    metrics.inbound_connections.dec();
}

fn status(code: http::StatusCode) -> http::Response<Empty<Bytes>> {
    let mut r = http::Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// One stream: admitted and proxied by `crate::tcp::proxy_to` on its own task; answered when
/// that decides (200 once the upstream is connected, or the refusal's status).
async fn stream(
    ctx: Arc<Ctx>,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Empty<Bytes>> {
    let metrics = super::metrics::get();
    if req.method() != http::Method::CONNECT {
        metrics.stream("inbound", "refused");
        return status(http::StatusCode::METHOD_NOT_ALLOWED);
    }
    if let Some(why) = ctx.credentials.stale(now_unix()) {
        metrics.stream("inbound", "refused");
        tracing::info!(peer = %ctx.peer, reason = why, "tunnel: stream refused; closing the connection to new streams");
        ctx.go_away.notify_one();
        return status(http::StatusCode::MISDIRECTED_REQUEST);
    }
    let Some(target) = (ctx.resolve)() else {
        metrics.stream("inbound", "refused");
        return status(http::StatusCode::SERVICE_UNAVAILABLE);
    };
    let slot = match &ctx.limit {
        Some(limit) => match limit.try_acquire(&ctx.name) {
            Some(slot) => Some(slot),
            None => {
                metrics.stream("inbound", "refused");
                return status(http::StatusCode::SERVICE_UNAVAILABLE);
            }
        },
        None => None,
    };
    let (respond, answer) = oneshot::channel();
    let down = StreamDownstream {
        respond,
        upgrade: hyper::upgrade::on(req),
        source: ctx.source,
    };
    let task_ctx = Arc::clone(&ctx);
    tokio::spawn(async move {
        let _slot = slot;
        let ctx = task_ctx;
        let tcp_target = TcpTarget {
            upstream: target.upstream,
            metrics: &target.metrics,
            authority: None,
        };
        crate::tcp::proxy_to(
            down,
            Some(ctx.peer.clone()),
            &target.listener,
            tcp_target,
            ctx.drain.clone(),
            ctx.drain_timeout,
        )
        .await;
    });
    match answer.await {
        Ok(code) => status(code),
        // The task ended without deciding (it cannot, short of a panic).
        Err(_) => {
            metrics.stream("inbound", "error");
            status(http::StatusCode::BAD_GATEWAY)
        }
    }
}

/// A CONNECT stream as `crate::tcp`'s downstream.
struct StreamDownstream {
    respond: oneshot::Sender<http::StatusCode>,
    upgrade: OnUpgrade,
    source: Option<SocketAddr>,
}

impl Downstream for StreamDownstream {
    type Io = TokioIo<Upgraded>;

    fn source(&self) -> Option<std::net::IpAddr> {
        self.source.map(|a| a.ip())
    }

    fn is_tls(&self) -> bool {
        // Writes go into HTTP/2 frames, not straight into rustls.
        false
    }

    async fn admit(self) -> std::io::Result<TokioIo<Upgraded>> {
        super::metrics::get().stream("inbound", "ok");
        if self.respond.send(http::StatusCode::OK).is_err() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the tunnel stream was reset",
            ));
        }
        let upgraded = self
            .upgrade
            .await
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionReset, e))?;
        Ok(TokioIo::new(upgraded))
    }

    async fn refuse(self, why: Refusal) {
        let (code, result) = match why {
            Refusal::Denied => (http::StatusCode::FORBIDDEN, "denied"),
            Refusal::RateLimited => (http::StatusCode::TOO_MANY_REQUESTS, "refused"),
            Refusal::Unreachable => (http::StatusCode::BAD_GATEWAY, "error"),
        };
        super::metrics::get().stream("inbound", result);
        let _ = self.respond.send(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::testing::TestCa;

    #[test]
    fn credentials_go_stale_on_a_trust_change_or_the_peer_certificate_expiring() {
        let trust = Arc::new(TrustStore::new());
        trust.set_discovery(&TestCa::new("cluster.local").bundle());
        let creds = Credentials {
            generation: trust.generation(),
            trust: Arc::clone(&trust),
            not_after: 1_000,
        };
        assert_eq!(creds.stale(999), None);
        assert_eq!(creds.stale(1_000), Some("the peer certificate expired"));
        // Another CA's bundle: connections verified against the old one take no new streams.
        trust.set_discovery(&TestCa::new("cluster.local").bundle());
        assert_eq!(
            creds.stale(999),
            Some("the trust bundle changed since the handshake")
        );
    }
}
