//! The sidecar's own connection caps with real processes: a flood of connections on a listener
//! past `limits.max_connections_per_listener` is closed at accept and counted, while the
//! connections already open keep being served and new ones work once the flood is gone; the
//! admin server's cap and header-read timeout hold the same way.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::{caller_proxy_config, wait_for_instance, Instance};
use weft_testkit::{wait_until, ControlPlane, HttpClient, PolicyDir, Proxy, DEFAULT_WAIT};

/// Opens up to `n` connections to `addr` (stops at the first refused connect) and counts how many
/// the server closed within `within` each; returns them (still open ones stay open).
async fn flood(addr: std::net::SocketAddr, n: usize, within: Duration) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::new();
    for _ in 0..n {
        match TcpStream::connect(addr).await {
            Ok(c) => conns.push(c),
            Err(_) => break,
        }
    }
    let mut closed = 0;
    for c in &mut conns {
        if closed_within(c, within).await {
            closed += 1;
        }
    }
    (conns, closed)
}

/// Whether the peer closed `conn` within `within` (EOF or reset; bytes it sends are ignored).
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_capped_and_open_connections_keep_serving() {
    let policies = PolicyDir::with_file("mesh.yaml", "services:\n  - name: web\n  - name: api\n");
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let mut config = caller_proxy_config(&cp, "web", "web-1");
    config.max_connections_per_listener = Some(8);
    let web = Proxy::start_with(config).await;
    // One keep-alive client connection, open before the flood.
    let client = HttpClient::h1(web.outbound_addr());
    wait_for_instance(&client, "api", "/", "api-1").await;

    // 40 more connections (bounded), held open: at most 7 more fit.
    let (held, closed) = flood(web.outbound_addr(), 40, Duration::from_millis(300)).await;
    assert!(
        closed >= 40 - 7,
        "{closed} of 40 flood connections were closed at accept"
    );
    let m = web.metrics().await;
    let refused = m.sum(
        "weft_listener_connections_refused_total",
        &[("direction", "outbound")],
    );
    assert!(
        refused >= 33.0,
        "{}",
        m.lines_for("weft_listener_connections_refused_total")
    );
    // The connection open before the flood is still served.
    let r = client
        .get("api", "/")
        .await
        .expect("request on the open connection");
    assert_eq!(r.status, 200, "{}", r.summary());

    // The flood goes; new connections are accepted again.
    drop(held);
    wait_until(
        DEFAULT_WAIT,
        "a new connection is served after the flood",
        async || {
            let r = HttpClient::h1(web.outbound_addr()).get("api", "/").await?;
            if r.status == 200 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_caps_connections_and_times_out_slow_heads() {
    let policies = PolicyDir::with_file("mesh.yaml", "services:\n  - name: web\n");
    let cp = ControlPlane::start(policies.path()).await;
    let web = weft_e2e::caller_proxy(&cp, "web", "web-1").await;
    let admin = web.admin_addr();

    // A client that sends half a request head is closed by the header-read timeout (10 s).
    let mut slow = TcpStream::connect(admin).await.expect("connect to admin");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    assert!(
        closed_within(&mut slow, Duration::from_secs(20)).await,
        "a half-sent request head kept its admin connection open for 20 s"
    );

    // 100 idle connections (bounded): at most 64 are kept, the rest closed at accept.
    let (held, closed) = flood(admin, 100, Duration::from_millis(200)).await;
    assert!(
        closed >= 36,
        "{closed} of 100 admin connections were closed"
    );
    drop(held);
    let url = web.admin_url("/metrics");
    let m = wait_until(
        DEFAULT_WAIT,
        "the admin API answers after the flood",
        async || {
            let r = weft_testkit::http_get(&url).await?;
            if r.status == 200 {
                Ok(weft_testkit::Metrics::parse(&r.text()))
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;
    assert!(
        m.sum(
            "weft_listener_connections_refused_total",
            &[("direction", "admin")]
        ) >= 36.0,
        "{}",
        m.lines_for("weft_listener_connections_refused_total")
    );
}
