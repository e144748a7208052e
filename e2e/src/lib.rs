//! Scenario helpers shared by the end-to-end tests in `tests/`: a service instance (demo app +
//! its sidecar), a caller-only sidecar, and traffic loops that are always bounded.
//!
//! The tests need the workspace's binaries: `cargo build --workspace --bins` first.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, DemoApp, DemoAppConfig, HttpClient,
    HttpResponse, Proxy, ProxyConfig, DEFAULT_WAIT,
};

/// One instance of a mesh service: a demo app and the sidecar in front of it. Dropping it stops
/// the sidecar first (fields drop in order), then the app.
#[derive(Debug)]
pub struct Instance {
    pub proxy: Proxy,
    pub app: DemoApp,
}

impl Instance {
    /// An HTTP service instance: the sidecar's inbound listener forwards to the app's HTTP port.
    pub async fn http(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start(service, instance).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.http_addr()).await;
        Instance { proxy, app }
    }

    /// A gRPC service instance: the inbound listener forwards to the app's gRPC port.
    pub async fn grpc(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start_with(DemoAppConfig::new(service, instance).with_grpc()).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.grpc_addr()).await;
        Instance { proxy, app }
    }

    /// A TCP service instance: the inbound listener forwards to the app's TCP echo port.
    pub async fn tcp(cp: &ControlPlane, service: &str, instance: &str) -> Instance {
        let app = DemoApp::start_with(DemoAppConfig::new(service, instance).with_tcp()).await;
        let proxy = Proxy::start(&cp.grpc_url(), service, instance, app.tcp_addr()).await;
        Instance { proxy, app }
    }

    /// The address the control plane registers for this instance.
    pub fn endpoint(&self) -> SocketAddr {
        self.proxy.inbound_addr()
    }
}

/// A sidecar for a service whose app is the test itself (it sends requests to the outbound
/// listener); its inbound app address is a port nothing listens on.
pub async fn caller_proxy(cp: &ControlPlane, service: &str, id: &str) -> Proxy {
    Proxy::start_with(caller_proxy_config(cp, service, id)).await
}

/// The config [`caller_proxy`] uses, on a fresh loopback IP.
pub fn caller_proxy_config(cp: &ControlPlane, service: &str, id: &str) -> ProxyConfig {
    caller_proxy_config_on(cp, next_loopback_ip(), service, id)
}

/// [`caller_proxy`] on `ip`: for tests that need the IP before the sidecar starts (a TCP
/// service's port is picked free on its caller's IP).
pub async fn caller_proxy_on(cp: &ControlPlane, ip: IpAddr, service: &str, id: &str) -> Proxy {
    Proxy::start_with(caller_proxy_config_on(cp, ip, service, id)).await
}

/// The config [`caller_proxy_on`] uses.
pub fn caller_proxy_config_on(
    cp: &ControlPlane,
    ip: IpAddr,
    service: &str,
    id: &str,
) -> ProxyConfig {
    ProxyConfig::on_ip(ip, &cp.grpc_url(), service, id, free_addr(ip))
}

/// `services:` YAML declaring plain HTTP services with default settings.
pub fn http_services_yaml(names: &[&str]) -> String {
    let mut yaml = String::from("services:\n");
    for n in names {
        yaml.push_str(&format!("  - name: {n}\n"));
    }
    yaml
}

/// The instance that answered (`x-demo-instance`), or "" for a response from no demo app.
pub fn instance_of(resp: &HttpResponse) -> String {
    resp.header("x-demo-instance").unwrap_or("").to_string()
}

/// Waits until `GET http://<host><path>` through `client` answers 200 from `instance`: the
/// route and its endpoints have reached the proxy.
pub async fn wait_for_instance(
    client: &HttpClient,
    host: &str,
    path: &str,
    instance: &str,
) -> HttpResponse {
    let what = format!(
        "GET http://{host}{path} via {} is answered 200 by {instance}",
        client.addr()
    );
    wait_until(DEFAULT_WAIT, &what, async || {
        let r = client.get(host, path).await?;
        if r.status == 200 && instance_of(&r) == instance {
            Ok(r)
        } else {
            Err(anyhow::anyhow!(
                "{} from {:?}",
                r.summary(),
                instance_of(&r)
            ))
        }
    })
    .await
}

/// What a bounded run of requests got.
#[derive(Debug, Default)]
pub struct Tally {
    /// 200 responses per answering instance.
    pub by_instance: BTreeMap<String, usize>,
    /// Every non-200 response or transport error, described.
    pub errors: Vec<String>,
}

impl Tally {
    pub fn count(&self, instance: &str) -> usize {
        self.by_instance.get(instance).copied().unwrap_or(0)
    }
}

/// Sends `n` sequential `GET http://<host><path>` through `client` and tallies who answered.
pub async fn tally(client: &HttpClient, host: &str, path: &str, n: usize) -> Tally {
    let mut t = Tally::default();
    for i in 0..n {
        match client.get(host, path).await {
            Ok(r) if r.status == 200 => *t.by_instance.entry(instance_of(&r)).or_default() += 1,
            Ok(r) => t.errors.push(format!("request {i}: {}", r.summary())),
            Err(e) => t.errors.push(format!("request {i}: {e:#}")),
        }
    }
    t
}

/// Waits until the scrape `scrape` returns has `name{labels}` (summed) at least `min`.
pub async fn wait_metric_at_least<F>(
    what: &str,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
    mut scrape: F,
) where
    F: AsyncFnMut() -> weft_testkit::Metrics,
{
    let what = format!("{what}: {name}{labels:?} >= {min}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = scrape().await;
        let v = m.sum(name, labels);
        if v >= min {
            Ok(v)
        } else {
            Err(format!("{v}; lines: {}", m.lines_for(name)))
        }
    })
    .await;
}

/// A short pause used only to let something *not* happen (e.g. give a bad config time to be
/// wrongly applied) before checking it did not.
pub const SETTLE: Duration = Duration::from_millis(500);

/// How long a `weftctl` run may take before the helpers give up on it.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `weftctl --server <cp admin> args...`; returns its output and a description of the run
/// (command line, exit status, stdout, stderr) for assertion messages.
pub async fn weftctl(cp: &ControlPlane, args: &[&str]) -> (std::process::Output, String) {
    let reach = cp.weftctl_args();
    let mut full: Vec<&str> = reach.iter().map(String::as_str).collect();
    full.extend_from_slice(args);
    let mut cmd = tokio::process::Command::new(weft_testkit::bin_path("weftctl"));
    cmd.args(&full).kill_on_drop(true);
    let out = tokio::time::timeout(CLI_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`weftctl {}` did not finish within {CLI_TIMEOUT:?}",
                full.join(" ")
            )
        })
        .unwrap_or_else(|e| panic!("cannot run `weftctl`: {e}"));
    let desc = format!(
        "`weftctl {}` exited {}\nstdout:\n{}\nstderr:\n{}",
        full.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, desc)
}

/// The `GET /v1/proxies` entry of proxy `id`, if listed.
pub async fn proxy_status(cp: &ControlPlane, id: &str) -> Option<serde_json::Value> {
    let proxies = cp.proxies().await;
    proxies
        .as_array()
        .and_then(|a| a.iter().find(|p| p["id"] == id))
        .cloned()
}

/// The ways [`MixedLoad`] reaches a proxy's outbound listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientKind {
    /// HTTP/1.1 over pooled keep-alive connections.
    H1KeepAlive,
    /// HTTP/1.1, a new connection per request (`connection: close`).
    H1NewConnection,
    /// HTTP/2 prior knowledge (h2c), requests multiplexed on one connection.
    H2,
}

/// A counter of configuration generations shared between a test that changes the config and
/// the load it runs meanwhile: `written` moves just before a change is submitted, `applied`
/// once the proxy under load is seen running it. A request sent while `applied` was `a` and
/// answered while `written` was `w` may have been served by any generation in `a..=w`.
#[derive(Debug, Default)]
pub struct Generations {
    pub applied: std::sync::atomic::AtomicU64,
    pub written: std::sync::atomic::AtomicU64,
}

impl Generations {
    fn applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One request of a [`MixedLoad`].
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub kind: ClientKind,
    pub host: String,
    pub path: String,
    /// `Generations::applied` when the request was sent.
    pub sent_applied: u64,
    /// `Generations::written` when the answer (or error) arrived.
    pub received_written: u64,
    /// `(service, instance)` of the demo app that answered 200, or what went wrong instead.
    pub result: Result<(String, String), String>,
}

/// Every request of a finished [`MixedLoad`].
#[derive(Debug, Default)]
pub struct LoadReport {
    pub records: Vec<RequestRecord>,
}

impl LoadReport {
    /// The requests that did not get a 200 from a demo app.
    pub fn failures(&self) -> Vec<&RequestRecord> {
        self.records.iter().filter(|r| r.result.is_err()).collect()
    }

    /// Request counts per client kind.
    pub fn by_kind(&self) -> BTreeMap<ClientKind, usize> {
        let mut m = BTreeMap::new();
        for r in &self.records {
            *m.entry(r.kind).or_default() += 1;
        }
        m
    }

    /// 200 responses per answering service.
    pub fn by_service(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in &self.records {
            if let Ok((service, _)) = &r.result {
                *m.entry(service.clone()).or_default() += 1;
            }
        }
        m
    }

    /// The first `n` failures, described, for assertion messages.
    pub fn describe_failures(&self, n: usize) -> String {
        let failures = self.failures();
        let mut s = format!("{} failed requests", failures.len());
        for r in failures.iter().take(n) {
            s.push_str(&format!(
                "\n  {:?} http://{}{} (generations {}..={}): {}",
                r.kind,
                r.host,
                r.path,
                r.sent_applied,
                r.received_written,
                r.result.as_ref().err().map_or("", String::as_str)
            ));
        }
        s
    }
}

/// What a [`MixedLoad`] sends.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// The proxy's outbound listener.
    pub target: SocketAddr,
    /// Host names (services) the requests go to, in turn.
    pub hosts: Vec<String>,
    /// Concurrent tasks per [`ClientKind`].
    pub tasks_per_kind: usize,
    /// The most requests one task sends (the count bound).
    pub max_per_task: usize,
    /// The time bound: a task sends nothing after this long.
    pub max_duration: Duration,
    /// A pause between one task's requests, so the load spreads over the config changes.
    pub pause: Duration,
    /// Every `slow_every`-th request of a task asks the demo app to wait `slow_ms` before
    /// answering, so some requests are in flight across a config swap (0 = never).
    pub slow_every: usize,
    pub slow_ms: u64,
}

/// Bounded concurrent HTTP load of every [`ClientKind`] through one proxy: each task stops at
/// its request count, at the time bound, or when [`MixedLoad::finish`] is called.
#[derive(Debug)]
pub struct MixedLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<RequestRecord>>>,
}

impl MixedLoad {
    /// Starts the tasks; `generations` stamps every request (see [`Generations`]).
    pub fn start(spec: &LoadSpec, generations: &std::sync::Arc<Generations>) -> MixedLoad {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        let shared_h1 = HttpClient::h1(spec.target);
        let shared_h2 = HttpClient::h2c(spec.target);
        for kind in [
            ClientKind::H1KeepAlive,
            ClientKind::H1NewConnection,
            ClientKind::H2,
        ] {
            for task in 0..spec.tasks_per_kind {
                let spec = spec.clone();
                let client = match kind {
                    ClientKind::H1KeepAlive => Some(shared_h1.clone()),
                    ClientKind::H2 => Some(shared_h2.clone()),
                    ClientKind::H1NewConnection => None,
                };
                let (stop, sent, generations) = (stop.clone(), sent.clone(), generations.clone());
                tasks.push(tokio::spawn(async move {
                    load_task(kind, task, spec, client, stop, sent, generations).await
                }));
            }
        }
        MixedLoad { stop, sent, tasks }
    }

    /// Requests answered (or failed) so far.
    pub fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` requests were answered, so a change happens under load.
    pub async fn wait_sent(&self, n: usize) {
        let what = format!("the load has sent {n} requests");
        wait_until(DEFAULT_WAIT, &what, async || {
            let sent = self.sent();
            if sent >= n {
                Ok(())
            } else {
                Err(format!("{sent} sent"))
            }
        })
        .await;
    }

    /// Stops the tasks after their current request and collects every record.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut report = LoadReport::default();
        for t in self.tasks {
            let records = tokio::time::timeout(DEFAULT_WAIT, t)
                .await
                .unwrap_or_else(|_| panic!("a load task did not stop within {DEFAULT_WAIT:?}"))
                .unwrap_or_else(|e| panic!("a load task panicked: {e}"));
            report.records.extend(records);
        }
        report
    }
}

async fn load_task(
    kind: ClientKind,
    task: usize,
    spec: LoadSpec,
    client: Option<HttpClient>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    generations: std::sync::Arc<Generations>,
) -> Vec<RequestRecord> {
    use std::sync::atomic::Ordering;
    let started = std::time::Instant::now();
    let mut records = Vec::new();
    for i in 0..spec.max_per_task {
        if stop.load(Ordering::SeqCst) || started.elapsed() >= spec.max_duration {
            break;
        }
        let host = spec.hosts[(i + task) % spec.hosts.len()].clone();
        let path = if spec.slow_every > 0 && i % spec.slow_every == spec.slow_every - 1 {
            format!("/delay/{}", spec.slow_ms)
        } else {
            format!("/load/{kind:?}/{task}/{i}")
        };
        let sent_applied = generations.applied();
        let resp = match &client {
            Some(c) => c.get(&host, &path).await,
            None => {
                HttpClient::h1(spec.target)
                    .request(
                        http::Method::GET,
                        &host,
                        &path,
                        &[("connection", "close")],
                        Vec::new(),
                    )
                    .await
            }
        };
        let received_written = generations.written();
        let result = match resp {
            Ok(r) if r.status == 200 => {
                match serde_json::from_slice::<serde_json::Value>(&r.body) {
                    Ok(body) => Ok((
                        body["service"].as_str().unwrap_or_default().to_string(),
                        instance_of(&r),
                    )),
                    Err(e) => Err(format!(
                        "200 without a demo-app JSON body ({e}): {}",
                        r.summary()
                    )),
                }
            }
            Ok(r) => Err(r.summary()),
            Err(e) => Err(format!("{e:#}")),
        };
        records.push(RequestRecord {
            kind,
            host,
            path,
            sent_applied,
            received_written,
            result,
        });
        sent.fetch_add(1, Ordering::SeqCst);
        if !spec.pause.is_zero() {
            tokio::time::sleep(spec.pause).await;
        }
    }
    records
}

const INSTALL_HINT: &str = "run scripts/install-test-deps.sh (Debian package `prometheus` \
                            provides both `prometheus` and `promtool`)";

/// The path of `tool` on `PATH`; fails the test (never skips) when it is not installed.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{tool}` is not installed (not found on PATH): {INSTALL_HINT}"))
}

/// Runs `promtool args...` with `stdin`; returns (exit code, stdout + stderr).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let bin = require_tool("promtool");
    let mut cmd = Command::new(&bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", bin.display()));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing to promtool {args:?}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for promtool {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// `promtool check metrics` on one exposition: `Err` describing the problems unless it exits 0
/// without a single line of output.
pub fn promtool_check_metrics(what: &str, text: &str) -> Result<(), String> {
    let (code, out) = promtool(&["check", "metrics"], Some(text));
    let problems: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    if code == Some(0) && problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics on {what}: exit {code:?}, problems:\n{}\n--- the /metrics text ---\n{text}",
            problems.join("\n")
        ))
    }
}
