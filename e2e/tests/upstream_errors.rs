//! Errors the proxy generates: each carries `x-weft-error` and a one-line body
//! (ARCHITECTURE.md, "Proxy request path").

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use weft_e2e::{caller_proxy, wait_for_instance, wait_metric_at_least, Instance};
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, HttpClient, HttpResponse, PolicyDir,
    DEFAULT_WAIT,
};

/// Waits until `GET http://<host><path>` answers `status` with `x-weft-error: <error>`.
async fn wait_for_error(
    client: &HttpClient,
    host: &str,
    path: &str,
    status: u16,
    error: &str,
) -> HttpResponse {
    let what = format!("GET http://{host}{path} answers {status} with x-weft-error: {error}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let r = client.get(host, path).await?;
        if r.status == status && r.header("x-weft-error") == Some(error) {
            Ok(r)
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_503_connect_failed() {
    // A static endpoint on a port nothing listens on.
    let closed: SocketAddr = free_addr(next_loopback_ip());
    let policy = format!(
        "services:\n  - name: web\n  - name: dead\n    connect_timeout: 500ms\n    endpoints:\n      - address: {closed}\n"
    );
    let policies = PolicyDir::with_file("dead.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();

    let r = wait_for_error(&client, "dead", "/", 503, "connect-failed").await;
    assert!(
        r.text().contains(&closed.to_string()),
        "the body names the peer {closed}: {:?}",
        r.text()
    );
    assert!(
        r.text().trim_end().lines().count() <= 1,
        "a one-line body: {:?}",
        r.text()
    );
    // Also over h2c.
    let r = web
        .h2c()
        .get("dead", "/")
        .await
        .expect("h2c GET http://dead/");
    assert_eq!(r.status, 503, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-error"),
        Some("connect-failed"),
        "{}",
        r.summary()
    );

    wait_metric_at_least(
        "web's sidecar counts connect errors to dead",
        "weft_upstream_connect_errors_total",
        &[("cluster", "dead.default")],
        2.0,
        async || web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "web's sidecar counts the 503s",
        "weft_requests_total",
        &[
            ("direction", "outbound"),
            ("cluster", "dead.default"),
            ("code", "503"),
        ],
        2.0,
        async || web.metrics().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_no_endpoints_timeout_and_reset() {
    // `reset` is a static endpoint that accepts, reads a little and closes without answering.
    let reset_listener = TcpListener::bind((next_loopback_ip(), 0))
        .await
        .expect("bind the resetting upstream");
    let reset_addr = reset_listener.local_addr().expect("local addr");
    let resetter = tokio::spawn(async move {
        // Bounded: the test makes a handful of requests.
        for _ in 0..200 {
            let Ok((mut s, _)) = reset_listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let policy = format!(
        "\
services:
  - name: web
  - name: api
  - name: lonely
  - name: reset
    endpoints:
      - address: {reset_addr}
routes:
  - name: api-slow
    service: api
    match:
      path: {{prefix: /delay}}
    destinations:
      - {{service: api, weight: 100}}
    timeout: 300ms
"
    );
    let policies = PolicyDir::with_file("errors.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    let r = client
        .get("no-such-service", "/")
        .await
        .expect("GET http://no-such-service/");
    assert_eq!(r.status, 404, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-error"),
        Some("no-route"),
        "{}",
        r.summary()
    );

    let r = client.get("lonely", "/").await.expect("GET http://lonely/");
    assert_eq!(r.status, 503, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-error"),
        Some("no-endpoints"),
        "{}",
        r.summary()
    );

    let r = client
        .get("api", "/delay/5000")
        .await
        .expect("GET http://api/delay/5000");
    assert_eq!(r.status, 504, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-error"),
        Some("request-timeout"),
        "{}",
        r.summary()
    );
    assert_eq!(
        r.header("x-weft-timeout"),
        Some("request"),
        "{}",
        r.summary()
    );
    let r = client
        .get("api", "/delay/10")
        .await
        .expect("GET http://api/delay/10");
    assert_eq!(
        r.status,
        200,
        "a fast request on the same route: {}",
        r.summary()
    );

    let r = client.get("reset", "/").await.expect("GET http://reset/");
    assert_eq!(r.status, 502, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-error"),
        Some("upstream-reset"),
        "{}",
        r.summary()
    );

    // After all that, normal traffic is fine.
    let r = client.get("api", "/").await.expect("GET http://api/");
    assert_eq!(r.status, 200, "{}", r.summary());
    resetter.abort();
}
