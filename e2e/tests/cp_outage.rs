//! Control-plane outages: a control plane killed under load costs no request; proxies stay
//! ready on their last good snapshot, reconnect with backoff, and resync without being sent what
//! they already hold. A proxy started during the outage is not ready and serves nothing until
//! the control plane is back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_e2e::{
    caller_proxy, tally, wait_for_instance, Generations, Instance, LoadSpec, MixedLoad, SETTLE,
};
use weft_testkit::{
    free_addr, http_get, next_loopback_ip, wait_until, ConfigVersions, ControlPlane,
    ControlPlaneConfig, DemoApp, Metrics, PolicyDir, Proxy, ProxyConfig, DEFAULT_WAIT,
};

/// Every `weft_config_updates_total` sample, keyed by `type/result`.
fn updates(m: &Metrics) -> BTreeMap<String, f64> {
    m.matching("weft_config_updates_total", &[])
        .map(|s| {
            let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (format!("{}/{}", label("type"), label("result")), s.value)
        })
        .collect()
}

/// Waits until `weft_control_proxies_connected` is exactly `n`.
async fn wait_connected(cp: &ControlPlane, n: usize) {
    let what = format!("weft_control_proxies_connected is {n}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = cp.metrics().await;
        match m.get("weft_control_proxies_connected", &[]) {
            Some(v) if v == n as f64 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Asserts `/ready` of every proxy answers 200.
async fn assert_all_ready(proxies: &[&Proxy], when: &str) {
    for p in proxies {
        let r = http_get(&p.admin_url("/ready"))
            .await
            .unwrap_or_else(|e| panic!("GET /ready on {} {when}: {e:#}", p.id()));
        assert_eq!(
            r.status,
            200,
            "{} is not ready {when}: {}",
            p.id(),
            r.summary()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_control_plane_costs_no_request_and_resync_pushes_nothing() {
    let legacy = DemoApp::start("legacy", "legacy-static").await;
    let policy = format!(
        "services:\n  - name: web\n  - name: api\n  - name: legacy\n    endpoints:\n      - address: {}\n  \
         - name: batch\n    dependencies: [legacy]\n",
        legacy.http_addr()
    );
    let policies = PolicyDir::with_file("mesh.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let api1 = Instance::http(&cp, "api", "api-1").await;
    let api2 = Instance::http(&cp, "api", "api-2").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let batch = caller_proxy(&cp, "batch", "batch-1").await;
    web.wait_endpoint(api1.endpoint(), true).await;
    web.wait_endpoint(api2.endpoint(), true).await;
    wait_for_instance(&web.http1(), "api", "/", "api-2").await;
    wait_for_instance(&web.http1(), "legacy", "/", "legacy-static").await;
    wait_for_instance(&batch.http1(), "legacy", "/", "legacy-static").await;
    let all = [&web, &batch, &api1.proxy, &api2.proxy];
    wait_connected(&cp, all.len()).await;
    // Let every proxy's view settle (each registration pushes endpoints to the others).
    let mut before: Vec<(ConfigVersions, BTreeMap<String, f64>)> = Vec::new();
    wait_until(
        DEFAULT_WAIT,
        "every proxy has acked what it runs and nothing changes for 500ms",
        async || {
            let mut now = Vec::new();
            for p in all {
                let versions = p.versions().await;
                let acked = weft_e2e::proxy_status(&cp, p.id())
                    .await
                    .map(|s| s["versions"].clone())
                    .unwrap_or_default();
                if acked["endpoints"] != versions.endpoints.as_str() {
                    return Err(format!("{} runs {versions:?}, acked {acked}", p.id()));
                }
                now.push((versions, updates(&p.metrics().await)));
            }
            if now == before {
                Ok(())
            } else {
                before = now;
                tokio::time::sleep(Duration::from_millis(500)).await;
                Err("still changing".to_string())
            }
        },
    )
    .await;

    let generations = Arc::new(Generations::default());
    let spec = |target, hosts: &[&str]| LoadSpec {
        target,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        tasks_per_kind: 1,
        max_per_task: 2000,
        max_duration: Duration::from_secs(90),
        pause: Duration::from_millis(5),
        slow_every: 0,
        slow_ms: 0,
    };
    let web_load = MixedLoad::start(&spec(web.outbound_addr(), &["api", "legacy"]), &generations);
    let batch_load = MixedLoad::start(&spec(batch.outbound_addr(), &["legacy"]), &generations);
    web_load.wait_sent(100).await;

    // SIGKILL: no goodbye on the streams.
    let mut cp = cp;
    let config = cp.config.clone();
    let killed_at = Instant::now();
    cp.process.kill();
    assert!(
        cp.admin()
            .request(http::Method::GET, "/healthz", "")
            .await
            .is_err(),
        "the control plane's admin port still answers after SIGKILL"
    );
    drop(cp);
    let sent_at_kill = web_load.sent() + batch_load.sent();
    // Down for ~3 s, long enough for several reconnect attempts; every proxy stays ready.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_all_ready(&all, &format!("{i}: while the control plane is down")).await;
    }
    let sent_while_down = web_load.sent() + batch_load.sent() - sent_at_kill;

    let cp = ControlPlane::start_with(config).await;
    wait_connected(&cp, all.len()).await;
    let reconnected_in = killed_at.elapsed();
    assert_all_ready(&all, "after the control plane came back").await;
    let sent = web_load.sent();
    web_load.wait_sent(sent + 300).await;
    tokio::time::sleep(SETTLE).await;
    let web_report = web_load.finish().await;
    let batch_report = batch_load.finish().await;

    let failed = web_report.failures().len() + batch_report.failures().len();
    println!(
        "control plane killed under load: web {} requests {:?} {:?}, batch {} requests, \
         {sent_while_down} answered while it was down, {failed} failed; all {} proxies \
         reconnected {reconnected_in:?} after the kill",
        web_report.records.len(),
        web_report.by_kind(),
        web_report.by_service(),
        batch_report.records.len(),
        all.len()
    );
    let cm = cp.metrics().await;
    println!(
        "restarted control plane: {}",
        cm.lines_for("weft_control_pushes_total")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        failed == 0,
        "requests failed across the control-plane kill and restart:\nweb: {}\nbatch: {}\n{}",
        web_report.describe_failures(20),
        batch_report.describe_failures(5),
        web.process.describe()
    );
    assert!(
        sent_while_down > 0,
        "no request was answered while the control plane was down"
    );

    // Resync: every proxy announced what it holds, the registry is rebuilt, and nothing the
    // proxies hold was sent again.
    let mut repushed = Vec::new();
    for (p, (versions, counts)) in all.iter().zip(&before) {
        let now_versions = p.versions().await;
        let now_counts = updates(&p.metrics().await);
        if &now_versions != versions || &now_counts != counts {
            repushed.push(format!(
                "{}: versions {versions:?} -> {now_versions:?}; weft_config_updates_total \
                 {counts:?} -> {now_counts:?}",
                p.id()
            ));
        }
        let acked = weft_e2e::proxy_status(&cp, p.id())
            .await
            .unwrap_or_else(|| panic!("{} not in /v1/proxies after the restart", p.id()));
        assert_eq!(
            acked["versions"]["routes"],
            now_versions.routes,
            "the new control plane knows what {} holds: {acked}",
            p.id()
        );
    }
    assert!(
        repushed.is_empty(),
        "proxies were sent config again although nothing changed (the restarted control plane \
         pushed {} times):\n{}\n{}",
        cm.sum("weft_control_pushes_total", &[]),
        repushed.join("\n"),
        cp.process.describe()
    );
    assert_eq!(
        cm.sum("weft_control_pushes_total", &[]),
        0.0,
        "the restarted control plane pushed nothing: {}",
        cm.lines_for("weft_control_pushes_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_started_during_an_outage_waits_for_the_control_plane() {
    let policies =
        PolicyDir::with_file("mesh.yaml", &weft_e2e::http_services_yaml(&["web", "api"]));
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    // Nothing is deregistered while the control plane is away.
    cp_config.deregister_grace = Duration::from_secs(5);
    // The stand-in listener below reads node ids (and CSRs) out of the proxies' gRPC bytes:
    // plaintext gRPC (the mesh itself still runs mTLS with certificates from the CA).
    cp_config.grpc_tls = false;
    let mut cp = ControlPlane::start_with(cp_config).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web1 = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web1.http1(), "api", "/", "api-1").await;

    let config = cp.config.clone();
    let grpc = cp.grpc_addr;
    cp.process.kill();
    drop(cp);
    // Something that accepts on the control plane's address and hangs up at once: each accept
    // is one reconnect attempt of the proxies.
    let fake = tokio::net::TcpListener::bind(grpc)
        .await
        .unwrap_or_else(|e| panic!("bind the dead control plane's address {grpc}: {e}"));
    // Each attempt is attributed to a proxy by the node id in its `Hello`: the h2 client sends
    // its preface, the stream's HEADERS and the first DATA frame (the protobuf `Hello`, ids as
    // plain bytes) without waiting for the server.
    let seen: Arc<Mutex<Vec<(Duration, String)>>> = Arc::default();
    let acceptor = {
        let seen = seen.clone();
        AbortOnDrop(tokio::spawn(async move {
            let started = Instant::now();
            // Bounded by count; aborted (closing the socket) before the control plane restarts.
            for _ in 0..1000 {
                let Ok((conn, _)) = fake.accept().await else {
                    break;
                };
                let at = started.elapsed();
                let seen = seen.clone();
                tokio::spawn(async move {
                    // web-2 has no certificate yet: its attempts are Certify calls (a CSR in
                    // the first DATA frame), which must succeed before it may open its
                    // (certificate-authenticated) discovery stream. Only web-2 certifies in
                    // this window: the others' certificates are hours from renewal.
                    let who = hello_sender(
                        conn,
                        &[
                            ("web-2", "web-2"),
                            ("web-1", "web-1"),
                            ("api-1", "api-1"),
                            ("CERTIFICATE REQUEST", "web-2"),
                        ],
                    )
                    .await;
                    lock(&seen).push((at, who));
                });
            }
        }))
    };

    let mut web2 = Proxy::spawn(second_web_config(&config));
    let url = web2.admin_url("/ready");
    wait_until(
        DEFAULT_WAIT,
        "web-2 (started during the outage) answers /ready with 503",
        async || {
            let r = http_get(&url).await?;
            if r.status == 503 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;
    let watch_from = Instant::now();
    // Watch ~6 s of reconnect attempts, checking web-2 stays unready and bound to nothing and
    // web-1 keeps serving.
    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = http_get(&url).await.expect("GET /ready on web-2");
        assert_eq!(r.status, 503, "{i}: web-2 /ready: {}", r.summary());
        for addr in [web2.outbound_addr(), web2.inbound_addr()] {
            assert!(
                tokio::net::TcpStream::connect(addr).await.is_err(),
                "{i}: web-2 accepts on {addr} without ever having had a snapshot"
            );
        }
        let t = tally(&web1.http1(), "api", "/", 5).await;
        assert!(
            t.errors.is_empty() && t.count("api-1") == 5,
            "{i}: web-1 during the outage: {t:?}"
        );
    }
    let watched = watch_from.elapsed();
    drop(acceptor);
    let seen = lock(&seen).clone();
    let web2_attempts: Vec<Duration> = seen
        .iter()
        .filter(|(_, who)| who == "web-2")
        .map(|(t, _)| *t)
        .collect();
    let gaps: Vec<u128> = web2_attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    println!(
        "web-2 reconnect attempts over ~{watched:?}: {} (gaps ms {gaps:?}); all attempts: {:?}",
        web2_attempts.len(),
        seen.iter()
            .map(|(t, who)| format!("{}ms {who}", t.as_millis()))
            .collect::<Vec<_>>()
    );
    // Backoff from 100 ms, doubling to 5 s: about 7-10 attempts in this window. A proxy that
    // retried at a fixed 100 ms would make over 60.
    assert!(
        web2_attempts.len() >= 3,
        "web-2 keeps trying to reach the control plane: {web2_attempts:?}"
    );
    assert!(
        web2_attempts.len() <= 40,
        "web-2 retries without backing off: {} attempts, gaps {gaps:?}",
        web2_attempts.len()
    );

    // The control plane is back on the same addresses: web-2 becomes ready and serves.
    let cp = ControlPlane::start_with(config).await;
    web2.wait_ready().await;
    wait_for_instance(&web2.http1(), "api", "/", "api-1").await;
    let t = tally(&web2.http1(), "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "web-2 after the control plane came back: {t:?}"
    );
    wait_connected(&cp, 3).await;
    let ids: Vec<String> = cp
        .proxies()
        .await
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    for id in ["api-1", "web-1", "web-2"] {
        assert!(ids.iter().any(|i| i == id), "{id} in /v1/proxies: {ids:?}");
    }
}

/// A `web` caller's config, `web-2`, pointed at the control plane `config` describes.
fn second_web_config(config: &ControlPlaneConfig) -> ProxyConfig {
    let grpc = config
        .grpc
        .unwrap_or_else(|| panic!("a started control plane's config has its gRPC address"));
    let ip = next_loopback_ip();
    ProxyConfig::on_ip(ip, &format!("http://{grpc}"), "web", "web-2", free_addr(ip))
}

/// Reads what a client sends on `conn` (at most 1 s, 64 KiB) and returns the first of `ids`
/// found in it, or "?"; then hangs up.
async fn hello_sender(mut conn: tokio::net::TcpStream, ids: &[(&str, &str)]) -> String {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while bytes.len() < 64 * 1024 {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => break,
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Some((_, who)) = ids.iter().find(|(needle, _)| text.contains(needle)) {
            return (*who).to_string();
        }
    }
    "?".to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Aborts a task when dropped (also when the test panics first).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
