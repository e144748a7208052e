//! Opaque TCP proxying (ARCHITECTURE.md "TCP"): accept -> (inbound: authorization) -> the
//! listener's cluster -> round-robin endpoint -> connect with the cluster's connect timeout ->
//! (mesh endpoint: mTLS, expecting its identity) -> copy both ways. Each direction's EOF is
//! forwarded as a half-close (`shutdown(Write)`, a TLS close_notify) while the other direction
//! keeps flowing. Bytes are counted per direction as they pass.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::authz::{self, AuthzRequest};
use crate::drain::DrainWatch;
use crate::snapshot::{Listener, ListenerKind};
use crate::tls::io::{ClientIo, ServerIo};
use crate::tls::spiffe::SpiffeId;
use crate::tls::{originate, Alpn};

const BUF_SIZE: usize = 16 * 1024;

/// Decrements the open-connections gauge however the connection ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
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
    let _open = OpenGuard(metrics.open.clone());
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
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
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
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        count.inc_by(n as u64);
    }
}
