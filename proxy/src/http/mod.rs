//! The HTTP server side: one hyper-util `auto` connection (HTTP/1.1 keep-alive or h2c prior
//! knowledge) per accepted socket, drained gracefully, plus the pieces the request path uses:
//! response bodies ([`body`]), header rewriting ([`headers`]) and proxy-generated errors
//! ([`error`]).

pub mod body;
pub mod error;
pub mod headers;
pub mod idle;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::task::AtomicWaker;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::drain::DrainWatch;
use crate::pipeline::HttpProxy;

/// The shared server builder type.
pub type ServerBuilder = auto::Builder<TokioExecutor>;

/// HTTP/1.1 header read timeout of [`server_builder`]. hyper starts it whenever the connection
/// waits for a request head, so it is also the keep-alive idle timeout: connections of listeners
/// with another `idle_timeout` get a builder with that value instead (see [`serve_connection`]).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A server builder with the proxy's HTTP/1 and HTTP/2 settings.
pub fn server_builder() -> ServerBuilder {
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
    b
}

/// Serves one downstream connection until it closes; on drain, shuts it down gracefully (h1:
/// close after the in-flight response; h2: GOAWAY) and cuts it after `drain_timeout`. A
/// connection with no request in flight for the listener's idle timeout is shut down gracefully
/// too ([`idle`]), without a cut.
pub async fn serve_connection<S>(
    stream: S,
    builder: Arc<ServerBuilder>,
    service: HttpProxy,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) where
    // A plain `TcpStream` (outbound) or a maybe-mTLS inbound stream.
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (activity, idle) = service.idle();
    // hyper's HTTP/1.1 keep-alive idle limit is its header read timeout: follow the listener's.
    let own;
    let builder: &ServerBuilder = if idle == HEADER_READ_TIMEOUT {
        &builder
    } else {
        let mut b = (*builder).clone();
        b.http1().header_read_timeout(idle);
        own = b;
        &own
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
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
                match idle::check(&activity, idle) {
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
            conn.as_mut().graceful_shutdown();
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
            conn.as_mut().graceful_shutdown();
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
