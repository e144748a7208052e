//! Observability end to end: a real Prometheus scrapes real sidecars and a real control plane,
//! `promtool` lints every `/metrics` page, and the chart's Grafana dashboard and alert rules are
//! checked against the metric names the binaries actually export.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`): `scripts/install-test-deps.sh`.
//! Without them these tests fail (they never skip).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::{
    caller_proxy, caller_proxy_on, http_services_yaml, promtool, promtool_check_metrics,
    require_tool, tally, wait_for_instance, Instance,
};
use weft_testkit::{
    free_addr, free_port, http_get, next_loopback_ip, wait_until, ControlPlane, DemoApp,
    DemoAppConfig, Metrics, PolicyDir, ProcessGuard, Proxy, DEFAULT_WAIT,
};

/// Deadline of every wait on Prometheus: new targets are picked up on a 5s tick, so the first
/// sample takes ~6s.
const PROM_WAIT: Duration = Duration::from_secs(40);
const PROM_POLL: Duration = Duration::from_millis(250);

/// The scrape jobs the chart's alert rules assume (charts/weft/alerts/weft-rules.yaml).
const PROXY_JOB: &str = "weft-proxy";
const CONTROL_JOB: &str = "weft-control";

/// A metric the alert rules may use before any binary exports it (mTLS is not there yet).
const FUTURE_METRICS: &[&str] = &["weft_cert_expiry_timestamp_seconds"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent directory")
        .to_path_buf()
}

fn rules_file() -> PathBuf {
    repo_root().join("charts/weft/alerts/weft-rules.yaml")
}

fn rules_tests_dir() -> PathBuf {
    repo_root().join("charts/weft/alerts/tests")
}

fn dashboard_file() -> PathBuf {
    repo_root().join("charts/weft/dashboards/weft-mesh.json")
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Percent-encodes `s` for a URL query value (everything but RFC 3986 unreserved characters).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One sample of an instant-query vector.
#[derive(Debug, Clone)]
struct PromSample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// How Prometheus reaches an HTTPS target that wants a bearer token (the control plane's
/// admin API): its CA and a token file, as a Prometheus operator configures it.
#[derive(Clone, Debug)]
struct ScrapeAuth {
    ca_file: PathBuf,
    token_file: PathBuf,
}

impl ScrapeAuth {
    /// The control plane's roots and its bootstrap admin token.
    fn control_plane(cp: &ControlPlane) -> Option<Self> {
        let dir = cp.ca_dir().filter(|_| cp.admin_tls())?;
        Some(Self {
            ca_file: cp.roots_pem(),
            token_file: dir.join("admin-token"),
        })
    }
}

/// A real `prometheus` on its own loopback IP with a temporary TSDB, stopped by PID on drop
/// (before its directory is removed: fields drop in order).
struct Prometheus {
    addr: SocketAddr,
    process: ProcessGuard,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping each `(job, targets, auth)` every second (HTTPS with a bearer
    /// token where `auth` says so), evaluating `rule_files` every second, and waits until it is
    /// ready.
    async fn start_with(
        jobs: &[(&str, Vec<SocketAddr>, Option<ScrapeAuth>)],
        rule_files: &[PathBuf],
    ) -> Prometheus {
        let bin = require_tool("prometheus");
        let dir = TempDir::new("weft-prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                config.push_str(&format!(
                    "  - {}\n",
                    serde_json::Value::from(f.to_string_lossy())
                ));
            }
        }
        config.push_str("scrape_configs:\n");
        for (job, targets, auth) in jobs {
            let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            config.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ));
            if let Some(auth) = auth {
                let json = |p: &PathBuf| serde_json::Value::from(p.to_string_lossy());
                config.push_str(&format!(
                    "    scheme: https\n    tls_config:\n      ca_file: {}\n    authorization:\n      credentials_file: {}\n",
                    json(&auth.ca_file),
                    json(&auth.token_file)
                ));
            }
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let tsdb = dir.path().join("tsdb");
        let addr = free_addr(next_loopback_ip());
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", tsdb.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info");
        let process = ProcessGuard::spawn("prometheus", cmd);
        let mut prom = Prometheus {
            addr,
            process,
            _dir: dir,
        };
        let url = prom.url("/-/ready");
        let process = &mut prom.process;
        wait_until(
            DEFAULT_WAIT,
            "prometheus answers /-/ready with 200",
            async || {
                if let Some(status) = process.try_exit_status() {
                    panic!(
                        "prometheus exited ({status}) before it was ready; config:\n{config}\n{}",
                        process.describe()
                    );
                }
                match http_get(&url).await {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(r.summary()),
                    Err(e) => Err(format!("{e:#}")),
                }
            },
        )
        .await;
        prom
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// `GET <path_and_query>` of the HTTP API: the `data` of a `"status": "success"` answer.
    async fn api(&self, path_and_query: &str) -> Result<serde_json::Value, String> {
        let url = self.url(path_and_query);
        let r = http_get(&url)
            .await
            .map_err(|e| format!("GET {url}: {e:#}"))?;
        let body: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("GET {url}: {} is not JSON: {e}", r.summary()))?;
        if r.status != 200 || body["status"] != "success" {
            return Err(format!("GET {url}: {} {body}", r.status));
        }
        Ok(body["data"].clone())
    }

    /// An instant query that must return a vector.
    async fn query(&self, promql: &str) -> Result<Vec<PromSample>, String> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await?;
        if data["resultType"] != "vector" {
            return Err(format!("{promql}: not a vector: {data}"));
        }
        let result = data["result"].as_array().cloned().unwrap_or_default();
        result
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let raw = s["value"][1].as_str().unwrap_or_default();
                let value = match raw {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    "NaN" => f64::NAN,
                    v => v
                        .parse()
                        .map_err(|e| format!("{promql}: bad value {raw:?}: {e}"))?,
                };
                Ok(PromSample { labels, value })
            })
            .collect()
    }

    /// The single value of a query returning exactly one sample.
    async fn scalar(&self, promql: &str) -> Result<f64, String> {
        let samples = self.query(promql).await?;
        match samples.as_slice() {
            [one] => Ok(one.value),
            other => Err(format!("{promql}: {} samples: {other:?}", other.len())),
        }
    }

    /// Polls `probe` every 250 ms until it returns `Ok`, for at most [`PROM_WAIT`]; panics with
    /// `what` (the condition that never held), the last observation and Prometheus's log tail.
    async fn wait<T>(&self, what: &str, mut probe: impl AsyncFnMut() -> Result<T, String>) -> T {
        let start = Instant::now();
        let mut last = String::from("(no observation)");
        loop {
            match tokio::time::timeout(PROM_WAIT, probe()).await {
                Ok(Ok(v)) => return v,
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("the probe hung; before: {last}"),
            }
            if start.elapsed() + PROM_POLL >= PROM_WAIT {
                panic!(
                    "timed out after {:?} waiting until {what}; last observation: {last}\n{}",
                    start.elapsed(),
                    self.process.describe()
                );
            }
            tokio::time::sleep(PROM_POLL).await;
        }
    }

    /// Waits until `promql` returns exactly `want`; panics at once if it goes past `want` (a
    /// counter that overshoots will not come back).
    async fn wait_value(&self, what: &str, promql: &str, want: f64) {
        self.wait(&format!("{what}: {promql} == {want}"), async || {
            let v = self.scalar(promql).await?;
            if v > want {
                panic!("{what}: {promql} = {v}, more than {want}");
            }
            if v == want {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        })
        .await;
    }
}

/// Writes `payload`, half-closes, reads to EOF; returns what came back.
async fn tcp_echo(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(payload).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        anyhow::Ok(got)
    };
    tokio::time::timeout(Duration::from_secs(15), io)
        .await
        .map_err(|_| anyhow::anyhow!("no EOF from {addr} within 15s"))?
}

/// `web` (a caller-only sidecar: the test is its app) calls `api` (demo app + sidecar).
struct HttpMesh {
    web: Proxy,
    api: Instance,
    cp: ControlPlane,
    _policies: PolicyDir,
}

async fn http_mesh() -> HttpMesh {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    // Wait on /config_dump, not on requests: every request through web's outbound sidecar must be
    // one the test counts.
    web.wait_endpoint(api.endpoint(), true).await;
    HttpMesh {
        web,
        api,
        cp,
        _policies: policies,
    }
}

/// `instance="<admin addr>"`: how Prometheus labels a target's samples.
fn inst(p: &Proxy) -> String {
    format!("instance=\"{}\"", p.admin_addr())
}

/// A real Prometheus scrapes both sidecars and the control plane: the numbers it stores are the
/// traffic the test sent, the versions the proxies run, and the proxies connected. The chart's
/// dashboard queries and alert rules evaluate without error against that data, and a healthy mesh
/// raises no alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh() {
    require_tool("prometheus");
    let mesh = http_mesh().await;
    let web = &mesh.web;
    let api = &mesh.api.proxy;
    let prom = Prometheus::start_with(
        &[
            (PROXY_JOB, vec![web.admin_addr(), api.admin_addr()], None),
            (
                CONTROL_JOB,
                vec![mesh.cp.admin_addr],
                ScrapeAuth::control_plane(&mesh.cp),
            ),
        ],
        &[rules_file()],
    )
    .await;

    // Every target is scraped successfully.
    let want_targets: BTreeSet<String> = [web.admin_addr(), api.admin_addr(), mesh.cp.admin_addr]
        .iter()
        .map(|a| a.to_string())
        .collect();
    prom.wait("every target in /api/v1/targets is up", async || {
        let data = prom.api("/api/v1/targets?state=active").await?;
        let active = data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        for t in &active {
            let instance = t["labels"]["instance"].as_str().unwrap_or_default();
            if t["health"] != "up" {
                return Err(format!(
                    "{} ({}) health {} lastError {}",
                    instance, t["labels"]["job"], t["health"], t["lastError"]
                ));
            }
            seen.insert(instance.to_string());
        }
        if seen == want_targets {
            Ok(())
        } else {
            Err(format!("up targets {seen:?}, want {want_targets:?}"))
        }
    })
    .await;

    // The control plane counts both sidecars.
    prom.wait_value(
        "the control plane reports both proxies",
        &format!("weft_control_proxies_connected{{job=\"{CONTROL_JOB}\"}}"),
        2.0,
    )
    .await;

    // weft_config_version_info on each proxy = the versions its /config_dump reports.
    for proxy in [web, api] {
        let what = format!(
            "{}'s weft_config_version_info in Prometheus matches its /config_dump",
            proxy.id()
        );
        prom.wait(&what, async || {
            let dump = proxy.versions().await;
            let samples = prom
                .query(&format!("weft_config_version_info{{{}}}", inst(proxy)))
                .await?;
            let mut got: BTreeMap<String, String> = BTreeMap::new();
            for s in &samples {
                let ty = s.labels.get("type").cloned().unwrap_or_default();
                let version = s.labels.get("version").cloned().unwrap_or_default();
                if s.value != 1.0 {
                    return Err(format!("{ty} {version} has value {}", s.value));
                }
                if let Some(prev) = got.insert(ty.clone(), version) {
                    return Err(format!("two versions of {ty}: {prev} and {}", got[&ty]));
                }
            }
            let want: BTreeMap<String, String> = [
                ("listeners", &dump.listeners),
                ("routes", &dump.routes),
                ("clusters", &dump.clusters),
                ("endpoints", &dump.endpoints),
                ("policies", &dump.policies),
                ("trust", &dump.trust),
            ]
            .into_iter()
            .map(|(t, v)| (t.to_string(), v.clone()))
            .collect();
            if want.values().any(String::is_empty) {
                return Err(format!("/config_dump versions incomplete: {dump:?}"));
            }
            if got == want {
                Ok(())
            } else {
                Err(format!("prometheus {got:?}, /config_dump {want:?}"))
            }
        })
        .await;
    }

    // Traffic: exactly 200 requests through web's outbound sidecar, in two batches with a scrape
    // between them (so rate() has samples before and after).
    let client = web.http1();
    let caller_total = format!(
        "sum(weft_requests_total{{{}, direction=\"outbound\"}})",
        inst(web)
    );
    for (batch, total) in [(1, 100.0), (2, 200.0)] {
        let t = tally(&client, "api", "/hello", 100).await;
        assert!(
            t.errors.is_empty() && t.count("api-1") == 100,
            "batch {batch}: {t:?}"
        );
        prom.wait_value(
            &format!("Prometheus counts web's outbound requests after batch {batch}"),
            &caller_total,
            total,
        )
        .await;
    }
    prom.wait_value(
        "every outbound request of web is a 200 to api.default",
        &format!(
            "sum(weft_requests_total{{{}, direction=\"outbound\", cluster=\"api.default\", code=\"200\"}})",
            inst(web)
        ),
        200.0,
    )
    .await;
    prom.wait_value(
        "api's sidecar counts the same requests inbound",
        &format!(
            "sum(weft_requests_total{{{}, direction=\"inbound\"}})",
            inst(api)
        ),
        200.0,
    )
    .await;
    // The sidecar's own /metrics agrees with what Prometheus stored.
    let direct = web
        .metrics()
        .await
        .sum("weft_requests_total", &[("direction", "outbound")]);
    assert_eq!(direct, 200.0, "web's /metrics after the traffic");

    // Median latency of those requests, from the histogram.
    let p50_query = format!(
        "histogram_quantile(0.5, sum by (le) (rate(weft_request_duration_seconds_bucket{{{}, direction=\"outbound\"}}[1m])))",
        inst(web)
    );
    let p50 = prom
        .wait("the outbound median latency is a number", async || {
            let v = prom.scalar(&p50_query).await?;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(format!("{v}"))
            }
        })
        .await;
    assert!(
        p50 > 0.0 && p50 < 10.0,
        "{p50_query} = {p50}: want a positive number of seconds below 10"
    );

    // Every query of the dashboard is valid PromQL that this Prometheus evaluates.
    for (title, expr) in dashboard_exprs(&load_dashboard()) {
        let promql = grafana_to_promql(&expr);
        if let Err(e) = prom.query(&promql).await {
            panic!("dashboard panel {title:?}: query {promql:?} fails: {e}");
        }
    }

    // Prometheus loaded every alert rule, evaluates them without error, and nothing fires or is
    // pending for a healthy mesh.
    prom.wait(
        "every rule of weft-rules.yaml is evaluated with health ok",
        async || {
            let data = prom.api("/api/v1/rules").await?;
            let mut n = 0;
            for group in data["groups"].as_array().cloned().unwrap_or_default() {
                for rule in group["rules"].as_array().cloned().unwrap_or_default() {
                    n += 1;
                    if rule["health"] != "ok" {
                        return Err(format!(
                            "rule {} health {} lastError {}",
                            rule["name"], rule["health"], rule["lastError"]
                        ));
                    }
                }
            }
            if n == 0 {
                Err("no rules loaded".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let alerts = prom
        .api("/api/v1/alerts")
        .await
        .expect("GET /api/v1/alerts");
    assert_eq!(
        alerts["alerts"].as_array().map(Vec::len),
        Some(0),
        "a healthy mesh raises alerts: {alerts}"
    );
}

/// A mesh with every kind of traffic: `web` calls `api` over HTTP/1.1 and h2c (200s and 500s),
/// a TCP service `store` (outside the mesh: the api demo app's echo port) through web's TCP
/// listener, a service `gone` whose only endpoint refuses connections, and a host with no route.
struct FullMesh {
    web: Proxy,
    api: Instance,
    cp: ControlPlane,
    _policies: PolicyDir,
}

async fn full_mesh_after_traffic() -> FullMesh {
    let web_ip = next_loopback_ip();
    let store_port = free_port(web_ip);
    let api_app = DemoAppConfig::new("api", "api-1").with_tcp();
    let gone = free_addr(next_loopback_ip());
    let yaml = format!(
        "services:\n  - name: web\n  - name: api\n  - name: store\n    protocol: tcp\n    port: {store_port}\n    endpoints:\n      - address: {}\n  - name: gone\n    connect_timeout: 1s\n    endpoints:\n      - address: {gone}\n",
        api_app.tcp.expect("tcp")
    );
    let policies = PolicyDir::with_file("mesh.yaml", &yaml);
    let cp = ControlPlane::start(policies.path()).await;
    let app = DemoApp::start_with(api_app).await;
    let api_proxy = Proxy::start(&cp.grpc_url(), "api", "api-1", app.http_addr()).await;
    let api = Instance {
        proxy: api_proxy,
        app,
    };
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;

    let h1 = web.http1();
    wait_for_instance(&h1, "api", "/", "api-1").await;
    let t = tally(&h1, "api", "/hello", 20).await;
    assert!(t.errors.is_empty(), "HTTP/1.1 traffic: {t:?}");
    let t = tally(&web.h2c(), "api", "/hello", 10).await;
    assert!(t.errors.is_empty(), "h2c traffic: {t:?}");
    for _ in 0..3 {
        let r = h1.get("api", "/status/500").await.expect("GET /status/500");
        assert_eq!(r.status, 500, "{}", r.summary());
    }
    let r = h1
        .request(Method::POST, "api", "/echo", &[], "hello")
        .await
        .expect("POST /echo");
    assert_eq!(r.status, 200, "{}", r.summary());
    let r = h1.get("gone", "/").await.expect("GET http://gone/");
    assert_eq!(r.status, 503, "{}", r.summary());
    let r = h1.get("nosuch", "/").await.expect("GET http://nosuch/");
    assert_eq!(r.status, 404, "{}", r.summary());

    let store = SocketAddr::new(web_ip, store_port);
    wait_until(
        DEFAULT_WAIT,
        "a TCP echo through web's store listener",
        async || {
            let got = tcp_echo(store, b"ping").await?;
            if got == b"ping" {
                Ok(())
            } else {
                Err(anyhow::anyhow!("got {got:?}"))
            }
        },
    )
    .await;
    for _ in 0..3 {
        let got = tcp_echo(store, &[7u8; 5000]).await.expect("TCP echo");
        assert_eq!(got.len(), 5000);
    }

    // Wait until the TCP and connect-error series are there (TCP counters may be recorded as the
    // connection closes).
    wait_until(
        DEFAULT_WAIT,
        "web's /metrics has TCP bytes and connect errors",
        async || {
            let m = web.metrics().await;
            let bytes = m.sum(
                "weft_tcp_bytes_total",
                &[("direction", "outbound"), ("cluster", "store.default")],
            );
            let errors = m.sum("weft_upstream_connect_errors_total", &[]);
            if bytes >= 2.0 * 15004.0 && errors >= 1.0 {
                Ok(())
            } else {
                Err(format!("tcp bytes {bytes}, connect errors {errors}"))
            }
        },
    )
    .await;
    FullMesh {
        web,
        api,
        cp,
        _policies: policies,
    }
}

/// `promtool check metrics` is clean (exit 0, no problem line) on both sidecars' and the control
/// plane's `/metrics` after HTTP, h2c, error and TCP traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_every_metrics_page() {
    require_tool("promtool");
    let mesh = full_mesh_after_traffic().await;
    let pages = [
        (
            "web's sidecar /metrics",
            mesh.web.admin_get("/metrics").await,
        ),
        (
            "api's sidecar /metrics",
            mesh.api.proxy.admin_get("/metrics").await,
        ),
        ("weft-control /metrics", mesh.cp.get("/metrics").await),
    ];
    let mut failures = Vec::new();
    for (what, resp) in pages {
        assert_eq!(resp.status, 200, "{what}: {}", resp.summary());
        // Collect every page's verdict before failing, so one run shows every complaint.
        if let Err(e) = promtool_check_metrics(what, &resp.text()) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn load_dashboard() -> serde_json::Value {
    let path = dashboard_file();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every panel (rows' nested panels included) of a dashboard.
fn all_panels(dash: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut stack: Vec<serde_json::Value> = dash["panels"].as_array().cloned().unwrap_or_default();
    stack.reverse();
    while let Some(p) = stack.pop() {
        if let Some(nested) = p["panels"].as_array() {
            stack.extend(nested.iter().rev().cloned());
        }
        out.push(p);
    }
    out
}

/// `(panel title, expr)` of every panel target.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        for t in p["targets"].as_array().cloned().unwrap_or_default() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or_default().to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// A Grafana query as PromQL: its variables replaced with what "All" and a short range mean.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
        .replace("${cluster}", ".*")
        .replace("$cluster", ".*")
}

/// Identifier tokens (`[A-Za-z_:][A-Za-z0-9_:]*`) of `text` that start with `weft_`: the metric
/// names a PromQL expression (or a whole rules file) references.
fn weft_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut token = String::new();
    let mut prev_ident = false;
    for c in text.chars().chain(std::iter::once(' ')) {
        let ident = c.is_ascii_alphanumeric() || c == '_' || c == ':';
        if ident {
            // A token may not start with a digit; `$var` and `{{label}}` are not names either.
            if token.is_empty() && !prev_ident && c.is_ascii_digit() {
                prev_ident = true;
                continue;
            }
            if token.is_empty() && prev_ident {
                continue;
            }
            token.push(c);
        } else {
            if token.starts_with("weft_") {
                names.insert(token.clone());
            }
            token.clear();
        }
        prev_ident = ident;
    }
    names
}

/// Sample names (histograms: `_bucket`, `_sum`, `_count`) of a Prometheus text exposition.
fn exported_names(text: &str) -> BTreeSet<String> {
    Metrics::parse(text)
        .samples
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// The chart's alert rules pass `promtool check rules` and their unit tests; the dashboard is a
/// Grafana dashboard with a Prometheus datasource variable; every metric either references is one
/// the sidecars or the control plane export (the rules may also use the future
/// `weft_cert_expiry_timestamp_seconds`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_use_exported_metrics() {
    require_tool("promtool");
    let rules = rules_file();
    let (code, out) = promtool(&["check", "rules", &rules.to_string_lossy()], None);
    assert_eq!(
        code,
        Some(0),
        "promtool check rules {}:\n{out}",
        rules.display()
    );
    let mut tests: Vec<PathBuf> = std::fs::read_dir(rules_tests_dir())
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", rules_tests_dir().display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    tests.sort();
    assert!(
        !tests.is_empty(),
        "no rule unit tests in {}",
        rules_tests_dir().display()
    );
    for t in &tests {
        let (code, out) = promtool(&["test", "rules", &t.to_string_lossy()], None);
        assert_eq!(code, Some(0), "promtool test rules {}:\n{out}", t.display());
    }

    // The dashboard's shape: what Grafana needs to import it with any Prometheus.
    let dash = load_dashboard();
    let schema = dash["schemaVersion"].as_i64().unwrap_or(0);
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(
        dash["uid"].is_string() && dash["title"].is_string(),
        "uid and title"
    );
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "a `datasource` variable of type datasource / prometheus: {vars:?}"
    );
    let panels = all_panels(&dash);
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert!(
            p["gridPos"]["w"].is_i64() && p["gridPos"]["h"].is_i64(),
            "gridPos of {title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} must use the datasource variable"
        );
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
    }
    let exprs = dashboard_exprs(&dash);
    let mut dash_names = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = weft_names(expr);
        assert!(
            !names.is_empty() || expr.contains("up{"),
            "panel {title:?} queries no Weft metric: {expr}"
        );
        dash_names.extend(names.into_iter().map(|n| (n, title.clone())));
    }
    let mut var_names = BTreeSet::new();
    for v in &vars {
        if let Some(q) = v["definition"].as_str() {
            var_names.extend(weft_names(q));
        }
    }
    // What the dashboard must show.
    let shown: BTreeSet<&str> = dash_names.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "weft_requests_total",
        "weft_request_duration_seconds_bucket",
        "weft_tcp_bytes_total",
        "weft_tcp_connections",
        "weft_tcp_connections_total",
        "weft_control_push_duration_seconds_bucket",
        "weft_control_proxies_connected",
        "weft_control_pushes_total",
        "weft_config_updates_total",
    ] {
        assert!(shown.contains(needed), "the dashboard shows no {needed}");
    }

    // What the binaries export, from live /metrics after every kind of traffic.
    let mesh = full_mesh_after_traffic().await;
    let mut exported = BTreeSet::new();
    for text in [
        mesh.web.metrics().await.text,
        mesh.api.proxy.metrics().await.text,
        mesh.cp.metrics().await.text,
    ] {
        exported.extend(exported_names(&text));
    }
    let unknown: Vec<String> = dash_names
        .iter()
        .filter(|(n, _)| !exported.contains(n))
        .map(|(n, title)| format!("{n} (panel {title:?})"))
        .chain(var_names.iter().filter(|n| !exported.contains(*n)).cloned())
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics nobody exports: {unknown:?}\nexported: {exported:?}"
    );

    let rules_text = std::fs::read_to_string(&rules).expect("read the rules file");
    let rule_names = weft_names(&rules_text);
    let unknown: Vec<&String> = rule_names
        .iter()
        .filter(|n| !exported.contains(*n) && !FUTURE_METRICS.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the alert rules use metrics nobody exports: {unknown:?}\nexported: {exported:?}"
    );
    for needed in [
        "weft_requests_total",
        "weft_control_proxies_connected",
        "weft_cert_expiry_timestamp_seconds",
    ] {
        assert!(rule_names.contains(needed), "no alert rule uses {needed}");
    }
    assert!(
        rules_text.contains(&format!("up{{job=\"{CONTROL_JOB}\"}} == 0")),
        "an alert on the control plane's scrape job being down"
    );
}

#[test]
fn weft_names_finds_metric_names_only() {
    let names = weft_names(
        r#"sum by (cluster) (rate(weft_requests_total{job="weft-control",x="$cluster"}[5m])) / weft_a:b + 2weft_x {{weft_label}} cluster:weft_rec:rate5m"#,
    );
    let want: BTreeSet<String> = ["weft_requests_total", "weft_a:b", "weft_label"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    assert_eq!(url_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
}
