//! Unit tests of the handshake helpers, and the tunnel paths end to end in-process: the real
//! listener manager and request path on loopback (plaintext, no control plane), against raw TCP
//! upstreams that play the WebSocket server's part byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proto::v1;
use weft_proto::v1::discovery_request::Kind as Reply;

use super::*;
use crate::discovery::ConfigApplier;
use crate::listen::{DataPlane, ListenerManager};
use crate::metrics::Metrics;
use crate::snapshot::{Direction, SnapshotStore};

/// Every wait in these tests.
const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn websocket_accept_matches_rfc_6455() {
    // RFC 6455 §1.3's example.
    assert_eq!(
        websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(websocket_key().len(), 24);
    assert_ne!(websocket_key(), websocket_key());
}

#[test]
fn base64_pads() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foobar"), "Zm9vYmFy");
}

#[test]
fn kinds() {
    let req = |method: &str, version: Version, headers: &[(&str, &str)]| {
        let mut b = Request::builder().method(method).version(version).uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    };
    let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
    assert_eq!(
        Kind::of(&req("GET", Version::HTTP_11, &ws)),
        Some(Kind::Upgrade(HeaderValue::from_static("websocket")))
    );
    assert_eq!(Kind::of(&req("GET", Version::HTTP_11, &[])), None);
    assert_eq!(Kind::of(&req("GET", Version::HTTP_10, &ws)), None);
    let h2c = [
        ("connection", "Upgrade, HTTP2-Settings"),
        ("upgrade", "h2c"),
    ];
    assert_eq!(Kind::of(&req("GET", Version::HTTP_11, &h2c)), None);
    let mut connect = Request::builder()
        .method("CONNECT")
        .uri("example.com:443")
        .body(())
        .unwrap();
    assert_eq!(Kind::of(&connect), Some(Kind::Connect));
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    assert_eq!(
        Kind::of(&connect),
        Some(Kind::ExtendedConnect("websocket".into()))
    );
}

#[tokio::test]
async fn prefixed_reads_its_prefix_first() {
    let (mut a, b) = tokio::io::duplex(64);
    let mut p = Prefixed::new(b, Bytes::from_static(b"early "));
    a.write_all(b"later").await.unwrap();
    drop(a);
    let mut got = Vec::new();
    p.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"early later");
}

// ------------------------------------------------------------------ in-process proxy

struct Proxy {
    applier: ConfigApplier,
    nonce: AtomicUsize,
}

impl Proxy {
    fn new() -> Self {
        let store = Arc::new(SnapshotStore::empty());
        let plane = DataPlane {
            store: Arc::clone(&store),
            drain_timeout: Duration::from_millis(500),
            http: Arc::new(crate::http::server_builder()),
            tls: Arc::new(
                crate::tls::MeshTls::new(crate::tls::metrics::SecurityMetrics::unregistered())
                    .expect("TLS 1.3 config"),
            ),
            limits: crate::conn_limit::RefusalMetrics::unregistered(),
            max_connections: crate::conn_limit::DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
            transparent: Arc::new(crate::transparent::Transparent::unregistered()),
        };
        let manager = ListenerManager::new(tokio::runtime::Handle::current(), plane);
        let applier = ConfigApplier::new(
            store,
            Arc::new(Mutex::new(manager)),
            Metrics::new().unwrap(),
        );
        Self {
            applier,
            nonce: AtomicUsize::new(0),
        }
    }

    fn push(&self, mut resp: v1::DiscoveryResponse) {
        resp.nonce = format!("n{}", self.nonce.fetch_add(1, Ordering::SeqCst));
        match self.applier.apply(&resp).kind {
            Some(Reply::Ack(_)) => {}
            other => panic!("config not applied: {other:?}"),
        }
    }
}

fn two_free_ports() -> (SocketAddr, SocketAddr) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

/// An outbound listener at `outbound` (host `backend` -> `up`, cluster protocol `protocol`) and
/// an inbound one at `inbound` (catch-all -> `up`), both with `idle_ms`; `egress` on the
/// outbound listener.
fn config(
    outbound: SocketAddr,
    inbound: SocketAddr,
    up: SocketAddr,
    protocol: v1::UpstreamProtocol,
    idle_ms: u64,
    egress: Option<&v1::EgressPolicy>,
) -> v1::DiscoveryResponse {
    let listener = |name: &str, addr: SocketAddr, direction: v1::Direction| v1::Listener {
        name: name.into(),
        address: addr.to_string(),
        direction: direction.into(),
        protocol: v1::ListenerProtocol::Http.into(),
        route_table: if name == "outbound" {
            "outbound".into()
        } else {
            String::new()
        },
        cluster: if name == "inbound" {
            "inbound".into()
        } else {
            String::new()
        },
        idle_timeout_ms: idle_ms,
        egress: if name == "outbound" {
            egress.cloned()
        } else {
            None
        },
        ..Default::default()
    };
    let cluster = |name: &str| v1::Cluster {
        name: name.into(),
        connect_timeout_ms: 1000,
        protocol: protocol.into(),
        ..Default::default()
    };
    let endpoints = |name: &str| v1::ClusterEndpoints {
        cluster: name.into(),
        endpoints: vec![v1::Endpoint {
            address: up.to_string(),
            weight: 1,
            ..Default::default()
        }],
    };
    v1::DiscoveryResponse {
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![
                listener("outbound", outbound, v1::Direction::Outbound),
                listener("inbound", inbound, v1::Direction::Inbound),
            ],
            ..Default::default()
        }),
        routes: Some(v1::RouteSet {
            version: "r1".into(),
            tables: vec![v1::RouteTable {
                name: "outbound".into(),
                routes: vec![v1::Route {
                    name: "default-backend".into(),
                    r#match: Some(v1::RouteMatch {
                        hosts: vec!["backend".into()],
                        ..Default::default()
                    }),
                    destinations: vec![v1::WeightedCluster {
                        cluster: "backend".into(),
                        weight: 100,
                    }],
                    ..Default::default()
                }],
            }],
        }),
        clusters: Some(v1::ClusterSet {
            version: "c1".into(),
            clusters: vec![cluster("backend"), cluster("inbound")],
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e1".into(),
            clusters: vec![endpoints("backend"), endpoints("inbound")],
        }),
        ..Default::default()
    }
}

/// Reads up to the end of an HTTP head (`\r\n\r\n`); returns the head and what followed it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = tokio::time::timeout(LIMIT, s.read(&mut chunk))
            .await
            .expect("a head within the limit")
            .expect("read");
        assert!(n > 0, "closed before the end of the head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads exactly `n` more bytes after `have`.
async fn read_exactly(s: &mut TcpStream, mut have: Vec<u8>, n: usize) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    while have.len() < n {
        let got = tokio::time::timeout(LIMIT, s.read(&mut chunk))
            .await
            .expect("bytes within the limit")
            .expect("read");
        assert!(got > 0, "closed after {have:?}, wanted {n} bytes");
        have.extend_from_slice(&chunk[..got]);
    }
    have
}

/// What a raw upstream saw: the request heads, one per connection.
type Seen = Arc<Mutex<Vec<String>>>;

/// A raw upstream. Per connection: reads a request head; `101` (a WebSocket handshake, the
/// accept computed from the key) is answered with a 101, `greeting` right behind the head, then
/// an echo until EOF (then a half-close back); anything else is answered `200 declined` with
/// keep-alive, and the next request head is answered the same way.
async fn raw_upstream(greeting: &'static [u8]) -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                loop {
                    let (head, rest) = read_head(&mut s).await;
                    log.lock().unwrap().push(head.clone());
                    let lower = head.to_ascii_lowercase();
                    if lower.contains("\r\nupgrade: websocket") {
                        let key = lower
                            .lines()
                            .find_map(|l| l.strip_prefix("sec-websocket-key: "))
                            .map(|k| {
                                // The original case of the key.
                                let at = lower.find(k).unwrap();
                                head[at..at + k.len()].to_owned()
                            })
                            .unwrap_or_default();
                        let answer = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\n\
                             upgrade: websocket\r\nsec-websocket-accept: {}\r\n\r\n",
                            websocket_accept(&key)
                        );
                        s.write_all(answer.as_bytes()).await.unwrap();
                        s.write_all(greeting).await.unwrap();
                        s.write_all(&rest).await.unwrap();
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                        return;
                    }
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ndeclined";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

const WS_HEAD: &str =
    "GET /chat?room=1 HTTP/1.1\r\nhost: backend\r\nconnection: keep-alive, Upgrade\r\n\
     upgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
     sec-websocket-version: 13\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upgrade_is_spliced_both_ways_with_half_close() {
    let (up, seen) = raw_upstream(b"hello from upstream|").await;
    let (outbound, inbound) = two_free_ports();
    let proxy = Proxy::new();
    // An h2 cluster: the upgrade still goes out on its own HTTP/1.1 connection.
    proxy.push(config(
        outbound,
        inbound,
        up,
        v1::UpstreamProtocol::Http2,
        60_000,
        None,
    ));
    let m = tunnel_metrics::get().handles(Direction::Outbound, TunnelKind::WebSocket);
    let (opened, rx, tx) = (m.opened.get(), m.rx.get(), m.tx.get());

    let mut c = TcpStream::connect(outbound).await.unwrap();
    // Bytes right behind the head (before the 101): they belong to the tunnel.
    c.write_all(format!("{WS_HEAD}early|").as_bytes())
        .await
        .unwrap();
    let (head, rest) = read_head(&mut c).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 101"), "{head}");
    assert!(lower.contains("\r\nupgrade: websocket"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let want = b"hello from upstream|early|";
    let got = read_exactly(&mut c, rest, want.len()).await;
    assert_eq!(got, want);

    // Bulk both ways, then a half-close that comes back as one.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = c.into_split();
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut echoed = Vec::new();
        tokio::time::timeout(LIMIT, r.read_to_end(&mut echoed))
            .await
            .expect("echo and EOF within the limit")
            .unwrap();
        echoed
    };
    let ((), echoed) = tokio::join!(send, recv);
    assert!(echoed == payload, "echo differs ({} bytes)", echoed.len());

    let sent = seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(sent.starts_with("get /chat?room=1 http/1.1\r\n"), "{sent}");
    assert!(sent.contains("\r\nconnection: upgrade\r\n"), "{sent}");
    assert!(!sent.contains("keep-alive"), "{sent}");
    assert!(sent.contains("\r\nhost: backend\r\n"), "{sent}");

    let deadline = tokio::time::Instant::now() + LIMIT;
    while m.rx.get() < rx + 6 + payload.len() as u64 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(m.opened.get() > opened);
    assert!(m.rx.get() >= rx + 6 + payload.len() as u64);
    assert!(m.tx.get() >= tx + want.len() as u64 + payload.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_and_h2c_upgrades_leave_a_keep_alive_connection_that_hibernates() {
    let (up, seen) = raw_upstream(b"").await;
    let (outbound, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(
        outbound,
        inbound,
        up,
        v1::UpstreamProtocol::Preserve,
        60_000,
        None,
    ));
    let mut c = TcpStream::connect(outbound).await.unwrap();
    // An upgrade to a protocol the upstream declines: its 200 is relayed.
    c.write_all(
        b"GET /x HTTP/1.1\r\nhost: backend\r\nconnection: upgrade\r\nupgrade: foo/1\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(&mut c, rest, 8).await, b"declined");
    // h2c: served as plain HTTP/1.1, never upgraded, no Upgrade upstream.
    c.write_all(
        b"GET /y HTTP/1.1\r\nhost: backend\r\nconnection: Upgrade, HTTP2-Settings\r\n\
          upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(&mut c, rest, 8).await, b"declined");
    {
        let seen = seen.lock().unwrap();
        let declined = seen[0].to_ascii_lowercase();
        assert!(declined.contains("\r\nupgrade: foo/1\r\n"), "{declined}");
        let h2c = seen
            .last()
            .map(|h| h.to_ascii_lowercase())
            .unwrap_or_default();
        assert!(h2c.starts_with("get /y "), "{h2c}");
        assert!(!h2c.contains("upgrade"), "{h2c}");
        assert!(!h2c.contains("http2-settings"), "{h2c}");
    }
    // The keep-alive connection hibernates once idle and serves again after.
    let before = crate::http::hibernate::hibernated_total();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while crate::http::hibernate::hibernated_total() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection never hibernated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.write_all(b"GET /z HTTP/1.1\r\nhost: backend\r\n\r\n")
        .await
        .unwrap();
    let (head, rest) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(&mut c, rest, 8).await, b"declined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed_after_the_listener_idle_timeout() {
    let (up, _seen) = raw_upstream(b"").await;
    let (outbound, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(
        outbound,
        inbound,
        up,
        v1::UpstreamProtocol::Preserve,
        300,
        None,
    ));
    let mut c = TcpStream::connect(outbound).await.unwrap();
    c.write_all(WS_HEAD.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(b"ping").await.unwrap();
    let echoed = read_exactly(&mut c, Vec::new(), 4).await;
    assert_eq!(echoed, b"ping");
    // Nothing more either way: closed by the proxy, long before the limit.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(LIMIT, c.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the idle tunnel was not closed");
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_becomes_an_http1_websocket_handshake() {
    let (up, seen) = raw_upstream(b"hi|").await;
    let (outbound, inbound) = two_free_ports();
    let proxy = Proxy::new();
    proxy.push(config(
        outbound,
        inbound,
        up,
        v1::UpstreamProtocol::Http1,
        60_000,
        None,
    ));
    let s = TcpStream::connect(outbound).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // A first plain request: the server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) are in.
    let first = Request::get("http://backend/warm")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(LIMIT, h2.send_request(first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://backend/chat")
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = tokio::time::timeout(LIMIT, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key(SEC_WEBSOCKET_ACCEPT));
    let stream = tokio::time::timeout(LIMIT, hyper::upgrade::on(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let mut stream = TokioIo::new(stream);
    stream.write_all(b"over h2").await.unwrap();
    let mut got = vec![0u8; 10];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"hi|over h2");

    let sent = seen
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.contains("/chat"))
        .cloned()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(sent.starts_with("get /chat http/1.1\r\n"), "{sent}");
    assert!(sent.contains("\r\nupgrade: websocket\r\n"), "{sent}");
    assert!(sent.contains("\r\nsec-websocket-key: "), "{sent}");
    assert!(sent.contains("\r\nhost: backend\r\n"), "{sent}");

    // Another :protocol: 501.
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://backend/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("connect-udp"));
    let resp = tokio::time::timeout(LIMIT, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
    assert_eq!(resp.headers()[X_WEFT_ERROR], "unsupported-protocol");
    let _ = resp.into_body().collect().await;
}

/// A TCP echo server.
async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_allowed_destinations_only() {
    let echo = tcp_echo().await;
    let (up, _seen) = raw_upstream(b"").await;
    let (outbound, inbound) = two_free_ports();
    let proxy = Proxy::new();
    let egress = v1::EgressPolicy {
        deny_unknown: true,
        allow_hosts: vec!["localhost".into()],
    };
    proxy.push(config(
        outbound,
        inbound,
        up,
        v1::UpstreamProtocol::Preserve,
        60_000,
        Some(&egress),
    ));
    let denied = tunnel_metrics::get().egress_denied_connect().get();

    // An IP nobody declared: refused.
    let mut c = TcpStream::connect(outbound).await.unwrap();
    c.write_all(format!("CONNECT {echo} HTTP/1.1\r\nhost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("x-weft-error: egress-denied"), "{head}");
    assert!(tunnel_metrics::get().egress_denied_connect().get() > denied);

    // The same echo by an allowed name (resolved by the system resolver), and by the declared
    // endpoint's address (known).
    for target in [format!("localhost:{}", echo.port()), up.to_string()] {
        let mut c = TcpStream::connect(outbound).await.unwrap();
        c.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, rest) = read_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
        assert!(rest.is_empty());
        if target.starts_with("localhost") {
            c.write_all(b"raw bytes").await.unwrap();
            c.shutdown().await.unwrap();
            let mut echoed = Vec::new();
            tokio::time::timeout(LIMIT, c.read_to_end(&mut echoed))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(echoed, b"raw bytes");
        }
    }

    // HTTP/2 CONNECT (no :protocol): the stream is the tunnel.
    let s = TcpStream::connect(outbound).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("localhost:{}", echo.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = tokio::time::timeout(LIMIT, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let stream = tokio::time::timeout(LIMIT, hyper::upgrade::on(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let mut stream = TokioIo::new(stream);
    stream.write_all(b"over an h2 stream").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, b"over an h2 stream");

    // CONNECT on the inbound listener: refused.
    let mut c = TcpStream::connect(inbound).await.unwrap();
    c.write_all(format!("CONNECT {echo} HTTP/1.1\r\nhost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
}
