//! Opaque TCP proxying (ARCHITECTURE.md "TCP"): accept -> (inbound: authorization) -> the
//! listener's cluster -> round-robin endpoint -> connect with the cluster's connect timeout ->
//! (mesh endpoint: mTLS, expecting its identity) -> copy both ways. Each direction's EOF is
//! forwarded as a half-close (`shutdown(Write)`, a TLS close_notify) while the other direction
//! keeps flowing. Bytes are counted per direction as they pass. A connection that moves no byte
//! in either direction for the listener's `idle_timeout` is closed, and the listener's rate
//! limit (connections per second) closes connections over it right after accept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::authz::{self, AuthzRequest};
use crate::drain::DrainWatch;
use crate::lb::load::now_nanos;
use crate::snapshot::{Listener, ListenerKind};
use crate::tls::io::{ClientIo, ServerIo};
use crate::tls::spiffe::SpiffeId;
use crate::tls::{originate, Alpn};

const BUF_SIZE: usize = 16 * 1024;

/// Decrements the open-connections gauge and counts the connection closed however it ends.
struct OpenGuard<'a>(&'a crate::metrics::TcpMetrics);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open.dec();
        self.0.closed.inc();
    }
}

/// Proxies one accepted connection of a TCP `listener` until both directions finish, an error
/// occurs, or `drain_timeout` after a drain started. `peer` is the client's verified identity
/// (inbound mTLS).
pub async fn proxy_connection(
    mut client: ServerIo,
    peer: Option<SpiffeId>,
    listener: Arc<Listener>,
    mut drain: DrainWatch,
    drain_timeout: Duration,
) {
    let ListenerKind::Tcp { cluster, metrics } = &listener.kind else {
        return;
    };
    metrics.accepted.inc();
    metrics.open.inc();
    let _open = OpenGuard(metrics);
    if let Some((limit, refused)) = &listener.rate_limit {
        if limit.check().is_err() {
            refused.inc();
            tracing::debug!(listener = %listener.name, "tcp: over the listener's rate limit; closing");
            return;
        }
    }
    let request = AuthzRequest {
        peer: peer.as_ref(),
        method: None,
        path: None,
    };
    if let Err(policy) = authz::check(listener.authz.as_deref(), &request) {
        if let Some(denied) = &listener.authz_denied {
            denied.inc();
        }
        tracing::debug!(%policy, peer = ?peer.as_ref().map(SpiffeId::as_str), "tcp: denied by authorization policy; closing");
        return;
    }
    let Some(endpoint) = cluster.pick() else {
        tracing::debug!(cluster = %cluster.name, "tcp: cluster has no endpoints; closing");
        return;
    };
    let addr = endpoint.addr;
    let mesh = endpoint.pool.mesh_identity().cloned();
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        originate(tcp, addr.ip(), mesh.as_ref(), Alpn::None).await
    };
    let mut upstream: ClientIo = match tokio::time::timeout(cluster.connect_timeout, connect).await
    {
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
    let cut_after_drain = async {
        drain.signaled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        res = copy_both_ways_idle(&mut client, &mut upstream, &metrics.rx, &metrics.tx, Some(listener.idle_timeout)) => {
            if let Err(e) = res {
                tracing::debug!(%addr, error = %e, "tcp: connection ended with error");
            }
        }
        () = cut_after_drain => tracing::debug!(%addr, "tcp: connection cut after drain timeout"),
    }
}

/// Copies `client` <-> `upstream` with half-close; ends when both directions saw EOF, or on the
/// first error. `rx` counts bytes read from the client, `tx` bytes written to it.
pub async fn copy_both_ways<C, U>(
    client: &mut C,
    upstream: &mut U,
    rx: &IntCounter,
    tx: &IntCounter,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    copy_both_ways_idle(client, upstream, rx, tx, None).await
}

/// [`copy_both_ways`], ending with a `TimedOut` error when no byte moved in either direction for
/// `idle`.
pub async fn copy_both_ways_idle<C, U>(
    client: &mut C,
    upstream: &mut U,
    rx: &IntCounter,
    tx: &IntCounter,
    idle: Option<Duration>,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = AtomicU64::new(now_nanos());
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let to_upstream = copy_half(&mut cr, &mut uw, rx, &last);
    let to_client = copy_half(&mut ur, &mut cw, tx, &last);
    let period = idle.unwrap_or(Duration::MAX);
    let timer = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400 * 365)));
    tokio::pin!(to_upstream, to_client, timer);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut to_upstream, if !up_done => { r?; up_done = true; }
            r = &mut to_client, if !down_done => { r?; down_done = true; }
            () = &mut timer, if idle.is_some() => {
                let since = Duration::from_nanos(now_nanos().saturating_sub(last.load(Ordering::Relaxed)));
                if since >= period {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no bytes either way for {period:?} (idle timeout)"),
                    ));
                }
                timer.as_mut().reset(tokio::time::Instant::now() + (period - since));
            }
        }
    }
    Ok(())
}

async fn copy_half<R, W>(
    r: &mut R,
    w: &mut W,
    count: &IntCounter,
    last: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes TCP without close_notify: treat as EOF, as plaintext would.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Forward the EOF as a half-close; the other direction keeps going.
            w.shutdown().await?;
            return Ok(());
        }
        last.store(now_nanos(), Ordering::Relaxed);
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.inc_by(n as u64);
    }
}
