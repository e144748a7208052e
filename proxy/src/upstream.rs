//! Connections to upstream endpoints, one [`EndpointPool`] per endpoint address, made by the
//! first request to the endpoint ([`LazyPool`]), not for every endpoint a snapshot lists.
//!
//! - HTTP/1.1: a LIFO stack of idle connections, each driven by the request that uses it
//!   ([`crate::h1client`]: no connection task). A connection goes back to the pool only once its
//!   response body has been read to the end (the body hands it back), and idle connections are
//!   bounded in number and age; one the upstream closed while idle is not reused.
//! - HTTP/2: one shared connection per endpoint, multiplexing every request; re-established
//!   (by a single task) when it closes, and dropped once no request used it for the idle
//!   timeout (so a sidecar does not keep a connection to every endpoint it ever called).
//!
//! A request that never reached a stale pooled connection is retried on another one, so an
//! upstream closing an idle keep-alive connection does not surface as a 502.
//!
//! An upgrade request (WebSocket, `crate::http::upgrade`) gets a dedicated HTTP/1.1 connection
//! instead ([`EndpointPool::connect_upgrade`]), never pooled: after a 101 it carries the
//! tunnel, and after any other answer it is closed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::h1client::{self, BoxError, Conn};

use crate::tls::io::ClientIo;
use crate::tls::spiffe::SpiffeId;
use crate::tls::{originate, Alpn, Expect};

use crate::breaker::{ConnectionGate, Permit};
use crate::retry::RequestBody;

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 128;
/// Idle HTTP/1.1 connections older than this are closed, unless the cluster sets its own
/// `idle_timeout` ([`EndpointPool::set_idle_timeout`]).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// TCP connect did not complete in time.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The cluster's connect timeout.
        after: Duration,
    },
    /// The mTLS handshake with a mesh endpoint failed (wrong identity, untrusted chain, no
    /// certificate of our own, ...).
    #[error("mTLS handshake with {addr} failed: {source}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// rustls' error, as I/O.
        source: std::io::Error,
    },
    /// The connection was refused before any byte was sent: the endpoint expects mTLS and this
    /// sidecar cannot originate it (no identity, or the endpoint's identity is invalid).
    #[error("not connecting to {addr}: {reason}")]
    Refused {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP handshake (h2 preface/settings) failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's error.
        source: hyper::Error,
    },
    /// Reading the downstream request body failed while forwarding it (malformed chunked body,
    /// client reset): the client's fault, not the upstream's.
    #[error("reading the request body for {addr} failed: {source}")]
    RequestBody {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's or the HTTP/1.1 client's error.
        source: BoxError,
    },
    /// The cluster's `max_connections` circuit-breaker limit is reached.
    #[error("connection limit of the cluster reached; not connecting to {addr}")]
    Overloaded {
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The connection closed or was reset before a response arrived.
    #[error("upstream {addr} reset before responding: {source}")]
    Reset {
        /// The endpoint.
        addr: SocketAddr,
        /// hyper's or the HTTP/1.1 client's error.
        source: BoxError,
    },
}

impl UpstreamError {
    /// Whether the failure happened while connecting (-> 503 connect-failed), as opposed to
    /// after the request was handed to a connection (-> 502 upstream-reset).
    pub fn is_connect(&self) -> bool {
        !matches!(self, Self::Reset { .. } | Self::RequestBody { .. })
    }

    /// Classifies an error from a request already handed to a connection.
    pub fn after_send(addr: SocketAddr, source: hyper::Error) -> Self {
        // hyper reports failures of the body *we* stream (the downstream request body) as
        // "user" errors; everything else is the upstream connection failing.
        if source.is_user() {
            Self::RequestBody {
                addr,
                source: source.into(),
            }
        } else {
            Self::Reset {
                addr,
                source: source.into(),
            }
        }
    }

    /// Classifies an error of the HTTP/1.1 client ([`crate::h1client`]).
    pub fn after_send_h1(addr: SocketAddr, source: h1client::Error) -> Self {
        if source.is_request_body() {
            Self::RequestBody {
                addr,
                source: source.into(),
            }
        } else {
            Self::Reset {
                addr,
                source: source.into(),
            }
        }
    }
}

/// The stream of a dedicated upgrade connection whose upstream answered 101
/// ([`EndpointPool::connect_upgrade`]).
#[derive(Debug)]
pub struct UpgradedUpstream {
    /// The connection (mTLS to a mesh endpoint).
    pub io: ClientIo,
    /// Bytes the upstream sent after the 101 head (already tunnel data).
    pub read_buf: bytes::Bytes,
    /// The cluster's `max_connections` slot: held while the tunnel lives.
    pub permit: Option<Permit>,
}

/// HTTP version to use towards the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.1.
    H1,
    /// HTTP/2 prior knowledge.
    H2,
}

struct IdleH1 {
    conn: Box<Conn<H1Io>>,
    /// [`crate::lb::load::now_nanos`] at check-in.
    since: u64,
}

/// The stream of a pooled HTTP/1.1 connection, holding its `max_connections` slot for as long
/// as it lives.
#[derive(Debug)]
pub struct H1Io {
    io: ClientIo,
    _permit: Option<Permit>,
}

impl AsyncRead for H1Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for H1Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body from an endpoint: read by the request's task over HTTP/1.1, or hyper's over
/// the shared HTTP/2 connection (and for upgrade requests).
#[derive(Debug)]
pub enum UpstreamBody {
    /// HTTP/1.1 ([`crate::h1client`]); hands its connection back to the pool when it ends.
    H1(h1client::ResponseBody<H1Io, RequestBody>),
    /// hyper's body.
    Hyper(Incoming),
}

impl UpstreamBody {
    /// Hands an HTTP/1.1 connection whose exchange is over back to its pool now, idle since
    /// `now` (the owner's [`crate::lb::load::now_nanos`] reading at the response's end); a
    /// body dropped without this does it with a clock read of its own.
    pub fn release_at(&mut self, now: u64) {
        if let Self::H1(b) = self {
            b.release_at(now);
        }
    }
}

impl From<Incoming> for UpstreamBody {
    fn from(b: Incoming) -> Self {
        Self::Hyper(b)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
        }
    }
}

/// Connections to one endpoint.
pub struct EndpointPool {
    addr: SocketAddr,
    /// What connections must be: mTLS verifying the endpoint sidecar's identity, plaintext, or
    /// refused (see [`crate::tls::originate`]). Part of the pool's key: a new expectation means
    /// a new pool.
    expect: Expect,
    idle_h1: Mutex<VecDeque<IdleH1>>,
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Serializes establishing the shared h2 connection (single flight).
    h2_connecting: tokio::sync::Mutex<()>,
    /// The cluster's `max_connections` breaker: every open connection holds a permit.
    gate: Option<Arc<ConnectionGate>>,
    /// Idle HTTP/1.1 connections are closed after this many milliseconds (the cluster's
    /// `idle_timeout`; updated by every snapshot that has the endpoint).
    idle_ms: AtomicU64,
    /// Whether a task is closing expired idle connections (one per pool while any are idle).
    reaping: AtomicBool,
    /// [`crate::lb::load::now_nanos`] of the last request sent to the shared HTTP/2 connection
    /// (the attempt's reading).
    h2_used: AtomicU64,
    /// Whether a task closes the shared HTTP/2 connection once idle for the idle timeout.
    h2_reaping: AtomicBool,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.addr)
            .field("expect", &self.expect)
            .finish_non_exhaustive()
    }
}

impl h1client::Recycle<H1Io> for EndpointPool {
    fn recycle(self: Arc<Self>, conn: Box<Conn<H1Io>>) {
        self.checkin(conn, crate::lb::load::now_nanos());
    }

    fn recycle_at(self: Arc<Self>, conn: Box<Conn<H1Io>>, now: u64) {
        self.checkin(conn, now);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Closes a pool's idle HTTP/1.1 connections as they expire; ends when none is idle or the pool
/// is gone.
async fn reap_idle(pool: std::sync::Weak<EndpointPool>) {
    loop {
        let next = match pool.upgrade() {
            Some(p) => p.expire_idle(),
            None => return,
        };
        match next {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return,
        }
    }
}

/// Drops a pool's shared HTTP/2 connection once no request was sent on it for the pool's idle
/// timeout (requests in flight on it finish; the connection closes after them); ends when the
/// pool has no HTTP/2 connection or is gone.
async fn reap_idle_h2(pool: std::sync::Weak<EndpointPool>) {
    loop {
        let wait = {
            let Some(p) = pool.upgrade() else { return };
            let idle = p.idle_timeout();
            let since = Duration::from_nanos(
                crate::lb::load::now_nanos().saturating_sub(p.h2_used.load(Ordering::Acquire)),
            );
            if since < idle {
                idle - since
            } else {
                let closed = lock(&p.h2).take().is_some();
                if closed {
                    tracing::debug!(addr = %p.addr, ?idle, "closing idle upstream h2 connection");
                }
                p.h2_reaping.store(false, Ordering::Release);
                // A request may have made a new connection meanwhile, seeing this task still
                // running: keep watching it.
                if lock(&p.h2).is_some() && !p.h2_reaping.swap(true, Ordering::AcqRel) {
                    idle
                } else {
                    return;
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Locks ignoring poisoning: the guarded data (a queue / an optional sender) stays consistent
/// even if a holder panicked, because every critical section is a single push/pop/replace.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An endpoint's connection pool, made on first use: a snapshot of a large scope has thousands
/// of endpoints it never calls, and an empty [`EndpointPool`] (locks, h2 single-flight, idle
/// bookkeeping) costs a few hundred bytes each. The [`EndpointPool`] is created by the first
/// HTTP request sent to the endpoint (data path, mirror, upgrade: [`LazyPool::get`], or through
/// `Deref`); until then only what every snapshot must know without connecting (address,
/// [`Expect`], read by TCP connections, health checks and peer labels) is kept.
///
/// The cell holding the pool is shared by every snapshot that has the endpoint with the same
/// expectation ([`LazyPool::carry`]), so a pool made through an older snapshot after a newer
/// one was built is the newer one's too, and a push keeps warm connections.
pub struct LazyPool {
    addr: SocketAddr,
    expect: Expect,
    gate: Option<Arc<ConnectionGate>>,
    idle: Option<Duration>,
    cell: Arc<OnceLock<Arc<EndpointPool>>>,
}

impl std::fmt::Debug for LazyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPool")
            .field("addr", &self.addr)
            .field("expect", &self.expect)
            .field("created", &self.cell.get().is_some())
            .finish_non_exhaustive()
    }
}

impl LazyPool {
    /// No pool yet for `addr`; once made, its connections are as `expect` says, count against
    /// `gate` (the cluster's `max_connections`) and idle out after `idle` (`None`: default).
    pub fn new(
        addr: SocketAddr,
        expect: Expect,
        gate: Option<Arc<ConnectionGate>>,
        idle: Option<Duration>,
    ) -> Self {
        Self {
            addr,
            expect,
            gate,
            idle,
            cell: Arc::default(),
        }
    }

    /// The pool of `previous` (the same endpoint and expectation in the previous snapshot),
    /// made or not; one made from now on idles out after `idle`. A pool made already keeps its
    /// idle timeout until the caller applies the new one ([`LazyPool::created`],
    /// [`EndpointPool::set_idle_timeout`]) once the snapshot is accepted.
    pub fn carry(
        previous: &LazyPool,
        gate: Option<Arc<ConnectionGate>>,
        idle: Option<Duration>,
    ) -> Self {
        Self {
            addr: previous.addr,
            expect: previous.expect.clone(),
            gate,
            idle,
            cell: Arc::clone(&previous.cell),
        }
    }

    /// The pool, made now if this is the endpoint's first use.
    pub fn get(&self) -> &Arc<EndpointPool> {
        self.cell.get_or_init(|| {
            let pool = match &self.gate {
                Some(gate) => EndpointPool::with_gate(self.addr, Arc::clone(gate)),
                None => EndpointPool::new(self.addr),
            }
            .expect(self.expect.clone());
            pool.set_idle_timeout(self.idle);
            Arc::new(pool)
        })
    }

    /// The pool if it was made (`None` while no HTTP request was sent to the endpoint).
    pub fn created(&self) -> Option<&Arc<EndpointPool>> {
        self.cell.get()
    }

    /// Whether `self` and `other` are one endpoint's pool (made or not).
    pub fn same_as(&self, other: &LazyPool) -> bool {
        Arc::ptr_eq(&self.cell, &other.cell)
    }

    /// What connections to the endpoint must be (without making the pool).
    pub fn expectation(&self) -> &Expect {
        &self.expect
    }

    /// The identity the endpoint must present, if connections to it are mTLS (without making
    /// the pool).
    pub fn mesh_identity(&self) -> Option<&SpiffeId> {
        self.expect.identity()
    }

    /// The endpoint address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle HTTP/1.1 connections in the pool (0 while it was not made).
    pub fn idle_connections(&self) -> usize {
        self.cell.get().map_or(0, |p| p.idle_connections())
    }
}

impl std::ops::Deref for LazyPool {
    type Target = Arc<EndpointPool>;

    /// The pool, made on first use ([`LazyPool::get`]).
    fn deref(&self) -> &Arc<EndpointPool> {
        self.get()
    }
}

impl EndpointPool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            expect: Expect::Plain,
            idle_h1: Mutex::new(VecDeque::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            gate: None,
            idle_ms: AtomicU64::new(millis(IDLE_TIMEOUT)),
            reaping: AtomicBool::new(false),
            h2_used: AtomicU64::new(0),
            h2_reaping: AtomicBool::new(false),
        }
    }

    /// An empty pool whose connections count against `gate` (circuit breaker).
    pub fn with_gate(addr: SocketAddr, gate: Arc<ConnectionGate>) -> Self {
        Self {
            gate: Some(gate),
            ..Self::new(addr)
        }
    }

    /// This pool, with connections as `expect` says (plaintext by default).
    #[must_use]
    pub fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    /// What connections to the endpoint must be.
    pub fn expectation(&self) -> &Expect {
        &self.expect
    }

    /// Closes idle HTTP/1.1 connections after `idle` (`None`: the proxy default, 30s).
    pub fn set_idle_timeout(&self, idle: Option<Duration>) {
        self.idle_ms
            .store(millis(idle.unwrap_or(IDLE_TIMEOUT)), Ordering::Relaxed);
    }

    /// How long an HTTP/1.1 connection may stay idle in the pool.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
    }

    /// Idle HTTP/1.1 connections in the pool (tests, `/config_dump`).
    pub fn idle_connections(&self) -> usize {
        lock(&self.idle_h1).len()
    }

    /// The endpoint address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The identity the endpoint must present, if connections to it are mTLS.
    pub fn mesh_identity(&self) -> Option<&SpiffeId> {
        self.expect.identity()
    }

    /// Sends `req` over `wire`, connecting if needed. An HTTP/1.1 connection goes back to the
    /// pool when the response body has been read to the end.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        wire: Wire,
        connect_timeout: Duration,
        connect_errors: &IntCounter,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let now = crate::lb::load::now_nanos();
        self.send_at(req, wire, connect_timeout, connect_errors, now)
            .await
    }

    /// [`EndpointPool::send`] at `now` (the caller's [`crate::lb::load::now_nanos`] reading,
    /// which decides whether an idle connection has expired).
    pub async fn send_at(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        wire: Wire,
        connect_timeout: Duration,
        connect_errors: &IntCounter,
        now: u64,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match wire {
            Wire::H1 => {
                let (head, body) = req.into_parts();
                self.send_h1(&head, body, connect_timeout, connect_errors, now)
                    .await
            }
            Wire::H2 => {
                let sent = self.send_h2(req, connect_timeout, connect_errors).await;
                self.note_h2_use(now);
                Ok(sent?.map(UpstreamBody::Hyper))
            }
        }
    }

    /// TCP connect, then the mTLS handshake to a mesh endpoint (ALPN per `wire`), each within
    /// `timeout`.
    async fn connect(
        &self,
        timeout: Duration,
        errors: &IntCounter,
        wire: Wire,
    ) -> Result<(TokioIo<ClientIo>, Option<Permit>), UpstreamError> {
        let addr = self.addr;
        let permit = match &self.gate {
            Some(g) => Some(
                g.try_open()
                    .map_err(|_| UpstreamError::Overloaded { addr })?,
            ),
            None => None,
        };
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                errors.inc();
                return Err(UpstreamError::Connect { addr, source });
            }
            Err(_) => {
                errors.inc();
                return Err(UpstreamError::ConnectTimeout {
                    addr,
                    after: timeout,
                });
            }
        };
        // Best effort: latency matters more than packet count for request/response traffic.
        let _ = stream.set_nodelay(true);
        let alpn = match wire {
            Wire::H1 => Alpn::Http1,
            Wire::H2 => Alpn::H2,
        };
        let tls = tokio::time::timeout(timeout, originate(stream, addr.ip(), &self.expect, alpn));
        match tls.await {
            Ok(Ok(io)) => Ok((TokioIo::new(io), permit)),
            Ok(Err(source)) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                errors.inc();
                Err(UpstreamError::Refused {
                    addr,
                    reason: source.to_string(),
                })
            }
            Ok(Err(source)) => {
                errors.inc();
                Err(UpstreamError::Tls { addr, source })
            }
            Err(_) => {
                errors.inc();
                Err(UpstreamError::ConnectTimeout {
                    addr,
                    after: timeout,
                })
            }
        }
    }

    /// The most recently used idle connection that has not expired at `now` (the attempt's
    /// [`crate::lb::load::now_nanos`] reading: no clock read of its own).
    fn pop_idle_h1(&self, now: u64) -> Option<Box<Conn<H1Io>>> {
        let timeout = self.idle_timeout();
        let mut idle = lock(&self.idle_h1);
        while let Some(c) = idle.pop_back() {
            if crate::lb::load::between(c.since, now) < timeout {
                return Some(c.conn);
            }
        }
        None
    }

    /// Pools `conn`, idle since `now` (a [`crate::lb::load::now_nanos`] reading).
    fn checkin(self: &Arc<Self>, conn: Box<Conn<H1Io>>, now: u64) {
        let timeout = self.idle_timeout();
        {
            let mut idle = lock(&self.idle_h1);
            // Oldest first: drop the expired and anything over the bound (dropping the sender
            // closes the connection).
            while idle.front().is_some_and(|c| {
                crate::lb::load::between(c.since, now) >= timeout || idle.len() >= MAX_IDLE_H1
            }) {
                idle.pop_front();
            }
            idle.push_back(IdleH1 { conn, since: now });
        }
        // Close connections when they expire, not only when the pool is next used.
        if !self.reaping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(reap_idle(Arc::downgrade(self)));
                }
                Err(_) => self.reaping.store(false, Ordering::Release),
            }
        }
    }

    /// Drops expired idle connections; `Some(wait)` until the next one expires, `None` (and no
    /// longer reaping) when none is left.
    fn expire_idle(&self) -> Option<Duration> {
        let now = crate::lb::load::now_nanos();
        let timeout = self.idle_timeout();
        let mut idle = lock(&self.idle_h1);
        // Also drop the ones the upstream closed meanwhile (a read that does not block).
        let mut noop = Context::from_waker(Waker::noop());
        idle.retain_mut(|c| {
            crate::lb::load::between(c.since, now) < timeout && c.conn.poll_usable(&mut noop)
        });
        match idle.front() {
            Some(c) => Some(timeout.saturating_sub(crate::lb::load::between(c.since, now))),
            None => {
                // Under the lock: a checkin after this sees `false` and starts a new reaper.
                self.reaping.store(false, Ordering::Release);
                None
            }
        }
    }

    /// [`EndpointPool::send_at`] of a request that may be sent again (a retry): its head is
    /// only read over HTTP/1.1 and copied over HTTP/2.
    pub async fn send_head(
        self: &Arc<Self>,
        head: &http::request::Parts,
        body: RequestBody,
        wire: Wire,
        connect_timeout: Duration,
        connect_errors: &IntCounter,
        now: u64,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match wire {
            Wire::H1 => {
                self.send_h1(head, body, connect_timeout, connect_errors, now)
                    .await
            }
            Wire::H2 => {
                let mut req = Request::new(body);
                *req.method_mut() = head.method.clone();
                *req.uri_mut() = head.uri.clone();
                *req.version_mut() = head.version;
                *req.headers_mut() = head.headers.clone();
                let sent = self.send_h2(req, connect_timeout, connect_errors).await;
                self.note_h2_use(now);
                Ok(sent?.map(UpstreamBody::Hyper))
            }
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        head: &http::request::Parts,
        mut body: RequestBody,
        connect_timeout: Duration,
        errors: &IntCounter,
        now: u64,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let addr = self.addr;
        // Try idle connections; each iteration consumes one, so this ends.
        while let Some(mut conn) = self.pop_idle_h1(now) {
            // Closed by the upstream while idle (or otherwise unusable): drop it, try another.
            if !std::future::poll_fn(|cx| Poll::Ready(conn.poll_usable(cx))).await {
                continue;
            }
            match h1client::send(conn, head, body, self.recycler()).await {
                Ok(resp) => return Ok(resp.map(UpstreamBody::H1)),
                Err(e) => match e.unsent {
                    // Never written: safe to try another connection.
                    Some(b) => body = b,
                    None => return Err(UpstreamError::after_send_h1(addr, e.error)),
                },
            }
        }
        // Boxed: the connect state would otherwise inflate every request's future (and its
        // allocation and moves) for a path only new connections take.
        let conn = Box::pin(self.connect_h1(connect_timeout, errors)).await?;
        match h1client::send(conn, head, body, self.recycler()).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::H1)),
            Err(e) => Err(UpstreamError::after_send_h1(addr, e.error)),
        }
    }

    fn recycler(self: &Arc<Self>) -> Arc<dyn h1client::Recycle<H1Io>> {
        Arc::clone(self) as Arc<dyn h1client::Recycle<H1Io>>
    }

    async fn connect_h1(
        &self,
        connect_timeout: Duration,
        errors: &IntCounter,
    ) -> Result<Box<Conn<H1Io>>, UpstreamError> {
        let (io, permit) = self.connect(connect_timeout, errors, Wire::H1).await?;
        // The breaker slot is held for the connection's lifetime.
        Ok(Conn::new(H1Io {
            io: io.into_inner(),
            _permit: permit,
        }))
    }

    /// A new HTTP/1.1 connection (mTLS to a mesh endpoint, ALPN `http/1.1`) for one upgrade
    /// request, whatever the cluster's upstream protocol: never pooled, its `max_connections`
    /// slot held as long as the connection lives. Send the request on the returned sender; if
    /// the answer is a 101, the receiver yields the connection's stream (and any bytes the
    /// upstream sent after the 101 head) for the tunnel, otherwise the connection closes once
    /// the response is over.
    pub async fn connect_upgrade<B>(
        &self,
        connect_timeout: Duration,
        errors: &IntCounter,
    ) -> Result<
        (
            http1::SendRequest<B>,
            tokio::sync::oneshot::Receiver<UpgradedUpstream>,
        ),
        UpstreamError,
    >
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let addr = self.addr;
        let (io, permit) = self.connect(connect_timeout, errors, Wire::H1).await?;
        let (tx, conn) = http1::handshake::<_, B>(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        let (give, taken) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // `without_shutdown`: after a 101 hyper hands the stream back instead of closing it
            // (hyper's own `with_upgrades` would too, but would release the breaker slot with
            // the connection future, while the tunnel still uses the connection).
            match conn.without_shutdown().await {
                Ok(parts) => {
                    // Nobody waiting (not a 101): dropping the stream closes the connection.
                    let _ = give.send(UpgradedUpstream {
                        io: parts.io.into_inner(),
                        read_buf: parts.read_buf,
                        permit,
                    });
                }
                Err(e) => tracing::debug!(%addr, error = %e, "upstream upgrade connection ended"),
            }
        });
        Ok((tx, taken))
    }

    /// Records a request on the shared HTTP/2 connection and makes sure it is closed once idle
    /// ([`reap_idle_h2`]); `now` is the attempt's reading, not a clock read of its own.
    fn note_h2_use(self: &Arc<Self>, now: u64) {
        self.h2_used.store(now, Ordering::Release);
        // A load first: under load the flag is set and this stays a read.
        if !self.h2_reaping.load(Ordering::Acquire) && !self.h2_reaping.swap(true, Ordering::AcqRel)
        {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(reap_idle_h2(Arc::downgrade(self)));
                }
                Err(_) => self.h2_reaping.store(false, Ordering::Release),
            }
        }
    }

    fn shared_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        lock(&self.h2)
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    async fn h2_sender(
        &self,
        connect_timeout: Duration,
        errors: &IntCounter,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        if let Some(tx) = self.shared_h2() {
            return Ok(tx);
        }
        // Cold path, boxed so it does not inflate every h2 request's future.
        Box::pin(self.connect_h2(connect_timeout, errors)).await
    }

    async fn connect_h2(
        &self,
        connect_timeout: Duration,
        errors: &IntCounter,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let _single = self.h2_connecting.lock().await;
        if let Some(tx) = self.shared_h2() {
            return Ok(tx);
        }
        let addr = self.addr;
        let (io, permit) = self.connect(connect_timeout, errors, Wire::H2).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream h2 connection ended");
            }
        });
        *lock(&self.h2) = Some(tx.clone());
        Ok(tx)
    }

    async fn send_h2(
        &self,
        mut req: Request<RequestBody>,
        connect_timeout: Duration,
        errors: &IntCounter,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let addr = self.addr;
        // At most one retry, on a fresh connection, for a request the old one never took.
        for attempt in 0..2 {
            let mut tx = self.h2_sender(connect_timeout, errors).await?;
            let ready = tx.ready().await;
            if ready.is_err() && attempt == 0 {
                self.forget_h2(&tx);
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if attempt == 0 => {
                        self.forget_h2(&tx);
                        req = r;
                    }
                    _ => return Err(UpstreamError::after_send(addr, e.into_error())),
                },
            }
        }
        // Unreachable in practice: attempt 1 always returns above. Report it as a reset rather
        // than panicking.
        Err(UpstreamError::ConnectTimeout {
            addr,
            after: connect_timeout,
        })
    }

    fn forget_h2(&self, dead: &http2::SendRequest<RequestBody>) {
        let mut g = lock(&self.h2);
        // Only clear if nobody replaced it meanwhile (a closed sender is the dead one).
        if g.as_ref().is_some_and(|tx| tx.is_closed()) || dead.is_closed() {
            *g = g.take().filter(|tx| !tx.is_closed());
        }
    }
}
