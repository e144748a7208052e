//! Mesh mTLS between sidecars (rustls, TLS 1.3 only, `ring` provider).
//!
//! - [`spiffe`]: SPIFFE IDs and reading them from certificates.
//! - [`trust`]: the trust bundle (roots + trust domain), swapped whole on change.
//! - [`verify`]: the client- and server-certificate verifiers (chain + SPIFFE identity).
//! - [`certs`]: this proxy's certificate, swapped in on renewal; the rustls cert resolver.
//! - [`renew`]: key + CSR generation, `Identity.Certify`, renewal at ~2/3 of the lifetime.
//! - [`metrics`]: handshake / expiry / inbound transport / authz-denial metric families.
//! - [`origination`]: TLS originated to services outside the mesh (`Cluster.upstream_tls`).
//!
//! [`MeshTls`] ties them together: one server config for every inbound listener, and one client
//! config per (expected server identity, ALPN) for outbound connections. Every config reads the
//! certificate and the trust bundle per handshake, so rotation and trust changes take effect for
//! new handshakes without touching open connections or rebuilding configs. Session resumption is
//! off on both sides: every connection's peer is verified against the bundle in force.

pub mod certs;
pub mod control;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod origination;
pub mod renew;
pub mod sliced;
pub mod spiffe;
pub mod trust;
pub mod verify;

#[cfg(test)]
pub(crate) mod testing;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use weft_proto::v1;

use self::certs::CertStore;
use self::metrics::SecurityMetrics;
use self::spiffe::SpiffeId;
use self::trust::TrustStore;
use self::verify::{MeshClientVerifier, MeshServerVerifier};

/// ALPN id for HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN id of a pooled sidecar-to-sidecar tunnel connection: HTTP/2 whose streams are CONNECT
/// tunnels, each carrying one TCP connection (`crate::tunnel`).
pub const ALPN_TUNNEL: &[u8] = b"weft-tunnel";

/// How long an inbound TLS handshake may take before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an outbound connection offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// `h2` only: the request is HTTP/2.
    H2,
    /// `http/1.1` only.
    Http1,
    /// No ALPN: opaque TCP.
    None,
    /// `weft-tunnel` only: a pooled tunnel connection (`crate::tunnel`).
    Tunnel,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Self::H2 => vec![ALPN_H2.to_vec()],
            Self::Http1 => vec![ALPN_HTTP1.to_vec()],
            Self::None => Vec::new(),
            Self::Tunnel => vec![ALPN_TUNNEL.to_vec()],
        }
    }
}

/// An accepted inbound mTLS connection.
#[derive(Debug)]
pub struct Accepted<IO> {
    /// The decrypted stream.
    pub stream: server::TlsStream<IO>,
    /// The client's verified identity.
    pub peer: SpiffeId,
    /// Whether the client negotiated `h2` (else HTTP/1.1 or no ALPN).
    pub h2: bool,
    /// Whether the client negotiated `weft-tunnel` (a pooled tunnel connection).
    pub tunnel: bool,
}

/// Handshake counters, pre-resolved.
#[derive(Debug, Clone)]
struct Handshakes {
    inbound_ok: IntCounter,
    inbound_err: IntCounter,
    outbound_ok: IntCounter,
    outbound_err: IntCounter,
}

/// The proxy's mTLS context.
pub struct MeshTls {
    certs: Arc<CertStore>,
    trust: Arc<TrustStore>,
    metrics: SecurityMetrics,
    handshakes: Handshakes,
    provider: Arc<CryptoProvider>,
    acceptor: TlsAcceptor,
    clients: Mutex<HashMap<(SpiffeId, Alpn), TlsConnector>>,
}

/// The crypto provider every Weft TLS config uses (explicit, so a second provider linked into the
/// binary can never be picked by accident): ring's, preferring TLS 1.3 AES-128-GCM-SHA256.
///
/// ring's default order puts AES-256-GCM-SHA384 first. Both ends of a mesh connection are Weft,
/// so the order decides what every sidecar-to-sidecar byte costs: AES-128 runs 10 rounds instead
/// of 14, and SHA-256 (the handshake's hash) has CPU instructions where SHA-384 is software.
/// On this machine's AES-NI the bulk difference is within noise (`benches/run.sh`, TCP through
/// the mTLS mesh: 782 vs 792 MB/s), handshakes gained a few percent (1,178 vs ~1,115/s); it
/// matters more on CPUs without SHA extensions. AES-256 and ChaCha20 stay acceptable.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("certs", &self.certs)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// A context with no certificate and no trust bundle yet (handshakes fail until both exist).
    pub fn new(metrics: SecurityMetrics) -> Result<Self, rustls::Error> {
        let provider = provider();
        let certs = Arc::new(CertStore::new());
        let trust = Arc::new(TrustStore::new());
        let acceptor = server_acceptor(&provider, &trust, &certs, true)?;
        let handshakes = Handshakes {
            inbound_ok: metrics.handshake("inbound", true),
            inbound_err: metrics.handshake("inbound", false),
            outbound_ok: metrics.handshake("outbound", true),
            outbound_err: metrics.handshake("outbound", false),
        };
        Ok(Self {
            certs,
            trust,
            metrics,
            handshakes,
            provider,
            acceptor,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The same context with `weft-tunnel` no longer accepted inbound (the tunnel switched
    /// off): a peer's tunnel handshake then fails for lack of a common ALPN and the peer falls
    /// back to one mTLS connection per TCP connection.
    pub fn without_tunnel_alpn(mut self) -> Result<Self, rustls::Error> {
        self.acceptor = server_acceptor(&self.provider, &self.trust, &self.certs, false)?;
        Ok(self)
    }

    /// Changes whenever the trust bundle or this proxy's certificate changes (both counters
    /// only grow): pooled connections from an older generation take no new streams.
    pub fn generation(&self) -> u64 {
        self.trust.generation() + self.certs.generation()
    }

    /// This proxy's certificate.
    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// The trust bundle.
    pub fn trust(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// The security metric families.
    pub fn metrics(&self) -> &SecurityMetrics {
        &self.metrics
    }

    /// Terminates inbound mTLS on `io` (whose first bytes are a ClientHello), within
    /// [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(io)).await;
        let stream = match result {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.handshakes.inbound_err.inc();
                return Err(e);
            }
            Err(_) => {
                self.handshakes.inbound_err.inc();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
        };
        let conn = stream.get_ref().1;
        // The verifier accepted exactly one SPIFFE ID in the leaf; read it back.
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(self::spiffe::from_cert);
        let Some(Ok(peer)) = peer else {
            self.handshakes.inbound_err.inc();
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "client presented no verifiable identity",
            ));
        };
        let h2 = conn.alpn_protocol() == Some(ALPN_H2);
        let tunnel = conn.alpn_protocol() == Some(ALPN_TUNNEL);
        self.handshakes.inbound_ok.inc();
        Ok(Accepted {
            stream,
            peer,
            h2,
            tunnel,
        })
    }

    /// The connector for servers that must be `expected`, offering `alpn`.
    pub fn connector(
        &self,
        expected: &SpiffeId,
        alpn: Alpn,
    ) -> Result<TlsConnector, rustls::Error> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(&(expected.clone(), alpn)) {
            return Ok(c.clone());
        }
        let verifier = Arc::new(MeshServerVerifier::new(
            Arc::clone(&self.trust),
            self.provider.signature_verification_algorithms,
            expected.clone(),
        ));
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::clone(&self.certs) as _);
        config.alpn_protocols = alpn.protocols();
        config.resumption = Resumption::disabled();
        let connector = TlsConnector::from(Arc::new(config));
        clients.insert((expected.clone(), alpn), connector.clone());
        Ok(connector)
    }

    /// Originates mTLS on `io` to a sidecar at `ip` that must be `expected`.
    pub async fn connect<IO>(
        &self,
        io: IO,
        ip: IpAddr,
        expected: &SpiffeId,
        alpn: Alpn,
    ) -> std::io::Result<client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = self
            .connector(expected, alpn)
            .map_err(std::io::Error::other)?;
        // Identity is checked against `expected`, not a host name; an IP name sends no SNI.
        match connector
            .connect(ServerName::IpAddress(ip.into()), io)
            .await
        {
            Ok(s) => {
                self.handshakes.outbound_ok.inc();
                Ok(s)
            }
            Err(e) => {
                self.handshakes.outbound_err.inc();
                Err(e)
            }
        }
    }
}

/// The inbound acceptor: client certificates verified against `trust`, ours from `certs`,
/// ALPN `h2`, `http/1.1` and (with `tunnel`) `weft-tunnel`; no resumption.
fn server_acceptor(
    provider: &Arc<CryptoProvider>,
    trust: &Arc<TrustStore>,
    certs: &Arc<CertStore>,
    tunnel: bool,
) -> Result<TlsAcceptor, rustls::Error> {
    let verifier = Arc::new(MeshClientVerifier::new(
        Arc::clone(trust),
        provider.signature_verification_algorithms,
    ));
    let mut server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(certs) as _);
    server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    if tunnel {
        server.alpn_protocols.push(ALPN_TUNNEL.to_vec());
    }
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The process's mesh identity for originating mTLS, set once at start when the bootstrap
/// configures a join token. Upstream pools and TCP proxying read it when connecting to an
/// endpoint that has an identity; without it (a proxy run without identity) such a connection is
/// refused: a sidecar never sends plaintext to an endpoint that expects mTLS.
static ORIGINATION: OnceLock<Arc<MeshTls>> = OnceLock::new();

/// `weft_tls_origination_refused_total`, installed at start (absent in unit tests).
static REFUSALS: OnceLock<IntCounterVec> = OnceLock::new();

/// `weft_tls_handshakes_total{direction="outbound",result=ok|error}` for TLS originated to
/// services outside the mesh, installed at start (absent in unit tests). Mesh handshakes are
/// counted by [`MeshTls`] into the same series.
static EXTERNAL_HANDSHAKES: OnceLock<(IntCounter, IntCounter)> = OnceLock::new();

/// Makes `tls` the context outbound connections to mesh endpoints use (first call wins).
pub fn install_origination(tls: Arc<MeshTls>) {
    let _ = ORIGINATION.set(tls);
}

/// Counts refused originations into `counter` (first call wins).
pub fn install_refusal_metrics(counter: IntCounterVec) {
    let _ = REFUSALS.set(counter);
}

/// Counts TLS handshakes with services outside the mesh in `metrics`' outbound handshake
/// series (first call wins).
pub fn install_handshake_metrics(metrics: &SecurityMetrics) {
    let _ = EXTERNAL_HANDSHAKES.set((
        metrics.handshake("outbound", true),
        metrics.handshake("outbound", false),
    ));
}

/// The context for outbound mTLS, if this proxy has a mesh identity.
pub fn origination() -> Option<&'static Arc<MeshTls>> {
    ORIGINATION.get()
}

/// What a connection to an endpoint must be: decided once per endpoint when the snapshot is
/// built, enforced at every connect ([`originate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Plaintext: the endpoint has no identity (a static endpoint outside the mesh) or its
    /// cluster's mode is `DISABLED`.
    Plain,
    /// mTLS, and the server must present this identity.
    Mtls(SpiffeId),
    /// TLS to a service outside the mesh (the cluster's `upstream_tls`): WebPKI verification of
    /// the target's server name, optional client certificate. Never plaintext.
    Tls(Arc<origination::TlsTarget>),
    /// Nothing: the endpoint's identity does not parse (the reason). Never plaintext.
    Invalid(Arc<str>),
}

impl Expect {
    /// The identity connections must verify, for mTLS.
    pub fn identity(&self) -> Option<&SpiffeId> {
        match self {
            Self::Mtls(id) => Some(id),
            _ => None,
        }
    }
}

/// Why [`originate`] refused to connect.
fn refused(reason: &'static str, message: String) -> std::io::Error {
    if let Some(c) = REFUSALS.get() {
        c.with_label_values(&[reason]).inc();
    }
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, message)
}

/// Wraps a freshly connected `tcp` to an endpoint as `expect` says: mTLS verifying the
/// endpoint's identity, TLS to a service outside the mesh verifying its name, or plaintext to a
/// non-mesh endpoint. Fails closed: an endpoint that expects mTLS or TLS is never sent
/// plaintext, so without a mesh identity of our own (no join token) or with an unparsable
/// endpoint identity the connection is refused (a connect failure, 503 `connect-failed` for
/// HTTP) and counted in `weft_tls_origination_refused_total{reason}`; a failed handshake is a
/// connect failure too, counted in `weft_tls_handshakes_total{direction="outbound"}`.
pub async fn originate(
    tcp: tokio::net::TcpStream,
    ip: IpAddr,
    expect: &Expect,
    alpn: Alpn,
) -> std::io::Result<io::ClientIo> {
    match expect {
        Expect::Plain => Ok(io::ClientIo::Plain(tcp)),
        Expect::Mtls(id) => match origination() {
            Some(tls) => {
                let s = tls.connect(tcp, ip, id, alpn).await?;
                Ok(io::ClientIo::Tls(Box::new(s)))
            }
            None => Err(refused(
                "no_identity",
                format!("{id} expects mTLS and this sidecar has no mesh identity (no join_token): refusing to send plaintext"),
            )),
        },
        Expect::Tls(target) => {
            let result = target.connect(tcp, alpn).await;
            if let Some((ok, err)) = EXTERNAL_HANDSHAKES.get() {
                if result.is_ok() { ok } else { err }.inc();
            }
            Ok(io::ClientIo::Tls(Box::new(result?)))
        }
        Expect::Invalid(reason) => Err(refused(
            "invalid_identity",
            format!("endpoint identity is not a SPIFFE ID ({reason}): refusing to connect"),
        )),
    }
}

/// What outbound connections to `endpoint` of `cluster` must be: mTLS when the endpoint names
/// an identity and the cluster's mode is not `DISABLED`; plaintext when it names none (outside
/// the mesh) or the mode is `DISABLED`; refused when the identity does not parse.
pub fn expectation(cluster: &v1::Cluster, endpoint: &v1::Endpoint) -> Expect {
    if endpoint.identity.is_empty()
        || inbound::MtlsMode::from_proto(cluster.mtls) == Some(inbound::MtlsMode::Disabled)
    {
        return Expect::Plain;
    }
    match SpiffeId::parse(&endpoint.identity) {
        Ok(id) => Expect::Mtls(id),
        Err(e) => {
            tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.address, error = %e, "endpoint identity does not parse: connections to it are refused");
            Expect::Invalid(e.to_string().into())
        }
    }
}

/// Whether `first` (the first bytes of a connection) start a TLS handshake record.
pub fn looks_like_tls(first: &[u8]) -> bool {
    // ContentType handshake (22), then a legacy record version 3.x.
    match first {
        [] => false,
        [0x16] => true,
        [0x16, 0x03, ..] => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
