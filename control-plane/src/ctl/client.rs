//! A minimal HTTP/1 client for the control plane's admin API (hyper-util's legacy client).

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
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
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:15011` (http only).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| ClientError::BadUrl {
                url: base.clone(),
                reason: e.to_string(),
            })?;
        match uri.scheme_str() {
            Some("http") => {}
            _ => {
                return Err(ClientError::BadUrl {
                    url: base,
                    reason: "only http://host:port URLs are supported".to_owned(),
                })
            }
        }
        if uri.host().is_none() {
            return Err(ClientError::BadUrl {
                url: base,
                reason: "no host".to_owned(),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { base, client })
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
