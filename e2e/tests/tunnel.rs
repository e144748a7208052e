//! Pooled mTLS tunnels between sidecars (issue 17 item 2), with real processes: a control
//! plane with a CA, a caller sidecar and a callee sidecar in front of the demo app's TCP echo
//! server, and Python's socket module as the TCP client. TCP connections to a mesh endpoint
//! travel as HTTP/2 CONNECT streams over a pooled mTLS connection (ALPN `weft-tunnel`):
//! - many connections cost one or two handshakes, each keeps its bytes, half-close, the
//!   caller's verified identity in metrics and the access log;
//! - authorization denies per stream (403 on the stream) while the pooled connection stays up
//!   for the streams a changed policy allows;
//! - a certificate rotation moves new streams to a new connection (a new handshake);
//! - one bulk flow and many small exchanges share a connection and all finish;
//! - a callee with the tunnel switched off is dialled directly (fallback, never plaintext).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_e2e::caller_proxy_config_on;
use weft_testkit::{
    free_port, next_loopback_ip, wait_until, ControlPlane, ControlPlaneConfig, DemoApp,
    DemoAppConfig, Metrics, PolicyDir, Proxy, ProxyConfig, DEFAULT_WAIT,
};

const WEB_ID: &str = "spiffe://cluster.local/ns/default/sa/web";
const STORE_ID: &str = "spiffe://cluster.local/ns/default/sa/store";

/// The Python client: `seq ADDR N SIZE` makes N sequential connections, each sending SIZE
/// bytes, half-closing and reading to EOF, and prints one JSON object per connection
/// (`echoed`: bytes back, `same`: they equal what was sent); `fair ADDR BULK SMALL` sends BULK
/// bytes on one connection (reading the echo on another thread) while SMALL connections
/// exchange 64 bytes each, and prints the outcome with the times it observed.
const CLIENT: &str = r#"
import hashlib, json, socket, sys, threading, time

def exchange(addr, data):
    try:
        s = socket.create_connection(addr, timeout=20)
    except OSError as e:
        return b"", str(e)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        return bytes(got), None
    except OSError as e:
        return b"", str(e)
    finally:
        s.close()

def pattern(n, seed):
    base = bytes((i * 31 + seed) % 256 for i in range(65521))
    return (base * (n // len(base) + 1))[:n]

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = (host, port)
if mode == "seq":
    n, size = int(sys.argv[4]), int(sys.argv[5])
    for i in range(n):
        data = pattern(size, i)
        got, err = exchange(addr, data)
        print(json.dumps({"i": i, "echoed": len(got), "same": got == data, "error": err}), flush=True)
elif mode == "fair":
    # The bulk flow's echo is not read until every small exchange is done: its bytes back up
    # through both sidecars and fill its stream's windows on the shared tunnel connection,
    # and the small exchanges must still get through beside it.
    bulk, small = int(sys.argv[4]), int(sys.argv[5])
    result, progress = {}, {"sent": 0}
    smalls_done = threading.Event()
    def run_bulk():
        t0 = time.monotonic()
        s = socket.create_connection(addr, timeout=300)
        chunk = pattern(1 << 20, 7)
        sent = hashlib.sha256()
        def reader(out):
            smalls_done.wait(300)
            h, n = hashlib.sha256(), 0
            while True:
                b = s.recv(1 << 18)
                if not b:
                    break
                h.update(b)
                n += len(b)
            out["digest"], out["n"] = h.hexdigest(), n
        got = {}
        t = threading.Thread(target=reader, args=(got,))
        t.start()
        left = bulk
        while left > 0:
            part = chunk[: min(left, len(chunk))]
            s.sendall(part)
            sent.update(part)
            left -= len(part)
            progress["sent"] += len(part)
        s.shutdown(socket.SHUT_WR)
        t.join(600)
        s.close()
        result["bulk_ok"] = got.get("n") == bulk and got.get("digest") == sent.hexdigest()
        result["bulk_bytes_back"] = got.get("n")
        result["bulk_seconds"] = round(time.monotonic() - t0, 3)
    bt = threading.Thread(target=run_bulk)
    bt.start()
    # Until the bulk sender is blocked (its bytes stopped moving) or 30 s passed.
    last, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if progress["sent"] == last:
            break
        last = progress["sent"]
    result["bulk_sent_before_small"] = progress["sent"]
    t0 = time.monotonic()
    ok, worst, fails = 0, 0.0, []
    for i in range(small):
        data = pattern(64, i)
        a = time.monotonic()
        got, err = exchange(addr, data)
        worst = max(worst, time.monotonic() - a)
        if got == data:
            ok += 1
        else:
            fails.append([i, len(got), err])
    result["bulk_sent_when_small_done"] = progress["sent"]
    smalls_done.set()
    result["small_ok"] = ok
    result["small_failures"] = fails[:5]
    result["small_seconds"] = round(time.monotonic() - t0, 3)
    result["small_worst_ms"] = round(worst * 1000, 1)
    bt.join(900)
    print(json.dumps(result), flush=True)
"#;

/// Runs the Python client with `args`; its JSON lines.
async fn python(args: &[String], limit: Duration) -> Vec<serde_json::Value> {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(CLIENT).args(args).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("python3 client {args:?} did not finish within {limit:?}"))
        .expect("running python3");
    assert!(
        out.status.success(),
        "python3 client {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `n` sequential connections to `addr` with `size` bytes each.
async fn sequential(addr: SocketAddr, n: usize, size: usize) -> Vec<serde_json::Value> {
    let args = [
        "seq".to_string(),
        addr.ip().to_string(),
        addr.port().to_string(),
        n.to_string(),
        size.to_string(),
    ];
    let lines = python(&args, Duration::from_secs(120)).await;
    assert_eq!(lines.len(), n, "{lines:?}");
    lines
}

fn all_echoed(lines: &[serde_json::Value]) -> bool {
    lines.iter().all(|l| l["same"] == true)
}

fn tempdir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir =
        std::env::temp_dir().join(format!("weft-tunnel-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

fn q(p: &Path) -> String {
    serde_json::Value::from(p.display().to_string()).to_string()
}

async fn spawn_with(mut config: ProxyConfig, extra: &str) -> Proxy {
    config.resolve_security();
    let yaml = format!("{}{extra}", config.to_yaml());
    let mut proxy = Proxy::spawn_yaml(config, &yaml);
    proxy.wait_ready().await;
    proxy
}

async fn secure_cp(policies: &PolicyDir, extra: &[&str]) -> ControlPlane {
    let mut config = ControlPlaneConfig::new(policies.path());
    config.ca = true;
    config.grpc_tls = true;
    config.extra_args = extra.iter().map(|s| (*s).to_string()).collect();
    ControlPlane::start_with(config).await
}

fn store_policy(port: u16, default: &str) -> String {
    format!(
        "services:
  - name: web
  - name: store
    protocol: tcp
    port: {port}
    mtls: strict
authorization:
  - name: store-callers
    service: store
    default: {default}
"
    )
}

/// The mesh of these tests: `web` (caller, the test is its app) -> `store` (TCP echo).
struct Mesh {
    policies: PolicyDir,
    _cp: ControlPlane,
    web: Proxy,
    store: Proxy,
    _app: DemoApp,
    /// web's TCP listener for `store`.
    entry: SocketAddr,
    store_log: PathBuf,
}

async fn mesh(
    policies: PolicyDir,
    port: u16,
    web_ip: IpAddr,
    cp_args: &[&str],
    store_extra: &str,
) -> Mesh {
    let cp = secure_cp(&policies, cp_args).await;
    let app = DemoApp::start_with(DemoAppConfig::new("store", "store-1").with_tcp()).await;
    let store_log = tempdir("store").join("access.log");
    let store_config = ProxyConfig::new(&cp.grpc_url(), "store", "store-1", app.tcp_addr());
    let store = spawn_with(
        store_config,
        &format!(
            "observability:\n  access_log: {{format: json, path: {}}}\n{store_extra}",
            q(&store_log)
        ),
    )
    .await;
    let web = spawn_with(caller_proxy_config_on(&cp, web_ip, "web", "web-1"), "").await;
    web.wait_endpoint(store.inbound_addr(), true).await;
    Mesh {
        policies,
        _cp: cp,
        web,
        store,
        _app: app,
        entry: SocketAddr::new(web_ip, port),
        store_log,
    }
}

/// A fresh IP for the caller, a free port on it, and the policy dir for `store`.
fn setup(default: &str) -> (IpAddr, u16, PolicyDir) {
    let ip = next_loopback_ip();
    let port = free_port(ip);
    (
        ip,
        port,
        PolicyDir::with_file("mesh.yaml", &store_policy(port, default)),
    )
}

async fn metrics(p: &Proxy) -> Metrics {
    p.metrics().await
}

fn inbound_handshakes(m: &Metrics) -> f64 {
    m.sum(
        "weft_tls_handshakes_total",
        &[("direction", "inbound"), ("result", "ok")],
    )
}

fn streams(m: &Metrics, direction: &str, result: &str) -> f64 {
    m.sum(
        "weft_tunnel_streams_total",
        &[("direction", direction), ("result", result)],
    )
}

/// Waits until one echo goes through `entry` (the route and the endpoint are in place).
async fn wait_echo(entry: SocketAddr) {
    wait_until(
        DEFAULT_WAIT,
        "a TCP echo through web's store listener",
        async || {
            let lines = sequential(entry, 1, 16).await;
            if all_echoed(&lines) {
                Ok(())
            } else {
                Err(format!("{lines:?}"))
            }
        },
    )
    .await;
}

/// (a) N sequential connections: all bytes back, one or two handshakes on the callee, and
/// every stream counted and logged under the caller's verified identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_handshake_and_keep_the_callers_identity() {
    const N: usize = 20;
    let (ip, port, policies) = setup("allow");
    let m = mesh(policies, port, ip, &[], "").await;
    let before = metrics(&m.store).await;
    wait_echo(m.entry).await;
    let lines = sequential(m.entry, N, 100_000).await;
    assert!(all_echoed(&lines), "{lines:?}");

    let total = N as f64 + 1.0;
    let after = m
        .store
        .wait_metric(
            "weft_tcp_connections_closed_total",
            &[("direction", "inbound"), ("peer", WEB_ID)],
            total,
        )
        .await;
    let handshakes = inbound_handshakes(&after) - inbound_handshakes(&before);
    assert!(
        (1.0..=2.0).contains(&handshakes),
        "{handshakes} inbound handshakes for {total} connections:\n{}",
        after.lines_for("weft_tls_handshakes_total")
    );
    assert!(
        streams(&after, "inbound", "ok") >= total,
        "{}",
        after.lines_for("weft_tunnel_streams_total")
    );
    assert_eq!(
        after.sum(
            "weft_tcp_connections_total",
            &[("direction", "inbound"), ("tls", "mtls"), ("peer", WEB_ID)]
        ),
        total,
        "{}",
        after.lines_for("weft_tcp_connections_total")
    );
    let web = metrics(&m.web).await;
    assert!(streams(&web, "outbound", "ok") >= total);
    assert_eq!(web.sum("weft_tunnel_fallbacks_total", &[]), 0.0);
    assert!(
        web.sum("weft_tunnel_connections", &[("direction", "outbound")]) >= 1.0,
        "{}",
        web.lines_for("weft_tunnel_connections")
    );
    // The caller's /config_dump shows its pooled connection(s) to the callee, by identity.
    let dump = m.web.config_dump().await;
    let tunnel = &dump["tunnel"];
    assert_eq!(tunnel["enabled"], true, "{tunnel}");
    let peers = tunnel["peers"].as_array().expect("tunnel.peers");
    assert!(
        peers
            .iter()
            .any(|p| p["address"] == m.store.inbound_addr().to_string()
                && p["identity"] == STORE_ID
                && p["connections"]
                    .as_array()
                    .is_some_and(|c| (1..=2).contains(&c.len()))),
        "{tunnel}"
    );
    assert_eq!(tunnel["direct"], serde_json::json!([]), "{tunnel}");

    // One access log line per connection, naming the caller.
    let logged = wait_until(
        DEFAULT_WAIT,
        "store's access log has every connection",
        async || {
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&m.store_log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|v: &serde_json::Value| v["protocol"] == "TCP")
                .collect();
            if lines.len() > N {
                Ok(lines)
            } else {
                Err(format!("{} lines", lines.len()))
            }
        },
    )
    .await;
    for line in &logged {
        assert_eq!(line["peer_identity"], WEB_ID, "{line}");
        assert_eq!(line["direction"], "inbound", "{line}");
    }
    assert!(
        logged
            .iter()
            .filter(|l| l["bytes_received"] == 100_000)
            .count()
            >= N,
        "{logged:?}"
    );
}

/// (b) Authorization per stream: every connection of a denied caller is refused (403 on its
/// stream, counted per stream), and once the policy allows it the same pooled connection
/// carries its connections (no new handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_denies_each_stream_and_the_connection_stays_up() {
    const N: usize = 10;
    let (ip, port, policies) = setup("deny");
    let m = mesh(policies, port, ip, &[], "").await;
    // The policy applies before the first attempt: wait until a denial is counted.
    wait_until(DEFAULT_WAIT, "a denied TCP connection", async || {
        sequential(m.entry, 1, 16).await;
        let s = metrics(&m.store).await;
        if streams(&s, "inbound", "denied") >= 1.0 {
            Ok(())
        } else {
            Err(s.lines_for("weft_tunnel_streams_total"))
        }
    })
    .await;
    let before = metrics(&m.store).await;
    let lines = sequential(m.entry, N, 1000).await;
    assert!(
        lines.iter().all(|l| l["echoed"] == 0),
        "a denied caller got bytes back: {lines:?}"
    );
    let denied_before = before.sum("weft_authz_denied_total", &[("policy", "store-callers")]);
    let after = m
        .store
        .wait_metric(
            "weft_authz_denied_total",
            &[("policy", "store-callers")],
            denied_before + N as f64,
        )
        .await;
    assert_eq!(
        streams(&after, "inbound", "denied") - streams(&before, "inbound", "denied"),
        N as f64,
        "{}",
        after.lines_for("weft_tunnel_streams_total")
    );
    let web = metrics(&m.web).await;
    assert!(
        streams(&web, "outbound", "refused") >= N as f64,
        "{}",
        web.lines_for("weft_tunnel_streams_total")
    );

    // Allowed now: the pooled connection that carried the denials carries these.
    let handshakes = inbound_handshakes(&after);
    m.policies.write("mesh.yaml", &store_policy(port, "allow"));
    wait_echo(m.entry).await;
    let lines = sequential(m.entry, N, 1000).await;
    assert!(all_echoed(&lines), "{lines:?}");
    let end = metrics(&m.store).await;
    assert_eq!(
        inbound_handshakes(&end),
        handshakes,
        "allowed streams needed a new handshake:\n{}",
        end.lines_for("weft_tls_handshakes_total")
    );
}

/// (c) A certificate rotation of the caller retires its pooled connection for new streams:
/// the next connection costs a new handshake under the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_moves_new_streams_to_a_new_connection() {
    let (ip, port, policies) = setup("allow");
    // Certificates live 6 s: sidecars renew every ~4 s.
    let m = mesh(policies, port, ip, &["--cert-ttl", "6s"], "").await;
    wait_echo(m.entry).await;
    let web = metrics(&m.web).await;
    let expiry = web
        .get("weft_cert_expiry_timestamp_seconds", &[])
        .unwrap_or(0.0);
    let lines = sequential(m.entry, 3, 1000).await;
    assert!(all_echoed(&lines), "{lines:?}");
    let before = inbound_handshakes(&metrics(&m.store).await);
    wait_until(DEFAULT_WAIT, "web renews its certificate", async || {
        let e = metrics(&m.web)
            .await
            .get("weft_cert_expiry_timestamp_seconds", &[])
            .unwrap_or(0.0);
        if e > expiry {
            Ok(())
        } else {
            Err(format!("expiry still {e}"))
        }
    })
    .await;
    let lines = sequential(m.entry, 3, 1000).await;
    assert!(all_echoed(&lines), "{lines:?}");
    let after = metrics(&m.store).await;
    assert!(
        inbound_handshakes(&after) > before,
        "no new handshake after web's certificate rotation:\n{}",
        after.lines_for("weft_tls_handshakes_total")
    );
}

/// (d) One bulk flow and 200 small exchanges at the same time through the same caller and
/// callee, over the same tunnel connection: the bulk flow's echo is left unread until the
/// small exchanges are done, so its stream is backed up (its windows full) the whole time;
/// every small exchange completes, then the bulk completes with its bytes intact. The times
/// are printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_flow_does_not_starve_small_exchanges() {
    const BULK: usize = 200 * 1024 * 1024;
    const SMALL: usize = 200;
    let (ip, port, policies) = setup("allow");
    let m = mesh(policies, port, ip, &[], "").await;
    wait_echo(m.entry).await;
    let before = inbound_handshakes(&metrics(&m.store).await);
    let args = [
        "fair".to_string(),
        m.entry.ip().to_string(),
        m.entry.port().to_string(),
        BULK.to_string(),
        SMALL.to_string(),
    ];
    let out = python(&args, Duration::from_secs(900)).await;
    let r = &out[0];
    println!("bulk + small through the tunnel: {r}");
    assert_eq!(r["small_ok"], SMALL, "{r}");
    // The bulk flow was in flight (blocked, not finished) the whole time.
    assert!(
        r["bulk_sent_when_small_done"].as_u64() < Some(BULK as u64),
        "{r}"
    );
    assert_eq!(r["bulk_ok"], true, "{r}");
    let after = metrics(&m.store).await;
    // All of it went over the pooled connection(s): a handshake or two, not 201.
    assert!(
        inbound_handshakes(&after) - before <= 2.0,
        "{}",
        after.lines_for("weft_tls_handshakes_total")
    );
    assert!(streams(&after, "inbound", "ok") >= (SMALL + 2) as f64);
}

/// A callee with the tunnel switched off does not speak `weft-tunnel`: the caller falls back
/// to one mTLS connection per TCP connection (counted), and every connection still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_without_the_tunnel_is_dialled_directly() {
    const N: usize = 5;
    let (ip, port, policies) = setup("allow");
    let m = mesh(policies, port, ip, &[], "tunnel:\n  enabled: false\n").await;
    wait_echo(m.entry).await;
    let before = metrics(&m.store).await;
    let lines = sequential(m.entry, N, 10_000).await;
    assert!(all_echoed(&lines), "{lines:?}");
    let after = m
        .store
        .wait_metric(
            "weft_tcp_connections_closed_total",
            &[("direction", "inbound"), ("peer", WEB_ID)],
            before.sum(
                "weft_tcp_connections_closed_total",
                &[("direction", "inbound"), ("peer", WEB_ID)],
            ) + N as f64,
        )
        .await;
    // Direct mTLS: a handshake per connection, the peer still verified.
    assert_eq!(
        inbound_handshakes(&after) - inbound_handshakes(&before),
        N as f64,
        "{}",
        after.lines_for("weft_tls_handshakes_total")
    );
    assert_eq!(streams(&after, "inbound", "ok"), 0.0);
    let web = metrics(&m.web).await;
    assert!(
        web.sum("weft_tunnel_fallbacks_total", &[]) >= N as f64,
        "{}",
        web.lines_for("weft_tunnel_fallbacks_total")
    );
    // The caller's /config_dump names the callee as dialled directly for now.
    let dump = m.web.config_dump().await;
    let direct = dump["tunnel"]["direct"].as_array().expect("tunnel.direct");
    assert!(
        direct.iter().any(
            |d| d["address"] == m.store.inbound_addr().to_string() && d["identity"] == STORE_ID
        ),
        "{}",
        dump["tunnel"]
    );
}
