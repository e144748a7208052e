//! A minimal HTTP/1 client for the control plane's admin API (hyper-util's legacy client over
//! hyper-rustls): HTTPS verified with the control plane's CA, with a client certificate or a
//! bearer token ([`super::auth`]); plaintext `http://` only for `--insecure-admin` servers.

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Errors talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the weft-control admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// A reply: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Client of one control plane's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    bearer: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl AdminClient {
    /// A client of a plaintext (`--insecure-admin`) admin API at `base` (`http://host:port`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_credentials(base, &super::auth::Credentials::default())
    }

    /// A client of the admin API at `base` (`https://host:port`, or `http://` for an
    /// `--insecure-admin` server) authenticating with `credentials`.
    pub fn with_credentials(
        base: &str,
        credentials: &super::auth::Credentials,
    ) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::BadUrl {
                    url: base,
                    reason:
                        "expected https://host:port (or http:// for an --insecure-admin server)"
                            .to_owned(),
                })
            }
        };
        if uri.host().is_none() {
            return Err(ClientError::BadUrl {
                url: base,
                reason: "no host".to_owned(),
            });
        }
        let resolved = credentials
            .resolve(https)
            .map_err(|reason| ClientError::BadUrl {
                url: base.clone(),
                reason,
            })?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        http.enforce_http(false);
        let connector = match resolved.tls {
            Some(tls) => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*tls).clone())
                .https_only()
                .enable_http1()
                .wrap_connector(http),
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ClientError::BadUrl {
                        url: base.clone(),
                        reason: e.to_string(),
                    })?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http()
                .enable_http1()
                .wrap_connector(http),
        };
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base,
            bearer: resolved.bearer,
            client,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request; only transport failures are errors, any HTTP status is a [`Reply`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Reply, ClientError> {
        let url = format!("{}{}", self.base, path);
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.bearer {
            builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/yaml");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::BadUrl {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            self.client.request(request),
        )
        .await
        .map_err(|_| unreachable("timed out after 30s".to_owned()))?
        .map_err(|e| unreachable(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?
            .to_bytes();
        Ok(Reply { status, body })
    }
}

/// An error and its sources on one line ("client error (Connect): tcp connect error: ...").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
