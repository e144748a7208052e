//! The HTTP server side: one hyper-util `auto` connection (HTTP/1.1 keep-alive or h2c prior
//! knowledge) per accepted socket, drained gracefully, plus the pieces the request path uses:
//! response bodies ([`body`]), header rewriting ([`headers`]) and proxy-generated errors
//! ([`error`]).

pub mod body;
pub mod error;
pub mod headers;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

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
pub async fn serve_connection(
    stream: TcpStream,
    builder: Arc<ServerBuilder>,
    service: HttpProxy,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                // Garbage bytes, resets, header timeouts: the client's problem, not ours.
                tracing::debug!(error = %e, "downstream connection ended with error");
            }
        }
        () = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            if tokio::time::timeout(drain_timeout, conn).await.is_err() {
                tracing::debug!("downstream connection cut after drain timeout");
            }
        }
    }
}
