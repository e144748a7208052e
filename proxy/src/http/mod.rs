//! The HTTP server side: one connection (HTTP/1.1 keep-alive or HTTP/2, told apart by ALPN over
//! mTLS and by the first bytes otherwise) per accepted socket, drained gracefully, plus the pieces
//! the request path uses: response bodies ([`body`]), header rewriting ([`headers`]) and
//! proxy-generated errors ([`error`]).

pub mod body;
pub mod error;
pub mod headers;
pub mod idle;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::drain::DrainWatch;
use crate::pipeline::HttpProxy;
use crate::tls::io::{MaybeTls, ServerIo};
use crate::tls::{ALPN_H2, ALPN_HTTP1};

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
    h1.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b.http2()
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
}

impl ServerStream for ServerIo {
    fn protocol_hint(&self) -> ProtocolHint<'_> {
        match self {
            MaybeTls::Plain(s) => ProtocolHint::Peek(s),
            MaybeTls::Tls(s) => ProtocolHint::Alpn(s.get_ref().1.alpn_protocol()),
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
    let io = TokioIo::new(stream);
    // hyper's HTTP/1.1 keep-alive idle limit is its header read timeout: follow the listener's.
    let custom_idle = idle != HEADER_READ_TIMEOUT;
    match protocol {
        Protocol::Http1 => {
            // The common case stays inline in this task; the others are boxed so that they
            // don't size every connection's task.
            let own;
            let h1 = if custom_idle {
                let mut b = builder.h1.clone();
                b.header_read_timeout(idle);
                own = b;
                &own
            } else {
                &builder.h1
            };
            let conn = h1.serve_connection(io, service);
            drive(conn, &activity, idle, drain, drain_timeout).await;
        }
        Protocol::H2 => {
            let conn = builder.h2.serve_connection(io, service);
            Box::pin(drive(conn, &activity, idle, drain, drain_timeout)).await;
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
            let conn = auto.serve_connection(io, service);
            Box::pin(drive(conn, &activity, idle, drain, drain_timeout)).await;
        }
    }
}

/// Completes once a connection (with nothing in flight) has been idle for `idle`.
async fn idle_out(activity: &Activity, idle: Duration) {
    while let Err(wait) = idle::check(activity, idle) {
        tokio::time::sleep(wait).await;
    }
}

/// A server connection that can be shut down gracefully.
trait GracefulConnection: Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    fn shutdown(self: Pin<&mut Self>);
}

impl<S: ServerStream> GracefulConnection for http1::Connection<TokioIo<S>, HttpProxy> {
    type Error = hyper::Error;
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<S: ServerStream> GracefulConnection
    for auto::Connection<'_, TokioIo<S>, HttpProxy, TokioExecutor>
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives a served connection: see [`serve_connection`].
async fn drive<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    tokio::pin!(conn);
    // Idle watchdog: polled only when its timer fires (same trick as the drain branch).
    let idle_wake = Arc::new(BranchWake::default());
    let idle_waker = Waker::from(Arc::clone(&idle_wake));
    let mut idle_timer = std::pin::pin!(tokio::time::sleep(idle));
    // Like `select!` on (connection, drain), but the drain future is polled only when its own
    // waker fired: the connection is woken several times per request and re-polling the drain
    // watch (a lock and a notifier registration) each time is pure overhead on the hot path.
    let wake = Arc::new(BranchWake::default());
    let drain_waker = Waker::from(Arc::clone(&wake));
    let drained = {
        let mut signaled = std::pin::pin!(drain.signaled());
        std::future::poll_fn(|cx| {
            wake.task.register(cx.waker());
            if wake.woken.swap(false, Ordering::AcqRel)
                && signaled
                    .as_mut()
                    .poll(&mut Context::from_waker(&drain_waker))
                    .is_ready()
            {
                return Poll::Ready(Ok(Ended::Drain));
            }
            idle_wake.task.register(cx.waker());
            while idle_wake.woken.swap(false, Ordering::AcqRel)
                && idle_timer
                    .as_mut()
                    .poll(&mut Context::from_waker(&idle_waker))
                    .is_ready()
            {
                match idle::check(activity, idle) {
                    Ok(()) => return Poll::Ready(Ok(Ended::Idle)),
                    Err(wait) => {
                        idle_timer
                            .as_mut()
                            .reset(tokio::time::Instant::now() + wait);
                        // Poll the reset timer once so that it registers its waker.
                        idle_wake.woken.store(true, Ordering::Release);
                    }
                }
            }
            conn.as_mut()
                .poll(cx)
                .map(|res| res.map(|()| Ended::Closed))
        })
        .await
    };
    match drained {
        Ok(Ended::Closed) => {}
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
                _ = conn.as_mut() => {}
                () = cut_after_drain => {
                    tracing::debug!("downstream connection cut after drain timeout");
                }
            }
        }
        Err(e) => {
            // Garbage bytes, resets, header timeouts: the client's problem, not ours.
            tracing::debug!(error = %e, "downstream connection ended with error");
        }
        Ok(Ended::Drain) => {
            conn.as_mut().shutdown();
            if tokio::time::timeout(drain_timeout, conn).await.is_err() {
                tracing::debug!("downstream connection cut after drain timeout");
            }
        }
    }
}

/// Why [`serve_connection`]'s main loop ended.
enum Ended {
    /// The connection finished on its own.
    Closed,
    /// The listener is draining.
    Drain,
    /// Nothing was in flight for the idle timeout.
    Idle,
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
