//! TCP services: the caller's sidecar listens on `<tcp_bind_ip>:<port>` for each `tcp` service
//! and pipes bytes to an instance's inbound sidecar, which pipes them to the app. Each
//! direction's EOF is forwarded as a half-close.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::{caller_proxy_on, wait_metric_at_least, Instance};
use weft_testkit::{
    free_port, next_loopback_ip, wait_until, ControlPlane, PolicyDir, Proxy, DEFAULT_WAIT,
};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Writes `payload`, half-closes, and reads until EOF (reading and writing concurrently, so a
/// large payload cannot deadlock on full buffers). Returns what came back.
async fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(payload).await?;
        // Half-close: we are done sending, but still want every echoed byte.
        wr.shutdown().await?;
        anyhow::Ok(())
    };
    let read = async {
        let mut got = Vec::with_capacity(payload.len());
        rd.read_to_end(&mut got).await?;
        anyhow::Ok(got)
    };
    let (w, r) = tokio::time::timeout(IO_TIMEOUT, async { tokio::join!(write, read) })
        .await
        .map_err(|_| anyhow::anyhow!("no EOF from {addr} within {IO_TIMEOUT:?}"))?;
    w?;
    r
}

struct TcpMesh {
    listener: SocketAddr,
    web: Proxy,
    store: Instance,
    _cp: ControlPlane,
    _policies: PolicyDir,
}

/// `web` calls the tcp service `store`; returns web's listener for it.
async fn tcp_mesh() -> TcpMesh {
    // The web proxy's IP must be known to pick the service port: the policy names the port each
    // caller's sidecar binds on its tcp_bind_ip.
    let web_ip = next_loopback_ip();
    let port = free_port(web_ip);
    let policies = PolicyDir::with_file(
        "tcp.yaml",
        &format!(
            "services:\n  - name: web\n  - name: store\n    protocol: tcp\n    port: {port}\n"
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let store = Instance::tcp(&cp, "store", "store-1").await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    web.wait_endpoint(store.endpoint(), true).await;
    let listener = SocketAddr::new(web.ip(), port);
    TcpMesh {
        listener,
        web,
        store,
        _cp: cp,
        _policies: policies,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_with_half_close() {
    let mesh = tcp_mesh().await;

    let first = wait_until(
        DEFAULT_WAIT,
        "a TCP echo through web's store listener returns the bytes",
        async || {
            let got = echo_roundtrip(mesh.listener, b"ping").await?;
            if got == b"ping" {
                Ok(got)
            } else {
                Err(anyhow::anyhow!("got {:?}", String::from_utf8_lossy(&got)))
            }
        },
    )
    .await;
    assert_eq!(first, b"ping");

    // 4 MiB: the client half-closes right after writing and still gets every byte back.
    let payload: Vec<u8> = (0..4usize << 20).map(|i| (i * 7 % 256) as u8).collect();
    let got = echo_roundtrip(mesh.listener, &payload)
        .await
        .expect("4 MiB echo");
    assert_eq!(got.len(), payload.len(), "echoed byte count");
    assert!(got == payload, "echoed bytes differ");

    // Half-close before reading anything: the reply still arrives, then EOF.
    let mut s = TcpStream::connect(mesh.listener).await.expect("connect");
    s.write_all(b"one-way").await.expect("write");
    s.shutdown().await.expect("shutdown(Write)");
    let mut got = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut got))
        .await
        .expect("EOF after the echo")
        .expect("read");
    assert_eq!(got, b"one-way");

    // Concurrent connections each get their own bytes back.
    let conns = (0..8u8).map(|i| {
        let addr = mesh.listener;
        async move {
            let payload = vec![b'a' + i; 10_000 + usize::from(i) * 1000];
            let got = echo_roundtrip(addr, &payload).await;
            (payload, got)
        }
    });
    for (want, got) in futures::future::join_all(conns).await {
        let got = got.expect("concurrent echo");
        assert!(
            got == want,
            "connection of {:?} got {} bytes",
            want[0] as char,
            got.len()
        );
    }

    wait_metric_at_least(
        "web's sidecar counts outbound TCP connections to store",
        "weft_tcp_connections_total",
        &[("direction", "outbound"), ("cluster", "store.default")],
        11.0,
        async || mesh.web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "web's sidecar counts bytes sent to store",
        "weft_tcp_bytes_total",
        &[("direction", "outbound"), ("cluster", "store.default")],
        (4 << 20) as f64,
        async || mesh.web.metrics().await,
    )
    .await;
    wait_metric_at_least(
        "store's sidecar counts inbound TCP connections",
        "weft_tcp_connections_total",
        &[("direction", "inbound")],
        11.0,
        async || mesh.store.proxy.metrics().await,
    )
    .await;
}

/// A connection that sends nothing and half-closes at once gets a clean EOF back (the client's
/// EOF reaches the app, whose half-close comes back through both sidecars).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_empty_connection_closes_cleanly() {
    let mesh = tcp_mesh().await;
    wait_until(
        DEFAULT_WAIT,
        "a TCP echo through web's store listener works",
        async || {
            let got = echo_roundtrip(mesh.listener, b"x").await?;
            if got == b"x" {
                Ok(())
            } else {
                Err(anyhow::anyhow!("got {got:?}"))
            }
        },
    )
    .await;
    let got = echo_roundtrip(mesh.listener, b"")
        .await
        .expect("empty echo");
    assert!(
        got.is_empty(),
        "an empty exchange returned {} bytes",
        got.len()
    );
}

/// A TCP service balanced by a ring hash on `source_ip` keeps a client on one instance: every
/// connection from one address lands on the same instance's sidecar (counted there), while
/// round robin would spread them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_source_ip_ring_hash_sticks_to_one_instance() {
    let web_ip = next_loopback_ip();
    let port = free_port(web_ip);
    let policies = PolicyDir::with_file(
        "tcp.yaml",
        &format!(
            "services:\n  - name: web\n  - name: store\n    protocol: tcp\n    port: {port}\n    \
             lb: ring_hash\n    hash: {{source_ip: true}}\n"
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let stores = [
        Instance::tcp(&cp, "store", "store-1").await,
        Instance::tcp(&cp, "store", "store-2").await,
        Instance::tcp(&cp, "store", "store-3").await,
    ];
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    for s in &stores {
        web.wait_endpoint(s.endpoint(), true).await;
    }
    let listener = SocketAddr::new(web.ip(), port);
    const N: usize = 12;
    for i in 0..N {
        let got = echo_roundtrip(listener, format!("hello {i}").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_eq!(got, format!("hello {i}").as_bytes());
    }
    // Every connection came from the test's one address: one instance took them all.
    let mut counts = Vec::new();
    for s in &stores {
        let m = s.proxy.metrics().await;
        counts.push(m.sum("weft_tcp_connections_total", &[("direction", "inbound")]));
    }
    counts.sort_by(f64::total_cmp);
    assert_eq!(
        counts,
        [0.0, 0.0, N as f64],
        "inbound TCP connections per instance"
    );
}
