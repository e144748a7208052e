//! Mesh security with real processes: a control plane with a CA and TLS gRPC, sidecars that
//! certify with join tokens and speak mTLS to each other, strict/permissive inbound modes,
//! authorization policies, certificate rotation under load, and `openssl s_client` as a client
//! outside the mesh (foreign trust domain, valid and expired mesh certificates).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_e2e::{
    caller_proxy, caller_proxy_config, caller_proxy_on, instance_of, promtool_check_metrics, tally,
    wait_for_instance, Instance,
};
use weft_testkit::security::{
    certify_with_openssl, foreign_cert, register_fake_node, s_client_get, server_leaf,
};
use weft_testkit::{
    raw_exchange, wait_until, ControlPlane, ControlPlaneConfig, HttpClient, PolicyDir, Proxy,
    DEFAULT_WAIT,
};

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";

/// A control plane with a CA and TLS gRPC (whatever the testkit default is).
async fn secure_cp(policies: &PolicyDir, extra: &[&str]) -> ControlPlane {
    let mut config = ControlPlaneConfig::new(policies.path());
    config.ca = true;
    config.grpc_tls = true;
    config.extra_args = extra.iter().map(|s| (*s).to_string()).collect();
    let cp = ControlPlane::start_with(config).await;
    assert!(cp.grpc_url().starts_with("https://"), "{}", cp.grpc_url());
    cp
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The `x-weft-peer-identity` the demo app saw (its JSON echo of request headers).
async fn peer_identity_seen(client: &HttpClient, host: &str, headers: &[(&str, &str)]) -> String {
    let resp = client
        .request(http::Method::GET, host, "/", headers, bytes_empty())
        .await
        .unwrap_or_else(|e| panic!("GET http://{host}/: {e:#}"));
    assert_eq!(resp.status, 200, "GET http://{host}/: {}", resp.summary());
    resp.json()["headers"]["x-weft-peer-identity"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn bytes_empty() -> Vec<u8> {
    Vec::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_inbound_serves_mtls_and_refuses_plaintext() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n    mtls: strict\n",
    );
    let cp = secure_cp(&policies, &[]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;

    // Through the sidecars: mTLS, and the app learns who called. A client-supplied header is
    // replaced, not trusted.
    let seen = peer_identity_seen(
        &web.http1(),
        "backend",
        &[(
            "x-weft-peer-identity",
            "spiffe://cluster.local/ns/default/sa/admin",
        )],
    )
    .await;
    assert_eq!(seen, WEB_ID);
    let seen_h2 = peer_identity_seen(&web.h2c(), "backend", &[]).await;
    assert_eq!(seen_h2, WEB_ID);

    // Plaintext straight to the strict inbound port: closed without an answer.
    let out = raw_exchange(
        backend.endpoint(),
        b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .expect("raw exchange with the strict inbound port");
    assert!(
        out.received.is_empty() && out.closed,
        "strict inbound answered plaintext: {out:?}"
    );

    let m = backend
        .proxy
        .wait_metric("weft_inbound_connections_total", &[("tls", "refused")], 1.0)
        .await;
    assert!(m.sum("weft_inbound_connections_total", &[("tls", "mtls")]) >= 1.0);
    assert!(
        m.sum(
            "weft_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        ) >= 1.0
    );
    let wm = web.metrics().await;
    assert!(
        wm.sum(
            "weft_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "ok")]
        ) >= 1.0,
        "{}",
        wm.lines_for("weft_tls_handshakes_total")
    );
    let expiry = wm
        .get("weft_cert_expiry_timestamp_seconds", &[])
        .unwrap_or(0.0);
    assert!(
        expiry > unix_now(),
        "cert expiry {expiry} is not in the future"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_clients_foreign_valid_and_expired_certificates() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n    mtls: strict\n",
    );
    let cp = secure_cp(&policies, &[]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let roots = cp.roots_pem();
    let addr: SocketAddr = backend.endpoint();

    // A mesh certificate issued to "web": served, and the app sees the identity.
    let valid = certify_with_openssl(cp.grpc_addr, "web", "default", Duration::ZERO)
        .await
        .expect("Certify for web");
    assert_eq!(valid.spiffe_id, WEB_ID);
    let ok = s_client_get(addr, Some((&valid.cert, &valid.key)), &roots, "/").await;
    assert!(
        ok.got_http_response() && ok.stdout.contains("200"),
        "valid mesh cert: {ok:?}"
    );
    assert!(
        ok.stdout.contains(WEB_ID),
        "peer identity echoed: {}",
        ok.stdout
    );

    // No client certificate: refused.
    let none = s_client_get(addr, None, &roots, "/").await;
    assert!(!none.got_http_response(), "no client cert: {none:?}");

    // A certificate from another trust domain's CA: refused.
    let foreign = foreign_cert("spiffe://evil.example/ns/default/sa/web");
    let out = s_client_get(addr, Some((&foreign.cert, &foreign.key)), &roots, "/").await;
    assert!(!out.got_http_response(), "foreign CA: {out:?}");

    // A mesh certificate that has expired: refused.
    let short = certify_with_openssl(cp.grpc_addr, "web", "default", Duration::from_secs(1))
        .await
        .expect("Certify for web, 1s");
    let wait = (short.not_after as f64 - unix_now()).max(0.0) + 1.5;
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let out = s_client_get(addr, Some((&short.cert, &short.key)), &roots, "/").await;
    assert!(!out.got_http_response(), "expired cert: {out:?}");

    let m = backend.proxy.metrics().await;
    assert!(
        m.sum(
            "weft_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "error")]
        ) >= 3.0,
        "{}",
        m.lines_for("weft_tls_handshakes_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sidecar_refuses_a_server_with_the_wrong_identity() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n  - name: impostor\n",
    );
    let cp = secure_cp(&policies, &[]).await;
    let impostor = Instance::http(&cp, "impostor", "impostor-1").await;
    // The control plane is told that impostor's sidecar address is an instance of backend: a
    // caller must expect backend's identity there and refuse what it finds.
    let _fake = register_fake_node(
        cp.grpc_addr,
        "fake-backend",
        "backend",
        "default",
        impostor.endpoint(),
    )
    .await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(impostor.endpoint(), true).await;
    wait_for_instance(&web.http1(), "impostor", "/", "impostor-1").await;

    let resp = web
        .http1()
        .get("backend", "/")
        .await
        .expect("GET http://backend/");
    assert_eq!(resp.status, 503, "{}", resp.summary());
    assert_eq!(resp.header("x-weft-error"), Some("connect-failed"));
    assert_eq!(instance_of(&resp), "");
    let m = web
        .wait_metric(
            "weft_tls_handshakes_total",
            &[("direction", "outbound"), ("result", "error")],
            1.0,
        )
        .await;
    assert!(
        m.sum(
            "weft_upstream_connect_errors_total",
            &[("cluster", "backend.default")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_listed_callers_and_denies_others() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:
  - name: web
  - name: other
  - name: backend
authorization:
  - name: backend-callers
    service: backend
    default: deny
    rules:
      - name: from-web
        from: {services: [web]}
",
    );
    let cp = secure_cp(&policies, &[]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let other = caller_proxy(&cp, "other", "other-1").await;
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;
    assert_eq!(
        peer_identity_seen(&web.http1(), "backend", &[]).await,
        WEB_ID
    );

    let denied = wait_until(
        DEFAULT_WAIT,
        "other's request to backend is answered",
        async || other.http1().get("backend", "/").await,
    )
    .await;
    assert_eq!(denied.status, 403, "{}", denied.summary());
    assert_eq!(denied.header("x-weft-error"), Some("forbidden"));
    assert_eq!(
        instance_of(&denied),
        "",
        "the app must not see a denied request"
    );

    // Plaintext (permissive) straight to the inbound port: no identity, default deny.
    let direct = HttpClient::h1(backend.endpoint())
        .get("backend", "/")
        .await
        .expect("plaintext GET to backend's inbound");
    assert_eq!(direct.status, 403, "{}", direct.summary());

    let m = backend
        .proxy
        .wait_metric(
            "weft_authz_denied_total",
            &[("policy", "backend-callers")],
            2.0,
        )
        .await;
    assert!(m.sum("weft_inbound_connections_total", &[("tls", "plaintext")]) >= 1.0);
    assert!(m.sum("weft_inbound_connections_total", &[("tls", "mtls")]) >= 2.0);
    // Denied requests are counted like any other response.
    assert!(
        m.sum(
            "weft_requests_total",
            &[("direction", "inbound"), ("code", "403")]
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request_and_serves_new_certificates() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n    mtls: strict\n",
    );
    // Certificates live 4 s: proxies renew about every 2.7 s.
    let cp = secure_cp(&policies, &["--cert-ttl", "4s"]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;
    let first_expiry = web
        .metrics()
        .await
        .get("weft_cert_expiry_timestamp_seconds", &[])
        .unwrap_or(0.0);

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop_at = Instant::now() + Duration::from_secs(9);
    let mut loops = Vec::new();
    for client in [web.http1(), web.h2c()] {
        let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
        loops.push(tokio::spawn(async move {
            // Bounded by the deadline; each request is bounded by the client's timeout.
            while Instant::now() < stop_at {
                match client.get("backend", "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(r.summary()),
                    Err(e) => failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{e:#}")),
                }
            }
        }));
    }
    // Meanwhile: the server certificate new handshakes see changes, and a caller started in the
    // middle of it (fresh connections, fresh certificates on both ends) is served too.
    let mut serials = std::collections::BTreeSet::new();
    let backend_addr = backend.endpoint();
    let mut late = None;
    while Instant::now() < stop_at {
        let (_, info) = tokio::task::spawn_blocking(move || server_leaf(backend_addr))
            .await
            .expect("server_leaf task");
        serials.insert(info);
        if late.is_none() && Instant::now() + Duration::from_secs(5) > stop_at {
            let p = Proxy::start_with(caller_proxy_config(&cp, "web", "web-late")).await;
            wait_for_instance(&p.http1(), "backend", "/", "backend-1").await;
            late = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    for l in loops {
        l.await.expect("load loop");
    }
    let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "rotation under load: {ok} ok, {} failed, {} distinct server certs",
        failed.len(),
        serials.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests during rotation: {failed:?}"
    );
    assert!(ok > 100, "only {ok} requests in 9 s");
    assert!(
        serials.len() >= 2,
        "the server certificate never changed: {serials:?}"
    );

    let m = web.metrics().await;
    let renewals = m.sum("weft_cert_renewals_total", &[("result", "ok")]);
    assert!(renewals >= 3.0, "web renewed {renewals} times in 9 s");
    let expiry = m
        .get("weft_cert_expiry_timestamp_seconds", &[])
        .unwrap_or(0.0);
    assert!(
        expiry > first_expiry,
        "expiry {expiry} did not move from {first_expiry}"
    );
    let late = late.expect("the late caller started");
    let t = weft_e2e::tally(&late.http1(), "backend", "/", 10).await;
    assert!(t.errors.is_empty(), "late caller: {t:?}");
}

/// Runs `program args` (bounded by the tool's own duration flag) and returns its stdout.
async fn run_tool(program: &str, args: &[String]) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// wrk's `Requests/sec:` figure.
fn wrk_rps(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{out}"))
}

/// Not a test: the numbers for "mTLS on vs off", measured in one run on one mesh. Two backends
/// with the same demo app, `tls-backend` (default permissive: callers originate mTLS) and
/// `plain-backend` (`mtls: disabled`), behind one caller sidecar `web`:
/// - request throughput through the 2-sidecar path, wrk keep-alive (pooled upstream
///   connections), alternating the two backends;
/// - new-connection rate at a backend's inbound sidecar, one connection per request (TLS: full
///   mTLS handshakes with `openssl s_time -new`, plaintext: `wrk` with `connection: close`).
///
/// `cargo build --release -p weft-proxy -p weft-testkit --bins`, put those and a `weft-control`
/// in one directory, then `WEFT_BIN_DIR=DIR cargo test -p weft-e2e --test security -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly, with release binaries"]
async fn bench_mtls_on_vs_off() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: tls-backend\n  - name: plain-backend\n    mtls: disabled\n",
    );
    let cp = secure_cp(&policies, &[]).await;
    let tls_backend = Instance::http(&cp, "tls-backend", "tls-1").await;
    let plain_backend = Instance::http(&cp, "plain-backend", "plain-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "tls-backend", "/", "tls-1").await;
    wait_for_instance(&web.http1(), "plain-backend", "/", "plain-1").await;
    let secs = std::env::var("WEFT_BENCH_SECS").unwrap_or_else(|_| "8".into());
    let url = format!("http://{}/", web.outbound_addr());

    let mut rps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..2 {
        for (label, host) in [("mtls", "tls-backend"), ("plaintext", "plain-backend")] {
            let args: Vec<String> = [
                "-t1",
                "-c32",
                "-d",
                &format!("{secs}s"),
                "-H",
                &format!("Host: {host}"),
                &url,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let out = run_tool("wrk", &args).await;
            if out.contains("Non-2xx") {
                let oha: Vec<String> = [
                    "-n",
                    "3000",
                    "-c",
                    "32",
                    "--no-tui",
                    "-H",
                    &format!("host: {host}"),
                    &url,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let sample = run_tool("oha", &oha).await;
                panic!("round {round} {label}: {out}\noha after: {sample}");
            }
            rps.entry(label).or_default().push(wrk_rps(&out));
        }
    }

    let cert = certify_with_openssl(cp.grpc_addr, "web", "default", Duration::ZERO)
        .await
        .expect("Certify for web");
    let roots = cp.roots_pem();
    let s_time: Vec<String> = [
        "s_time",
        "-connect",
        &tls_backend.endpoint().to_string(),
        "-new",
        "-time",
        &secs,
        "-www",
        "/",
        "-cert",
        &cert.cert.display().to_string(),
        "-key",
        &cert.key.display().to_string(),
        "-CAfile",
        &roots.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_tool("openssl", &s_time).await;
    // "N connections in T real seconds, B bytes read per connection"
    let tls_conns = out
        .lines()
        .find(|l| l.contains("real seconds"))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            let n: f64 = w.next()?.parse().ok()?;
            let t: f64 = w.nth(2)?.parse().ok()?;
            Some(n / t)
        })
        .unwrap_or_else(|| panic!("no rate in openssl s_time output:\n{out}"));
    let plain_url = format!("http://{}/", plain_backend.endpoint());
    let args: Vec<String> = [
        "-t1",
        "-c1",
        "-d",
        &format!("{secs}s"),
        "-H",
        "connection: close",
        "-H",
        "Host: plain-backend",
        &plain_url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let plain_conns = wrk_rps(&run_tool("wrk", &args).await);
    let m = tls_backend.proxy.metrics().await;
    println!("== mTLS on vs off (same run, same mesh, {secs}s per case) ==");
    println!(
        "requests/s through 2 sidecars, keep-alive, 32 conns: mTLS {:?}, plaintext {:?}",
        rps["mtls"], rps["plaintext"]
    );
    println!("new connections/s at one inbound sidecar (1 at a time, one GET each): mTLS handshakes {tls_conns:.0}, plaintext {plain_conns:.0}");
    println!(
        "tls-backend inbound handshakes ok: {}",
        m.sum(
            "weft_tls_handshakes_total",
            &[("direction", "inbound"), ("result", "ok")]
        )
    );
}

/// Writes `bytes`, half-closes and reads until EOF (5 s bound).
async fn tcp_roundtrip(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no EOF within 5s",
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_service_strict_mtls_and_authorization() {
    use weft_testkit::{free_port, next_loopback_ip};
    let (web_ip, other_ip) = (next_loopback_ip(), next_loopback_ip());
    let port = free_port(web_ip);
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &format!(
            "services:
  - name: web
  - name: other
  - name: store
    protocol: tcp
    port: {port}
    mtls: strict
authorization:
  - name: store-callers
    service: store
    default: deny
    rules:
      - name: from-web
        from: {{services: [web]}}
"
        ),
    );
    let cp = secure_cp(&policies, &[]).await;
    let store = Instance::tcp(&cp, "store", "store-1").await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    let other = caller_proxy_on(&cp, other_ip, "other", "other-1").await;
    web.wait_endpoint(store.endpoint(), true).await;
    other.wait_endpoint(store.endpoint(), true).await;

    let got = wait_until(
        DEFAULT_WAIT,
        "a TCP echo through web's store listener",
        async || {
            let got = tcp_roundtrip(SocketAddr::new(web_ip, port), b"ping").await?;
            if got == b"ping" {
                Ok(got)
            } else {
                Err(anyhow::anyhow!("got {:?}", String::from_utf8_lossy(&got)))
            }
        },
    )
    .await;
    assert_eq!(got, b"ping");

    // `other` is not allowed: its sidecar's mTLS connection is closed before the app is dialled.
    let denied = tcp_roundtrip(SocketAddr::new(other_ip, port), b"ping").await;
    assert!(
        denied.as_ref().map_or(true, Vec::is_empty),
        "other got an echo: {denied:?}"
    );
    // Plaintext straight to the strict inbound port: closed.
    let plain = tcp_roundtrip(store.endpoint(), b"ping").await;
    assert!(
        plain.as_ref().map_or(true, Vec::is_empty),
        "plaintext got an echo: {plain:?}"
    );
    let m = store
        .proxy
        .wait_metric(
            "weft_authz_denied_total",
            &[("policy", "store-callers"), ("protocol", "tcp")],
            1.0,
        )
        .await;
    assert!(m.sum("weft_inbound_connections_total", &[("tls", "refused")]) >= 1.0);
    // TCP connections count under the verified caller (the denied one too: it was accepted).
    for caller in [WEB_ID, OTHER_ID] {
        assert!(
            m.sum(
                "weft_tcp_connections_total",
                &[("direction", "inbound"), ("tls", "mtls"), ("peer", caller)]
            ) >= 1.0,
            "{caller}: {}",
            m.lines_for("weft_tcp_connections_total")
        );
    }
    assert!(
        m.sum(
            "weft_tcp_bytes_total",
            &[("tls", "mtls"), ("peer", WEB_ID), ("flow", "tx")]
        ) >= 4.0,
        "{}",
        m.lines_for("weft_tcp_bytes_total")
    );
}

const BACKEND_ID: &str = "spiffe://cluster.local/ns/default/sa/backend";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";

/// Waits until `name{labels}` on `proxy` reaches `want`, then checks it is exactly `want`.
async fn assert_metric_eq(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let m = proxy.wait_metric(name, labels, want).await;
    assert_eq!(
        m.sum(name, labels),
        want,
        "{} {name}{labels:?}:\n{}",
        proxy.id(),
        m.lines_for(name)
    );
}

/// Golden request metrics name the hop's transport and peer: the callee's sidecar attributes
/// inbound requests to the verified caller (`tls="mtls"`, `peer=<caller's SPIFFE ID>`, denied
/// ones included), plaintext ones to nobody (`tls="none"`, `peer=""`); the caller's sidecar labels
/// its outbound requests with the callee's expected identity. `promtool` accepts both pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_carry_peer_identity_and_tls() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:
  - name: web
  - name: other
  - name: backend
authorization:
  - name: backend-callers
    service: backend
    default: deny
    rules:
      - name: from-web
        from: {services: [web]}
      - name: public
        to: {paths: [{prefix: /public}]}
",
    );
    let cp = secure_cp(&policies, &[]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let other = caller_proxy(&cp, "other", "other-1").await;
    // Exactly one 200 from backend-1 (earlier answers come from web's sidecar: no route or no
    // endpoint yet, never from backend's).
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;
    let mut ok = 1;
    for (client, n) in [(web.http1(), 5), (web.h2c(), 3)] {
        for i in 0..n {
            let r = client
                .get("backend", &format!("/peer/{i}"))
                .await
                .expect("GET http://backend/peer/..");
            assert_eq!(r.status, 200, "{}", r.summary());
            ok += 1;
        }
    }

    // `other` is denied by backend's policy: count the 403s that came from backend's sidecar.
    let mut denied = 0;
    wait_until(
        DEFAULT_WAIT,
        "other's request to backend is denied",
        async || {
            let r = other.http1().get("backend", "/").await?;
            if r.status == 403 {
                denied += 1;
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;
    for _ in 0..2 {
        let r = other.http1().get("backend", "/").await.expect("GET");
        assert_eq!(r.status, 403, "{}", r.summary());
        denied += 1;
    }

    // Plaintext straight to backend's (permissive) inbound port: no identity.
    let direct = HttpClient::h1(backend.endpoint());
    let r = direct
        .get("backend", "/public/x")
        .await
        .expect("GET /public");
    assert_eq!(r.status, 200, "{}", r.summary());
    let r = direct.get("backend", "/").await.expect("GET /");
    assert_eq!(r.status, 403, "{}", r.summary());

    let inbound = |tls, peer, code| {
        [
            ("direction", "inbound"),
            ("route", "inbound"),
            ("tls", tls),
            ("peer", peer),
            ("code", code),
        ]
    };
    let requests = "weft_requests_total";
    assert_metric_eq(
        &backend.proxy,
        requests,
        &inbound("mtls", WEB_ID, "200"),
        ok as f64,
    )
    .await;
    assert_metric_eq(
        &backend.proxy,
        requests,
        &inbound("mtls", OTHER_ID, "403"),
        denied as f64,
    )
    .await;
    assert_metric_eq(&backend.proxy, requests, &inbound("none", "", "200"), 1.0).await;
    assert_metric_eq(&backend.proxy, requests, &inbound("none", "", "403"), 1.0).await;
    let m = backend.proxy.metrics().await;
    // Every inbound request is in exactly one of those series; the other families agree.
    assert_eq!(
        m.sum(requests, &[("direction", "inbound")]),
        (ok + denied + 2) as f64,
        "{}",
        m.lines_for(requests)
    );
    for family in [
        "weft_request_duration_seconds_count",
        "weft_response_headers_duration_seconds_count",
    ] {
        let labels = [("direction", "inbound"), ("tls", "mtls"), ("peer", WEB_ID)];
        assert_eq!(m.sum(family, &labels), ok as f64, "{}", m.lines_for(family));
    }
    assert!(
        m.sum(
            "weft_response_body_bytes_total",
            &[("direction", "inbound"), ("tls", "mtls"), ("peer", WEB_ID)]
        ) > 0.0,
        "{}",
        m.lines_for("weft_response_body_bytes_total")
    );

    // The caller's side: requests to backend went over mTLS to backend's identity.
    let outbound = [
        ("direction", "outbound"),
        ("cluster", "backend.default"),
        ("code", "200"),
    ];
    let mtls_to_backend = [
        ("direction", "outbound"),
        ("cluster", "backend.default"),
        ("tls", "mtls"),
        ("peer", BACKEND_ID),
        ("code", "200"),
    ];
    assert_metric_eq(&web, requests, &mtls_to_backend, ok as f64).await;
    let wm = web.metrics().await;
    assert_eq!(
        wm.sum(requests, &outbound),
        ok as f64,
        "no 200 to backend outside the mTLS series:\n{}",
        wm.lines_for(requests)
    );
    assert!(
        wm.sum(
            "weft_request_duration_seconds_count",
            &[
                ("direction", "outbound"),
                ("tls", "mtls"),
                ("peer", BACKEND_ID)
            ]
        ) >= ok as f64,
        "{}",
        wm.lines_for("weft_request_duration_seconds_count")
    );
    let om = other.metrics().await;
    assert_eq!(
        om.sum(
            requests,
            &[
                ("direction", "outbound"),
                ("tls", "mtls"),
                ("peer", BACKEND_ID),
                ("code", "403")
            ]
        ),
        denied as f64,
        "{}",
        om.lines_for(requests)
    );

    let mut failures = Vec::new();
    for (what, text) in [("backend's sidecar", m.text), ("web's sidecar", wm.text)] {
        if let Err(e) = promtool_check_metrics(what, &text) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The callee's sidecar hibernates an idle mTLS connection from the caller's sidecar (the caller
/// keeps it pooled): the TLS session survives, and the next request reuses it without a new
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_mtls_connection_hibernates_and_is_reused() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n    mtls: strict\n",
    );
    let cp = secure_cp(&policies, &[]).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "backend", "/", "backend-1").await;
    assert_eq!(peer_identity_seen(&client, "backend", &[]).await, WEB_ID);

    let m = backend.proxy.metrics().await;
    let mtls_conns = m.sum("weft_inbound_connections_total", &[("tls", "mtls")]);
    let hibernated = m.sum("weft_http_connections_hibernated_total", &[]);
    assert!(
        mtls_conns >= 1.0,
        "{}",
        m.lines_for("weft_inbound_connections_total")
    );
    backend
        .proxy
        .wait_metric(
            "weft_http_connections_hibernated_total",
            &[],
            hibernated + 1.0,
        )
        .await;

    for i in 0..3 {
        assert_eq!(
            peer_identity_seen(&client, "backend", &[]).await,
            WEB_ID,
            "request {i} after the inbound mTLS connection hibernated"
        );
    }
    let m = backend.proxy.metrics().await;
    assert_eq!(
        m.sum("weft_inbound_connections_total", &[("tls", "mtls")]),
        mtls_conns,
        "the pooled mTLS connection is reused after hibernating, no new handshake: {}",
        m.lines_for("weft_inbound_connections_total")
    );
}

/// Active health checks of a `mtls: strict` service go over mesh mTLS like its traffic: healthy
/// instances stay in rotation, and an instance whose app died (its sidecar answers 503) leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_reach_strict_mtls_sidecars() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:
  - name: web
  - name: backend
    mtls: strict
    lb: round_robin
    health_check:
      http: {path: /}
      interval: 100ms
      timeout: 5s
      healthy_threshold: 1
      unhealthy_threshold: 2
",
    );
    let cp = secure_cp(&policies, &[]).await;
    let one = Instance::http(&cp, "backend", "backend-1").await;
    let mut two = Instance::http(&cp, "backend", "backend-2").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "backend", "/", "backend-1").await;
    wait_for_instance(&client, "backend", "/", "backend-2").await;

    // Several check rounds over mTLS: both healthy, no failure.
    let checks = one
        .proxy
        .wait_metric("weft_inbound_connections_total", &[("tls", "mtls")], 5.0)
        .await;
    assert_eq!(
        checks.sum("weft_inbound_connections_total", &[("tls", "refused")]),
        0.0,
        "no plaintext check reached the strict sidecar: {}",
        checks.lines_for("weft_inbound_connections_total")
    );
    let m = web.metrics().await;
    for instance in [&one, &two] {
        assert_eq!(
            m.get(
                "weft_endpoint_healthy",
                &[
                    ("cluster", "backend.default"),
                    ("endpoint", &instance.endpoint().to_string())
                ]
            ),
            Some(1.0),
            "{}",
            m.lines_for("weft_endpoint_healthy")
        );
    }
    assert_eq!(
        m.sum(
            "weft_health_check_failures_total",
            &[("cluster", "backend.default")]
        ),
        0.0,
        "{}",
        m.lines_for("weft_health_check_failures_total")
    );

    // backend-2's app dies: its sidecar answers the checks 503, and it leaves rotation.
    two.app.process.kill();
    wait_until(
        DEFAULT_WAIT,
        "the instance without an app leaves rotation",
        async || {
            let t = tally(&client, "backend", "/", 10).await;
            if t.count("backend-1") == 10 {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await;
}
