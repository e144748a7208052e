//! Opaque TCP proxying (ARCHITECTURE.md "TCP"): accept -> (inbound: authorization) -> the
//! listener's cluster -> round-robin endpoint -> connect with the cluster's connect timeout ->
//! (mesh endpoint: mTLS, expecting its identity) -> copy both ways. Each direction's EOF is
//! forwarded as a half-close (`shutdown(Write)`, a TLS close_notify) while the other direction
//! keeps flowing. Bytes are counted per direction as they pass. A connection that moves no byte
//! in either direction for the listener's `idle_timeout` is closed, and the listener's rate
//! limit (connections per second) closes connections over it right after accept.
//!
//! The copy loop ([`splice`], with [`Counted`] for one connection's totals) is also what
//! carries HTTP upgrades and CONNECT tunnels once their handshake is done
//! (`crate::http::upgrade`).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::authz::{self, AuthzRequest};
use crate::drain::DrainWatch;
use crate::lb::load::now_nanos;
use crate::snapshot::{Listener, ListenerKind};
use crate::tls::io::{ClientIo, ServerIo};
use crate::tls::sliced::Sliced;
use crate::tls::spiffe::SpiffeId;
use crate::tls::{originate, Alpn, Expect};

/// Each direction's buffer starts at this size ...
const BUF_INITIAL: usize = 16 * 1024;
/// ... grows to this once a batch fills it (a bulk transfer): fewer, larger reads and writes
/// (a TLS sink then writes up to four full records per `writev`), so fewer syscalls and wakeups
/// of the processes on either side per MB; and shrinks back after a small batch.
const BUF_MAX: usize = 64 * 1024;
/// The largest TLS record payload: a TLS source hands out at most one record per read.
const TLS_RECORD_MAX: usize = 16 * 1024;

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
/// (inbound mTLS). With the listener's access log on, one line per connection when it ends.
pub async fn proxy_connection(
    client: ServerIo,
    peer: Option<SpiffeId>,
    listener: Arc<Listener>,
    drain: DrainWatch,
    drain_timeout: Duration,
) {
    let ListenerKind::Tcp { cluster, metrics } = &listener.kind else {
        return;
    };
    let target = TcpTarget {
        upstream: Upstream::Cluster(Arc::clone(cluster)),
        metrics,
        authority: None,
    };
    proxy_to(client, peer, &listener, target, drain, drain_timeout).await;
}

/// Why [`proxy_to`] turned a connection away before copying any byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the listener's rate limit.
    RateLimited,
    /// Denied by the listener's authorization policy.
    Denied,
    /// The cluster has no endpoint, or connecting to it failed.
    Unreachable,
}

/// The downstream end of one proxied TCP connection: an accepted socket (plaintext or mTLS),
/// or one CONNECT stream of a tunnel connection (`crate::tunnel::server`), which only becomes
/// a byte stream once it is admitted (a 200 answer) and can be refused with a status.
pub trait Downstream: Send {
    /// The byte stream once admitted.
    type Io: AsyncRead + AsyncWrite + Unpin + Send;
    /// The client's address (a ring hash on `source_ip`).
    fn source(&self) -> Option<std::net::IpAddr>;
    /// Whether writes to the stream go into a rustls connection.
    fn is_tls(&self) -> bool;
    /// Admitted and the upstream is connected: the stream to copy.
    fn admit(self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
    /// Turned away (`why`), before any byte was copied.
    fn refuse(self, why: Refusal) -> impl std::future::Future<Output = ()> + Send;
}

impl Downstream for ServerIo {
    type Io = ServerIo;

    fn source(&self) -> Option<std::net::IpAddr> {
        crate::http::ServerStream::tcp(self)
            .peer_addr()
            .ok()
            .map(|a| a.ip())
    }

    fn is_tls(&self) -> bool {
        ServerIo::is_tls(self)
    }

    async fn admit(self) -> std::io::Result<ServerIo> {
        Ok(self)
    }

    /// The connection is closed (dropped).
    async fn refuse(self, _why: Refusal) {}
}

/// The upstream end: a socket (plaintext or mTLS) or a tunnel stream.
enum UpstreamIo {
    Direct(ClientIo),
    Tunnel(crate::tunnel::client::TunnelStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Direct(s) => s.is_write_vectored(),
            Self::Tunnel(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects to the endpoint at `addr` as `expect` says: a stream over a pooled tunnel
/// connection for a mesh endpoint with an identity when the tunnel is on (unless that peer
/// does not speak it), else TCP plus `originate` (mTLS, TLS or plaintext).
async fn connect_upstream(
    addr: std::net::SocketAddr,
    expect: &Expect,
) -> std::io::Result<UpstreamIo> {
    if let (Some(identity), Some(tunnel)) = (expect.identity(), crate::tunnel::active()) {
        if let Some(s) = tunnel.open(addr, identity).await? {
            return Ok(UpstreamIo::Tunnel(s));
        }
    }
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    Ok(UpstreamIo::Direct(
        originate(tcp, addr.ip(), expect, Alpn::None).await?,
    ))
}

/// Where [`proxy_to`] sends a connection's bytes.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A balanced endpoint of a cluster (mTLS to mesh endpoints).
    Cluster(Arc<crate::cluster::Cluster>),
    /// Straight to this address in plaintext, as the client meant (transparent mode's
    /// passthrough of an unknown destination, or an app port no cluster names).
    Direct {
        /// The address.
        addr: std::net::SocketAddr,
        /// Metric / access-log name (`passthrough`, `inbound-passthrough`).
        name: Arc<str>,
        /// Connect timeout.
        connect_timeout: Duration,
    },
}

impl Upstream {
    fn name(&self) -> &str {
        match self {
            Self::Cluster(c) => &c.name,
            Self::Direct { name, .. } => name,
        }
    }
}

/// One connection's destination and what it is counted in.
#[derive(Debug)]
pub struct TcpTarget<'a> {
    /// Where the bytes go.
    pub upstream: Upstream,
    /// `weft_tcp_*` handles of (listener direction, destination).
    pub metrics: &'a crate::metrics::TcpMetrics,
    /// What the access log shows as the authority (a TLS ClientHello's SNI).
    pub authority: Option<&'a str>,
}

/// Proxies one accepted connection of `listener` to `target` (its rate limit, authorization and
/// idle timeout apply): what [`proxy_connection`] does for a TCP listener's own cluster, and
/// transparent mode for a captured connection's destination.
pub async fn proxy_to<D: Downstream>(
    client: D,
    peer: Option<SpiffeId>,
    listener: &Listener,
    target: TcpTarget<'_>,
    drain: DrainWatch,
    drain_timeout: Duration,
) {
    let start = std::time::Instant::now();
    let start_wall = std::time::SystemTime::now();
    let mut out = Outcome::default();
    serve(
        client,
        peer.as_ref(),
        listener,
        &target,
        drain,
        drain_timeout,
        &mut out,
    )
    .await;
    crate::observe::log_tcp_connection(
        listener,
        &crate::observe::TcpConnectionLog {
            start: start_wall,
            duration: start.elapsed(),
            flags: out.flags,
            upstream: out.upstream,
            cluster: target.upstream.name(),
            peer_identity: peer.as_ref().map(SpiffeId::as_str),
            bytes_received: out.received,
            bytes_sent: out.sent,
            authority: target.authority,
        },
    );
}

/// How a TCP connection went (its access log line).
#[derive(Debug, Default)]
struct Outcome {
    flags: crate::observe::ResponseFlags,
    upstream: Option<std::net::SocketAddr>,
    /// Bytes read from the client.
    received: u64,
    /// Bytes written to the client.
    sent: u64,
}

async fn serve<D: Downstream>(
    client: D,
    peer: Option<&SpiffeId>,
    listener: &Listener,
    target: &TcpTarget<'_>,
    mut drain: DrainWatch,
    drain_timeout: Duration,
    out: &mut Outcome,
) {
    use crate::observe::ResponseFlags;
    // An inbound mTLS client's connections count under its identity (bounded per listener).
    let caller;
    let metrics = match peer {
        Some(p) => {
            caller = target.metrics.for_peer(p.as_str());
            &*caller
        }
        None => target.metrics,
    };
    metrics.accepted.inc();
    metrics.open.inc();
    let _open = OpenGuard(metrics);
    if let Some((limit, refused)) = &listener.rate_limit {
        if limit.check().is_err() {
            refused.inc();
            out.flags.insert(ResponseFlags::RATE_LIMITED);
            tracing::debug!(listener = %listener.name, "tcp: over the listener's rate limit; closing");
            client.refuse(Refusal::RateLimited).await;
            return;
        }
    }
    let request = AuthzRequest {
        peer,
        method: None,
        path: None,
    };
    if let Err(policy) = authz::check(listener.authz.as_deref(), &request) {
        if let Some(denied) = &listener.authz_denied {
            denied.inc();
        }
        out.flags.insert(ResponseFlags::DENIED);
        tracing::debug!(%policy, peer = ?peer.map(SpiffeId::as_str), "tcp: denied by authorization policy; closing");
        client.refuse(Refusal::Denied).await;
        return;
    }
    let (addr, expect, connect_timeout, connect_errors) = match &target.upstream {
        Upstream::Cluster(cluster) => {
            // The client's address, for a ring hash on `source_ip`.
            let Some(endpoint) = cluster.pick_for(client.source()) else {
                out.flags.insert(ResponseFlags::NO_HEALTHY_UPSTREAM);
                tracing::debug!(cluster = %cluster.name, "tcp: cluster has no endpoints; closing");
                client.refuse(Refusal::Unreachable).await;
                return;
            };
            (
                endpoint.addr,
                endpoint.pool.expectation().clone(),
                cluster.connect_timeout,
                Some(&cluster.connect_errors),
            )
        }
        Upstream::Direct {
            addr,
            connect_timeout,
            ..
        } => (*addr, Expect::Plain, *connect_timeout, None),
    };
    out.upstream = Some(addr);
    let connect = connect_upstream(addr, &expect);
    let failed = |out: &mut Outcome| {
        if let Some(c) = connect_errors {
            c.inc();
        }
        out.flags.insert(ResponseFlags::UPSTREAM_CONNECT_FAILURE);
    };
    let mut upstream = match tokio::time::timeout(connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if crate::tunnel::client::is_refusal(&e) => {
            // The peer sidecar turned the tunnel stream away (its authorization, limits or
            // upstream): as if it closed a direct connection, not a connect failure.
            out.flags
                .insert(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
            tracing::debug!(%addr, error = %e, "tcp: the peer sidecar refused the stream; closing client");
            client.refuse(Refusal::Unreachable).await;
            return;
        }
        Ok(Err(e)) => {
            failed(out);
            tracing::debug!(%addr, error = %e, "tcp: connect failed; closing client");
            client.refuse(Refusal::Unreachable).await;
            return;
        }
        Err(_) => {
            failed(out);
            tracing::debug!(%addr, "tcp: connect timed out; closing client");
            client.refuse(Refusal::Unreachable).await;
            return;
        }
    };
    let sinks = Sinks {
        client_tls: client.is_tls(),
        upstream_tls: matches!(&upstream, UpstreamIo::Direct(s) if s.is_tls()),
    };
    let client = match client.admit().await {
        Ok(c) => c,
        Err(e) => {
            out.flags.insert(ResponseFlags::DOWNSTREAM_DISCONNECT);
            tracing::debug!(%addr, error = %e, "tcp: the client went away before its stream was open");
            return;
        }
    };
    let mut client = Counted::new(client);
    let cut_after_drain = async {
        drain.signaled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        res = splice(&mut client, &mut upstream, &metrics.rx, &metrics.tx, Some(listener.idle_timeout), sinks) => {
            if let Err(e) = res {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    out.flags.insert(ResponseFlags::UPSTREAM_TIMEOUT);
                } else {
                    out.flags.insert(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION);
                }
                tracing::debug!(%addr, error = %e, "tcp: connection ended with error");
            }
        }
        () = cut_after_drain => tracing::debug!(%addr, "tcp: connection cut after drain timeout"),
    }
    out.received = client.read;
    out.sent = client.written;
}

/// A stream that counts the bytes read from and written to it (one connection's totals for its
/// access log line; the metrics count per listener as bytes pass).
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Counted<S> {
    /// `inner`, counted from now on.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }

    /// Bytes read from the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Bytes written to the stream so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written += n as u64;
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.written += n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
    splice(client, upstream, rx, tx, idle, Sinks::default()).await
}

/// Which ends of a proxied connection are TLS: writes to a TLS end take [`write_all_tls`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Sinks {
    /// The client (downstream) end is a rustls stream.
    pub client_tls: bool,
    /// The upstream end is a rustls stream.
    pub upstream_tls: bool,
}

/// The copy loop of every opaque byte stream the proxy carries (TCP listeners, HTTP upgrades,
/// CONNECT tunnels): `client` <-> `upstream` with half-close, each direction's EOF forwarded as
/// `shutdown(Write)` while the other keeps flowing; ends when both directions saw EOF, on the
/// first error, or with a `TimedOut` error when no byte moved either way for `idle`. `rx`
/// counts bytes read from the client, `tx` bytes written to it.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    rx: &IntCounter,
    tx: &IntCounter,
    idle: Option<Duration>,
    sinks: Sinks,
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = AtomicU64::new(now_nanos());
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let to_upstream = copy_half(&mut cr, &mut uw, sinks.upstream_tls, rx, &last);
    let to_client = copy_half(&mut ur, &mut cw, sinks.client_tls, tx, &last);
    let period = idle.unwrap_or(Duration::MAX);
    let timer = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400 * 365)));
    tokio::pin!(to_upstream, to_client, timer);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut to_upstream, if !up_done => { r?; up_done = true; }
            r = &mut to_client, if !down_done => { r?; down_done = true; }
            () = &mut timer, if idle.is_some() => {
                let since = crate::lb::load::between(last.load(Ordering::Relaxed), now_nanos());
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

/// One direction: waits for bytes, gathers what else is readable right away (up to the buffer),
/// writes it all at once, repeats; forwards EOF as a half-close. `w_tls`: `w` is a TLS stream.
async fn copy_half<R, W>(
    r: &mut R,
    w: &mut W,
    w_tls: bool,
    count: &IntCounter,
    last: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_INITIAL];
    loop {
        let first = eof_as_zero(r.read(&mut buf).await)?;
        if first == 0 {
            // Forward the EOF as a half-close; the other direction keeps going.
            w.shutdown().await?;
            return Ok(());
        }
        // Gather without waiting. A plaintext read returns all the socket holds (up to the space
        // offered), so a read that did not fill that space drained it; a TLS read returns at
        // most one record, and the next may already be in the socket: try again after a full one.
        let (mut filled, mut got, mut offered) = (first, first, buf.len());
        let (mut eof, mut error) = (false, None);
        while filled < buf.len() && (got == offered || got == TLS_RECORD_MAX) {
            offered = buf.len() - filled;
            match read_now(r, &mut buf[filled..]).await.map(eof_as_zero) {
                None => break,
                Some(Ok(0)) => eof = true,
                Some(Ok(n)) => {
                    filled += n;
                    got = n;
                    continue;
                }
                Some(Err(e)) => error = Some(e),
            }
            break;
        }
        last.store(now_nanos(), Ordering::Relaxed);
        if w_tls {
            write_all_tls(w, &buf[..filled]).await?;
        } else {
            w.write_all(&buf[..filled]).await?;
        }
        w.flush().await?;
        count.inc_by(filled as u64);
        if let Some(e) = error {
            return Err(e);
        }
        if eof {
            w.shutdown().await?;
            return Ok(());
        }
        if filled == buf.len() && buf.len() < BUF_MAX {
            buf.resize(BUF_MAX, 0);
        } else if buf.len() > BUF_INITIAL && filled <= BUF_INITIAL / 4 {
            // The burst is over: don't hold 64 KiB per direction on a quiet connection.
            buf.truncate(BUF_INITIAL);
            buf.shrink_to_fit();
        }
    }
}

/// A TLS peer that closes TCP without close_notify: EOF, as plaintext would.
fn eof_as_zero(r: std::io::Result<usize>) -> std::io::Result<usize> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        r => r,
    }
}

/// One read if bytes are ready now; `None` if it would wait.
async fn read_now<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Option<std::io::Result<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        Poll::Ready(match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Pending => None,
        })
    })
    .await
}

/// `write_all` to a TLS stream, handing rustls the bytes in slices ([`Sliced`]).
async fn write_all_tls<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    Sliced(w).write_all(data).await
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::task::Context;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tls::metrics::SecurityMetrics;
    use crate::tls::testing::TestCa;
    use crate::tls::MeshTls;

    fn counter() -> IntCounter {
        IntCounter::new("bytes", "bytes").unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Hands out at most one "record" (16 KiB) per read, as a TLS stream does.
    struct Records<'a>(&'a [u8]);

    impl AsyncRead for Records<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.0.len().min(buf.remaining()).min(TLS_RECORD_MAX);
            buf.put_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Poll::Ready(Ok(()))
        }
    }

    /// Records each write; accepts at most `cap` bytes per call (vectored or not).
    #[derive(Default)]
    struct Sink {
        data: Vec<u8>,
        writes: Vec<usize>,
        cap: usize,
        shut: bool,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.cap);
            self.data.extend_from_slice(&buf[..n]);
            self.writes.push(n);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.data.extend_from_slice(&b[..take]);
                n += take;
            }
            self.writes.push(n);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn record_sized_reads_are_gathered_into_large_writes() {
        let input = pattern(1024 * 1024 + 1234, 7);
        for w_tls in [false, true] {
            let mut sink = Sink {
                cap: usize::MAX,
                ..Sink::default()
            };
            let (count, last) = (counter(), AtomicU64::new(0));
            copy_half(&mut Records(&input), &mut sink, w_tls, &count, &last)
                .await
                .unwrap();
            assert!(sink.data == input, "bytes changed (w_tls {w_tls})");
            assert!(sink.shut, "EOF not forwarded");
            assert_eq!(count.get(), input.len() as u64);
            // After the first (16 KiB) batch the buffer grows and four records go per write.
            assert_eq!(sink.writes[0], BUF_INITIAL);
            assert!(sink.writes[1..sink.writes.len() - 1]
                .iter()
                .all(|&n| n == BUF_MAX));
        }
    }

    #[tokio::test]
    async fn tls_writes_survive_partial_vectored_writes() {
        let input = pattern(200_000, 3);
        let mut sink = Sink {
            cap: 5000,
            ..Sink::default()
        };
        write_all_tls(&mut sink, &input).await.unwrap();
        assert!(sink.data == input);
        assert!(sink.writes.iter().all(|&n| n <= 5000));
    }

    /// client (plaintext) -> proxy -> mTLS -> server and back, with half-close both ways.
    #[tokio::test]
    async fn bulk_copy_over_mtls_keeps_bytes_counts_and_half_close() {
        const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
        const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
        let ca = TestCa::new("cluster.local");
        let mesh = |id: &str| {
            let tls = MeshTls::new(SecurityMetrics::unregistered()).unwrap();
            tls.trust().set_discovery(&ca.bundle());
            tls.certs().install(ca.leaf(id, 3600).issued());
            tls
        };
        let (server_tls, client_tls) = (mesh(WEB), mesh(CLIENT));
        let (a, b) = duplex(64 * 1024);
        let expected = SpiffeId::parse(WEB).unwrap();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (server, upstream) = tokio::join!(
            server_tls.accept(a),
            client_tls.connect(b, ip, &expected, Alpn::None)
        );
        let (mut server, mut upstream) = (server.unwrap().stream, upstream.unwrap());
        let (mut app, mut proxied) = duplex(64 * 1024);
        let (rx, tx) = (counter(), counter());
        let up = pattern(3 * 1024 * 1024 + 17, 1);
        let down = pattern(700_001, 2);

        let proxy = async {
            let sinks = Sinks {
                client_tls: false,
                upstream_tls: true,
            };
            splice(&mut proxied, &mut upstream, &rx, &tx, None, sinks).await
        };
        let client = async {
            let (mut r, mut w) = tokio::io::split(&mut app);
            let send = async {
                for chunk in up.chunks(10_000) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let ((), n) = tokio::join!(send, recv);
            n.unwrap();
            got
        };
        let server_side = async {
            // Read everything the client sent (its EOF arrives as close_notify), then answer.
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let (res, to_client, to_server) = tokio::join!(proxy, client, server_side);
        res.unwrap();
        assert!(to_server == up, "client -> server bytes differ");
        assert!(to_client == down, "server -> client bytes differ");
        assert_eq!(rx.get(), up.len() as u64);
        assert_eq!(tx.get(), down.len() as u64);
    }
}
