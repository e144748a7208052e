//! In-crate integration tests: the real listener manager, HTTP request path and TCP proxy on
//! loopback, configured with hand-built discovery responses (no control plane), against tiny
//! hyper / TCP upstreams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proto::v1;
use weft_proto::v1::discovery_request::Kind;
use weft_proxy::discovery::ConfigApplier;
use weft_proxy::listen::{DataPlane, ListenerManager};
use weft_proxy::metrics::Metrics;
use weft_proxy::snapshot::SnapshotStore;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A port nobody listens on right now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Two distinct free ports (both held while the second is picked: two `free_port` calls may
/// return the same one, and a snapshot refuses two listeners on one address).
fn two_free_ports() -> (SocketAddr, SocketAddr) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

/// Upstream: echoes what it saw in headers and the request body; `/trailers` adds
/// `grpc-status: 0` trailers; `/slow` waits 2s.
async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let host = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .or_else(|| {
                            req.headers()
                                .get(header::HOST)
                                .map(|h| h.to_str().unwrap().to_owned())
                        })
                        .unwrap_or_default();
                    let path = req.uri().path().to_owned();
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let out: BoxBody = if path.starts_with("/trailers") {
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, Infallible>(Frame::data(body)),
                            Ok(Frame::trailers(t)),
                        ];
                        StreamBody::new(futures::stream::iter(frames)).boxed()
                    } else {
                        Full::new(body).boxed()
                    };
                    let resp = Response::builder()
                        .header("x-upstream-version", version)
                        .header("x-upstream-host", host)
                        .header("x-upstream-path", path)
                        .body(out)
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

struct Proxy {
    applier: ConfigApplier,
    store: Arc<SnapshotStore>,
    nonce: AtomicUsize,
}

impl Proxy {
    fn new() -> Self {
        let store = Arc::new(SnapshotStore::empty());
        let plane = DataPlane {
            store: store.clone(),
            drain_timeout: Duration::from_millis(500),
            http: Arc::new(weft_proxy::http::server_builder()),
            tls: Arc::new(
                weft_proxy::tls::MeshTls::new(
                    weft_proxy::tls::metrics::SecurityMetrics::unregistered(),
                )
                .expect("TLS 1.3 config"),
            ),
            limits: weft_proxy::conn_limit::RefusalMetrics::unregistered(),
            max_connections: weft_proxy::conn_limit::DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
            transparent: Arc::new(weft_proxy::transparent::Transparent::unregistered()),
        };
        let manager = ListenerManager::new(tokio::runtime::Handle::current(), plane);
        let applier = ConfigApplier::new(
            store.clone(),
            Arc::new(Mutex::new(manager)),
            Metrics::new().unwrap(),
        );
        Self {
            applier,
            store,
            nonce: AtomicUsize::new(0),
        }
    }

    /// Applies a response; Ok(()) on ACK, Err(reason) on NACK.
    fn push(&self, mut resp: v1::DiscoveryResponse) -> Result<(), String> {
        resp.nonce = format!("n{}", self.nonce.fetch_add(1, Ordering::SeqCst));
        match self.applier.apply(&resp).kind {
            Some(Kind::Ack(a)) => {
                assert_eq!(a.nonce, resp.nonce);
                Ok(())
            }
            Some(Kind::Nack(n)) => Err(n.error),
            other => panic!("unexpected reply {other:?}"),
        }
    }
}

fn http_listener(name: &str, addr: SocketAddr, table: &str, cluster: &str) -> v1::Listener {
    v1::Listener {
        name: name.into(),
        address: addr.to_string(),
        direction: v1::Direction::Outbound.into(),
        protocol: v1::ListenerProtocol::Http.into(),
        route_table: table.into(),
        cluster: cluster.into(),
        ..Default::default()
    }
}

fn route(name: &str, host: &str, prefix: &str, cluster: &str, timeout_ms: u64) -> v1::Route {
    v1::Route {
        name: name.into(),
        r#match: Some(v1::RouteMatch {
            hosts: vec![host.into()],
            path: Some(v1::PathMatch {
                kind: Some(v1::path_match::Kind::Prefix(prefix.into())),
            }),
            ..Default::default()
        }),
        destinations: vec![v1::WeightedCluster {
            cluster: cluster.into(),
            weight: 100,
        }],
        timeout_ms,
        ..Default::default()
    }
}

fn cluster(name: &str, protocol: v1::UpstreamProtocol) -> v1::Cluster {
    v1::Cluster {
        name: name.into(),
        connect_timeout_ms: 500,
        protocol: protocol.into(),
        ..Default::default()
    }
}

fn endpoints(cluster: &str, addrs: &[SocketAddr]) -> v1::ClusterEndpoints {
    v1::ClusterEndpoints {
        cluster: cluster.into(),
        endpoints: addrs
            .iter()
            .map(|a| v1::Endpoint {
                address: a.to_string(),
                weight: 1,
                ..Default::default()
            })
            .collect(),
    }
}

/// One outbound HTTP listener; host `backend` -> cluster `backend` (upstream, preserve), `h2up`
/// -> `backend-h2` (upstream, http2), `down` -> a dead port, `empty` -> no endpoints; inbound
/// catch-all -> `inbound`.
fn config(listen: SocketAddr, inbound: SocketAddr, up: SocketAddr) -> v1::DiscoveryResponse {
    let dead = free_port();
    v1::DiscoveryResponse {
        nonce: String::new(),
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![
                http_listener("outbound", listen, "outbound", ""),
                http_listener("inbound", inbound, "", "inbound"),
            ],
            ..Default::default()
        }),
        routes: Some(v1::RouteSet {
            version: "r1".into(),
            tables: vec![v1::RouteTable {
                name: "outbound".into(),
                routes: vec![
                    route("slow", "backend", "/slow", "backend", 200),
                    route("default-backend", "backend", "/", "backend", 0),
                    route("h2", "h2up", "/", "backend-h2", 0),
                    route("down", "down", "/", "down", 0),
                    route("empty", "empty", "/", "empty", 0),
                ],
            }],
        }),
        clusters: Some(v1::ClusterSet {
            version: "c1".into(),
            clusters: vec![
                cluster("backend", v1::UpstreamProtocol::Preserve),
                cluster("backend-h2", v1::UpstreamProtocol::Http2),
                cluster("down", v1::UpstreamProtocol::Preserve),
                cluster("empty", v1::UpstreamProtocol::Preserve),
                cluster("inbound", v1::UpstreamProtocol::Preserve),
            ],
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e1".into(),
            clusters: vec![
                endpoints("backend", &[up]),
                endpoints("backend-h2", &[up]),
                endpoints("down", &[dead]),
                endpoints("inbound", &[up]),
            ],
        }),
        ..Default::default()
    }
}

async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

fn get(host: &str, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header(header::HOST, host)
        .body(Full::default())
        .unwrap()
}

async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> hyper::Result<Response<Incoming>> {
    c.ready().await?;
    c.send_request(req).await
}

async fn text(resp: Response<Incoming>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_routes_pools_and_reports_errors() {
    let (up, up_conns) = upstream().await;
    let (listen, inbound) = two_free_ports();
    let proxy = Proxy::new();
    assert!(proxy.store.load().is_none());
    proxy.push(config(listen, inbound, up)).unwrap();

    let mut c = h1_client(listen).await;
    for i in 0..5 {
        let req = Request::builder()
            .method("POST")
            .uri("/echo")
            .header(header::HOST, "Backend:15001")
            .body(Full::new(Bytes::from(format!("hello {i}"))))
            .unwrap();
        let resp = send(&mut c, req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-upstream-version"], "HTTP/1.1");
        assert_eq!(resp.headers()["x-upstream-host"], "Backend:15001");
        assert_eq!(text(resp).await, format!("hello {i}"));
    }
    // Sequential requests reuse one pooled upstream connection.
    assert_eq!(up_conns.load(Ordering::SeqCst), 1);

    // h1 downstream -> h2 upstream (cluster protocol http2) keeps the client's host.
    let resp = send(&mut c, get("h2up", "/x")).await.unwrap();
    assert_eq!(resp.headers()["x-upstream-version"], "HTTP/2.0");
    assert_eq!(resp.headers()["x-upstream-host"], "h2up");

    let resp = send(&mut c, get("nowhere", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-weft-error"], "no-route");

    let resp = send(&mut c, get("down", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-weft-error"], "connect-failed");
    assert!(
        text(resp).await.contains("127.0.0.1:"),
        "body names the peer"
    );

    let resp = send(&mut c, get("empty", "/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["x-weft-error"], "no-endpoints");

    let resp = send(&mut c, get("backend", "/slow")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()["x-weft-error"], "request-timeout");
    assert_eq!(resp.headers()["x-weft-timeout"], "request");

    // The inbound listener forwards everything to its catch-all cluster.
    let mut ic = h1_client(inbound).await;
    let resp = send(&mut ic, get("anything", "/any/path")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-upstream-path"], "/any/path");

    // Garbage gets a 400 or a close, and the proxy keeps serving.
    let mut raw = TcpStream::connect(listen).await.unwrap();
    raw.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    // A malformed chunked body is the client's fault: 400 or a close, never 502.
    let mut raw = TcpStream::connect(listen).await.unwrap();
    raw.write_all(
        b"POST /echo HTTP/1.1\r\nhost: backend\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 4"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    let resp = send(&mut c, get("backend", "/still")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_preserves_version_and_trailers() {
    let (up, up_conns) = upstream().await;
    let (listen, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(listen, inbound, up)).unwrap();

    let mut c = h2_client(listen).await;
    let mut handles = Vec::new();
    for i in 0..10 {
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://backend/trailers/{i}"))
            .version(Version::HTTP_2)
            .header(header::TE, "trailers")
            .body(Full::new(Bytes::from(format!("msg {i}"))))
            .unwrap();
        c.ready().await.unwrap();
        handles.push(tokio::spawn(c.send_request(req)));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let resp = h.await.unwrap().unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-upstream-version"], "HTTP/2.0");
        assert_eq!(resp.headers()["x-upstream-host"], "backend");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers pass through");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), Bytes::from(format!("msg {i}")));
    }
    // All h2 requests to one endpoint share one upstream connection.
    assert_eq!(up_conns.load(Ordering::SeqCst), 1);

    let req = Request::builder()
        .uri("http://nowhere/")
        .version(Version::HTTP_2)
        .body(Full::default())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-weft-error"], "no-route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_keeps_old_config_and_removed_listener_stops() {
    let (up, _) = upstream().await;
    let (listen, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(listen, inbound, up)).unwrap();

    // A listener on a port someone else holds: NACK naming it, old config keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut bad = config(listen, inbound, up);
    let ls = &mut bad.listeners.as_mut().unwrap().listeners;
    ls.push(http_listener(
        "extra",
        taken.local_addr().unwrap(),
        "",
        "inbound",
    ));
    bad.listeners.as_mut().unwrap().version = "l2".into();
    let err = proxy.push(bad).unwrap_err();
    assert!(
        err.contains(r#"listener "extra": address: cannot bind"#),
        "{err}"
    );
    let v = proxy.store.load_full().unwrap();
    assert_eq!(v.resources.listeners.as_ref().unwrap().version, "l1");

    // A bad regex is NACKed too.
    let mut bad = config(listen, inbound, up);
    bad.routes.as_mut().unwrap().tables[0].routes[0]
        .r#match
        .as_mut()
        .unwrap()
        .path = Some(v1::PathMatch {
        kind: Some(v1::path_match::Kind::Regex("(".into())),
    });
    let err = proxy.push(bad).unwrap_err();
    assert!(err.contains(r#"route "slow": match.path.regex"#), "{err}");

    let mut c = h1_client(listen).await;
    let resp = send(&mut c, get("backend", "/ok")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // Move the outbound listener to a new port: the new one serves, the old one stops accepting.
    let moved = free_port();
    let mut next = config(moved, inbound, up);
    next.listeners.as_mut().unwrap().version = "l3".into();
    proxy.push(next).unwrap();
    let mut c2 = h1_client(moved).await;
    let resp = send(&mut c2, get("backend", "/ok")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "old listener address still accepts after removal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_half_close_and_byte_counts() {
    // Upstream: reads until EOF, then answers with the byte count and closes.
    let ul = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = ul.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = ul.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(format!("got {} bytes", buf.len()).as_bytes())
                    .await
                    .unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let listen = free_port();
    let proxy = Proxy::new();
    let resp = v1::DiscoveryResponse {
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![v1::Listener {
                name: "outbound-tcp-db".into(),
                address: listen.to_string(),
                direction: v1::Direction::Outbound.into(),
                protocol: v1::ListenerProtocol::Tcp.into(),
                route_table: String::new(),
                cluster: "db".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        clusters: Some(v1::ClusterSet {
            version: "c1".into(),
            clusters: vec![cluster("db", v1::UpstreamProtocol::Unspecified)],
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e1".into(),
            clusters: vec![endpoints("db", &[up])],
        }),
        ..Default::default()
    };
    proxy.push(resp).unwrap();

    for _ in 0..3 {
        let mut c = TcpStream::connect(listen).await.unwrap();
        c.write_all(&[7u8; 100_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
            .await
            .expect("upstream answer after half-close")
            .unwrap();
        assert_eq!(answer, "got 100000 bytes");
    }
}

/// A client stream whose first `skip` written bytes were already sent by hand.
struct SkipFirst {
    inner: TcpStream,
    skip: usize,
}

impl tokio::io::AsyncRead for SkipFirst {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SkipFirst {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The downstream protocol is told from the first bytes, also when they arrive piecemeal: a
/// first chunk that is a prefix of the h2 preface leaves the choice to the bytes that follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_detection_with_split_first_bytes() {
    let (up, _) = upstream().await;
    let (listen, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(listen, inbound, up)).unwrap();

    // HTTP/1.1 starting with `P` (a prefix of `PRI * HTTP/2.0`), then the rest.
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(
        b"OST /echo HTTP/1.1\r\nhost: backend\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("hi"), "{out}");

    // HTTP/1.1 arriving a byte at a time, not a prefix of the preface.
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"ET /echo HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // h2c prior knowledge whose preface arrives in two pieces.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&PREFACE[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let io = SkipFirst { inner: s, skip: 5 };
    let (mut c, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://backend/echo")
        .version(Version::HTTP_2)
        .body(Full::<Bytes>::default())
        .unwrap();
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-upstream-host"], "backend");

    // A client that closes before sending anything.
    let s = TcpStream::connect(listen).await.unwrap();
    drop(s);
    let mut c = h1_client(listen).await;
    let resp = send(&mut c, get("backend", "/after")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
