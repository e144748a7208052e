//! Responses the proxy generates itself (ARCHITECTURE.md "Errors the proxy generates"): a status,
//! an `x-weft-error` code and a one-line text body.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use crate::breaker::Limit;
use crate::http::body::ResponseBody;
use crate::upstream::UpstreamError;

/// `x-weft-error`.
pub const X_WEFT_ERROR: HeaderName = HeaderName::from_static("x-weft-error");
/// `x-weft-timeout`.
pub const X_WEFT_TIMEOUT: HeaderName = HeaderName::from_static("x-weft-timeout");
/// `x-weft-overloaded`: which circuit-breaker limit refused the request.
pub const X_WEFT_OVERLOADED: HeaderName = HeaderName::from_static("x-weft-overloaded");

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched and the listener has no catch-all cluster.
    #[error("no route for host {host:?} path {path:?}")]
    NoRoute {
        /// Normalized request host.
        host: String,
        /// Request path.
        path: String,
    },
    /// The chosen cluster has no endpoints.
    #[error("cluster {cluster:?} has no endpoints")]
    NoEndpoints {
        /// Cluster name.
        cluster: String,
    },
    /// Connecting to the chosen endpoint failed.
    #[error("{0}")]
    ConnectFailed(UpstreamError),
    /// The upstream closed or reset before responding.
    #[error("{0}")]
    UpstreamReset(UpstreamError),
    /// The downstream request body could not be read while forwarding it.
    #[error("{0}")]
    BadRequest(UpstreamError),
    /// The route or cluster request timeout fired.
    #[error("request timed out after {0:?}")]
    RequestTimeout(Duration),
    /// The retry policy's per-try timeout fired (on the last attempt).
    #[error("upstream attempt timed out after {0:?} (per-try timeout)")]
    PerTryTimeout(Duration),
    /// Connecting to the chosen endpoint timed out.
    #[error("{0}")]
    ConnectTimeout(UpstreamError),
    /// A circuit-breaker limit of the cluster is reached: failed fast.
    #[error("upstream overloaded: circuit-breaker limit {} reached", .0.as_str())]
    Overloaded(Limit),
    /// A local rate limit refused the request; retry after this many seconds.
    #[error("rate limited; retry after {0}s")]
    RateLimited(u64),
    /// The inbound authorization policy denied the request.
    #[error("forbidden by authorization policy {0:?}")]
    Forbidden(std::sync::Arc<str>),
    /// The downstream request body could not be read while buffering it for retries.
    #[error("reading the request body failed: {0}")]
    BadRequestBody(hyper::Error),
    /// The request was refused before routing (request hygiene: path, host, header names).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        if matches!(e, UpstreamError::RequestBody { .. }) {
            Self::BadRequest(e)
        } else if matches!(e, UpstreamError::ConnectTimeout { .. }) {
            Self::ConnectTimeout(e)
        } else if matches!(e, UpstreamError::Overloaded { .. }) {
            Self::Overloaded(Limit::Connections)
        } else if e.is_connect() {
            Self::ConnectFailed(e)
        } else {
            Self::UpstreamReset(e)
        }
    }
}

impl ProxyError {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::NoEndpoints { .. } | Self::ConnectFailed(_) | Self::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) | Self::ConnectTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::BadRequest(_) | Self::BadRequestBody(_) | Self::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The `x-weft-error` value; `None` for a 400, which ARCHITECTURE.md leaves to hyper's
    /// semantics (unparsable request bytes) and so carries no proxy error code.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::NoRoute { .. } => Some("no-route"),
            Self::NoEndpoints { .. } => Some("no-endpoints"),
            Self::ConnectFailed(_) => Some("connect-failed"),
            Self::UpstreamReset(_) => Some("upstream-reset"),
            Self::RequestTimeout(_) => Some("request-timeout"),
            Self::PerTryTimeout(_) => Some("per-try-timeout"),
            Self::ConnectTimeout(_) => Some("connect-timeout"),
            Self::Overloaded(_) => Some("overloaded"),
            Self::RateLimited(_) => Some("rate-limited"),
            Self::Forbidden(_) => Some("forbidden"),
            Self::InvalidRequest(_) => Some("invalid-request"),
            Self::BadRequest(_) | Self::BadRequestBody(_) => None,
        }
    }

    /// The response sent downstream.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::local(Bytes::from(format!("{self}\n"))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        if let Some(code) = self.code() {
            h.insert(X_WEFT_ERROR, HeaderValue::from_static(code));
        }
        if matches!(self, Self::BadRequest(_) | Self::BadRequestBody(_)) {
            // The request body is in an unknown state: this connection cannot carry another.
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            Self::RequestTimeout(_) => {
                h.insert(X_WEFT_TIMEOUT, HeaderValue::from_static("request"));
            }
            Self::PerTryTimeout(_) => {
                h.insert(X_WEFT_TIMEOUT, HeaderValue::from_static("per-try"));
            }
            Self::ConnectTimeout(_) => {
                h.insert(X_WEFT_TIMEOUT, HeaderValue::from_static("connect"));
            }
            Self::Overloaded(limit) => {
                h.insert(X_WEFT_OVERLOADED, HeaderValue::from_static(limit.as_str()));
            }
            Self::RateLimited(secs) => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            _ => {}
        }
        resp
    }
}
