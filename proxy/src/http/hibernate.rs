//! Hibernation of idle HTTP/1.1 keep-alive connections.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer, plus its connection state, for
//! as long as it serves a connection, idle or not: with thousands of idle keep-alive clients
//! (every app keeps a pool to its sidecar) that is most of the proxy's memory. So an HTTP/1.1
//! connection with no request for [`HIBERNATE_AFTER`] is handed back by hyper and waits for its
//! next bytes as a bare socket; the next request starts a fresh hyper connection on it.
//!
//! How hyper is made to hand it back: the server's IO is wrapped in [`Hibernating`]. When the
//! connection's watchdog asks for hibernation ([`Activity::request_hibernation`]) and hyper next
//! reads while idle, the wrapper first reads the socket: bytes are passed on as usual (and cancel
//! the request); only a read that would block is answered with end-of-file. hyper takes that as
//! the client closing an idle connection and finishes cleanly, without writing anything and
//! (polled with `poll_without_shutdown`) without shutting the socket down. Nothing is lost:
//!
//! - the wrapper only ends a read that found nothing on the socket (TCP or TLS alike);
//! - not while hyper's last write or flush would block (a slow reader still owed the tail of a
//!   response that already ended upstream: hyper's buffers hold it);
//! - not while a request is in flight, nor when bytes arrived since the last response ended
//!   (they may be a partial request head in hyper's buffer): [`Activity::may_hibernate`].
//!
//! Only plain and TLS HTTP/1.1 served by hyper's `http1` builder hibernate; HTTP/2 keeps its
//! connection (its idle cost is the h2 codec's, and one h2 connection carries many requests).
//! A connection that became a tunnel (a 101 to an upgrade, a 200 to CONNECT:
//! [`super::upgrade`]) never hibernates: the tunnel holds the request in flight until it closes,
//! and the socket is spliced, never handed back to a hyper connection. An upgrade the upstream
//! declined (any other answer) leaves an ordinary keep-alive connection, which hibernates as
//! usual.
//!
//! Freed must also be returned: glibc's malloc would keep the holes the released buffers leave
//! between the connections' live allocations, so the proxy runs on jemalloc ([`crate::alloc`]),
//! whose size classes keep the buffers on pages of their own and whose background thread hands
//! pages freed for a second back to the OS.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::Activity;

/// An HTTP/1.1 connection with nothing in flight for this long releases hyper's buffers.
///
/// Short enough that a client's idle pool costs little soon after a burst, long enough that a
/// connection carrying steady traffic (a request at least every second) never pays the wake-up
/// (a new hyper connection state: two buffer allocations).
pub const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

/// Hibernations since the proxy started (`weft_http_connections_hibernated_total`).
static HIBERNATED: AtomicU64 = AtomicU64::new(0);

/// Connections hibernated since start.
pub fn hibernated_total() -> u64 {
    HIBERNATED.load(Ordering::Relaxed)
}

/// Records a hibernation.
pub fn note_hibernated() {
    HIBERNATED.fetch_add(1, Ordering::Relaxed);
}

/// The server IO of a hibernating-capable HTTP/1.1 connection (see the module docs).
#[derive(Debug)]
pub struct Hibernating<S> {
    inner: S,
    activity: Arc<Activity>,
    /// A read was answered with end-of-file to hibernate (not a real EOF).
    asleep: bool,
    /// The last write or flush would block: hyper still holds response bytes the socket has
    /// not taken (a slow reader), and hibernating would drop them with its buffers.
    write_blocked: bool,
}

impl<S> Hibernating<S> {
    /// `inner`, whose requests are tracked by `activity`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            asleep: false,
            write_blocked: false,
        }
    }

    /// Whether hyper was told end-of-file to hibernate (then the socket is still open and idle).
    pub fn is_asleep(&self) -> bool {
        self.asleep
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Hibernating<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.note_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if !this.write_blocked && this.activity.may_hibernate() => {
                // Nothing to read and nothing pending in hyper: "end of file" ends hyper's
                // connection cleanly; the socket stays open.
                this.asleep = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S> Hibernating<S> {
    /// Notes whether a write or flush would block (see `write_blocked`).
    fn note_write<T>(&mut self, r: Poll<T>) -> Poll<T> {
        self.write_blocked = r.is_pending();
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Hibernating<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.note_write(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
