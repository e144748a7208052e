//! The gRPC channels to the control plane: TLS when the URL is `https://`, verifying the server
//! against the bootstrap's `control_plane_ca` (the control plane's `<ca-dir>/roots.pem`). The
//! server's certificate must name the URL's host (DNS name or IP).
//!
//! - `Identity.Certify` ([`control_endpoint`]) presents no client certificate: it authenticates
//!   with the join token (the proxy may have no certificate yet, or an expired one).
//! - `Discovery.Stream` ([`discovery_endpoint`]) presents this proxy's SVID as the TLS client
//!   certificate, read from the same [`CertStore`] the data path uses at every handshake, so a
//!   renewed certificate is used from the next connection on. The control plane registers the
//!   proxy under the identity in that certificate and refuses a stream without one.
//!
//! With several control-plane addresses (a list, or a DNS name with several addresses; see
//! `crate::discovery::targets`) the discovery connector dials one resolved address
//! ([`DiscoveryConnector::dialing`]) while TLS still verifies the URL's host name, so every
//! replica behind one name presents a certificate for that name.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::certs::CertStore;
use super::io::ClientIo;

/// Why the control-plane endpoint cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ControlChannelError {
    /// The URL is malformed.
    #[error("control_plane {url:?}: {source}")]
    Url {
        /// The configured URL.
        url: String,
        /// tonic's error.
        source: tonic::transport::Error,
    },
    /// `https://` without a CA to verify the server with.
    #[error("control_plane {0:?} is https:// but control_plane_ca is not set")]
    NoCa(String),
    /// The TLS settings were refused.
    #[error("control_plane TLS: {0}")]
    Tls(tonic::transport::Error),
    /// The TLS client configuration could not be built.
    #[error("control_plane TLS: {0}")]
    Config(String),
}

/// The endpoint for `url`, with TLS verified by `ca_pem` when `url` is `https://`.
pub fn control_endpoint(url: &str, ca_pem: Option<&str>) -> Result<Endpoint, ControlChannelError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|source| ControlChannelError::Url {
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let ca = ca_pem.ok_or_else(|| ControlChannelError::NoCa(url.to_owned()))?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .assume_http2(true);
    endpoint.tls_config(tls).map_err(ControlChannelError::Tls)
}

/// Connects the discovery channel: TCP, then (for `https://`) TLS with this proxy's SVID as
/// the client certificate.
#[derive(Clone)]
pub struct DiscoveryConnector {
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Dial this address instead of resolving the URL's host.
    dial: Option<SocketAddr>,
}

impl DiscoveryConnector {
    /// Dials `addr` (one of the addresses the URL's host resolved to) instead of resolving the
    /// host again; the TLS server name stays the URL's host.
    #[must_use]
    pub fn dialing(mut self, addr: SocketAddr) -> Self {
        self.dial = Some(addr);
        self
    }
}

impl std::fmt::Debug for DiscoveryConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryConnector")
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .field("dial", &self.dial)
            .finish()
    }
}

impl tower::Service<http::Uri> for DiscoveryConnector {
    type Response = TokioIo<ClientIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let dial = self.dial;
        Box::pin(async move {
            let tcp = match dial {
                Some(addr) => TcpStream::connect(addr).await?,
                None => {
                    let host = uri
                        .host()
                        .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned();
                    let port = uri.port_u16().unwrap_or(80);
                    TcpStream::connect((host.as_str(), port)).await?
                }
            };
            let _ = tcp.set_nodelay(true);
            match tls {
                None => Ok(TokioIo::new(ClientIo::Plain(tcp))),
                Some((connector, name)) => {
                    let tls = connector.connect(name, tcp).await?;
                    Ok(TokioIo::new(ClientIo::Tls(Box::new(tls))))
                }
            }
        })
    }
}

/// The discovery endpoint for `url` and the connector to open it with
/// (`endpoint.connect_with_connector(connector)`). For `https://` the server is verified with
/// `ca_pem` and `certs` provides the client certificate; the endpoint itself is given the
/// `http://` form of the URL because the connector does the TLS.
pub fn discovery_endpoint(
    url: &str,
    ca_pem: Option<&str>,
    certs: Option<Arc<CertStore>>,
) -> Result<(Endpoint, DiscoveryConnector), ControlChannelError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Ok((
            control_endpoint(url, None)?,
            DiscoveryConnector {
                tls: None,
                dial: None,
            },
        ));
    };
    let ca = ca_pem.ok_or_else(|| ControlChannelError::NoCa(url.to_owned()))?;
    let endpoint = control_endpoint(&format!("http://{rest}"), None)?;
    let uri = endpoint.uri().clone();
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| ControlChannelError::Config(format!("server name {host:?}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let cert =
            cert.map_err(|e| ControlChannelError::Config(format!("control_plane_ca: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| ControlChannelError::Config(format!("control_plane_ca: {e}")))?;
    }
    if roots.is_empty() {
        return Err(ControlChannelError::Config(
            "control_plane_ca holds no certificate".to_owned(),
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlChannelError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match certs {
        Some(certs) => builder.with_client_cert_resolver(certs),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
    Ok((
        endpoint,
        DiscoveryConnector {
            tls: Some((TlsConnector::from(Arc::new(config)), name)),
            dial: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_needs_a_ca() {
        assert!(control_endpoint("http://127.0.0.1:1", None).is_ok());
        let e = control_endpoint("https://127.0.0.1:1", None).unwrap_err();
        assert!(e.to_string().contains("control_plane_ca"), "{e}");
        let ca = crate::tls::testing::TestCa::new("cluster.local");
        assert!(control_endpoint("https://127.0.0.1:1", Some(&ca.root_pem())).is_ok());
        let e = discovery_endpoint("https://127.0.0.1:1", None, None).unwrap_err();
        assert!(e.to_string().contains("control_plane_ca"), "{e}");
        let (endpoint, connector) =
            discovery_endpoint("https://localhost:15010", Some(&ca.root_pem()), None).unwrap();
        assert_eq!(endpoint.uri().to_string(), "http://localhost:15010/");
        assert!(connector.tls.is_some());
        let e = discovery_endpoint("https://127.0.0.1:1", Some("not pem"), None).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
    }

    #[tokio::test]
    async fn dials_the_given_address_not_the_url_host() {
        use tower::Service as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The URL's host does not resolve: only the dialled address can be reached.
        let (endpoint, connector) =
            discovery_endpoint("http://cp.weft.invalid:15010", None, None).unwrap();
        let mut connector = connector.dialing(addr);
        let (accepted, connected) =
            tokio::join!(listener.accept(), connector.call(endpoint.uri().clone()));
        assert!(connected.is_ok(), "{connected:?}");
        assert!(accepted.is_ok());
    }
}
