//! HTTP/1.1 and HTTP/2 (h2c) through the caller's outbound sidecar, the callee's inbound sidecar,
//! to the demo app; and the README demo (`web` calls `api` through its own sidecar).

use http::{Method, Version};
use weft_e2e::{
    caller_proxy, http_services_yaml, instance_of, wait_for_instance, wait_metric_at_least,
    Instance,
};
use weft_testkit::{ControlPlane, DemoApp, DemoAppConfig, PolicyDir, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_crosses_both_sidecars() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    let r = client
        .request(Method::GET, "api", "/hello?x=1", &[("x-test", "yes")], "")
        .await
        .expect("GET http://api/hello through web's sidecar");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(instance_of(&r), "api-1");
    let body = r.json();
    assert_eq!(body["service"], "api", "{body}");
    assert_eq!(body["method"], "GET", "{body}");
    assert_eq!(body["path"], "/hello", "{body}");
    assert_eq!(body["query"], "x=1", "{body}");
    assert_eq!(
        body["version"], "HTTP/1.1",
        "the app must see HTTP/1.1: {body}"
    );
    assert_eq!(
        body["headers"]["x-test"], "yes",
        "request headers must reach the app: {body}"
    );
    let host = body["host"].as_str().unwrap_or_default();
    assert!(
        host == "api" || host.starts_with("api:"),
        "the app sees Host {host:?}: {body}"
    );

    // A body of 1 MiB goes up and comes back unchanged.
    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let r = client
        .request(
            Method::POST,
            "api",
            "/echo",
            &[("content-type", "application/octet-stream")],
            payload.clone(),
        )
        .await
        .expect("POST http://api/echo");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.body.len(), payload.len(), "echoed body length");
    assert!(r.body[..] == payload[..], "echoed body differs");

    // The app's own statuses pass through untouched (no proxy error header).
    let r = client
        .get("api", "/status/418")
        .await
        .expect("GET /status/418");
    assert_eq!(r.status, 418, "{}", r.summary());
    assert_eq!(instance_of(&r), "api-1");
    assert_eq!(r.header("x-weft-error"), None, "{}", r.summary());

    // Every host name of the service routes to it (lower-cased, port stripped).
    for host in [
        "api.default",
        "api.default.svc",
        "api.default.svc.cluster.local",
        "API:8080",
        "api.default.svc.cluster.local:80",
    ] {
        let r = client
            .get(host, "/")
            .await
            .unwrap_or_else(|e| panic!("GET http://{host}/: {e:#}"));
        assert_eq!(r.status, 200, "Host {host}: {}", r.summary());
        assert_eq!(instance_of(&r), "api-1", "Host {host}");
    }

    // Both sidecars counted the requests.
    wait_metric_at_least(
        "web's sidecar counts outbound requests to api",
        "weft_requests_total",
        &[
            ("direction", "outbound"),
            ("cluster", "api.default"),
            ("code", "200"),
        ],
        6.0,
        async || web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "api's sidecar counts inbound requests",
        "weft_requests_total",
        &[("direction", "inbound"), ("code", "418")],
        1.0,
        async || api.proxy.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "the code class rides along the code",
        "weft_requests_total",
        &[
            ("direction", "inbound"),
            ("code", "418"),
            ("code_class", "4xx"),
        ],
        1.0,
        async || api.proxy.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "web's sidecar times response headers of the outbound requests",
        "weft_response_headers_duration_seconds_count",
        &[("direction", "outbound"), ("cluster", "api.default")],
        6.0,
        async || web.metrics().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_cross_both_sidecars() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.h2c();
    wait_for_instance(&client, "api", "/", "api-1").await;

    let r = client
        .get("api", "/h2?y=2")
        .await
        .expect("h2c GET http://api/h2");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(
        r.version,
        Version::HTTP_2,
        "the sidecar must answer h2c with HTTP/2"
    );
    let body = r.json();
    assert_eq!(body["service"], "api", "{body}");
    assert_eq!(body["path"], "/h2", "{body}");
    let host = body["host"].as_str().unwrap_or_default();
    assert!(
        host == "api" || host.starts_with("api:"),
        "the app sees authority {host:?}: {body}"
    );

    let payload: Vec<u8> = (0..300_000usize).map(|i| (i % 253) as u8).collect();
    let r = client
        .request(Method::POST, "api", "/echo", &[], payload.clone())
        .await
        .expect("h2c POST http://api/echo");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        r.body[..] == payload[..],
        "echoed h2 body differs ({} bytes back)",
        r.body.len()
    );

    // Concurrent streams on the one h2 connection, each with its own answer.
    let requests = (0..20).map(|i| {
        let client = client.clone();
        async move { (i, client.get("api", &format!("/stream/{i}")).await) }
    });
    for (i, r) in futures::future::join_all(requests).await {
        let r = r.unwrap_or_else(|e| panic!("concurrent h2 request {i}: {e:#}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.summary());
        assert_eq!(r.json()["path"], format!("/stream/{i}"));
    }
}

/// The README demo: `web` (a demo app) calls `api` through its own outbound sidecar; the test
/// calls `web` through web's inbound sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_app_calls_api_through_its_sidecar() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;

    let web_proxy_config = weft_e2e::caller_proxy_config(&cp, "web", "web-1");
    let web_app = DemoApp::start_with(
        DemoAppConfig::new("web", "web-1").with_outbound(web_proxy_config.outbound),
    )
    .await;
    let mut cfg = web_proxy_config;
    cfg.app = web_app.http_addr();
    let web = Proxy::start_with(cfg).await;

    let inbound = weft_testkit::HttpClient::h1(web.inbound_addr());
    let what = "web's app, called through web's inbound sidecar, gets 200 from api through web's outbound sidecar";
    let r = weft_testkit::wait_until(weft_testkit::DEFAULT_WAIT, what, async || {
        let r = inbound
            .get("web", "/call?url=http%3A%2F%2Fapi%2Fhello")
            .await?;
        let body = r.json();
        if r.status == 200 && body["status"] == 200 {
            Ok(body)
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await;
    assert_eq!(r["body"]["service"], "api", "{r}");
    assert_eq!(r["body"]["instance"], "api-1", "{r}");
    assert_eq!(r["body"]["path"], "/hello", "{r}");
    assert_eq!(r["headers"]["x-demo-instance"], "api-1", "{r}");
}

/// Several clients at once, HTTP/1.1 and h2c mixed: a bounded burst with no errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_no_errors() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api1 = Instance::http(&cp, "api", "api-1").await;
    let _api2 = Instance::http(&cp, "api", "api-2").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-2").await;

    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 50;
    let runs = (0..CLIENTS).map(|i| {
        let client = if i % 2 == 0 { web.http1() } else { web.h2c() };
        async move { weft_e2e::tally(&client, "api", &format!("/client/{i}"), PER_CLIENT).await }
    });
    let mut total = 0;
    for (i, t) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(t.errors.is_empty(), "client {i}: {:?}", t.errors);
        total += t.count("api-1") + t.count("api-2");
    }
    assert_eq!(total, CLIENTS * PER_CLIENT);
}

/// Writes `req` on `conn` and reads one response (head + `Content-Length` body); `None` if the
/// connection closed first.
async fn exchange(conn: &mut tokio::net::TcpStream, req: &[u8]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(req).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(text);
            }
        }
    }
}

/// An idle HTTP/1.1 keep-alive connection hibernates (hyper's buffers released, the socket
/// kept) and serves its next request as if nothing happened; a connection that stalls in the
/// middle of a request head is not hibernated under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hibernate_and_wake() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    let hibernated = async || {
        web.metrics()
            .await
            .sum("weft_http_connections_hibernated_total", &[])
    };
    let before = hibernated().await;

    let get = b"GET /hello HTTP/1.1\r\nhost: api\r\n\r\n";
    let mut conn = tokio::net::TcpStream::connect(web.outbound_addr())
        .await
        .expect("connect to web's outbound listener");
    let r = exchange(&mut conn, get).await.expect("first response");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // Idle: the connection hibernates (after about a second)...
    wait_metric_at_least(
        "the idle keep-alive connection hibernates",
        "weft_http_connections_hibernated_total",
        &[],
        before + 1.0,
        async || web.metrics().await,
    )
    .await;
    // ...and the same connection serves the next requests.
    for i in 0..3 {
        let r = exchange(&mut conn, get)
            .await
            .unwrap_or_else(|| panic!("request {i} after hibernation: connection closed"));
        assert!(r.starts_with("HTTP/1.1 200"), "request {i}: {r}");
        assert!(r.contains("api-1"), "request {i}: {r}");
    }
    // Pipelined: two requests in one write, two responses.
    let two = [&get[..], &get[..]].concat();
    let r = exchange(&mut conn, &two)
        .await
        .expect("pipelined responses");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // A request head that stalls half-way for longer than the hibernation delay: the bytes
    // already read must not be dropped by a hibernation.
    wait_metric_at_least(
        "the connection hibernates again",
        "weft_http_connections_hibernated_total",
        &[],
        before + 2.0,
        async || web.metrics().await,
    )
    .await;
    use tokio::io::AsyncWriteExt;
    conn.write_all(b"GET /hello HTTP/1.1\r\nho")
        .await
        .expect("first half of a head");
    let at_stall = hibernated().await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        hibernated().await,
        at_stall,
        "no hibernation in the middle of a request head"
    );
    let r = exchange(&mut conn, b"st: api\r\n\r\n")
        .await
        .expect("response to the completed head");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

/// Reads a response to `GET /bytes/{len}` on `conn`: the head and a first chunk, then stalls for
/// `stall`, then the rest; returns how many body bytes arrived before the connection ended.
async fn read_after_stall(
    mut conn: tokio::net::TcpStream,
    len: usize,
    stall: std::time::Duration,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("GET /bytes/{len} HTTP/1.1\r\nhost: api\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = conn.read(&mut buf).await.expect("first bytes");
    let head_end = buf[..got]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the response head in the first read")
        + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    got -= head_end;
    tokio::time::sleep(stall).await;
    while got < len {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the rest of the body within 10 s")
            .expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    got
}

/// A client that stops reading a large response for longer than the hibernation delay gets all
/// of it: a connection whose response is still being flushed never hibernates (hyper's unsent
/// bytes would be dropped with its buffers). Several sizes, so that for some of them the
/// response has ended upstream while its tail still waits in web's sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_its_whole_response_across_the_hibernation_delay() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;

    let sizes = [
        1usize << 20,
        4 << 20,
        8 << 20,
        12 << 20,
        16 << 20,
        24 << 20,
        32 << 20,
    ];
    let mut readers = Vec::new();
    for len in sizes {
        let conn = tokio::net::TcpStream::connect(web.outbound_addr())
            .await
            .expect("connect to web's outbound listener");
        readers.push(tokio::spawn(read_after_stall(
            conn,
            len,
            std::time::Duration::from_millis(3000),
        )));
    }
    for (len, reader) in sizes.into_iter().zip(readers) {
        let got = reader.await.expect("reader task");
        assert_eq!(got, len, "a {len}-byte response arrived cut");
    }
}
