//! HTTP clients for tests: pooled HTTP/1.1 and h2c (prior knowledge) clients that always connect
//! to one socket address (a proxy listener) whatever host the request names, one-shot helpers
//! for admin APIs, and a raw TCP exchange for malformed input.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one request may take before the helpers give up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A connector that ignores the request URI and always dials one address, so a request can
/// name a mesh service (`http://api/...`: Host / `:authority` = `api`) and still go to a proxy.
#[derive(Clone, Debug)]
pub struct FixedConnector {
    addr: SocketAddr,
}

impl FixedConnector {
    /// Dials `addr` for every URI.
    pub fn new(addr: SocketAddr) -> Self {
        FixedConnector { addr }
    }
}

impl tower::Service<Uri> for FixedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let addr = self.addr;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A response read to the end.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// HTTP trailers, if the response had any.
    pub trailers: Option<HeaderMap>,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {}, headers {:?}, body {:?}",
                self.status,
                self.headers,
                self.text()
            )
        })
    }

    /// A header's value as a string, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// One line describing the response, for assertion messages.
    pub fn summary(&self) -> String {
        let mut body = self.text();
        if body.len() > 300 {
            let mut cut = 300;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
            body.push_str("...");
        }
        format!(
            "{} {:?} x-weft-error={:?} body={body:?}",
            self.status,
            self.version,
            self.header("x-weft-error")
        )
    }
}

/// Reads a hyper response to the end (body and trailers).
pub async fn read_response<B>(resp: http::Response<B>) -> anyhow::Result<HttpResponse>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.context("reading the response body")?;
    let trailers = collected.trailers().cloned();
    Ok(HttpResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// A pooled client that sends every request to one address (typically a proxy listener).
/// Request targets name the service: `client.get("api", "/x")` sends Host (HTTP/1.1) or
/// `:authority` (HTTP/2) `api` to the proxy.
#[derive(Clone, Debug)]
pub struct HttpClient {
    addr: SocketAddr,
    version: Version,
    client: Client<FixedConnector, Full<Bytes>>,
}

impl HttpClient {
    /// HTTP/1.1 to `addr`.
    pub fn h1(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).build(FixedConnector::new(addr));
        HttpClient {
            addr,
            version: Version::HTTP_11,
            client,
        }
    }

    /// HTTP/2 with prior knowledge (h2c) to `addr`: one multiplexed connection.
    pub fn h2c(addr: SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(FixedConnector::new(addr));
        HttpClient {
            addr,
            version: Version::HTTP_2,
            client,
        }
    }

    /// The address every request goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A request builder for `method http://<host><path>` with this client's HTTP version.
    pub fn builder(&self, method: Method, host: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"))
            .version(self.version)
    }

    /// Sends `req` and reads the whole response, within [`REQUEST_TIMEOUT`].
    pub async fn send(&self, req: Request<Full<Bytes>>) -> anyhow::Result<HttpResponse> {
        let what = format!("{} {} via {}", req.method(), req.uri(), self.addr);
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                // hyper-util's error hides the cause in its source chain.
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                anyhow!(msg)
            })?;
            read_response(resp).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(r) => r.with_context(|| what.clone()),
            Err(_) => bail!("{what}: no response within {REQUEST_TIMEOUT:?}"),
        }
    }

    /// `GET http://<host><path>`.
    pub async fn get(&self, host: &str, path: &str) -> anyhow::Result<HttpResponse> {
        self.request(Method::GET, host, path, &[], Bytes::new())
            .await
    }

    /// A request with extra headers and a body.
    pub async fn request(
        &self,
        method: Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<HttpResponse> {
        let mut b = self.builder(method, host, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body.into()))
            .context("building the request")?;
        self.send(req).await
    }
}

async fn one_shot(method: Method, url: &str, body: Bytes) -> anyhow::Result<HttpResponse> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("URL {url} has no host:port"))?;
    let port = authority.port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{}:{port}", authority.host())
        .parse()
        .with_context(|| format!("URL {url} must name an IP address"))?;
    HttpClient::h1(addr)
        .request(
            method,
            authority.as_str(),
            uri.path_and_query().map_or("/", |p| p.as_str()),
            &[],
            body,
        )
        .await
}

/// `GET url` over HTTP/1.1 (url = `http://ip:port/path`), e.g. an admin API.
pub async fn http_get(url: &str) -> anyhow::Result<HttpResponse> {
    one_shot(Method::GET, url, Bytes::new()).await
}

/// `PUT url` with `body`.
pub async fn http_put(url: &str, body: impl Into<Bytes>) -> anyhow::Result<HttpResponse> {
    one_shot(Method::PUT, url, body.into()).await
}

/// `POST url` with `body`.
pub async fn http_post(url: &str, body: impl Into<Bytes>) -> anyhow::Result<HttpResponse> {
    one_shot(Method::POST, url, body.into()).await
}

/// `DELETE url`.
pub async fn http_delete(url: &str) -> anyhow::Result<HttpResponse> {
    one_shot(Method::DELETE, url, Bytes::new()).await
}

/// What a peer did with bytes written to it raw.
#[derive(Clone, Debug)]
pub struct RawOutcome {
    /// Everything read before EOF, reset, or the timeout.
    pub received: Vec<u8>,
    /// The peer closed (EOF) or reset the connection within the timeout.
    pub closed: bool,
    /// The connection was reset (or the write failed) rather than closed cleanly.
    pub reset: bool,
}

impl RawOutcome {
    /// The received bytes as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Connects to `addr`, writes `bytes`, and reads until the peer closes or `timeout` passes.
pub async fn raw_exchange(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> anyhow::Result<RawOutcome> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut out = RawOutcome {
        received: Vec::new(),
        closed: false,
        reset: false,
    };
    if stream.write_all(bytes).await.is_err() {
        out.closed = true;
        out.reset = true;
        return Ok(out);
    }
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return (true, false),
                Ok(n) => out.received.extend_from_slice(&buf[..n]),
                Err(_) => return (true, true),
            }
        }
    };
    if let Ok((closed, reset)) = tokio::time::timeout(timeout, read_all).await {
        out.closed = closed;
        out.reset = reset;
    }
    Ok(out)
}
