//! The HTTP server side: one connection (HTTP/1.1 keep-alive or HTTP/2, told apart by ALPN over
//! mTLS and by the first bytes otherwise) per accepted socket, drained gracefully, plus the pieces
//! the request path uses: response bodies ([`body`]), header rewriting ([`headers`]),
//! proxy-generated errors ([`error`]) and tunnels ([`upgrade`], [`connect`]).
//!
//! Tunnels: an HTTP/1.1 connection served by [`serve_connection`]'s own loop hands its socket to
//! the tunnel its last request agreed to (a 101, or a 200 to CONNECT) once hyper wrote that
//! response, and runs the tunnel in its task (so a drain cuts it like a TCP connection after
//! `drain_timeout`); it never hibernates then. HTTP/2 streams (extended CONNECT, CONNECT) and
//! connections whose protocol hyper-util's `auto` detected use hyper's upgrade API instead.

pub mod body;
pub mod connect;
pub mod error;
pub mod head_timer;
pub mod headers;
pub mod hibernate;
pub mod hygiene;
pub mod idle;
pub mod normalize;
pub mod request_timer;
pub mod tunnel_metrics;
pub mod upgrade;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain::DrainWatch;
use crate::pipeline::HttpProxy;
use crate::tls::io::{MaybeTls, ServerIo};
use crate::tls::{ALPN_H2, ALPN_HTTP1};

use self::hibernate::{Hibernating, HIBERNATE_AFTER};
use self::idle::Activity;

/// HTTP/1.1 header read timeout of [`server_builder`]. hyper starts it whenever the connection
/// waits for a request head, so it is also the keep-alive idle timeout: connections of listeners
/// with another `idle_timeout` get a builder with that value instead (see [`serve_connection`]).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The proxy's HTTP/1 and HTTP/2 server settings.
///
/// [`serve_connection`] picks the protocol itself (ALPN over TLS, else a peek at the first
/// bytes), then serves HTTP/1.1 with `h1` directly and HTTP/2 with `h2` (hyper-util's `auto`
/// builder limited to HTTP/2); only a connection whose protocol is still unknown (TLS without
/// ALPN, or first bytes that are a strict prefix of the h2 preface) goes through `auto`'s own
/// version detection. Same settings as one `auto` builder, but an idle HTTP/1.1 connection
/// costs about a quarter less memory: `auto` hands hyper the sniffed bytes as a prefix, which
/// makes hyper grow its first read buffer from 8 KiB to 16 KiB (kept for the life of the
/// connection), and its connection future is twice the size of hyper's h1 one.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    h1: http1::Builder,
    h2: auto::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// A server builder with the proxy's HTTP/1 and HTTP/2 settings.
pub fn server_builder() -> ServerBuilder {
    let mut h1 = http1::Builder::new();
    // Only `serve_h1` serves with `h1`: its watchdog polls slow heads in time (`head_timer`).
    // `writev(false)`: a response head and its body chunks are written from one buffer (one
    // `write`) instead of a queue of buffers for `writev`, whose bookkeeping cost ~300
    // instructions per small response (benches/RESULTS.md, callgrind).
    h1.timer(head_timer::HeadTimer)
        .keep_alive(true)
        .writev(false)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .writev(false)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // RFC 8441 extended CONNECT (WebSocket over HTTP/2): `SETTINGS_ENABLE_CONNECT_PROTOCOL`.
    b.http2()
        .enable_connect_protocol()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    ServerBuilder {
        h1,
        h2: b.clone().http2_only(),
        auto: b,
    }
}

/// A downstream stream [`serve_connection`] can serve.
pub trait ServerStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// How the stream's protocol can be told before any of it is read.
    fn protocol_hint(&self) -> ProtocolHint<'_>;

    /// The TCP socket underneath (readiness of a hibernated connection).
    fn tcp(&self) -> &TcpStream;
}

/// See [`ServerStream::protocol_hint`].
#[derive(Debug)]
pub enum ProtocolHint<'a> {
    /// Plain TCP: the first bytes can be peeked at.
    Peek(&'a TcpStream),
    /// Terminated TLS, with the ALPN protocol negotiated (`None`: no ALPN).
    Alpn(Option<&'a [u8]>),
}

impl ServerStream for TcpStream {
    fn protocol_hint(&self) -> ProtocolHint<'_> {
        ProtocolHint::Peek(self)
    }

    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl ServerStream for ServerIo {
    fn protocol_hint(&self) -> ProtocolHint<'_> {
        match self {
            MaybeTls::Plain(s) => ProtocolHint::Peek(s),
            MaybeTls::Tls(s) => ProtocolHint::Alpn(s.get_ref().1.alpn_protocol()),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().0,
        }
    }
}

/// The protocol a connection is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    H2,
    /// Unknown yet: hyper-util's `auto` reads on until it knows.
    Auto,
}

/// The protocol that a connection starting with `head` speaks (`head` is not empty).
fn sniff(head: &[u8]) -> Protocol {
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] != H2_PREFACE[..n] {
        Protocol::Http1
    } else if n == H2_PREFACE.len() {
        Protocol::H2
    } else {
        Protocol::Auto
    }
}

/// The protocol that a TLS connection negotiated with ALPN `alpn` speaks.
fn from_alpn(alpn: Option<&[u8]>) -> Protocol {
    match alpn {
        Some(p) if p == ALPN_H2 => Protocol::H2,
        Some(p) if p == ALPN_HTTP1 => Protocol::Http1,
        _ => Protocol::Auto,
    }
}

/// Serves one downstream connection until it closes; on drain, shuts it down gracefully (h1:
/// close after the in-flight response; h2: GOAWAY) and cuts it after `drain_timeout`. A
/// connection with no request in flight for the listener's idle timeout is shut down gracefully
/// too ([`idle`]), without a cut.
///
/// On plain TCP nothing HTTP is set up before the client's first bytes arrive (a connection
/// that never sends any is just a socket and this task); they pick the protocol (see
/// [`ServerBuilder`]).
pub async fn serve_connection<S>(
    stream: S,
    builder: Arc<ServerBuilder>,
    service: HttpProxy,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) where
    // A plain `TcpStream` (outbound) or a maybe-mTLS inbound stream.
    S: ServerStream,
{
    let (activity, idle) = service.idle();
    let protocol = match stream.protocol_hint() {
        ProtocolHint::Alpn(alpn) => from_alpn(alpn),
        ProtocolHint::Peek(tcp) => {
            let mut head = [0u8; H2_PREFACE.len()];
            let peeked = tokio::select! {
                biased;
                () = drain.signaled() => return,
                () = idle_out(&activity, idle) => {
                    tracing::debug!(?idle, "downstream connection idle; closing");
                    return;
                }
                p = tcp.peek(&mut head) => p,
            };
            match peeked {
                Ok(0) => return,
                Ok(n) => sniff(&head[..n]),
                Err(e) => {
                    tracing::debug!(error = %e, "downstream connection ended with error");
                    return;
                }
            }
        }
    };
    // hyper's HTTP/1.1 keep-alive idle limit is its header read timeout: follow the listener's.
    let custom_idle = idle != HEADER_READ_TIMEOUT;
    match protocol {
        Protocol::Http1 => {
            let own;
            let h1 = if custom_idle {
                let mut b = builder.h1.clone();
                b.header_read_timeout(idle);
                own = b;
                &own
            } else {
                &builder.h1
            };
            serve_h1(stream, h1, service, activity, idle, drain, drain_timeout).await;
        }
        Protocol::H2 => {
            // Boxed: an h2 connection state would otherwise size every connection's task.
            Box::pin(async {
                let conn = builder.h2.serve_connection(TokioIo::new(stream), service);
                drive(pin!(conn), &activity, idle, None, &mut drain, drain_timeout).await
            })
            .await;
        }
        Protocol::Auto => {
            let own;
            let auto = if custom_idle {
                let mut b = builder.auto.clone();
                b.http1().header_read_timeout(idle);
                own = b;
                &own
            } else {
                &builder.auto
            };
            Box::pin(async {
                // With upgrades: an HTTP/1.1 upgrade here goes through hyper's upgrade API.
                let conn = auto.serve_connection_with_upgrades(TokioIo::new(stream), service);
                drive(pin!(conn), &activity, idle, None, &mut drain, drain_timeout).await
            })
            .await;
        }
    }
}

/// Serves an HTTP/1.1 connection with hyper's `http1`, hibernating it whenever it has been idle
/// for [`HIBERNATE_AFTER`] ([`hibernate`]): hyper's connection (and its buffers) is dropped and
/// the socket waits for its next bytes alone. A connection whose request agreed to a tunnel
/// (see the module docs) becomes that tunnel once hyper wrote the response.
async fn serve_h1<S: ServerStream>(
    mut stream: S,
    h1: &http1::Builder,
    mut service: HttpProxy,
    activity: Arc<Activity>,
    idle: Duration,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    activity.set_manual_upgrades();
    loop {
        let io = TokioIo::new(Hibernating::new(stream, Arc::clone(&activity)));
        // Boxed: freed while the connection hibernates (this task keeps only the socket).
        let mut conn = Box::pin(h1.serve_connection(io, service));
        // Boxed too: its timers and drain watch would otherwise size this task for good.
        let ended = Box::pin(drive(
            conn.as_mut(),
            &activity,
            idle,
            Some(HIBERNATE_AFTER),
            &mut drain,
            drain_timeout,
        ))
        .await;
        let parts = Pin::into_inner(conn).into_parts();
        let io = parts.io.into_inner();
        // hyper's connection (and the request future in it) is gone: no tunnel can be agreed
        // after this look.
        if let Some(tunnel) = activity.take_tunnel() {
            if ended == Ended::Closed {
                // hyper finished with the 101 / 200 written: what it read past that request's
                // head already belongs to the tunnel.
                let stream = io.into_inner();
                let tls = matches!(stream.protocol_hint(), ProtocolHint::Alpn(_));
                let downstream = upgrade::Prefixed::new(stream, parts.read_buf);
                // Boxed: the tunnel's future (~1.8 KiB) would otherwise size every HTTP/1.1
                // connection's task, asleep or not, for the rare one that becomes a tunnel.
                Box::pin(tunnel.run(downstream, tls, Some((&mut drain, drain_timeout)))).await;
            } else {
                tracing::debug!(
                    ?ended,
                    "downstream connection ended before its tunnel started"
                );
                close(io.into_inner(), drain_timeout).await;
            }
            return;
        }
        let unread = parts.read_buf.len();
        // Even empty, it may still own hyper's read buffer: free it before sleeping.
        drop(parts.read_buf);
        if !(ended == Ended::Closed && io.is_asleep() && unread == 0) {
            // hyper was polled without its own shutdown: close the stream as it would have
            // (FIN; TLS close_notify), boundedly.
            close(io.into_inner(), drain_timeout).await;
            return;
        }
        stream = io.into_inner();
        service = parts.service;
        // Nothing of the connection's request state stays registered (or cached) while it
        // sleeps.
        activity.request_timer().clear();
        service.forget_cached();
        tracing::trace!("downstream connection hibernating");
        hibernate::note_hibernated();
        let woke = tokio::select! {
            biased;
            () = drain.signaled() => false,
            () = idle_out(&activity, idle) => {
                tracing::debug!(?idle, "downstream connection idle; closing");
                false
            }
            r = stream.tcp().readable() => r.is_ok(),
        };
        if !woke {
            close(stream, drain_timeout).await;
            return;
        }
        activity.request_hibernation(false);
    }
}

/// Shuts a downstream stream down (FIN, or TLS close_notify then FIN), giving up after `limit`.
async fn close<S: AsyncWrite + Unpin>(mut stream: S, limit: Duration) {
    let _ = tokio::time::timeout(limit, stream.shutdown()).await;
}

/// Completes once a connection (with nothing in flight) has been idle for `idle`.
async fn idle_out(activity: &Activity, idle: Duration) {
    while let Err(wait) = idle::check(activity, idle) {
        tokio::time::sleep(wait).await;
    }
}

/// A server connection that can be shut down gracefully.
trait GracefulConnection {
    type Error: std::fmt::Display;
    /// Serves until the connection ends.
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>>;
    fn shutdown(self: Pin<&mut Self>);
}

impl<S: ServerStream> GracefulConnection for http1::Connection<TokioIo<Hibernating<S>>, HttpProxy> {
    type Error = hyper::Error;
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Without hyper's shutdown of the stream: a hibernating connection stays open
        // (`serve_h1` shuts it down otherwise).
        self.get_mut().poll_without_shutdown(cx)
    }
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S: ServerStream> GracefulConnection
    for auto::Connection<'_, TokioIo<S>, HttpProxy, TokioExecutor>
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll(cx)
    }
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S: ServerStream> GracefulConnection
    for auto::UpgradeableConnection<'_, TokioIo<S>, HttpProxy, TokioExecutor>
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.poll(cx)
    }
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Completes when `conn` ends.
fn served<C: GracefulConnection>(
    mut conn: Pin<&mut C>,
) -> impl Future<Output = Result<(), C::Error>> + '_ {
    std::future::poll_fn(move |cx| conn.as_mut().poll_serve(cx))
}

/// Drives a served connection: see [`serve_connection`]. With `hibernate_after`, an idle
/// connection is asked to hibernate ([`hibernate`]) after that long without a request; it then
/// ends as [`Ended::Closed`].
async fn drive<C: GracefulConnection>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    idle: Duration,
    hibernate_after: Option<Duration>,
    drain: &mut DrainWatch,
    drain_timeout: Duration,
) -> Ended {
    // Idle watchdog: polled only when its timer fires (same trick as the drain branch). It
    // fires at the idle timeout, and before it at the hibernation delay.
    let first = hibernate_after.map_or(idle, |h| h.min(idle));
    let idle_wake = Arc::new(BranchWake::default());
    let idle_waker = Waker::from(Arc::clone(&idle_wake));
    let mut idle_timer = std::pin::pin!(tokio::time::sleep(first));
    // Like `select!` on (connection, drain), but the drain future is polled only when its own
    // waker fired: the connection is woken several times per request and re-polling the drain
    // watch (a lock and a notifier registration) each time is pure overhead on the hot path.
    let wake = Arc::new(BranchWake::default());
    let drain_waker = Waker::from(Arc::clone(&wake));
    let drained = {
        let mut signaled = std::pin::pin!(drain.signaled());
        // Registering the task's waker with both branches on every poll (the connection is
        // polled several times per request) costs atomic read-modify-writes for nothing: a
        // branch's registration stays valid until its wake takes it, and that wake sets
        // `woken` first. So a branch registers again only once it consumed a wake (`armed`
        // false) or when the task's waker changed, and checks `woken` after registering.
        let mut registered: Option<Waker> = None;
        let (mut drain_armed, mut idle_armed) = (false, false);
        std::future::poll_fn(|cx| {
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                registered = Some(cx.waker().clone());
                (drain_armed, idle_armed) = (false, false);
            }
            while wake.woken(&mut drain_armed, cx) {
                if signaled
                    .as_mut()
                    .poll(&mut Context::from_waker(&drain_waker))
                    .is_ready()
                {
                    return Poll::Ready(Ok(Ended::Drain));
                }
            }
            while idle_wake.woken(&mut idle_armed, cx) {
                if idle_timer
                    .as_mut()
                    .poll(&mut Context::from_waker(&idle_waker))
                    .is_pending()
                {
                    continue;
                }
                let mut wait = match idle::check(activity, idle) {
                    Ok(()) => return Poll::Ready(Ok(Ended::Idle)),
                    Err(wait) => wait,
                };
                if let Some(after) = hibernate_after {
                    match idle::check(activity, after) {
                        // Idle long enough: hibernate at hyper's next read that would block
                        // (polled just below). If that does not happen (bytes arrived), look
                        // again a delay later.
                        Ok(()) => {
                            activity.request_hibernation(true);
                            wait = wait.min(after);
                        }
                        Err(w) => wait = wait.min(w),
                    }
                }
                idle_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + wait);
                // Poll the reset timer once so that it registers its waker.
                idle_wake.woken.store(true, Ordering::Release);
            }
            conn.as_mut()
                .poll_serve(cx)
                .map(|res| res.map(|()| Ended::Closed))
        })
        .await
    };
    match drained {
        Ok(Ended::Closed) => Ended::Closed,
        Ok(Ended::Idle) => {
            tracing::debug!(?idle, "downstream connection idle; closing");
            conn.as_mut().shutdown();
            // Nothing is in flight: this ends at once unless a request arrived meanwhile, which
            // is then answered (h1: with `connection: close`) or drained like on a drain.
            let cut_after_drain = async {
                drain.signaled().await;
                tokio::time::sleep(drain_timeout).await;
            };
            tokio::select! {
                _ = served(conn.as_mut()) => {}
                () = cut_after_drain => {
                    tracing::debug!("downstream connection cut after drain timeout");
                }
            }
            Ended::Idle
        }
        Err(e) => {
            // Garbage bytes, resets, header timeouts: the client's problem, not ours.
            tracing::debug!(error = %e, "downstream connection ended with error");
            Ended::Failed
        }
        Ok(Ended::Drain) => {
            conn.as_mut().shutdown();
            if tokio::time::timeout(drain_timeout, served(conn.as_mut()))
                .await
                .is_err()
            {
                tracing::debug!("downstream connection cut after drain timeout");
            }
            Ended::Drain
        }
        Ok(Ended::Failed) => Ended::Failed,
    }
}

/// Why [`serve_connection`]'s main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The connection finished on its own.
    Closed,
    /// The listener is draining.
    Drain,
    /// Nothing was in flight for the idle timeout.
    Idle,
    /// The connection failed (garbage bytes, a reset, a header read timeout).
    Failed,
}

/// The waker of one branch of a two-way select: records that the branch was woken and wakes the
/// task. Starts out "woken" so the branch is polled once (to register interest).
struct BranchWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Default for BranchWake {
    fn default() -> Self {
        Self {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }
    }
}

impl BranchWake {
    /// Whether the branch was woken since it was last looked at, keeping the task's waker
    /// registered with it: the waker of `cx` is registered first unless `armed` (registered
    /// already, and no wake consumed since: a wake may take the registration, so a consumed one
    /// disarms). Not woken costs a plain load: no read-modify-write on the hot path.
    fn woken(&self, armed: &mut bool, cx: &Context<'_>) -> bool {
        if !*armed {
            self.task.register(cx.waker());
            *armed = true;
        }
        let woken = self.woken.load(Ordering::Acquire) && self.woken.swap(false, Ordering::AcqRel);
        *armed &= !woken;
        woken
    }
}

impl Wake for BranchWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_pick_the_protocol() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(sniff(b"G"), Protocol::Http1);
        assert_eq!(sniff(b"PROPFIND / HTTP/1.1"), Protocol::Http1);
        assert_eq!(sniff(b"P"), Protocol::Auto);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Protocol::Auto);
        assert_eq!(sniff(H2_PREFACE), Protocol::H2);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"), Protocol::H2);
    }

    #[test]
    fn alpn_picks_the_protocol() {
        assert_eq!(from_alpn(Some(b"h2")), Protocol::H2);
        assert_eq!(from_alpn(Some(b"http/1.1")), Protocol::Http1);
        assert_eq!(from_alpn(Some(b"spdy/3")), Protocol::Auto);
        assert_eq!(from_alpn(None), Protocol::Auto);
    }
}
