//! TLS for the control plane's gRPC port (`--grpc-tls`).
//!
//! The server certificate is issued by the control plane's own CA (SANs: DNS `localhost`, any
//! `--tls-san`, the listen IP or `127.0.0.1` when listening on all addresses, and URI
//! `spiffe://<td>/ns/weft-system/sa/weft-control`), lives for `--cert-ttl`, and is reissued at 2/3
//! of its life: the rustls config resolves the certificate per handshake, so rotation needs no
//! restart and open connections are untouched. Clients verify it with `<ca-dir>/roots.pem`
//! ([`client_tls_config`]). No client certificate is asked for: Certify authenticates with the
//! join token.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{Ca, LocalCert, SignError};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed reissue.
const RETRY: Duration = Duration::from_secs(60);

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("issuing the gRPC server certificate: {0}")]
    Issue(#[from] SignError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The ring provider (the only one this crate enables).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
    current: Mutex<(OffsetDateTime, OffsetDateTime)>,
    acceptor: TlsAcceptor,
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
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        tracing::info!(not_after = %crate::ca::rfc3339(local.not_after), ?dns, ?ips, "issued the gRPC server certificate");
        Ok(Self {
            ca,
            dns,
            ips,
            resolver,
            current: Mutex::new((local.not_before, local.not_after)),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
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
    /// never blocks the others). Failed handshakes are logged and dropped. Accepting stops when
    /// the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let acceptor = self.acceptor.clone();
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
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
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

        let mut incoming = tls.incoming(listener);
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
