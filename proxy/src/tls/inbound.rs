//! The inbound side of a connection: protocol detection and the per-listener mTLS mode.
//!
//! The first bytes are peeked (nothing is consumed): a TLS ClientHello is terminated as mesh mTLS
//! when the listener is strict or permissive; anything else is plaintext, served when the
//! listener is permissive or disabled and refused (closed) when strict. A client that sends
//! nothing within the detection timeout ([`DETECT_TIMEOUT`], half a second, on every listener:
//! mesh clients send their ClientHello at once, so waiting longer only stalls silent
//! server-first clients) is treated as plaintext, so a strict listener closes it. Transparent
//! mode's captured connections detect with the mesh's own, shorter timeout and hand the result
//! to [`accept_detected`].

use std::time::Duration;

use tokio::net::TcpStream;
use weft_proto::v1;

use super::io::ServerIo;
use super::spiffe::SpiffeId;
use super::MeshTls;
use crate::detect::is_tls_prefix;

/// How long an inbound listener waits for a client's first bytes before treating it as
/// plaintext (HTTP and TCP listeners alike; it was 10 s on HTTP listeners, which held every
/// silent client that long).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// An inbound listener's mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Only mTLS.
    Strict,
    /// mTLS or plaintext.
    Permissive,
    /// Plaintext only: a ClientHello is passed through as opaque bytes.
    Disabled,
}

impl MtlsMode {
    /// From the proto (unspecified = permissive); `None` for an unknown value.
    pub fn from_proto(v: i32) -> Option<Self> {
        match v1::MtlsMode::try_from(v).ok()? {
            v1::MtlsMode::Strict => Some(Self::Strict),
            v1::MtlsMode::Unspecified | v1::MtlsMode::Permissive => Some(Self::Permissive),
            v1::MtlsMode::Disabled => Some(Self::Disabled),
        }
    }

    /// The mode's name, as in the policy YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
            Self::Disabled => "disabled",
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A TLS handshake record.
    Tls,
    /// Anything else.
    Plaintext,
    /// Nothing within the timeout.
    Silent,
    /// The client closed before sending anything.
    Closed,
}

/// Peeks at the first bytes of `stream`: TLS as [`crate::detect::classify`] sees 3 bytes (a
/// handshake record with a 3.x version, or a prefix of one).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let mut buf = [0u8; 3];
    match tokio::time::timeout(timeout, stream.peek(&mut buf)).await {
        Err(_) => Ok(Detected::Silent),
        Ok(Ok(0)) => Ok(Detected::Closed),
        Ok(Ok(n)) if is_tls_prefix(&buf[..n]) => Ok(Detected::Tls),
        Ok(Ok(_)) => Ok(Detected::Plaintext),
        Ok(Err(e)) => Err(e),
    }
}

/// An accepted inbound connection.
#[derive(Debug)]
pub struct InboundConn {
    /// The stream to serve (decrypted when mTLS).
    pub io: ServerIo,
    /// The client's verified identity (mTLS only).
    pub peer: Option<SpiffeId>,
    /// The client negotiated `h2` over mTLS.
    pub h2: bool,
    /// The client negotiated `weft-tunnel` over mTLS: a pooled tunnel connection whose
    /// streams are TCP connections (`crate::tunnel::server`).
    pub tunnel: bool,
}

/// Detects, enforces `mode` and terminates mTLS; `None` = the connection was refused or failed
/// (already counted and logged).
pub async fn accept(
    stream: TcpStream,
    mode: MtlsMode,
    tls: &MeshTls,
    detect_timeout: Duration,
) -> Option<InboundConn> {
    let detected = if mode == MtlsMode::Disabled {
        // Not peeked: whatever comes is passed through.
        Detected::Plaintext
    } else {
        match detect(&stream, detect_timeout).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "inbound: peek failed");
                return None;
            }
        }
    };
    accept_detected(stream, detected, mode, tls).await
}

/// [`accept`] once the first bytes were looked at (`detected`): terminates mTLS or passes
/// plaintext as `mode` allows (`Disabled` passes a ClientHello through as plaintext bytes).
pub async fn accept_detected(
    stream: TcpStream,
    detected: Detected,
    mode: MtlsMode,
    tls: &MeshTls,
) -> Option<InboundConn> {
    let plain = |stream| InboundConn {
        io: ServerIo::Plain(stream),
        peer: None,
        h2: false,
        tunnel: false,
    };
    if mode == MtlsMode::Disabled && detected != Detected::Closed {
        tls.metrics().inbound_connection("plaintext");
        return Some(plain(stream));
    }
    match (detected, mode) {
        (Detected::Closed, _) => None,
        (Detected::Tls, _) => match tls.accept(stream).await {
            Ok(a) => {
                tls.metrics().inbound_connection("mtls");
                Some(InboundConn {
                    io: ServerIo::Tls(Box::new(a.stream)),
                    peer: Some(a.peer),
                    h2: a.h2,
                    tunnel: a.tunnel,
                })
            }
            Err(e) => {
                tracing::info!(error = %e, "inbound: mTLS handshake failed; closing");
                None
            }
        },
        (Detected::Plaintext | Detected::Silent, MtlsMode::Strict) => {
            tls.metrics().inbound_connection("refused");
            tracing::info!(
                peer = ?stream.peer_addr().ok(),
                "inbound: plaintext connection refused (mTLS strict)"
            );
            None
        }
        (Detected::Plaintext | Detected::Silent, _) => {
            tls.metrics().inbound_connection("plaintext");
            Some(plain(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::metrics::SecurityMetrics;
    use crate::tls::testing::TestCa;
    use crate::tls::Alpn;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn mesh(ca: &TestCa, id: &str) -> Arc<MeshTls> {
        let tls = MeshTls::new(SecurityMetrics::unregistered()).unwrap();
        tls.trust().set_discovery(&ca.bundle());
        tls.certs().install(ca.leaf(id, 3600).issued());
        Arc::new(tls)
    }

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

    #[tokio::test]
    async fn strict_refuses_plaintext_and_silence_permissive_serves_it() {
        let ca = TestCa::new("cluster.local");
        let tls = mesh(&ca, WEB);
        let (mut c, s) = pair().await;
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let short = Duration::from_millis(200);
        assert!(accept(s, MtlsMode::Strict, &tls, short).await.is_none());
        let (_c, s) = pair().await;
        assert!(accept(s, MtlsMode::Strict, &tls, short).await.is_none());
        let (mut c, s) = pair().await;
        c.write_all(b"GET /").await.unwrap();
        let mut conn = accept(s, MtlsMode::Permissive, &tls, short).await.unwrap();
        assert!(conn.peer.is_none() && !conn.io.is_tls());
        // Nothing was consumed by detection.
        let mut buf = [0u8; 5];
        conn.io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET /");
    }

    #[tokio::test]
    async fn tls_is_terminated_in_strict_and_permissive() {
        let ca = TestCa::new("cluster.local");
        let server = mesh(&ca, WEB);
        let client = mesh(&ca, "spiffe://cluster.local/ns/default/sa/app");
        for mode in [MtlsMode::Strict, MtlsMode::Permissive] {
            let (c, s) = pair().await;
            let expected = SpiffeId::parse(WEB).unwrap();
            let ip = c.peer_addr().unwrap().ip();
            let (conn, cs) = tokio::join!(
                accept(s, mode, &server, Duration::from_secs(2)),
                client.connect(c, ip, &expected, Alpn::H2)
            );
            let mut conn = conn.unwrap();
            let mut cs = cs.unwrap();
            assert_eq!(
                conn.peer.as_ref().map(SpiffeId::as_str),
                Some("spiffe://cluster.local/ns/default/sa/app")
            );
            assert!(conn.h2 && conn.io.is_tls());
            cs.write_all(b"hi").await.unwrap();
            let mut buf = [0u8; 2];
            conn.io.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hi");
        }
    }
}
