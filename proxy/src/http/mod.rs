//! The HTTP server side: one hyper-util `auto` connection (HTTP/1.1 keep-alive or h2c prior
//! knowledge) per accepted socket, drained gracefully, plus the pieces the request path uses:
//! response bodies ([`body`]), header rewriting ([`headers`]) and proxy-generated errors
//! ([`error`]).

pub mod body;
pub mod error;
pub mod headers;

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

/// A server builder with the proxy's HTTP/1 and HTTP/2 settings.
pub fn server_builder() -> ServerBuilder {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Serves one downstream connection until it closes; on drain, shuts it down gracefully (h1:
/// close after the in-flight response; h2: GOAWAY) and cuts it after `drain_timeout`.
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
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
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
                return Poll::Ready(Ok(true));
            }
            conn.as_mut().poll(cx).map(|res| res.map(|()| false))
        })
        .await
    };
    match drained {
        Ok(false) => {}
        Err(e) => {
            // Garbage bytes, resets, header timeouts: the client's problem, not ours.
            tracing::debug!(error = %e, "downstream connection ended with error");
        }
        Ok(true) => {
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(drain_timeout, conn).await.is_err() {
                tracing::debug!("downstream connection cut after drain timeout");
            }
        }
    }
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
