//! Upgrades and tunnels (ARCHITECTURE.md "Upgrades and tunnels"): the requests that leave the
//! request/response path for a byte stream, and the stream's life until it closes.
//!
//! This module owns
//! - telling them apart ([`Kind::of`]): HTTP/1.1 `Connection: upgrade` + `Upgrade: <protocols>`
//!   (WebSocket and any other protocol, never `h2c`: see [`super::headers`]), RFC 8441 extended
//!   CONNECT (HTTP/2 `:method CONNECT` + `:protocol`), and CONNECT host:port
//!   ([`super::connect`] serves that one);
//! - forwarding an upgrade ([`forward`]), routed by the request path like any request (and, on
//!   an inbound listener, authorized like any request): on a dedicated HTTP/1.1 upstream
//!   connection ([`crate::upstream::EndpointPool::connect_upgrade`], never pooled; mTLS to a
//!   mesh endpoint), whatever the cluster's upstream protocol. An extended CONNECT with
//!   `:protocol websocket` is translated to an HTTP/1.1 WebSocket handshake (`GET`, `Upgrade:
//!   websocket`, a fresh `Sec-WebSocket-Key` whose `Sec-WebSocket-Accept` is verified) and the
//!   101 answered as 200: WebSocket frames are the same on both. Other `:protocol` values are
//!   answered 501 `unsupported-protocol`. An answer other than 101 is relayed as a normal
//!   response (and the connection closed after it);
//! - the [`Tunnel`] once the upstream agreed: the downstream stream (hyper's upgrade API, or
//!   the socket the HTTP/1.1 loop hands over, [`Prefixed`] with what hyper had read past the
//!   request) spliced to the upstream one by the TCP copy loop ([`crate::tcp::splice`]: half-close,
//!   the listener's idle timeout), counted in `weft_tunnel_*` ([`super::tunnel_metrics`]) and
//!   access-logged when it closes ([`crate::observe::access_log::log_tunnel`]).
//!
//! The request is counted in `weft_requests_total` with the status the downstream got (101, or
//! 200 for an extended CONNECT) when the tunnel starts; it stays "in flight" on its downstream
//! connection (which then never idles out or hibernates) and holds its `max_requests` and
//! `max_connections` breaker slots until the tunnel closes.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::breaker::{Limit, Permit};
use crate::cluster::Cluster;
use crate::drain::DrainWatch;
use crate::http::body::{Completion, CountedBody, ResponseBody};
use crate::http::error::{ProxyError, X_WEFT_ERROR};
use crate::http::headers::{
    prepare_upgrade_request, set_upgrade, strip_hop_by_hop, upgrade_protocols,
};
use crate::http::idle::{Activity, InFlight};
use crate::http::tunnel_metrics::{self, TunnelKind};
use crate::metrics::RequestMetrics;
use crate::observe::access_log::{log_tunnel, TunnelLog};
use crate::observe::ResponseFlags;
use crate::snapshot::Listener;
use crate::tcp::{splice, Counted, Sinks};
use crate::tls::io::ClientIo;
use crate::tls::spiffe::SpiffeId;
use crate::upstream::UpstreamError;

/// How long the dedicated upstream connection may take to hand its stream over once its 101
/// arrived (it does so at once: this only bounds a broken connection).
const HANDOFF_LIMIT: Duration = Duration::from_secs(5);

/// RFC 6455 §1.3: appended to `Sec-WebSocket-Key` before hashing into `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");
const SEC_WEBSOCKET_VERSION: HeaderName = HeaderName::from_static("sec-websocket-version");

/// A request that asks for a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 upgrade to these protocols (the `Upgrade` values without `h2c`).
    Upgrade(HeaderValue),
    /// RFC 8441 extended CONNECT with this `:protocol`.
    ExtendedConnect(String),
    /// CONNECT host:port ([`super::connect`]).
    Connect,
}

impl Kind {
    /// What `req` asks for; `None` for an ordinary request (including `Upgrade: h2c`, which is
    /// served as plain HTTP/1.1). One comparison and one header lookup per request.
    pub fn of<B>(req: &Request<B>) -> Option<Self> {
        if req.method() == Method::CONNECT {
            return Some(match req.extensions().get::<hyper::ext::Protocol>() {
                Some(p) => Self::ExtendedConnect(p.as_str().to_owned()),
                None => Self::Connect,
            });
        }
        if req.version() != Version::HTTP_11 {
            return None;
        }
        upgrade_protocols(req.headers()).map(Self::Upgrade)
    }
}

/// Where the request path routed an upgrade request (its `Target`).
#[derive(Debug)]
pub struct Routed {
    /// The destination cluster.
    pub cluster: Arc<Cluster>,
    /// The request's metric handles.
    pub metrics: Arc<RequestMetrics>,
    /// The route's timeout, else the cluster's: bounds the handshake (until the 101).
    pub timeout: Option<Duration>,
    /// The route's rate limit refused the request: `Retry-After` seconds.
    pub rate_limited: Option<u64>,
    /// The downstream peer's IP address (ring hash on `source_ip`).
    pub source: Option<IpAddr>,
    /// The request on its downstream connection; held by the tunnel until it closes.
    pub in_flight: InFlight,
}

/// The downstream side of a tunnel request.
#[derive(Debug)]
pub struct Downstream {
    /// The listener (as current when the request arrived): direction, name, idle timeout.
    pub listener: Arc<Listener>,
    /// The caller's verified identity (inbound mTLS).
    pub peer: Option<Arc<SpiffeId>>,
    /// The downstream connection's activity: where an HTTP/1.1 connection picks up its tunnel.
    pub activity: Arc<Activity>,
}

/// A proxy-generated answer of the tunnel paths: `status`, `x-weft-error: code`, `message`.
pub(crate) fn local_error(
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(Bytes::from(format!("{message}\n"))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(X_WEFT_ERROR, HeaderValue::from_static(code));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The request's authority as the client gave it (URI authority, else `Host`).
pub(crate) fn authority_of<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Forwards an upgrade request (`kind` is [`Kind::Upgrade`] or [`Kind::ExtendedConnect`]) to
/// `routed`'s cluster and relays the answer; on a 101 the tunnel starts once the response is
/// written (module docs).
pub async fn forward(
    mut req: Request<Incoming>,
    kind: Kind,
    routed: Routed,
    down: Downstream,
    start: Instant,
) -> Result<Response<ResponseBody>, Infallible> {
    let Routed {
        cluster,
        metrics,
        timeout,
        rate_limited,
        source,
        in_flight,
    } = routed;
    let elapsed = || start.elapsed().as_secs_f64();
    let fail = |e: ProxyError| {
        tracing::debug!(cluster = %cluster.name, error = %e, "upgrade request failed");
        metrics.record(e.status(), "", elapsed());
        e.to_response()
    };
    if let Some(secs) = rate_limited {
        return Ok(fail(ProxyError::RateLimited(secs)));
    }
    // Taken before the request is rewritten and sent: fulfilled once hyper wrote our answer
    // (HTTP/2 streams, connections detected by hyper-util's `auto`).
    let on_upgrade = hyper::upgrade::on(&mut req);
    let downstream_h2 = req.version() == Version::HTTP_2;
    let info = RequestInfo {
        method: req.method().as_str().to_owned(),
        authority: authority_of(&req),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
    };
    let (protocols, websocket_key, tunnel_kind, protocol) = match kind {
        Kind::Upgrade(protocols) => {
            let websocket = protocols.as_bytes().eq_ignore_ascii_case(b"websocket");
            let label = String::from_utf8_lossy(protocols.as_bytes()).into_owned();
            if websocket {
                (
                    protocols,
                    None,
                    TunnelKind::WebSocket,
                    "websocket".to_owned(),
                )
            } else {
                (protocols, None, TunnelKind::Upgrade, label)
            }
        }
        Kind::ExtendedConnect(p) if p.eq_ignore_ascii_case("websocket") => {
            let key = websocket_key();
            translate_extended_connect(&mut req, &key);
            (
                HeaderValue::from_static("websocket"),
                Some(key),
                TunnelKind::WebSocket,
                "websocket".to_owned(),
            )
        }
        Kind::ExtendedConnect(p) => {
            let resp = local_error(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported-protocol",
                &format!("extended CONNECT with :protocol {p:?} is not supported (only websocket)"),
            );
            metrics.record(resp.status(), "", elapsed());
            return Ok(resp);
        }
        Kind::Connect => {
            // The pipeline sends CONNECT host:port to `super::connect`, never here.
            let resp = local_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "CONNECT reached the upgrade path",
            );
            metrics.record(resp.status(), "", elapsed());
            return Ok(resp);
        }
    };
    // Held until the tunnel closes (or the relayed response ends).
    let active = match cluster
        .state()
        .breaker
        .try_acquire(Limit::Requests, cluster.breaker.get(Limit::Requests))
    {
        Ok(p) => p,
        Err(l) => return Ok(fail(ProxyError::Overloaded(l))),
    };
    crate::observe::note_route(&req, metrics.route(), &cluster.name);
    let note = crate::observe::note_of(&req);
    let hash = cluster.request_hash(req.headers(), source);
    let Some(i) = cluster.pick_index(hash) else {
        return Ok(fail(ProxyError::NoEndpoints {
            cluster: cluster.name.to_string(),
        }));
    };
    let endpoint = &cluster.endpoints[i];
    let addr = endpoint.addr;
    if let Some(note) = &note {
        note.attempt(addr);
    }
    prepare_upgrade_request(&mut req, protocols.clone(), addr);
    let pending = match cluster
        .state()
        .breaker
        .try_acquire(Limit::Pending, cluster.breaker.get(Limit::Pending))
    {
        Ok(p) => p,
        Err(l) => return Ok(fail(ProxyError::Overloaded(l))),
    };
    let req = req.map(|b| CountedBody::new(b, Arc::clone(&metrics)));
    let exchange = async {
        let (mut tx, upgraded) = endpoint
            .pool
            .connect_upgrade::<CountedBody>(cluster.connect_timeout, &cluster.connect_errors)
            .await?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::after_send(addr, e))?;
        Ok::<_, UpstreamError>((resp, upgraded))
    };
    let load = endpoint.load.start();
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, exchange).await {
            Ok(r) => r.map_err(ProxyError::from),
            Err(_) => Err(ProxyError::RequestTimeout(limit)),
        },
        None => exchange.await.map_err(ProxyError::from),
    };
    drop(pending);
    let (resp, upgraded) = match result {
        Ok(ok) => {
            load.observe();
            cluster.report(i, !ok.0.status().is_server_error());
            ok
        }
        Err(e) => {
            drop(load);
            if !matches!(e, ProxyError::Overloaded(_) | ProxyError::BadRequest(_)) {
                cluster.report(i, false);
            }
            return Ok(fail(e));
        }
    };
    metrics.record_response_headers(elapsed());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Declined (or failed): an ordinary response; the dedicated connection closes after it.
        drop(upgraded);
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = if downstream_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let completion = Completion {
            grpc_status: None,
            status: parts.status,
            metrics,
            start,
            active: Some(active),
            in_flight: Some(in_flight),
        };
        return Ok(Response::from_parts(
            parts,
            ResponseBody::upstream(body, completion),
        ));
    }
    if let Some(key) = &websocket_key {
        let expected = websocket_accept(key);
        let accept = resp.headers().get(SEC_WEBSOCKET_ACCEPT);
        if accept.is_none_or(|a| a.as_bytes() != expected.as_bytes()) {
            tracing::debug!(%addr, ?accept, "upstream 101 with a wrong Sec-WebSocket-Accept");
            let resp = local_error(
                StatusCode::BAD_GATEWAY,
                "upgrade-failed",
                &format!("upstream {addr} answered the WebSocket handshake with a wrong Sec-WebSocket-Accept"),
            );
            metrics.record(resp.status(), "", elapsed());
            return Ok(resp);
        }
    }
    let upstream = match tokio::time::timeout(HANDOFF_LIMIT, upgraded).await {
        Ok(Ok(u)) => u,
        _ => {
            let resp = local_error(
                StatusCode::BAD_GATEWAY,
                "upstream-reset",
                &format!("upstream {addr} closed after its 101"),
            );
            metrics.record(resp.status(), "", elapsed());
            return Ok(resp);
        }
    };
    let (mut parts, _empty) = resp.into_parts();
    let agreed = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if downstream_h2 {
        // RFC 8441 §5: the stream is the tunnel once the server answers 2xx; HTTP/2 has no
        // connection-specific headers and no handshake hashes.
        parts.status = StatusCode::OK;
        parts.version = Version::HTTP_2;
        parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
    } else {
        parts.version = Version::HTTP_11;
        set_upgrade(&mut parts.headers, agreed.unwrap_or(protocols));
    }
    let status = parts.status;
    metrics.record_finished(status, "", elapsed());
    let tunnel = Tunnel {
        upstream: Prefixed::new(upstream.io, upstream.read_buf),
        upstream_addr: Some(addr),
        kind: tunnel_kind,
        log: TunnelInfo {
            start,
            start_wall: SystemTime::now()
                .checked_sub(start.elapsed())
                .unwrap_or_else(SystemTime::now),
            answered_after: start.elapsed(),
            request: info,
            protocol,
            status: status.as_u16(),
            route: metrics.route().to_owned(),
            cluster: cluster.name.to_string(),
            peer: down.peer.as_deref().map(|p| p.as_str().to_owned()),
        },
        listener: Arc::clone(&down.listener),
        _held: Held {
            _in_flight: in_flight,
            _active: Some(active),
            _connection: upstream.permit,
        },
    };
    hand_over(tunnel, &down, downstream_h2, on_upgrade);
    Ok(Response::from_parts(parts, ResponseBody::empty()))
}

/// Starts `tunnel` once its downstream stream exists: an HTTP/1.1 connection served by the
/// proxy's own loop picks it up after writing the response; otherwise hyper's upgrade API
/// yields the stream (an HTTP/2 stream, a connection served by hyper-util's `auto`).
pub(crate) fn hand_over(
    tunnel: Tunnel,
    down: &Downstream,
    downstream_h2: bool,
    on_upgrade: hyper::upgrade::OnUpgrade,
) {
    if !downstream_h2 && down.activity.manual_upgrades() {
        down.activity.deposit_tunnel(Box::new(tunnel));
        return;
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => tunnel.run(TokioIo::new(upgraded), false, None).await,
            Err(e) => tracing::debug!(error = %e, "downstream never switched; tunnel dropped"),
        }
    });
}

/// Turns an extended CONNECT (`:protocol websocket`) into the HTTP/1.1 WebSocket handshake
/// request (RFC 8441 §5 / RFC 6455 §4.1) with `key` as `Sec-WebSocket-Key`; `Connection` and
/// `Upgrade` are set by [`prepare_upgrade_request`].
fn translate_extended_connect<B>(req: &mut Request<B>, key: &str) {
    *req.method_mut() = Method::GET;
    req.extensions_mut().remove::<hyper::ext::Protocol>();
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(key) {
        h.insert(SEC_WEBSOCKET_KEY, v);
    }
    if !h.contains_key(SEC_WEBSOCKET_VERSION) {
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
fn websocket_key() -> String {
    base64(&rand::random::<[u8; 16]>())
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with (RFC 6455 §4.2.2).
fn websocket_accept(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    base64(digest.as_ref())
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The request a tunnel was opened by, for its access log line.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) method: String,
    pub(crate) authority: String,
    pub(crate) path: String,
}

/// What a tunnel's access log line says besides its bytes and flags.
#[derive(Debug)]
pub(crate) struct TunnelInfo {
    pub(crate) start: Instant,
    pub(crate) start_wall: SystemTime,
    /// Arrival of the request to the upstream's answer.
    pub(crate) answered_after: Duration,
    pub(crate) request: RequestInfo,
    /// `websocket`, another upgrade token, or `TCP` (CONNECT).
    pub(crate) protocol: String,
    pub(crate) status: u16,
    pub(crate) route: String,
    pub(crate) cluster: String,
    pub(crate) peer: Option<String>,
}

/// What a tunnel holds until it closes.
#[derive(Debug)]
pub(crate) struct Held {
    /// The request stays in flight on its downstream connection.
    pub(crate) _in_flight: InFlight,
    /// The cluster's `max_requests` slot.
    pub(crate) _active: Option<Permit>,
    /// The cluster's `max_connections` slot of the dedicated upstream connection.
    pub(crate) _connection: Option<Permit>,
}

/// An agreed tunnel waiting for its downstream stream: the upstream side is connected and
/// answered (101, or the TCP connect of a CONNECT).
#[derive(Debug)]
pub struct Tunnel {
    pub(crate) upstream: Prefixed<ClientIo>,
    pub(crate) upstream_addr: Option<SocketAddr>,
    pub(crate) kind: TunnelKind,
    pub(crate) log: TunnelInfo,
    pub(crate) listener: Arc<Listener>,
    pub(crate) _held: Held,
}

impl Tunnel {
    /// Splices `downstream` (a TLS stream if `downstream_tls`) and the upstream until both
    /// sides closed, either failed, no byte moved for the listener's idle timeout, or
    /// `drain_timeout` after `drain` signalled; then writes the access log line.
    pub async fn run<D>(
        self,
        downstream: D,
        downstream_tls: bool,
        drain: Option<(&mut DrainWatch, Duration)>,
    ) where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        let Tunnel {
            mut upstream,
            upstream_addr,
            kind,
            log,
            listener,
            _held,
        } = self;
        let handles = tunnel_metrics::get().handles(listener.direction, kind);
        let open = handles.open();
        let sinks = Sinks {
            client_tls: downstream_tls,
            upstream_tls: upstream.get_ref().is_tls(),
        };
        let mut client = Counted::new(downstream);
        let mut flags = ResponseFlags::default();
        let cut_after_drain = async {
            match drain {
                Some((watch, limit)) => {
                    watch.signaled().await;
                    tokio::time::sleep(limit).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = splice(&mut client, &mut upstream, &handles.rx, &handles.tx, Some(listener.idle_timeout), sinks) => {
                if let Err(e) = res {
                    if e.kind() == io::ErrorKind::TimedOut {
                        flags.insert(ResponseFlags::UPSTREAM_TIMEOUT);
                    } else {
                        flags.insert(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
                    }
                    tracing::debug!(upstream = ?upstream_addr, error = %e, "tunnel ended with error");
                }
            }
            () = cut_after_drain => tracing::debug!(upstream = ?upstream_addr, "tunnel cut after drain timeout"),
        }
        drop(open);
        log_tunnel(
            &listener,
            &TunnelLog {
                start: log.start_wall,
                duration: log.start.elapsed(),
                response_duration: log.answered_after,
                flags,
                method: &log.request.method,
                authority: &log.request.authority,
                path: &log.request.path,
                protocol: &log.protocol,
                status: log.status,
                upstream: upstream_addr,
                route: &log.route,
                cluster: &log.cluster,
                peer_identity: log.peer.as_deref(),
                bytes_received: client.bytes_read(),
                bytes_sent: client.bytes_written(),
            },
        );
    }
}

/// A stream that first yields `prefix` (bytes already read from it by an HTTP codec: what
/// followed the head that agreed to the tunnel), then reads on from the stream; writes go
/// straight through.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, read after `prefix`.
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
