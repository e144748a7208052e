//! A client of the control plane's admin API as tests use it: HTTPS verified with the control
//! plane's `roots.pem`, authenticated with a bearer token (by default the bootstrap token the
//! control plane writes to `<ca-dir>/admin-token`), or plaintext for an `--insecure-admin` one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::{read_response, HttpResponse, REQUEST_TIMEOUT};

/// How to reach one admin API.
#[derive(Clone, Debug)]
pub struct AdminAccess {
    pub addr: SocketAddr,
    /// TLS client config trusting the control plane's roots (`None`: plaintext).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Bearer token sent with every request, if any.
    pub token: Option<String>,
}

/// A rustls client config trusting the PEM certificates in `roots`, presenting `client` (chain
/// and key PEM files) when given.
pub fn tls_config(roots: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = std::fs::read(roots).unwrap_or_else(|e| panic!("reading {}: {e}", roots.display()));
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        store
            .add(cert.unwrap_or_else(|e| panic!("{}: {e}", roots.display())))
            .unwrap_or_else(|e| panic!("{}: {e}", roots.display()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("TLS versions: {e}"))
    .with_root_certificates(store);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
            let key = PrivateKeyDer::from_pem_file(key)
                .unwrap_or_else(|e| panic!("{}: {e}", key.display()));
            builder
                .with_client_auth_cert(chain, key)
                .unwrap_or_else(|e| panic!("client certificate: {e}"))
        }
    };
    Arc::new(config)
}

impl AdminAccess {
    /// Plaintext, no credential (`--insecure-admin`, or a control plane without a CA).
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            tls: None,
            token: None,
        }
    }

    /// HTTPS trusting `roots` (PEM), sending `token` as a bearer token when given.
    pub fn tls(addr: SocketAddr, roots: &Path, token: Option<String>) -> Self {
        Self {
            addr,
            tls: Some(tls_config(roots, None)),
            token,
        }
    }

    /// HTTPS with a client certificate (`cert`, `key`: PEM files) and no token.
    pub fn with_client_cert(addr: SocketAddr, roots: &Path, cert: &Path, key: &Path) -> Self {
        Self {
            addr,
            tls: Some(tls_config(roots, Some((cert, key)))),
            token: None,
        }
    }

    /// This access with another (or no) bearer token.
    #[must_use]
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// Whether requests go over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// `https://addr` or `http://addr`.
    pub fn base_url(&self) -> String {
        format!(
            "{}://{}",
            if self.is_tls() { "https" } else { "http" },
            self.addr
        )
    }

    /// Sends `method path` with `body` on a fresh connection and reads the whole response,
    /// within [`REQUEST_TIMEOUT`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<HttpResponse> {
        let what = format!("{method} {}{path}", self.base_url());
        let body = body.into();
        let fut = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(http::header::HOST, self.addr.to_string());
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req.body(Full::new(body)).context("building the request")?;
            match &self.tls {
                None => send(TokioIo::new(tcp), req).await,
                Some(config) => {
                    let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
                    let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                        .connect(name, tcp)
                        .await
                        .context("TLS handshake")?;
                    send(TokioIo::new(tls), req).await
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.with_context(|| what.clone()),
            Err(_) => Err(anyhow!("{what}: no response within {REQUEST_TIMEOUT:?}")),
        }
    }
}

async fn send<IO>(io: TokioIo<IO>, req: Request<Full<Bytes>>) -> anyhow::Result<HttpResponse>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.context("sending")?;
    read_response(resp).await
}
