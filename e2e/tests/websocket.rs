//! Upgrades and tunnels through real sidecars: WebSocket (tokio-tungstenite's client and
//! server, a library nobody here wrote) from an app through its outbound sidecar, over strict
//! mTLS, through the callee's inbound sidecar to a WebSocket echo app and back; the same over
//! HTTP/2 (RFC 8441 extended CONNECT, hyper's client); `Upgrade: h2c` refused (served as plain
//! HTTP/1.1, curl's own h2c upgrade); the callee's authorization policy denying an upgrade;
//! idle tunnels closed; `curl -p -x` CONNECT tunnels to TCP destinations, and the egress policy
//! refusing unknown ones.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use weft_e2e::caller_proxy_config;
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, ControlPlaneConfig, DemoApp,
    DemoAppConfig, PolicyDir, Proxy, ProxyConfig, DEFAULT_WAIT,
};

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

/// Every single network step of these tests (a message, a close, a curl run).
const STEP: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------ the WebSocket echo app

/// What the echo app saw of one handshake.
#[derive(Debug, Clone)]
struct Handshake {
    path: String,
    peer_identity: String,
}

/// A WebSocket echo server (tokio-tungstenite's `accept_hdr_async`): every text and binary
/// message comes back as is; a close is answered by the library's close handshake.
struct WsApp {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    /// Close frames received from clients.
    closes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsApp {
    async fn start() -> WsApp {
        let addr = free_addr(next_loopback_ip());
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding the WebSocket app on {addr}: {e}"));
        let handshakes: Arc<Mutex<Vec<Handshake>>> = Arc::default();
        let closes = Arc::new(AtomicUsize::new(0));
        let (seen, closed) = (Arc::clone(&handshakes), Arc::clone(&closes));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, closed) = (Arc::clone(&seen), Arc::clone(&closed));
                tokio::spawn(async move {
                    // The signature is tungstenite's handshake callback.
                    #[allow(clippy::result_large_err)]
                    let record =
                        |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                            let peer_identity = req
                                .headers()
                                .get("x-weft-peer-identity")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            seen.lock().unwrap().push(Handshake {
                                path: req.uri().path().to_owned(),
                                peer_identity,
                            });
                            Ok(resp)
                        };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    while let Some(msg) = ws.next().await {
                        match msg {
                            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                                if ws.send(m).await.is_err() {
                                    return;
                                }
                            }
                            // The library queues the close reply; the next read flushes it
                            // and then ends the stream.
                            Ok(Message::Close(_)) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        WsApp {
            addr,
            handshakes,
            closes,
            task,
        }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }
}

// ------------------------------------------------------------------ mesh set-up

/// A control plane with a CA and TLS gRPC.
async fn secure_cp(policies: &PolicyDir) -> ControlPlane {
    let mut config = ControlPlaneConfig::new(policies.path());
    config.ca = true;
    config.grpc_tls = true;
    ControlPlane::start_with(config).await
}

/// A proxy from `config` with `extra` appended to its bootstrap.
async fn proxy_with(mut config: ProxyConfig, extra: &str) -> Proxy {
    config.resolve_security();
    let yaml = format!("{}{extra}", config.to_yaml());
    let mut proxy = Proxy::spawn_yaml(config, &yaml);
    proxy.wait_ready().await;
    proxy
}

fn quoted(p: &Path) -> String {
    serde_json::Value::from(p.display().to_string()).to_string()
}

/// The bootstrap section that writes every listener's access log, as JSON, to `file`.
fn access_log(file: &Path) -> String {
    format!(
        "observability:\n  access_log: {{format: json, path: {}}}\n",
        quoted(file)
    )
}

/// Two services over strict mTLS: `web` (a caller sidecar, the test is its app) and `chat`
/// (the WebSocket echo app behind its sidecar), both access-logging; `extra_yaml` is appended
/// to the policy.
struct ChatMesh {
    web: Proxy,
    chat: Proxy,
    app: WsApp,
    web_log: PathBuf,
    chat_log: PathBuf,
    cp: ControlPlane,
    _logs: tempfile::TempDir,
    _policies: PolicyDir,
}

async fn chat_mesh(extra_yaml: &str) -> ChatMesh {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &format!(
            "mesh:\n  mtls: strict\nservices:\n  - name: web\n  - name: other\n  - name: chat\n{extra_yaml}"
        ),
    );
    let cp = secure_cp(&policies).await;
    let logs = tempfile::tempdir().expect("a temp dir for access logs");
    let (web_log, chat_log) = (logs.path().join("web.log"), logs.path().join("chat.log"));
    let app = WsApp::start().await;
    let chat = proxy_with(
        ProxyConfig::new(&cp.grpc_url(), "chat", "chat-1", app.addr),
        &access_log(&chat_log),
    )
    .await;
    let web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &access_log(&web_log),
    )
    .await;
    web.wait_endpoint(chat.inbound_addr(), true).await;
    ChatMesh {
        web,
        chat,
        app,
        web_log,
        chat_log,
        cp,
        _logs: logs,
        _policies: policies,
    }
}

type Client = WebSocketStream<TcpStream>;

/// A WebSocket client through `proxy`'s outbound listener to `ws://<host><path>`.
async fn ws_connect(proxy: &Proxy, host: &str, path: &str) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(proxy.outbound_addr())
        .await
        .map_err(tungstenite::Error::Io)?;
    let url = format!("ws://{host}{path}");
    let (ws, resp) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("the WebSocket handshake within the step limit")?;
    assert_eq!(resp.status(), 101);
    Ok(ws)
}

/// Sends `msg` and expects it back unchanged.
async fn echo<S>(ws: &mut WebSocketStream<S>, msg: Message)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(STEP, ws.send(msg.clone()))
        .await
        .expect("sent within the step limit")
        .expect("send");
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("an echo within the step limit")
        .expect("the stream ended before the echo")
        .expect("a message");
    assert!(
        got == msg,
        "the echo differs: sent {} bytes, got {} bytes",
        msg.len(),
        got.len()
    );
}

/// Sends a close and waits (bounded) for the server's close frame and the end of the stream.
async fn close_handshake<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(STEP, ws.close(None))
        .await
        .expect("close sent within the step limit")
        .expect("close");
    let mut saw_close = false;
    // Bounded: each read has its own limit, and a closed stream ends the loop.
    for _ in 0..16 {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("the close answered within the step limit")
        {
            Some(Ok(Message::Close(_))) => saw_close = true,
            Some(Ok(other)) => panic!("unexpected message while closing: {other:?}"),
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => break,
            Some(Err(e)) => panic!("closing failed: {e}"),
        }
    }
    assert!(saw_close, "the server's close frame never came back");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The JSON access log lines of `file` with `"protocol": protocol`, waiting (bounded) for `n`.
async fn wait_log_lines(file: &Path, protocol: &str, n: usize) -> Vec<serde_json::Value> {
    let what = format!("{} has {n} {protocol} lines", file.display());
    wait_until(DEFAULT_WAIT, &what, async || {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .filter(|v: &serde_json::Value| v["protocol"] == protocol)
            .collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{} so far", lines.len()))
        }
    })
    .await
}

// ------------------------------------------------------------------ WebSocket over HTTP/1.1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_two_sidecars_over_strict_mtls() {
    let mesh = chat_mesh("").await;
    let mut ws = ws_connect(&mesh.web, "chat", "/echo")
        .await
        .expect("WebSocket handshake through web's outbound sidecar");

    echo(&mut ws, Message::text("hello, chat")).await;
    let big = pattern(1024 * 1024, 7);
    echo(&mut ws, Message::binary(big.clone())).await;
    echo(&mut ws, Message::text("é".repeat(1000))).await;
    echo(&mut ws, Message::binary(pattern(1024 * 1024, 99))).await;
    close_handshake(&mut ws).await;
    drop(ws);

    // The app saw the handshake through both sidecars, the caller's mesh identity attached.
    let seen = mesh.app.handshakes();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/echo");
    assert_eq!(seen[0].peer_identity, WEB_ID);
    assert_eq!(
        mesh.app.closes.load(Ordering::SeqCst),
        1,
        "the app saw no close"
    );

    // One access log line per tunnel, on each sidecar, with the bytes each way.
    let at_least = 2 * 1024 * 1024;
    for (file, direction) in [(&mesh.web_log, "outbound"), (&mesh.chat_log, "inbound")] {
        let lines = wait_log_lines(file, "websocket", 1).await;
        let line = &lines[0];
        assert_eq!(line["direction"], direction, "{line}");
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["path"], "/echo", "{line}");
        assert_eq!(line["status"], 101, "{line}");
        assert_eq!(line["response_flags"], "-", "{line}");
        let (rx, tx) = (
            line["bytes_received"].as_u64().unwrap_or(0),
            line["bytes_sent"].as_u64().unwrap_or(0),
        );
        assert!(rx >= at_least && tx >= at_least, "{line}");
        if direction == "inbound" {
            assert_eq!(line["peer_identity"], WEB_ID, "{line}");
            assert_eq!(line["cluster"], "inbound", "{line}");
        } else {
            assert_eq!(line["cluster"], "chat.default", "{line}");
            assert_eq!(
                line["upstream"],
                mesh.chat.inbound_addr().to_string(),
                "{line}"
            );
        }
    }
    // The request itself is logged too, with its 101.
    let requests = wait_log_lines(&mesh.web_log, "HTTP/1.1", 1).await;
    assert!(requests.iter().any(|l| l["status"] == 101), "{requests:?}");

    // Byte metrics and tunnel counts on both sidecars; nothing left open.
    for (proxy, direction) in [(&mesh.web, "outbound"), (&mesh.chat, "inbound")] {
        let labels = [("direction", direction), ("kind", "websocket")];
        let m = proxy.wait_metric("weft_tunnels_total", &labels, 1.0).await;
        for flow in ["rx", "tx"] {
            let l = [labels[0], labels[1], ("flow", flow)];
            assert!(
                m.sum("weft_tunnel_bytes_total", &l) >= at_least as f64,
                "{}",
                m.lines_for("weft_tunnel_bytes_total")
            );
        }
        assert_eq!(
            m.sum("weft_tunnels_open", &labels),
            0.0,
            "{}",
            m.lines_for("weft_tunnels_open")
        );
        let requests = m.sum(
            "weft_requests_total",
            &[("direction", direction), ("code", "101")],
        );
        assert_eq!(requests, 1.0, "{}", m.lines_for("weft_requests_total"));
    }
    // Over mTLS: the strict inbound listener took the tunnel's connection.
    let m = mesh.chat.metrics().await;
    assert!(m.sum("weft_inbound_connections_total", &[("tls", "mtls")]) >= 1.0);
    assert_eq!(
        m.sum("weft_inbound_connections_total", &[("tls", "plaintext")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_denies_an_upgrade_from_a_caller_it_does_not_allow() {
    let mesh = chat_mesh(
        "authorization:\n  - name: chat-callers\n    service: chat\n    default: deny\n    rules:\n      - name: from-web\n        from: {services: [web]}\n",
    )
    .await;
    let other = Proxy::start_with(caller_proxy_config(&mesh.cp, "other", "other-1")).await;
    other.wait_endpoint(mesh.chat.inbound_addr(), true).await;

    match ws_connect(&other, "chat", "/echo").await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403, "{resp:?}");
            assert_eq!(
                resp.headers()
                    .get("x-weft-error")
                    .and_then(|v| v.to_str().ok()),
                Some("forbidden")
            );
        }
        Err(e) => panic!("expected a 403, got {e}"),
        Ok(_) => panic!("an upgrade from `other` was let through"),
    }
    // web is allowed, and nothing of other's attempt reached the app.
    let mut ws = ws_connect(&mesh.web, "chat", "/allowed")
        .await
        .expect("web's upgrade is allowed");
    echo(&mut ws, Message::text("allowed")).await;
    close_handshake(&mut ws).await;
    let seen = mesh.app.handshakes();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/allowed");

    let m = mesh
        .chat
        .wait_metric(
            "weft_authz_denied_total",
            &[("policy", "chat-callers")],
            1.0,
        )
        .await;
    assert_eq!(
        m.sum(
            "weft_tunnels_total",
            &[("direction", "inbound"), ("kind", "websocket")]
        ),
        1.0,
        "{}",
        m.lines_for("weft_tunnels_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed_after_the_idle_timeout() {
    let mesh = chat_mesh("    idle_timeout: 2s\n").await;
    let mut ws = ws_connect(&mesh.web, "chat", "/idle")
        .await
        .expect("WebSocket handshake");
    echo(&mut ws, Message::text("then silence")).await;
    // Nobody sends anything: chat's inbound listener (idle_timeout 2s) closes the tunnel, and
    // the close reaches the client through web's sidecar. The client never pings.
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(Message::Close(_))) => {}
                Some(Ok(other)) => panic!("unexpected message on an idle tunnel: {other:?}"),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the idle tunnel was still open after {STEP:?}"
    );
    let lines = wait_log_lines(&mesh.chat_log, "websocket", 1).await;
    assert_eq!(lines[0]["response_flags"], "UT", "{}", lines[0]);
}

// ------------------------------------------------------------------ WebSocket over HTTP/2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_extended_connect() {
    let mesh = chat_mesh("").await;
    let tcp = TcpStream::connect(mesh.web.outbound_addr())
        .await
        .expect("connect to web's outbound listener");
    // h2c with prior knowledge, as an app's HTTP/2 client talks to its sidecar.
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake with the outbound listener");
    tokio::spawn(conn);
    // A first request: the sidecar's SETTINGS (ENABLE_CONNECT_PROTOCOL) have arrived after it.
    let warm = http::Request::get("http://nowhere/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(STEP, h2.send_request(warm))
        .await
        .expect("an answer within the step limit")
        .expect("an answer");
    let _ = resp.into_body().collect().await;

    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://chat/over-h2")
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut resp = tokio::time::timeout(STEP, h2.send_request(req))
        .await
        .expect("an answer within the step limit")
        .expect("an answer to the extended CONNECT");
    assert_eq!(resp.status(), 200, "{resp:?}");
    let stream = tokio::time::timeout(STEP, hyper::upgrade::on(&mut resp))
        .await
        .expect("the stream within the step limit")
        .expect("the CONNECT stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(stream), Role::Client, None).await;
    echo(&mut ws, Message::text("hello over h2")).await;
    echo(&mut ws, Message::binary(pattern(1024 * 1024, 3))).await;
    close_handshake(&mut ws).await;
    // The server closed its side; END_STREAM on ours ends the tunnel both ways.
    tokio::time::timeout(STEP, ws.get_mut().shutdown())
        .await
        .expect("END_STREAM within the step limit")
        .expect("shutdown of the CONNECT stream");
    drop(ws);

    let seen = mesh.app.handshakes();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/over-h2");
    assert_eq!(seen[0].peer_identity, WEB_ID);
    let web_line = &wait_log_lines(&mesh.web_log, "websocket", 1).await[0];
    assert_eq!(web_line["method"], "CONNECT", "{web_line}");
    assert_eq!(web_line["status"], 200, "{web_line}");
    assert!(web_line["bytes_received"].as_u64().unwrap_or(0) >= 1024 * 1024);
    // Inbound, it arrived as an HTTP/1.1 upgrade.
    let chat_line = &wait_log_lines(&mesh.chat_log, "websocket", 1).await[0];
    assert_eq!(chat_line["method"], "GET", "{chat_line}");
    assert_eq!(chat_line["status"], 101, "{chat_line}");
}

// ------------------------------------------------------------------ h2c, CONNECT

async fn run_curl(args: &[String]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(STEP + Duration::from_secs(5), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("curl {args:?} did not finish"))
        .unwrap_or_else(|e| panic!("cannot run curl (scripts/install-test-deps.sh): {e}"))
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TCP echo that ends its side once it has echoed a whole HTTP head: curl (`--http0.9`)
/// then gets its own request back as the response and the connection's end.
async fn head_echo(ip: IpAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let addr = free_addr(ip);
    let listener = TcpListener::bind(addr).await.expect("bind the echo");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // Bounded by the client: it ends when the head is complete or the client goes.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_is_refused_and_connect_tunnels_to_tcp() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "mesh:\n  mtls: strict\nservices:\n  - name: web\n  - name: backend\n",
    );
    let cp = secure_cp(&policies).await;
    let logs = tempfile::tempdir().expect("temp dir");
    let web_log = logs.path().join("web.log");
    let app = DemoApp::start("backend", "backend-1").await;
    let backend = Proxy::start(&cp.grpc_url(), "backend", "backend-1", app.http_addr()).await;
    let web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &access_log(&web_log),
    )
    .await;
    web.wait_endpoint(backend.inbound_addr(), true).await;
    let outbound = format!("http://{}", web.outbound_addr());

    // curl's own h2c upgrade (`--http2` on http://): answered over HTTP/1.1, never switched.
    let out = run_curl(&[
        "-sS".into(),
        "--http2".into(),
        "--max-time".into(),
        "15".into(),
        "-H".into(),
        "Host: backend".into(),
        "-w".into(),
        "\n%{http_code} %{http_version}".into(),
        format!("{outbound}/h2c"),
    ])
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (json, status) = stdout.rsplit_once('\n').unwrap_or_default();
    assert_eq!(status, "200 1.1", "{}", describe(&out));
    let body: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("demo app JSON ({e}): {}", describe(&out)));
    let headers = body["headers"].as_object().cloned().unwrap_or_default();
    assert!(!headers.contains_key("upgrade"), "{body}");
    assert!(!headers.contains_key("http2-settings"), "{body}");

    // CONNECT to a TCP destination outside the mesh: curl -p -x tunnels through web's outbound
    // listener to an echo, which returns curl's request as the (HTTP/0.9) answer.
    let (echo, _echo_task) = head_echo(next_loopback_ip()).await;
    let out = run_curl(&[
        "-sS".into(),
        "--http0.9".into(),
        "--max-time".into(),
        "15".into(),
        "-p".into(),
        "-x".into(),
        outbound.clone(),
        "-w".into(),
        "\n%{http_connect}".into(),
        format!("http://{echo}/through-the-tunnel"),
    ])
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("GET /through-the-tunnel HTTP/1.1\r\n"),
        "{}",
        describe(&out)
    );
    assert!(
        stdout.contains(&format!("Host: {echo}\r\n")),
        "{}",
        describe(&out)
    );
    assert!(stdout.trim_end().ends_with("200"), "{}", describe(&out));

    // And to an HTTP server: a real exchange inside the tunnel.
    let out = run_curl(&[
        "-sS".into(),
        "--max-time".into(),
        "15".into(),
        "-p".into(),
        "-x".into(),
        outbound,
        format!("http://{}/via-connect", app.http_addr()),
    ])
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("demo app JSON ({e}): {}", describe(&out)));
    assert_eq!(body["path"], "/via-connect", "{body}");

    let lines = wait_log_lines(&web_log, "TCP", 2).await;
    let line = lines
        .iter()
        .find(|l| l["authority"] == echo.to_string())
        .unwrap_or_else(|| panic!("no tunnel line for {echo}: {lines:?}"));
    assert_eq!(line["method"], "CONNECT", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["upstream"], echo.to_string(), "{line}");
    assert!(line["bytes_received"].as_u64().unwrap_or(0) > 30, "{line}");
    assert_eq!(line["bytes_received"], line["bytes_sent"], "{line}");
    let m = web
        .wait_metric(
            "weft_tunnels_total",
            &[("direction", "outbound"), ("kind", "connect")],
            2.0,
        )
        .await;
    assert!(
        m.sum(
            "weft_tunnel_bytes_total",
            &[("kind", "connect"), ("flow", "tx")]
        ) > 30.0
    );
    assert_eq!(m.sum("weft_egress_denied_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_deny_refuses_connect_to_unknown_destinations() {
    let (echo, _echo_task) = head_echo(next_loopback_ip()).await;
    let (known, _known_task) = head_echo(next_loopback_ip()).await;
    // `legacy` is a service outside the mesh with a static endpoint: a known destination.
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &format!(
            "mesh:\n  egress: {{unknown: deny}}\nservices:\n  - name: web\n  - name: legacy\n    \
             endpoints:\n      - address: {known}\n"
        ),
    );
    let cp = secure_cp(&policies).await;
    let web = Proxy::start_with(caller_proxy_config(&cp, "web", "web-1")).await;
    web.wait_endpoint(known, true).await;
    let outbound = format!("http://{}", web.outbound_addr());
    let connect = |target: SocketAddr| {
        vec![
            "-sS".into(),
            "--http0.9".into(),
            "--max-time".into(),
            "15".into(),
            "-p".into(),
            "-x".into(),
            outbound.clone(),
            "-w".into(),
            "\n%{http_connect}".into(),
            format!("http://{target}/x"),
        ]
    };

    let out = run_curl(&connect(echo)).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), "403", "{}", describe(&out));
    let m = web
        .wait_metric("weft_egress_denied_total", &[("via", "connect")], 1.0)
        .await;
    assert_eq!(
        m.sum("weft_tunnels_total", &[("kind", "connect")]),
        0.0,
        "{}",
        m.lines_for("weft_tunnels_total")
    );

    let out = run_curl(&connect(known)).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("GET /x HTTP/1.1\r\n"),
        "{}",
        describe(&out)
    );
    let m = web.metrics().await;
    assert_eq!(
        m.sum("weft_egress_denied_total", &[("via", "connect")]),
        1.0
    );
}

/// The demo app's own TCP echo works through CONNECT too (it echoes until the client
/// half-closes, which curl never does: a raw client here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reaches_the_demo_tcp_echo_with_half_close() {
    let policies = PolicyDir::with_file("mesh.yaml", "services:\n  - name: web\n");
    let cp = secure_cp(&policies).await;
    let app = DemoApp::start_with(DemoAppConfig::new("echo", "echo-1").with_tcp()).await;
    let web = Proxy::start_with(caller_proxy_config(&cp, "web", "web-1")).await;
    let target = app.tcp_addr();
    let mut s = TcpStream::connect(web.outbound_addr())
        .await
        .expect("connect to web's outbound listener");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Bounded: a head longer than 4 KiB is a failure anyway.
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        let n = tokio::time::timeout(STEP, s.read(&mut byte))
            .await
            .expect("the CONNECT answer within the step limit")
            .expect("read");
        assert_eq!(n, 1, "closed during the CONNECT answer: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let payload = pattern(200_000, 5);
    let (mut r, mut w) = s.into_split();
    let send = async {
        w.write_all(&payload).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let recv = async {
        let mut got = Vec::new();
        tokio::time::timeout(STEP, r.read_to_end(&mut got))
            .await
            .expect("the echo and its end within the step limit")
            .expect("read");
        got
    };
    let ((), got) = tokio::join!(send, recv);
    assert!(got == payload, "echo differs: {} bytes back", got.len());
}
