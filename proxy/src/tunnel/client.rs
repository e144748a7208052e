//! Opening a tunnel stream: the outbound half of `crate::tcp` for a mesh endpoint with an
//! identity when the tunnel is on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::pool::{Checkout, Conn, Key, Lease, Pool};
use super::{Tunnel, CONNECTION_WINDOW, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW};
use crate::tls::spiffe::SpiffeId;
use crate::tls::{Alpn, ALPN_TUNNEL};

/// How often an idle tunnel connection is pinged, and how long the answer may take before the
/// connection is taken for dead (its streams fail, the next stream opens a new one).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a pooled connection checks whether it should close.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One TCP connection carried as a CONNECT stream; dropping it before both directions ended
/// resets the stream (the peer sees its upstream connection closed).
#[derive(Debug)]
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    _lease: Lease,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a stream could not be opened over the tunnel.
enum OpenError {
    /// The peer does not speak `weft-tunnel`: dial it directly.
    NoTunnel(String),
    /// Anything else: the connection fails.
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl Tunnel {
    /// A stream to the endpoint at `addr`, which must be `identity`, on a pooled connection;
    /// `Ok(None)`: this peer does not speak the tunnel, dial it directly (mTLS). The caller
    /// bounds the time (the cluster's connect timeout).
    pub async fn open(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> io::Result<Option<TunnelStream>> {
        let pool = &self.pool;
        let key: Key = (addr, identity.clone());
        if pool.falls_back(&key, Instant::now()) {
            pool.metrics().fallbacks.inc();
            return Ok(None);
        }
        let result = open_stream(pool, &key).await;
        let metrics = pool.metrics();
        match result {
            Ok(s) => {
                metrics.stream("outbound", "ok");
                Ok(Some(s))
            }
            Err(OpenError::NoTunnel(why)) => {
                pool.mark_fallback(&key, Instant::now());
                metrics.fallbacks.inc();
                tracing::debug!(%addr, %identity, reason = %why, "tunnel: peer does not speak weft-tunnel; dialling it directly for a while");
                Ok(None)
            }
            Err(OpenError::Io(e)) => {
                let refused = is_refusal(&e);
                metrics.stream("outbound", if refused { "refused" } else { "error" });
                Err(e)
            }
        }
    }
}

/// The peer answered the CONNECT with this status.
#[derive(Debug)]
struct Refused(http::StatusCode);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer sidecar answered the tunnel CONNECT with {}",
            self.0
        )
    }
}

impl std::error::Error for Refused {}

async fn open_stream(pool: &Arc<Pool>, key: &Key) -> Result<TunnelStream, OpenError> {
    // A pooled connection the peer turned away for stale credentials (421) is retired and the
    // stream retried once, on another connection (a new handshake against the peer's bundle).
    let mut retried = false;
    loop {
        let generation = pool.tls().generation();
        let notified = pool.changed().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match pool.checkout(key, generation, Instant::now()) {
            Checkout::Use(lease) => {
                let (sender, conn) = (lease.conn().sender(), lease.shared());
                match connect_on(sender, lease, key).await {
                    Err(OpenError::Io(e)) if !retried && is_stale(&e) => {
                        tracing::debug!(addr = %key.0, "tunnel: the peer retired this connection (421); retrying on a new one");
                        conn.mark_stale();
                        retried = true;
                        continue;
                    }
                    other => return other,
                }
            }
            Checkout::Open => {
                // Released however the dial ends: error, or the caller's timeout dropping it.
                let slot = OpenSlot { pool, key };
                let (conn, lease) = dial(pool, key, generation).await?;
                std::mem::forget(slot);
                return connect_on(conn.sender(), lease, key).await;
            }
            Checkout::Wait => {
                // Woken when a connection joins or fails; re-checked at least every 100 ms.
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        }
    }
}

/// A connection being opened ([`Checkout::Open`]): dropped before [`Pool::opened`] took it
/// over, it gives the slot back.
struct OpenSlot<'a> {
    pool: &'a Pool,
    key: &'a Key,
}

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.pool.open_failed(self.key);
    }
}

/// The status the peer refused the stream with, if `e` is such a refusal.
fn refusal(e: &io::Error) -> Option<http::StatusCode> {
    Some(e.get_ref()?.downcast_ref::<Refused>()?.0)
}

/// Whether `e` is the peer retiring the connection for stale credentials (421).
fn is_stale(e: &io::Error) -> bool {
    refusal(e) == Some(http::StatusCode::MISDIRECTED_REQUEST)
}

/// Whether `e` (from [`Tunnel::open`]) is the peer refusing the stream (a status other than
/// 200: denied, over a limit, its upstream unreachable) rather than a failure to reach it.
pub fn is_refusal(e: &io::Error) -> bool {
    refusal(e).is_some()
}

/// Sends the CONNECT on `sender` and takes the stream on a 200.
async fn connect_on(
    mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    lease: Lease,
    key: &Key,
) -> Result<TunnelStream, OpenError> {
    let io_err = |e: hyper::Error| OpenError::Io(io::Error::new(io::ErrorKind::ConnectionReset, e));
    sender.ready().await.map_err(io_err)?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(key.0.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| OpenError::Io(io::Error::other(e)))?;
    let resp = sender.send_request(req).await.map_err(io_err)?;
    if resp.status() != http::StatusCode::OK {
        return Err(OpenError::Io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            Refused(resp.status()),
        )));
    }
    let upgraded = hyper::upgrade::on(resp).await.map_err(io_err)?;
    Ok(TunnelStream {
        io: TokioIo::new(upgraded),
        _lease: lease,
    })
}

/// Opens a new tunnel connection for `key`: TCP, mTLS offering only `weft-tunnel` (verifying
/// the identity like every mesh connection), HTTP/2; it joins the pool and a task drives it.
async fn dial(
    pool: &Arc<Pool>,
    key: &Key,
    generation: u64,
) -> Result<(Arc<Conn>, Lease), OpenError> {
    let (addr, identity) = key;
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let tls = match pool
        .tls()
        .connect(tcp, addr.ip(), identity, Alpn::Tunnel)
        .await
    {
        Ok(s) => s,
        Err(e) if no_common_alpn(&e) => return Err(OpenError::NoTunnel(e.to_string())),
        Err(e) => return Err(OpenError::Io(e)),
    };
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_TUNNEL) {
        // A server with no ALPN configured ignores ours: not a tunnel peer.
        return Err(OpenError::NoTunnel("the peer negotiated no ALPN".into()));
    }
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_frame_size(super::MAX_FRAME)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let (sender, connection) = builder
        .handshake::<_, Empty<Bytes>>(TokioIo::new(crate::tls::sliced::Sliced(tls)))
        .await
        .map_err(|e| OpenError::Io(io::Error::new(io::ErrorKind::ConnectionAborted, e)))?;
    let (conn, lease) = pool.opened(key, sender, generation);
    tracing::debug!(%addr, %identity, "tunnel: connection opened");
    let (pool, key, driven) = (Arc::clone(pool), key.clone(), Arc::clone(&conn));
    tokio::spawn(async move {
        tokio::pin!(connection);
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut connection => {
                    if let Err(e) = r {
                        tracing::debug!(addr = %key.0, error = %e, "tunnel: connection failed");
                    }
                    break;
                }
                _ = tick.tick() => {
                    if pool.retire_if_done(&key, &driven, Instant::now()) {
                        tracing::debug!(addr = %key.0, "tunnel: connection retired (idle, old, or trust/certificate changed)");
                        break;
                    }
                }
            }
        }
        pool.closed(&key, &driven);
    });
    Ok((conn, lease))
}

/// Whether a handshake failed because the peer shares no ALPN protocol with us.
fn no_common_alpn(e: &io::Error) -> bool {
    use rustls::AlertDescription::NoApplicationProtocol;
    let Some(inner) = e.get_ref() else {
        return false;
    };
    matches!(
        inner.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::AlertReceived(NoApplicationProtocol))
            | Some(rustls::Error::NoApplicationProtocol)
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::tls::metrics::SecurityMetrics;
    use crate::tls::testing::TestCa;
    use crate::tls::MeshTls;
    use crate::tunnel::metrics::TunnelMetrics;
    use crate::tunnel::pool::Settings;

    const STORE: &str = "spiffe://cluster.local/ns/default/sa/store";

    fn mesh(ca: &TestCa, id: &str) -> Arc<MeshTls> {
        let tls = MeshTls::new(SecurityMetrics::unregistered()).unwrap();
        tls.trust().set_discovery(&ca.bundle());
        tls.certs().install(ca.leaf(id, 3600).issued());
        Arc::new(tls)
    }

    /// A tunnel server that echoes every CONNECT stream; counts accepted connections and
    /// hands out an abort handle per connection.
    async fn echo_server(
        tls: Arc<MeshTls>,
        accepted: Arc<AtomicUsize>,
        conns: tokio::sync::mpsc::UnboundedSender<tokio::task::AbortHandle>,
    ) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let a = tls.accept(s).await.unwrap();
                assert!(a.tunnel);
                accepted.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    let service = hyper::service::service_fn(|mut req| async move {
                        let up = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let mut io = TokioIo::new(up.await.unwrap());
                            let mut buf = vec![0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = io.shutdown().await;
                        });
                        Ok::<_, Infallible>(http::Response::new(Empty::<Bytes>::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(a.stream), service)
                        .await;
                });
                let _ = conns.send(task.abort_handle());
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TunnelStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn streams_share_a_connection_and_a_broken_one_is_replaced() {
        let ca = TestCa::new("cluster.local");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, mut conns) = tokio::sync::mpsc::unbounded_channel();
        let addr = echo_server(mesh(&ca, STORE), Arc::clone(&accepted), tx).await;
        let client = mesh(&ca, "spiffe://cluster.local/ns/default/sa/web");
        let settings = Settings::from(&crate::tunnel::TunnelConfig::default());
        let metrics = TunnelMetrics::unregistered();
        let tunnel = Tunnel {
            pool: Pool::new(client, settings, metrics.clone()),
        };
        let id = SpiffeId::parse(STORE).unwrap();

        let mut a = tunnel
            .open(addr, &id)
            .await
            .unwrap()
            .expect("a tunnel stream");
        let mut b = tunnel
            .open(addr, &id)
            .await
            .unwrap()
            .expect("a tunnel stream");
        assert_eq!(roundtrip(&mut a, b"one").await.unwrap(), b"one");
        assert_eq!(roundtrip(&mut b, b"two").await.unwrap(), b"two");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "two streams, one handshake"
        );
        assert_eq!(metrics.outbound_connections.get(), 1);

        // The pooled connection breaks (the peer's side of it is gone): its streams fail ...
        conns.recv().await.unwrap().abort();
        let broken = async {
            a.write_all(b"x").await?;
            let mut buf = [0u8; 1];
            match a.read(&mut buf).await? {
                0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                _ => Ok(()),
            }
        };
        assert!(
            broken.await.is_err(),
            "a stream of a broken connection kept working"
        );
        // ... and the next stream opens a new connection.
        let mut c = tunnel
            .open(addr, &id)
            .await
            .unwrap()
            .expect("a tunnel stream");
        assert_eq!(roundtrip(&mut c, b"three").await.unwrap(), b"three");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // A peer without the tunnel ALPN: fallback (no stream), remembered.
        let plain_tls = MeshTls::new(SecurityMetrics::unregistered())
            .unwrap()
            .without_tunnel_alpn()
            .unwrap();
        plain_tls.trust().set_discovery(&ca.bundle());
        plain_tls.certs().install(ca.leaf(STORE, 3600).issued());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let old_addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                assert!(plain_tls.accept(s).await.is_err(), "no common ALPN");
            }
        });
        assert!(tunnel.open(old_addr, &id).await.unwrap().is_none());
        assert!(tunnel.open(old_addr, &id).await.unwrap().is_none());
        assert_eq!(metrics.fallbacks.get(), 2);
    }
}
