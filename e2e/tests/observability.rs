//! Access logs and distributed tracing with real processes: the test's client -> `web`'s sidecar
//! (outbound) -> `api`'s sidecar (inbound) -> the demo app, with a local OTLP collector (a tonic
//! `opentelemetry.proto.collector.trace.v1.TraceService` in this file) receiving both sidecars'
//! spans.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http::Method;
use weft_e2e::{
    caller_proxy_config, caller_proxy_config_on, http_services_yaml, wait_for_instance, Instance,
};
use weft_proto::otlp::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use weft_proto::otlp::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use weft_proto::otlp::common::v1::any_value::Value;
use weft_proto::otlp::trace::v1::{span::SpanKind, Span};
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, DemoApp, HttpResponse, PolicyDir, Proxy,
    ProxyConfig, DEFAULT_WAIT,
};

/// A span as the collector received it, with its resource's `service.name`.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    }

    fn attr_str(&self, key: &str) -> String {
        match self.attr(key) {
            Some(Value::StringValue(s)) => s,
            other => format!("{other:?}"),
        }
    }

    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }
}

/// The OTLP/gRPC collector: stores every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free loopback port until the returned task is aborted.
    async fn start() -> (Collector, SocketAddr, tokio::task::JoinHandle<()>) {
        Self::start_on(free_addr(next_loopback_ip()), None).await
    }

    /// Serves on `addr`, over TLS with `tls` = (certificate PEM, key PEM) when given.
    async fn start_on(
        addr: SocketAddr,
        tls: Option<(String, String)>,
    ) -> (Collector, SocketAddr, tokio::task::JoinHandle<()>) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("collector cannot bind {addr}: {e}"));
        let service = TraceServiceServer::new(collector.clone());
        let task = tokio::spawn(async move {
            let incoming = futures::stream::unfold(listener, |l| async move {
                let accepted = l.accept().await.map(|(s, _)| s);
                Some((accepted, l))
            });
            let mut server = tonic::transport::Server::builder();
            if let Some((cert, key)) = tls {
                server = server
                    .tls_config(
                        tonic::transport::ServerTlsConfig::new()
                            .identity(tonic::transport::Identity::from_pem(cert, key)),
                    )
                    .expect("collector TLS config");
            }
            if let Err(e) = server
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("collector stopped: {e}");
            }
        });
        (collector, addr, task)
    }

    /// Waits until spans of `trace_id` from `n` distinct (service, kind) pairs arrived.
    async fn wait_trace(&self, trace_id: &[u8], n: usize) -> Vec<Received> {
        let what = format!(
            "the collector received {n} spans of trace {}",
            hex(trace_id)
        );
        wait_until(DEFAULT_WAIT, &what, async || {
            let spans: Vec<Received> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.span.trace_id == trace_id)
                .cloned()
                .collect();
            if spans.len() >= n {
                Ok(spans)
            } else {
                Err(format!("{} so far: {spans:?}", spans.len()))
            }
        })
        .await
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `(trace id, parent id, flags)` of a `traceparent` value.
fn traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {v:?}");
    assert_eq!(parts[0], "00", "traceparent {v:?}");
    assert_eq!(parts[1].len(), 32, "traceparent {v:?}");
    assert_eq!(parts[2].len(), 16, "traceparent {v:?}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// Starts a proxy from `config` with `extra` appended to its bootstrap.
async fn proxy_with(mut config: ProxyConfig, extra: &str) -> Proxy {
    config.resolve_security();
    let yaml = format!("{}{extra}", config.to_yaml());
    let mut proxy = Proxy::spawn_yaml(config, &yaml);
    proxy.wait_ready().await;
    proxy
}

fn q(p: &Path) -> String {
    serde_json::Value::from(p.display().to_string()).to_string()
}

/// Lines of an access log file (empty when missing).
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The JSON access log lines of `path` whose path is `req_path`, waiting (bounded) for `n`.
async fn wait_log_lines(file: &Path, req_path: &str, n: usize) -> Vec<serde_json::Value> {
    let what = format!("{} has {n} lines for {req_path}", file.display());
    wait_until(DEFAULT_WAIT, &what, async || {
        let lines: Vec<serde_json::Value> = log_lines(file)
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}"))
            })
            .filter(|v| v["path"] == req_path)
            .collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{} so far", lines.len()))
        }
    })
    .await
}

fn header<'a>(body: &'a serde_json::Value, name: &str) -> &'a str {
    match &body["headers"][name] {
        serde_json::Value::String(s) => s,
        serde_json::Value::Array(a) => a.first().and_then(|v| v.as_str()).unwrap_or(""),
        _ => "",
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_access_logs_across_two_sidecars() {
    let (collector, collector_addr, collector_task) = Collector::start().await;
    let logs = tempfile_dir();
    let api_log = logs.join("api-access.log");
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;

    // api: access log (JSON file) of its inbound listener; starts a trace for every request
    // that arrives without one.
    let app = DemoApp::start("api", "api-1").await;
    let api = proxy_with(
        ProxyConfig::new(&cp.grpc_url(), "api", "api-1", app.http_addr()),
        &format!(
            "observability:\n  access_log: {{listeners: [inbound], format: json, path: {}}}\n  \
             tracing: {{sampling: 1.0, otlp_endpoint: \"http://{collector_addr}\"}}\n",
            q(&api_log)
        ),
    )
    .await;
    // web: access log to stdout, spans exported, never starts traces (sampling 0).
    let web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &format!(
            "observability:\n  access_log: {{path: stdout}}\n  tracing: {{sampling: 0.0, \
             otlp_endpoint: \"http://{collector_addr}\", service_name: web-frontend}}\n"
        ),
    )
    .await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    // 1. A sampled traceparent from the client, with tracestate and B3 headers.
    let sent_tp = format!("00-{TRACE_ID}-{CLIENT_PARENT}-01");
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
    let r = client
        .request(
            Method::GET,
            "api",
            "/traced?q=1",
            &[
                ("traceparent", sent_tp.as_str()),
                ("tracestate", "vendor=abc,other=xyz"),
                ("b3", b3),
                ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
                ("x-b3-sampled", "1"),
            ],
            "",
        )
        .await
        .expect("GET http://api/traced through web's sidecar");
    assert_eq!(r.status, 200, "{}", r.summary());
    let body = r.json();
    let (app_trace, app_parent, app_flags) = traceparent(header(&body, "traceparent"));
    assert_eq!(app_trace, TRACE_ID, "the trace id reaches the app: {body}");
    assert_eq!(app_flags, "01", "{body}");
    assert_ne!(
        app_parent, CLIENT_PARENT,
        "each hop sets its own span as parent: {body}"
    );
    assert_eq!(
        header(&body, "tracestate"),
        "vendor=abc,other=xyz",
        "{body}"
    );
    assert_eq!(header(&body, "b3"), b3, "{body}");
    assert_eq!(
        header(&body, "x-b3-traceid"),
        "80f198ee56343ba864fe8b2a57d3eff7",
        "{body}"
    );
    assert_eq!(header(&body, "x-b3-spanid"), "e457b5a2e4d86bd1", "{body}");
    assert_eq!(header(&body, "x-b3-sampled"), "1", "{body}");

    // Both sidecars' spans reach the collector, linked: client request -> web CLIENT span ->
    // api SERVER span -> the app.
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let spans = collector.wait_trace(&trace_bytes, 2).await;
    assert_eq!(spans.len(), 2, "one span per hop: {spans:#?}");
    let client_span = spans
        .iter()
        .find(|s| s.kind() == SpanKind::Client)
        .unwrap_or_else(|| panic!("no CLIENT span: {spans:#?}"));
    let server_span = spans
        .iter()
        .find(|s| s.kind() == SpanKind::Server)
        .unwrap_or_else(|| panic!("no SERVER span: {spans:#?}"));
    assert_eq!(client_span.service, "web-frontend", "{client_span:?}");
    assert_eq!(
        server_span.service, "api",
        "default service.name: {server_span:?}"
    );
    assert_eq!(
        hex(&client_span.span.parent_span_id),
        CLIENT_PARENT,
        "web's span is a child of the client's: {client_span:?}"
    );
    assert_eq!(
        server_span.span.parent_span_id, client_span.span.span_id,
        "api's SERVER span is a child of web's CLIENT span: {spans:#?}"
    );
    assert_eq!(
        hex(&server_span.span.span_id),
        app_parent,
        "the app's parent is api's span"
    );
    assert_eq!(server_span.span.trace_state, "vendor=abc,other=xyz");
    for s in [client_span, server_span] {
        assert_eq!(s.attr_str("http.request.method"), "GET", "{s:?}");
        assert_eq!(s.attr_str("url.path"), "/traced", "{s:?}");
        assert_eq!(
            s.attr("http.response.status_code"),
            Some(Value::IntValue(200)),
            "{s:?}"
        );
        assert!(s.attr_str("server.address").starts_with("api"), "{s:?}");
        assert!(
            s.span.end_time_unix_nano >= s.span.start_time_unix_nano,
            "{s:?}"
        );
    }
    assert_eq!(client_span.attr_str("weft.cluster"), "api.default");
    assert_eq!(client_span.attr_str("weft.route"), "default-api.default");
    assert_eq!(
        client_span.attr_str("weft.upstream.address"),
        api.inbound_addr().to_string()
    );
    assert_eq!(server_span.attr_str("weft.cluster"), "inbound");
    assert_eq!(
        server_span.attr_str("weft.upstream.address"),
        app.http_addr().to_string()
    );
    // The server span starts after the client span and ends before it.
    assert!(server_span.span.start_time_unix_nano >= client_span.span.start_time_unix_nano);
    assert!(server_span.span.end_time_unix_nano <= client_span.span.end_time_unix_nano);

    // 2. No traceparent: web does not start a trace (outbound), api does (sampling 1.0).
    let r = client
        .get("api", "/untraced")
        .await
        .expect("GET http://api/untraced");
    assert_eq!(r.status, 200, "{}", r.summary());
    let body = r.json();
    let (trace, parent, flags) = traceparent(header(&body, "traceparent"));
    assert_eq!(flags, "01", "{body}");
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let spans = collector.wait_trace(&trace_bytes, 1).await;
    assert_eq!(spans.len(), 1, "only api's sidecar traced it: {spans:#?}");
    assert_eq!(spans[0].kind(), SpanKind::Server);
    assert!(
        spans[0].span.parent_span_id.is_empty(),
        "a new root: {spans:?}"
    );
    assert_eq!(hex(&spans[0].span.span_id), parent);

    // 3. Access logs: one JSON line per request with the documented fields.
    for i in 0..3 {
        let r = client
            .get("api", &format!("/logged/{i}"))
            .await
            .expect("GET /logged");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    let r = client
        .get("nowhere", "/logged/none")
        .await
        .expect("GET http://nowhere");
    assert_eq!(r.status, 404, "{}", r.summary());
    for i in 0..3 {
        let lines = wait_log_lines(&api_log, &format!("/logged/{i}"), 1).await;
        assert_eq!(lines.len(), 1, "one line per request: {lines:?}");
        let v = &lines[0];
        assert_eq!(v["method"], "GET", "{v}");
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["response_flags"], "-", "{v}");
        assert_eq!(v["listener"], "inbound", "{v}");
        assert_eq!(v["cluster"], "inbound", "{v}");
        assert_eq!(v["upstream"], app.http_addr().to_string(), "{v}");
        assert_eq!(v["retries"], 0, "{v}");
        assert!(
            v["authority"].as_str().unwrap_or("").starts_with("api"),
            "{v}"
        );
        assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{v}");
        assert!(v["response_duration_ms"].is_number(), "{v}");
        assert!(
            v["trace_id"].as_str().is_some_and(|t| t.len() == 32),
            "api started a trace: {v}"
        );
        assert!(
            v["start_time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{v}"
        );
        assert!(v.get("peer_identity").is_some(), "{v}");
    }
    // The traced request's line carries the client's trace id.
    let traced = wait_log_lines(&api_log, "/traced?q=1", 1).await;
    assert_eq!(traced[0]["trace_id"], TRACE_ID, "{}", traced[0]);
    // web logs to stdout (its process log), its outbound lines included; the 404 is NR.
    let what = "web's stdout has the access log lines of /logged/2 and the 404";
    let web_lines = wait_until(DEFAULT_WAIT, what, async || {
        let lines: Vec<serde_json::Value> = web
            .process
            .log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let has = |p: &str| lines.iter().any(|v| v["path"] == p);
        if has("/logged/2") && has("/logged/none") {
            Ok(lines)
        } else {
            Err(format!("{} JSON lines", lines.len()))
        }
    })
    .await;
    let logged2: Vec<_> = web_lines
        .iter()
        .filter(|v| v["path"] == "/logged/2")
        .collect();
    assert_eq!(logged2.len(), 1, "{logged2:?}");
    assert_eq!(logged2[0]["listener"], "outbound");
    assert_eq!(logged2[0]["cluster"], "api.default");
    assert_eq!(logged2[0]["route"], "default-api.default");
    assert_eq!(logged2[0]["upstream"], api.inbound_addr().to_string());
    let nr = web_lines
        .iter()
        .find(|v| v["path"] == "/logged/none")
        .unwrap();
    assert_eq!(nr["status"], 404, "{nr}");
    assert_eq!(nr["response_flags"], "NR", "{nr}");
    let traced = web_lines
        .iter()
        .find(|v| v["path"] == "/traced?q=1")
        .expect("web logged the traced request");
    assert_eq!(traced["trace_id"], TRACE_ID, "{traced}");

    // Nothing was dropped.
    let m = web.metrics().await;
    assert_eq!(m.sum("weft_access_log_dropped_total", &[]), 0.0);
    let m = api.metrics().await;
    assert!(m.sum("weft_trace_spans_exported_total", &[]) >= 2.0);
    collector_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_writes_nothing() {
    let logs = tempfile_dir();
    let file = logs.join("inbound-only.log");
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let app = DemoApp::start("api", "api-1").await;
    // No observability section: the access log is off.
    let api = proxy_with(
        ProxyConfig::new(&cp.grpc_url(), "api", "api-1", app.http_addr()),
        "",
    )
    .await;
    // An access log for the inbound listener only: outbound requests are not logged.
    let web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &format!(
            "observability:\n  access_log: {{listeners: [inbound], path: {}}}\n",
            q(&file)
        ),
    )
    .await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let tp = format!("00-{TRACE_ID}-{CLIENT_PARENT}-01");
    for i in 0..5 {
        let r: HttpResponse = client
            .request(
                Method::GET,
                "api",
                &format!("/quiet/{i}"),
                &[("traceparent", tp.as_str())],
                "",
            )
            .await
            .expect("GET /quiet");
        assert_eq!(r.status, 200, "{}", r.summary());
        // Without `tracing` the traceparent passes through untouched.
        assert_eq!(header(&r.json(), "traceparent"), tp);
    }
    // Give a (wrongly) queued line time to be written before checking there is none.
    tokio::time::sleep(weft_e2e::SETTLE).await;
    assert!(file.exists(), "the configured file is created at start");
    assert_eq!(log_lines(&file), Vec::<String>::new());
    for p in [&web, &api] {
        let json_lines = p
            .process
            .log()
            .lines()
            .filter(|l| l.contains("\"/quiet/"))
            .count();
        assert_eq!(json_lines, 0, "{} logged requests", p.id());
    }
}

/// A temp dir that lives for the test process (kept for post-mortem on failure).
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "weft-observability-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// SIGTERM right after a burst of requests: the sidecar drains, then writes every queued access
/// log line before it exits (the writer thread batches every 50ms, so the last requests' lines
/// would otherwise go with the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_access_log() {
    let logs = tempfile_dir();
    let file = logs.join("all.log");
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let mut web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &format!(
            "observability:\n  access_log: {{format: json, path: {}}}\n",
            q(&file)
        ),
    )
    .await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    const N: usize = 30;
    for i in 0..N {
        let r = client
            .get("api", &format!("/last/{i}"))
            .await
            .expect("GET /last");
        assert_eq!(r.status, 200, "{}", r.summary());
    }
    drop(client);
    let status = tokio::task::block_in_place(|| web.process.stop());
    assert!(
        status.is_some_and(|s| s.success()),
        "the sidecar exits cleanly on SIGTERM: {status:?}"
    );
    let logged = log_lines(&file)
        .iter()
        .filter(|l| l.contains("\"/last/"))
        .count();
    assert_eq!(logged, N, "every request's line is in the access log");
}

/// TCP connections get one access log line each when they end: protocol `TCP`, the endpoint,
/// the cluster and the bytes each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_access_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let logs = tempfile_dir();
    let file = logs.join("tcp.log");
    let web_ip = next_loopback_ip();
    let port = weft_testkit::free_port(web_ip);
    let policies = PolicyDir::with_file(
        "tcp.yaml",
        &format!(
            "services:\n  - name: web\n  - name: store\n    protocol: tcp\n    port: {port}\n"
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let store = Instance::tcp(&cp, "store", "store-1").await;
    let web = proxy_with(
        caller_proxy_config_on(&cp, web_ip, "web", "web-1"),
        &format!(
            "observability:\n  access_log: {{format: json, path: {}}}\n",
            q(&file)
        ),
    )
    .await;
    web.wait_endpoint(store.endpoint(), true).await;

    let mut conn = tokio::net::TcpStream::connect((web_ip, port))
        .await
        .expect("connect to web's TCP listener");
    conn.write_all(b"hello tcp").await.expect("write");
    conn.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut echoed),
    )
    .await
    .expect("echo within 10 s")
    .expect("read");
    assert_eq!(echoed, b"hello tcp");
    drop(conn);

    let line = wait_until(DEFAULT_WAIT, "a TCP access log line", async || {
        log_lines(&file)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .find(|v| v["protocol"] == "TCP")
            .ok_or_else(|| format!("{:?}", log_lines(&file)))
    })
    .await;
    assert_eq!(line["cluster"], "store.default", "{line}");
    assert_eq!(line["direction"], "outbound", "{line}");
    assert_eq!(line["upstream"], store.endpoint().to_string(), "{line}");
    assert_eq!(line["bytes_received"], 9, "{line}");
    assert_eq!(line["bytes_sent"], 9, "{line}");
    assert_eq!(line["response_flags"], "-", "{line}");
}

/// Spans go to an `https://` collector, verified with `otlp_ca_file` (a self-signed certificate
/// for the collector's IP made with openssl).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_export_to_a_tls_collector() {
    let dir = tempfile_dir();
    let ip = next_loopback_ip();
    weft_testkit::security::openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "collector.key",
            "-out",
            "collector.pem",
            "-days",
            "1",
            "-subj",
            "/CN=otel-collector",
            "-addext",
            &format!("subjectAltName=IP:{ip}"),
            // A server certificate, not a CA: webpki refuses a CA used as an end entity.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
    );
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("reading {f}: {e}"))
    };
    let (collector, collector_addr, collector_task) = Collector::start_on(
        free_addr(ip),
        Some((read("collector.pem"), read("collector.key"))),
    )
    .await;

    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = proxy_with(
        caller_proxy_config(&cp, "web", "web-1"),
        &format!(
            "observability:\n  tracing: {{sampling: 1.0, otlp_endpoint: \"https://{collector_addr}\", \
             otlp_ca_file: {}}}\n",
            q(&dir.join("collector.pem"))
        ),
    )
    .await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let tp = format!("00-{TRACE_ID}-{CLIENT_PARENT}-01");
    let r = client
        .request(
            Method::GET,
            "api",
            "/tls-traced",
            &[("traceparent", tp.as_str())],
            "",
        )
        .await
        .expect("GET /tls-traced");
    assert_eq!(r.status, 200, "{}", r.summary());
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&TRACE_ID[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let spans = collector.wait_trace(&trace_id, 1).await;
    assert!(
        spans
            .iter()
            .any(|s| s.attr_str("url.path") == "/tls-traced"),
        "{spans:#?}"
    );
    collector_task.abort();
}
