//! `weft-demo-app`: the upstream service of Weft's tests and demo.
//!
//! - HTTP (HTTP/1.1 and h2c on one port): any request answers 200 with a JSON description of
//!   itself (`service`, `instance`, `method`, `path`, `query`, `host`, `version`, `headers`) and
//!   the header `x-demo-instance`; `POST /echo` echoes the body; `/status/<code>` answers that
//!   code; `/delay/<ms>` sleeps first; `/bytes/<n>` sends n bytes; `/call?url=<url>` fetches
//!   `url` through the sidecar's outbound listener (`--outbound`) and returns what it got.
//! - gRPC `weft.demo.v1.Echo` (`--grpc`): unary echo, and server streaming that ends with the
//!   trailer `x-demo-trailer: done`; responses carry `x-demo-instance` metadata.
//! - TCP echo (`--tcp`): echoes bytes until the client half-closes, then finishes writing and
//!   half-closes too.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use futures::Stream;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use weft_testkit::echo::echo_server::{Echo, EchoServer};
use weft_testkit::echo::{EchoReply, EchoRequest, StreamRequest};
use weft_testkit::http::FixedConnector;

/// The upstream service of Weft's tests and demo: HTTP (h1 + h2c), gRPC and TCP echo.
#[derive(Parser, Debug)]
#[command(name = "weft-demo-app", version)]
struct Args {
    /// Service name reported in responses.
    #[arg(long)]
    name: String,
    /// Instance id reported in responses and the `x-demo-instance` header.
    #[arg(long)]
    instance: String,
    /// HTTP listen address (HTTP/1.1 and h2c prior knowledge).
    #[arg(long)]
    http: SocketAddr,
    /// gRPC listen address (`weft.demo.v1.Echo`).
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// TCP echo listen address.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// The sidecar's outbound listener: `/call?url=...` sends its request there. Without it,
    /// `/call` connects to the URL's own host:port (which must be an IP).
    #[arg(long)]
    outbound: Option<SocketAddr>,
}

struct App {
    name: String,
    instance: String,
    outbound: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Arc::new(App {
        name: args.name,
        instance: args.instance,
        outbound: args.outbound,
    });

    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("binding HTTP on {}", args.http))?;
    println!("weft-demo-app {}: HTTP on {}", app.instance, args.http);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve_http(http, app.clone()));

    if let Some(addr) = args.grpc {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gRPC on {addr}"))?;
        println!("weft-demo-app {}: gRPC on {addr}", app.instance);
        let svc = EchoServer::new(EchoService { app: app.clone() });
        tasks.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .context("gRPC server")
        });
    }
    if let Some(addr) = args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP on {addr}"))?;
        println!("weft-demo-app {}: TCP echo on {addr}", app.instance);
        tasks.spawn(serve_tcp_echo(listener));
    }
    // Servers run until the process is signalled; one ending means it failed.
    if let Some(res) = tasks.join_next().await {
        res.context("server task panicked")??;
    }
    Ok(())
}

// ------------------------------------------------------------------- HTTP

async fn serve_http(listener: TcpListener, app: Arc<App>) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("accepting HTTP")?;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(app.clone(), req));
            // Errors are the client's (garbage, resets): nothing to do but drop the connection.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let info = describe(&app, &parts);
    let resp = if parts.method == Method::POST && path == "/echo" {
        match body.collect().await {
            Ok(b) => {
                let mut r = respond(&app, StatusCode::OK, b.to_bytes());
                if let Some(ct) = parts.headers.get(http::header::CONTENT_TYPE) {
                    r.headers_mut()
                        .insert(http::header::CONTENT_TYPE, ct.clone());
                }
                r
            }
            Err(e) => respond(
                &app,
                StatusCode::BAD_REQUEST,
                format!("reading body: {e}\n"),
            ),
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(s)
                if s.as_u16() < 200
                    || s == StatusCode::NO_CONTENT
                    || s == StatusCode::NOT_MODIFIED =>
            {
                respond(&app, s, Bytes::new())
            }
            Some(s) => json_response(&app, s, &info),
            None => respond(
                &app,
                StatusCode::BAD_REQUEST,
                format!("bad status {code:?}\n"),
            ),
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(120_000))).await;
                json_response(&app, StatusCode::OK, &info)
            }
            Err(_) => respond(&app, StatusCode::BAD_REQUEST, format!("bad delay {ms:?}\n")),
        }
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<usize>() {
            Ok(n) if n <= 64 << 20 => {
                let body: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                respond(&app, StatusCode::OK, body)
            }
            _ => respond(&app, StatusCode::BAD_REQUEST, format!("bad size {n:?}\n")),
        }
    } else if path == "/call" {
        match query_param(parts.uri.query().unwrap_or(""), "url") {
            Some(url) => call(&app, &url).await,
            None => respond(&app, StatusCode::BAD_REQUEST, "missing ?url=\n"),
        }
    } else {
        json_response(&app, StatusCode::OK, &info)
    };
    Ok(resp)
}

fn describe(app: &App, parts: &http::request::Parts) -> serde_json::Value {
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    json!({
        "service": app.name,
        "instance": app.instance,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "host": host,
        "version": format!("{:?}", parts.version),
        "headers": headers_json(&parts.headers),
    })
}

fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        map.insert(name.as_str().to_string(), json!(values.join(", ")));
    }
    serde_json::Value::Object(map)
}

fn respond(app: &App, status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = app.instance.parse() {
        r.headers_mut().insert("x-demo-instance", v);
    }
    r
}

fn json_response(app: &App, status: StatusCode, value: &serde_json::Value) -> Resp {
    let mut r = respond(app, status, value.to_string());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// `/call?url=...`: GET `url` through the sidecar and describe the answer.
async fn call(app: &App, url: &str) -> Resp {
    let result = async {
        let uri: http::Uri = url.parse().with_context(|| format!("bad url {url:?}"))?;
        let addr = match app.outbound {
            Some(a) => a,
            None => {
                let auth = uri.authority().context("url has no host")?;
                format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80))
                    .parse()
                    .context("without --outbound the url must name ip:port")?
            }
        };
        let client: Client<FixedConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(FixedConnector::new(addr));
        let req = Request::get(uri).body(Full::new(Bytes::new()))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
            .await
            .context("no answer within 30s")??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        let body_json = serde_json::from_slice::<serde_json::Value>(&body)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
        anyhow::Ok(json!({
            "status": parts.status.as_u16(),
            "headers": headers_json(&parts.headers),
            "body": body_json,
        }))
    }
    .await;
    match result {
        Ok(v) => json_response(app, StatusCode::OK, &v),
        Err(e) => json_response(
            app,
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("{e:#}")}),
        ),
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    // Two hex digits make one byte: h, l < 16.
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ------------------------------------------------------------------- gRPC

struct EchoService {
    app: Arc<App>,
}

impl EchoService {
    fn reply(&self, message: String, seq: u32) -> EchoReply {
        EchoReply {
            message,
            service: self.app.name.clone(),
            instance: self.app.instance.clone(),
            seq,
        }
    }

    fn with_instance<T>(&self, msg: T) -> tonic::Response<T> {
        let mut resp = tonic::Response::new(msg);
        if let Ok(v) = MetadataValue::try_from(self.app.instance.as_str()) {
            resp.metadata_mut().insert("x-demo-instance", v);
        }
        resp
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let req = request.into_inner();
        if req.status_code != 0 {
            return Err(Status::new(Code::from(req.status_code), req.message));
        }
        Ok(self.with_instance(self.reply(req.message, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::ServerStreamStream>, Status> {
        let req = request.into_inner();
        let count = req.count.min(100_000);
        let interval = Duration::from_millis(u64::from(req.interval_ms.min(10_000)));
        let replies: Vec<EchoReply> = (0..count)
            .map(|seq| self.reply(req.message.clone(), seq))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for reply in replies {
                if tx.send(Ok(reply)).await.is_err() {
                    return; // the client went away
                }
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
            // An OK status carrying metadata: tonic sends it as the trailers
            // (grpc-status: 0 plus x-demo-trailer).
            let mut trailers = MetadataMap::new();
            trailers.insert("x-demo-trailer", MetadataValue::from_static("done"));
            let _ = tx
                .send(Err(Status::with_metadata(Code::Ok, "", trailers)))
                .await;
        });
        Ok(self.with_instance(Box::pin(ReceiverStream::new(rx)) as ReplyStream))
    }
}

// ------------------------------------------------------------------- TCP

async fn serve_tcp_echo(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (mut stream, _) = listener.accept().await.context("accepting TCP")?;
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.split();
            // Echo until the client's EOF, then finish writing and half-close our side.
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                let _ = wr.shutdown().await;
            }
        });
    }
}
