//! Opaque TCP proxying (ARCHITECTURE.md "TCP"): accept -> the listener's cluster -> round-robin
//! endpoint -> connect with the cluster's connect timeout -> copy both ways. Each direction's EOF
//! is forwarded as a half-close (`shutdown(Write)`) while the other direction keeps flowing.
//! Bytes are counted per direction as they pass.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain::DrainWatch;
use crate::snapshot::{Listener, ListenerKind};

const BUF_SIZE: usize = 16 * 1024;

/// Decrements the open-connections gauge however the connection ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Proxies one accepted connection of a TCP `listener` until both directions finish, an error
/// occurs, or `drain_timeout` after a drain started.
pub async fn proxy_connection(
    mut client: TcpStream,
    listener: Arc<Listener>,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    let ListenerKind::Tcp { cluster, metrics } = &listener.kind else {
        return;
    };
    metrics.accepted.inc();
    metrics.open.inc();
    let _open = OpenGuard(metrics.open.clone());
    let Some(endpoint) = cluster.pick() else {
        tracing::debug!(cluster = %cluster.name, "tcp: cluster has no endpoints; closing");
        return;
    };
    let addr = endpoint.addr;
    let mut upstream =
        match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                cluster.connect_errors.inc();
                tracing::debug!(%addr, error = %e, "tcp: connect failed; closing client");
                return;
            }
            Err(_) => {
                cluster.connect_errors.inc();
                tracing::debug!(%addr, "tcp: connect timed out; closing client");
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    let cut_after_drain = async {
        drain.signaled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        res = copy_both_ways(&mut client, &mut upstream, &metrics.rx, &metrics.tx) => {
            if let Err(e) = res {
                tracing::debug!(%addr, error = %e, "tcp: connection ended with error");
            }
        }
        () = cut_after_drain => tracing::debug!(%addr, "tcp: connection cut after drain timeout"),
    }
}

/// Copies `client` <-> `upstream` with half-close; ends when both directions saw EOF, or on the
/// first error. `rx` counts bytes read from the client, `tx` bytes written to it.
pub async fn copy_both_ways(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    rx: &IntCounter,
    tx: &IntCounter,
) -> std::io::Result<()> {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let to_upstream = copy_half(&mut cr, &mut uw, rx);
    let to_client = copy_half(&mut ur, &mut cw, tx);
    tokio::pin!(to_upstream, to_client);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut to_upstream, if !up_done => { r?; up_done = true; }
            r = &mut to_client, if !down_done => { r?; down_done = true; }
        }
    }
    Ok(())
}

async fn copy_half<R, W>(r: &mut R, w: &mut W, count: &IntCounter) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Forward the EOF as a half-close; the other direction keeps going.
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.inc_by(n as u64);
    }
}
