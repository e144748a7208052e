//! TLS for the control plane's servers: the gRPC port and the admin API.
//!
//! The server certificate is issued by the control plane's own CA (SANs: DNS `localhost`, any
//! `--tls-san`, the listen IP or `127.0.0.1` when listening on all addresses, and URI
//! `spiffe://<td>/ns/weft-system/sa/weft-control`), lives for `--cert-ttl`, and is reissued at 2/3
//! of its life: the rustls config resolves the certificate per handshake, so rotation needs no
//! restart and open connections are untouched. Clients verify it with `<ca-dir>/roots.pem`
//! ([`client_tls_config`]).
//!
//! Client certificates are asked for and, when presented, verified against the trust bundle in
//! force (the CA's roots and `--extra-root`s, swapped on change: [`ServerTls::set_roots`]). They
//! are optional at the TLS layer because `Identity.Certify` authenticates with the join token
//! (a proxy has no certificate yet) and the admin API also takes bearer tokens; the services
//! decide: discovery refuses a stream without an SVID ([`crate::admission`]), the admin API a
//! request without an admin credential ([`crate::admin::auth`]).
//!
//! Every accepted connection holds a slot of its server's connection cap until it closes; past
//! the cap new connections are closed at once and counted
//! (`weft_control_connections_refused_total{server}`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::ca::{Ca, LocalCert, SignError};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed reissue.
const RETRY: Duration = Duration::from_secs(60);

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle: {0}")]
    Roots(String),
    #[error("issuing the gRPC server certificate: {0}")]
    Issue(#[from] SignError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The ring provider (the only one this crate enables).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client-certificate verifier in force, swapped whole when the trust bundle changes.
struct VerifierSlot(Arc<dyn ClientCertVerifier>);

/// Verifies presented client certificates against the current trust bundle; a client may also
/// present none (see the module docs).
pub struct BundleClientVerifier {
    current: ArcSwap<VerifierSlot>,
}

impl std::fmt::Debug for BundleClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleClientVerifier")
            .finish_non_exhaustive()
    }
}

fn webpki_verifier(roots_pem: &[String]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots_pem {
        for der in crate::ca::pem_certs(pem).map_err(TlsError::Roots)? {
            store
                .add(CertificateDer::from(der))
                .map_err(TlsError::Rustls)?;
        }
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Roots(e.to_string()))
}

impl BundleClientVerifier {
    /// A verifier trusting `roots_pem` (PEM texts, each one or more certificates).
    pub fn new(roots_pem: &[String]) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::from_pointee(VerifierSlot(webpki_verifier(roots_pem)?)),
        })
    }

    /// Trusts `roots_pem` from the next handshake on.
    pub fn set_roots(&self, roots_pem: &[String]) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(VerifierSlot(webpki_verifier(roots_pem)?)));
        Ok(())
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under us; clients here hold one certificate and send it anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The gRPC server's certificate, reissued by the CA before it expires.
pub struct ServerTls {
    ca: Arc<Ca>,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    resolver: Arc<Resolver>,
    clients: Arc<BundleClientVerifier>,
    current: Mutex<(OffsetDateTime, OffsetDateTime)>,
    /// ALPN `h2`.
    grpc: TlsAcceptor,
    /// ALPN `http/1.1`.
    admin: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("dns", &self.dns)
            .field("ips", &self.ips)
            .field("validity", &self.validity())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Issues the first server certificate for a server listening on `listen`, with the extra
    /// DNS names `sans`.
    pub fn new(ca: Arc<Ca>, listen: SocketAddr, sans: &[String]) -> Result<Self, TlsError> {
        let mut dns = vec!["localhost".to_owned()];
        let mut ips = Vec::new();
        for san in sans {
            match san.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(san.clone()),
            }
        }
        let ip = listen.ip();
        if ip.is_unspecified() {
            ips.push(IpAddr::from([127, 0, 0, 1]));
        } else {
            ips.push(ip);
        }
        ips.dedup();
        let local = ca.issue_local(&dns, &ips)?;
        let key = certified_key(&local)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(key)));
        let clients = Arc::new(BundleClientVerifier::new(&ca.roots_pem())?);
        let acceptor = |alpn: &[u8]| -> Result<TlsAcceptor, TlsError> {
            let mut config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(clients.clone())
                .with_cert_resolver(resolver.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        let grpc = acceptor(b"h2")?;
        let admin = acceptor(b"http/1.1")?;
        tracing::info!(not_after = %crate::ca::rfc3339(local.not_after), ?dns, ?ips, "issued the control plane's server certificate");
        Ok(Self {
            ca,
            dns,
            ips,
            resolver,
            clients,
            current: Mutex::new((local.not_before, local.not_after)),
            grpc,
            admin,
        })
    }

    /// Verifies client certificates against `roots_pem` from the next handshake on (the trust
    /// bundle changed).
    pub fn set_roots(&self, roots_pem: &[String]) -> Result<(), TlsError> {
        self.clients.set_roots(roots_pem)
    }

    /// The admin API's acceptor (ALPN `http/1.1`, same certificate and client verification).
    pub fn admin_acceptor(&self) -> TlsAcceptor {
        self.admin.clone()
    }

    /// `(not_before, not_after)` of the certificate being served.
    pub fn validity(&self) -> (OffsetDateTime, OffsetDateTime) {
        *self.current.lock().expect("tls lock")
    }

    /// When the certificate should be reissued: at 2/3 of its life.
    pub fn renew_at(&self) -> OffsetDateTime {
        let (nb, na) = self.validity();
        nb + (na - nb) * 2 / 3
    }

    /// Issues a new server certificate and serves it to every later handshake.
    pub fn rotate(&self) -> Result<(), TlsError> {
        let local = self.ca.issue_local(&self.dns, &self.ips)?;
        self.resolver.0.store(Arc::new(certified_key(&local)?));
        *self.current.lock().expect("tls lock") = (local.not_before, local.not_after);
        tracing::info!(not_after = %crate::ca::rfc3339(local.not_after), "reissued the gRPC server certificate");
        Ok(())
    }

    /// Reissues the certificate at 2/3 of its life, forever (spawn it; abort it to stop).
    pub async fn rotate_forever(self: Arc<Self>) {
        loop {
            let wait = self.renew_at() - OffsetDateTime::now_utc();
            // Re-check at least hourly (clock jumps, suspended machines).
            let wait = Duration::try_from(wait)
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(3600));
            tokio::time::sleep(wait).await;
            if OffsetDateTime::now_utc() < self.renew_at() {
                continue;
            }
            if let Err(e) = self.rotate() {
                tracing::error!("{e}; retrying in {}s", RETRY.as_secs());
                tokio::time::sleep(RETRY).await;
            }
        }
    }

    /// TLS connections accepted on `listener`, each handshake in its own task (a slow client
    /// never blocks the others), at most `slots` of them open at once. Failed handshakes are
    /// logged and dropped. Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        slots: ConnectionSlots,
    ) -> ReceiverStream<io::Result<Capped<TlsStream<TcpStream>>>> {
        let acceptor = self.grpc.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    () = tx.closed() => break,
                };
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!("gRPC accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(permit) = slots.try_take(peer) else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(Capped::new(tls, permit))).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "gRPC TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A server's connection cap: a slot per open connection.
#[derive(Debug, Clone)]
pub struct ConnectionSlots {
    server: &'static str,
    semaphore: Arc<Semaphore>,
    max: usize,
    refused: prometheus::IntCounter,
}

impl ConnectionSlots {
    /// At most `max` open connections of `server` (`grpc`, `admin`); refusals count on
    /// `refused`.
    pub fn new(server: &'static str, max: usize, refused: prometheus::IntCounter) -> Self {
        Self {
            server,
            semaphore: Arc::new(Semaphore::new(max)),
            max,
            refused,
        }
    }

    /// A slot for a connection from `peer`, or `None` (logged, counted) at the cap: the caller
    /// drops the connection.
    pub fn try_take(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.semaphore).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.refused.inc();
                tracing::warn!(server = self.server, %peer, max = self.max, "connection cap reached: closing a new connection");
                None
            }
        }
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }
}

/// A connection that holds its server's connection slot until it is dropped.
#[derive(Debug)]
pub struct Capped<S> {
    inner: S,
    _slot: OwnedSemaphorePermit,
}

impl<S> Capped<S> {
    pub fn new(inner: S, slot: OwnedSemaphorePermit) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: Connected> Connected for Capped<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Plaintext connections accepted on `listener` (`--insecure-grpc`), at most `slots` open.
pub fn plain_incoming(
    listener: TcpListener,
    slots: ConnectionSlots,
) -> ReceiverStream<io::Result<Capped<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let Some(permit) = slots.try_take(peer) else {
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    if tx.send(Ok(Capped::new(tcp, permit))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("gRPC accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

fn certified_key(local: &LocalCert) -> Result<CertifiedKey, TlsError> {
    let chain = local
        .chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(local.key_der.clone()));
    let signing = provider().key_provider.load_private_key(key)?;
    Ok(CertifiedKey::new(chain, signing))
}

/// A tonic client TLS config that trusts `roots_pem` (e.g. the contents of `<ca-dir>/roots.pem`)
/// and expects the server name `domain` (`localhost`, or an IP / `--tls-san` the server
/// certificate carries).
pub fn client_tls_config(roots_pem: &str, domain: &str) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(roots_pem))
        .domain_name(domain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CaConfig;
    use rustls::pki_types::ServerName;

    /// The served leaf certificate (DER) after a handshake trusting `roots`.
    async fn served_cert(addr: SocketAddr, roots: &[String]) -> Vec<u8> {
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            for der in crate::ca::pem_certs(root).unwrap() {
                store.add(CertificateDer::from(der)).unwrap();
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn rotation_serves_the_new_certificate_without_a_restart() {
        use tokio_stream::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mut config = CaConfig::new(dir.path());
        config.cert_ttl = Duration::from_secs(3000);
        let ca = Arc::new(Ca::load_or_create(&config).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTls::new(Arc::clone(&ca), addr, &["weft-control.example".into()]).unwrap();
        let (nb, na) = tls.validity();
        assert_eq!((na - nb).whole_seconds(), 3060, "ttl + 1 min backdating");
        assert_eq!(tls.renew_at(), nb + time::Duration::seconds(2040));

        let slots = ConnectionSlots::new("grpc", 8, prometheus::IntCounter::new("r", "r").unwrap());
        let mut incoming = tls.incoming(listener, slots);
        // Keep accepting server-side so handshakes complete.
        tokio::spawn(async move { while incoming.next().await.is_some() {} });
        let roots = ca.roots_pem();
        let first = served_cert(addr, &roots).await;
        assert_eq!(served_cert(addr, &roots).await, first);
        tls.rotate().unwrap();
        let second = served_cert(addr, &roots).await;
        assert_ne!(first, second, "the reissued certificate is served");
    }
}
