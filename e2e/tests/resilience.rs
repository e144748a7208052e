//! Resilience over real processes on loopback: a killed endpoint under load, a black-holed
//! endpoint, an upstream failing everything (retry budget, circuit breaker), health checks and
//! recovery, local rate limits and the timeout headers. Every loop is bounded; every process is
//! stopped by its guard.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use weft_e2e::{caller_proxy, caller_proxy_on, instance_of, tally, wait_for_instance, Instance};
use weft_testkit::{
    free_port, next_loopback_ip, wait_until, ControlPlane, PolicyDir, DEFAULT_WAIT,
};

/// What a [`FakeUpstream`] does with requests (health checks to `/healthz` follow `health`).
const ANSWER: u8 = 0;
const BLACK_HOLE: u8 = 1;
const FAIL_503: u8 = 2;

/// A tiny HTTP/1.1 upstream in the test process whose behaviour can be switched: answer 200
/// (`x-demo-instance: <name>`), accept and never answer, or 503 everything. Counts the
/// non-health-check requests it received.
struct FakeUpstream {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    healthy: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
    /// Connections currently open to it.
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Decrements a connection count when a connection task ends.
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn new(open: &Arc<AtomicUsize>) -> OpenConn {
        open.fetch_add(1, Ordering::SeqCst);
        OpenConn(open.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FakeUpstream {
    async fn start(name: &'static str, mode: u8, delay: Duration) -> FakeUpstream {
        let ip = next_loopback_ip();
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let mode = Arc::new(AtomicU8::new(mode));
        let healthy = Arc::new(AtomicU8::new(1));
        let requests = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (m, h, r, o) = (
            mode.clone(),
            healthy.clone(),
            requests.clone(),
            open.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (m, h, r) = (m.clone(), h.clone(), r.clone());
                let conn = OpenConn::new(&o);
                tokio::spawn(async move {
                    let _conn = conn;
                    let mut buf = Vec::with_capacity(4096);
                    // One request head per iteration; ends when the peer closes.
                    loop {
                        let head_end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        buf.drain(..head_end);
                        let status = if head.starts_with("GET /healthz ") {
                            if h.load(Ordering::SeqCst) == 1 {
                                200
                            } else {
                                503
                            }
                        } else {
                            r.fetch_add(1, Ordering::SeqCst);
                            match m.load(Ordering::SeqCst) {
                                BLACK_HOLE => {
                                    // Hold the connection open, never answer.
                                    tokio::time::sleep(Duration::from_secs(60)).await;
                                    return;
                                }
                                FAIL_503 => 503,
                                _ => 200,
                            }
                        };
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let body = format!("{{\"service\":\"fake\",\"instance\":\"{name}\"}}");
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-demo-instance: {name}\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            mode,
            healthy,
            requests,
            open,
            task,
        }
    }

    fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(u8::from(healthy), Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Concurrent bounded GET load: `tasks` tasks x `per_task` requests; returns (ok, failures).
async fn run_load(
    client: &weft_testkit::HttpClient,
    host: &str,
    tasks: usize,
    per_task: usize,
    mut during: impl FnMut(usize),
    progress: Arc<AtomicUsize>,
) -> (usize, Vec<String>) {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (client, host, progress) = (client.clone(), host.to_string(), progress.clone());
        handles.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut failures = Vec::new();
            for i in 0..per_task {
                match client.get(&host, &format!("/load/{t}/{i}")).await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failures.push(r.summary()),
                    Err(e) => failures.push(format!("{e:#}")),
                }
                progress.fetch_add(1, Ordering::SeqCst);
            }
            (ok, failures)
        }));
    }
    during(0);
    let (mut ok, mut failures) = (0, Vec::new());
    for h in handles {
        let (o, f) = tokio::time::timeout(Duration::from_secs(120), h)
            .await
            .expect("load task finished in time")
            .expect("load task did not panic");
        ok += o;
        failures.extend(f);
    }
    (ok, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_endpoint_under_load_keeps_success_rate() {
    let policies = PolicyDir::with_file(
        "svc.yaml",
        "services:\n  - name: web\n  - name: api\n    retry:\n      attempts: 2\n      on: [connect-failure, reset, 502, 503, 504]\n      budget: {ratio: 0.5, min_per_second: 50}\n",
    );
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api", "api-1").await;
    let b = Instance::http(&cp, "api", "api-2").await;
    let mut c = Instance::http(&cp, "api", "api-3").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    for i in ["api-1", "api-2", "api-3"] {
        wait_for_instance(&client, "api", "/", i).await;
    }
    let _keep = (&a, &b);
    let progress = Arc::new(AtomicUsize::new(0));
    let p = progress.clone();
    let killer = tokio::spawn(async move {
        // Kill api-3 (sidecar and app, SIGKILL) once a third of the load is through.
        // A plain polling loop: `wait_until`'s async closure is not `Send` inside a spawned task.
        let deadline = Instant::now() + DEFAULT_WAIT;
        while p.load(Ordering::SeqCst) < 500 {
            assert!(
                Instant::now() < deadline,
                "a third of the load was not sent within {DEFAULT_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.proxy.process.kill();
        c.app.process.kill();
        c
    });
    let (ok, failures) = run_load(&client, "api", 6, 250, |_| {}, progress).await;
    let _c = killer.await.expect("killer task");
    let total = ok + failures.len();
    let rate = ok as f64 / total as f64;
    assert!(
        rate >= 0.999,
        "success rate {rate} ({ok}/{total}) after killing api-3; failures: {:?}",
        &failures[..failures.len().min(5)]
    );
    let m = web.metrics().await;
    assert!(
        m.sum("weft_retries_total", &[("cluster", "api.default")]) >= 1.0,
        "the kill was absorbed by retries: {}",
        m.lines_for("weft_retries_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_endpoint_times_out_is_ejected_and_recovers() {
    let hole = FakeUpstream::start("hole", BLACK_HOLE, Duration::ZERO).await;
    let good = FakeUpstream::start("good", ANSWER, Duration::ZERO).await;
    let policy = format!(
        "services:
  - name: web
  - name: api
    lb: round_robin
    request_timeout: 3s
    endpoints:
      - address: {hole}
      - address: {good}
    outlier_detection: {{consecutive_failures: 2, base_ejection_time: 2s, max_ejection_percent: 50}}
    retry:
      attempts: 2
      per_try_timeout: 200ms
      on: [connect-failure, reset, 504]
  - name: slow
    request_timeout: 300ms
    endpoints:
      - address: {hole2}
    retry: {{attempts: 0}}
",
        hole = hole.addr,
        good = good.addr,
        hole2 = hole.addr,
    );
    let policies = PolicyDir::with_file("svc.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "good").await;

    // Requests that meet the black hole fire the per-try timeout and are retried on "good".
    let t = tally(&client, "api", "/", 20).await;
    assert!(t.errors.is_empty(), "{t:?}");
    assert_eq!(t.count("good"), 20, "{t:?}");
    let m = web.metrics().await;
    assert!(
        m.sum(
            "weft_outlier_ejections_total",
            &[
                ("cluster", "api.default"),
                ("reason", "consecutive_failures")
            ]
        ) >= 1.0,
        "the black hole was ejected: {}",
        m.lines_for("weft_outlier_ejections_total")
    );
    // Ejected: traffic moved, no request waits for a per-try timeout.
    let before = hole.requests();
    let started = Instant::now();
    let t = tally(&client, "api", "/", 10).await;
    assert!(t.errors.is_empty() && t.count("good") == 10, "{t:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "10 requests took {:?}: still waiting on the black hole?",
        started.elapsed()
    );
    assert_eq!(
        hole.requests(),
        before,
        "the ejected endpoint got no traffic"
    );

    // A route without retries: the request timeout fires, 504 names it.
    let r = client.get("slow", "/").await.expect("response");
    assert_eq!(r.status, 504, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-timeout"),
        Some("request"),
        "{}",
        r.summary()
    );

    // Recovery: the endpoint answers again and returns to rotation after its ejection.
    hole.set_mode(ANSWER);
    wait_until(
        DEFAULT_WAIT,
        "the recovered endpoint gets traffic again",
        async || {
            let r = client.get("api", "/").await?;
            if instance_of(&r) == "hole" {
                Ok(())
            } else {
                Err(anyhow::anyhow!("answered by {:?}", instance_of(&r)))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstream_retries_stay_within_budget_and_breaker_opens() {
    let failing = FakeUpstream::start("failing", FAIL_503, Duration::ZERO).await;
    let slow = FakeUpstream::start("slow", ANSWER, Duration::from_millis(300)).await;
    let policy = format!(
        "services:
  - name: web
  - name: flaky
    endpoints:
      - address: {failing}
    retry:
      attempts: 3
      on: [503]
      backoff: {{base: 1ms, max: 2ms}}
      budget: {{ratio: 0.2, min_per_second: 1, window: 10s}}
  - name: busy
    endpoints:
      - address: {slow}
    circuit_breaker: {{max_requests: 3}}
",
        failing = failing.addr,
        slow = slow.addr,
    );
    let policies = PolicyDir::with_file("svc.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_until(
        DEFAULT_WAIT,
        "flaky is routed (503 from the upstream)",
        async || {
            let r = client.get("flaky", "/").await?;
            if r.status == 503 && instance_of(&r) == "failing" {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;

    let before = failing.requests();
    let retried_before = web.metrics().await.sum(
        "weft_retries_total",
        &[("cluster", "flaky.default"), ("result", "failure")],
    );
    let n = 200;
    let t = tally(&client, "flaky", "/", n).await;
    assert_eq!(t.errors.len(), n, "everything fails: {:?}", t.by_instance);
    let sent = failing.requests() - before;
    // Without a budget: 4 x 200 = 800 attempts. With it: 200 + 20% + the 1/s x 10s floor.
    let max = n + n / 5 + 10 + 5;
    assert!(
        sent >= n && sent <= max,
        "the upstream saw {sent} requests for {n} (budget allows at most {max})"
    );
    let m = web.metrics().await;
    let exhausted = m.sum(
        "weft_retry_budget_exhausted_total",
        &[("cluster", "flaky.default")],
    );
    assert!(
        exhausted >= 1.0,
        "{}",
        m.lines_for("weft_retry_budget_exhausted_total")
    );
    let retries = m.sum(
        "weft_retries_total",
        &[("cluster", "flaky.default"), ("result", "failure")],
    );
    assert_eq!(
        (retries - retried_before) as usize,
        sent - n,
        "every retry sent is counted: {}",
        m.lines_for("weft_retries_total")
    );

    // Breaker: 3 active requests max; 12 concurrent slow requests -> the rest fail fast.
    let mut handles = Vec::new();
    for i in 0..12 {
        let c = client.clone();
        handles.push(tokio::spawn(async move {
            c.get("busy", &format!("/{i}")).await
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for h in handles {
        let r = h.await.expect("task").expect("response");
        match (r.status.as_u16(), r.header("x-weft-overloaded")) {
            (200, _) => ok += 1,
            (503, Some("requests")) => overloaded += 1,
            _ => panic!("unexpected {}", r.summary()),
        }
    }
    assert!(
        ok >= 3 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );
    let m = web.metrics().await;
    assert!(
        m.sum(
            "weft_breaker_rejections_total",
            &[("cluster", "busy.default"), ("limit", "requests")]
        ) >= 1.0,
        "{}",
        m.lines_for("weft_breaker_rejections_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_endpoints_out_and_back() {
    let sick = FakeUpstream::start("sick", ANSWER, Duration::ZERO).await;
    let fine = FakeUpstream::start("fine", ANSWER, Duration::ZERO).await;
    let policy = format!(
        "services:
  - name: web
  - name: api
    lb: round_robin
    endpoints:
      - address: {sick}
      - address: {fine}
    health_check:
      http: {{path: /healthz}}
      interval: 100ms
      timeout: 500ms
      healthy_threshold: 2
      unhealthy_threshold: 2
",
        sick = sick.addr,
        fine = fine.addr,
    );
    let policies = PolicyDir::with_file("svc.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "sick").await;
    sick.set_healthy(false);
    wait_until(
        DEFAULT_WAIT,
        "the failing endpoint leaves rotation",
        async || {
            let t = tally(&client, "api", "/", 10).await;
            if t.count("fine") == 10 {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await;
    let m = web.metrics().await;
    assert!(
        m.sum(
            "weft_health_check_failures_total",
            &[("cluster", "api.default")]
        ) >= 2.0
    );
    assert_eq!(
        m.get(
            "weft_endpoint_healthy",
            &[
                ("cluster", "api.default"),
                ("endpoint", &sick.addr.to_string())
            ]
        ),
        Some(0.0),
        "{}",
        m.lines_for("weft_endpoint_healthy")
    );
    sick.set_healthy(true);
    wait_for_instance(&client, "api", "/", "sick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_and_per_try_timeout_504() {
    let policies = PolicyDir::with_file(
        "svc.yaml",
        "services:
  - name: web
  - name: api
routes:
  - name: limited
    service: api
    match: {path: {prefix: /limited}}
    destinations: [{service: api, weight: 100}]
    rate_limit: {requests_per_second: 2, burst: 3}
  - name: per-try
    service: api
    match: {path: {prefix: /delay}}
    destinations: [{service: api, weight: 100}]
    timeout: 5s
    retry: {attempts: 0, per_try_timeout: 200ms}
",
    );
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    wait_for_instance(&client, "api", "/limited", "api-1").await;
    let mut limited = None;
    for _ in 0..10 {
        let r = client.get("api", "/limited").await.expect("response");
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("10 quick requests exceed 2/s with a burst of 3");
    assert_eq!(
        r.header("x-weft-error"),
        Some("rate-limited"),
        "{}",
        r.summary()
    );
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {}", r.summary()));
    assert!((1..=2).contains(&after), "{}", r.summary());
    let m = web.metrics().await;
    assert!(
        m.sum(
            "weft_rate_limited_total",
            &[("scope", "route"), ("name", "limited")]
        ) >= 1.0,
        "{}",
        m.lines_for("weft_rate_limited_total")
    );

    let r = client.get("api", "/delay/1000").await.expect("response");
    assert_eq!(r.status, 504, "{}", r.summary());
    assert_eq!(
        r.header("x-weft-timeout"),
        Some("per-try"),
        "{}",
        r.summary()
    );
}

/// A TCP echo server in the test process; counts open connections.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind((next_loopback_ip(), 0))
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("local addr");
    let open = Arc::new(AtomicUsize::new(0));
    let o = open.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let conn = OpenConn::new(&o);
            tokio::spawn(async move {
                let _conn = conn;
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, open, task)
}

/// Reads until EOF (or a reset) within `limit`; returns when that happened, or panics with `what`.
async fn wait_closed(s: &mut tokio::net::TcpStream, limit: Duration, what: &str) -> Instant {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still open after {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_downstream_upstream_and_tcp() {
    let one = FakeUpstream::start("one", ANSWER, Duration::ZERO).await;
    let (echo, echo_open, _echo_task) = echo_server().await;
    let web_ip = next_loopback_ip();
    let port = free_port(web_ip);
    let policy = format!(
        "services:
  - name: web
    idle_timeout: 1s
  - name: api
    idle_timeout: 1s
    endpoints:
      - address: {one}
  - name: store
    protocol: tcp
    port: {port}
    idle_timeout: 1s
    endpoints:
      - address: {echo}
",
        one = one.addr,
    );
    let policies = PolicyDir::with_file("svc.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "one").await;

    // Upstream: the pooled keep-alive connection to "one" is closed once idle for 1s.
    assert!(one.open_connections() >= 1, "a pooled upstream connection");
    wait_until(
        Duration::from_secs(5),
        "the idle pooled upstream connection is closed",
        async || match one.open_connections() {
            0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    )
    .await;

    // Downstream HTTP/1.1 keep-alive: served, kept open, then closed after 1s without requests.
    let mut s = tokio::net::TcpStream::connect(web.outbound_addr())
        .await
        .expect("connect outbound");
    s.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .expect("write request");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&head).contains("\"instance\":\"one\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read response");
        assert!(
            n > 0,
            "closed before the response: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let closed = wait_closed(&mut s, Duration::from_secs(5), "idle keep-alive connection").await;
    assert!(
        closed - answered >= Duration::from_millis(500),
        "kept alive for a while before the idle close, not closed at once ({:?})",
        closed - answered
    );
    // A connection that never sends a byte is closed too.
    let mut silent = tokio::net::TcpStream::connect(web.outbound_addr())
        .await
        .expect("connect outbound");
    wait_closed(&mut silent, Duration::from_secs(5), "silent connection").await;
    // A request head that never ends, its fields trickling in every 200 ms (a slow-loris
    // client): the header-read timeout (the listener's idle timeout, 1s here) runs from the
    // head's first bytes, so the trickle does not keep it open, and it is never answered.
    let mut slow = tokio::net::TcpStream::connect(web.outbound_addr())
        .await
        .expect("connect outbound");
    slow.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n")
        .await
        .expect("write half a head");
    let mut got = Vec::new();
    let mut closed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"x-trickle: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    assert!(
        closed,
        "a head trickling in for 10 s was still open: no header-read timeout"
    );
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1 2"),
        "an unfinished head was answered: {:?}",
        String::from_utf8_lossy(&got)
    );

    // TCP: bytes flow, then 1s with none either way closes both sides.
    let mut t = tokio::net::TcpStream::connect((web_ip, port))
        .await
        .expect("connect tcp listener");
    t.write_all(b"ping").await.expect("write");
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&got, b"ping");
    assert_eq!(echo_open.load(Ordering::SeqCst), 1);
    wait_closed(&mut t, Duration::from_secs(5), "idle TCP connection").await;
    wait_until(
        Duration::from_secs(5),
        "the upstream side of the idle TCP connection is closed",
        async || match echo_open.load(Ordering::SeqCst) {
            0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_ring_hash_sticks_to_one_endpoint() {
    let a = FakeUpstream::start("a", ANSWER, Duration::ZERO).await;
    let b = FakeUpstream::start("b", ANSWER, Duration::ZERO).await;
    let policy = format!(
        "services:
  - name: web
  - name: sticky
    lb: ring_hash
    hash: {{source_ip: true}}
    endpoints:
      - address: {a}
      - address: {b}
",
        a = a.addr,
        b = b.addr,
    );
    let policies = PolicyDir::with_file("svc.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_until(DEFAULT_WAIT, "sticky is routed", async || {
        let r = client.get("sticky", "/").await?;
        if r.status == 200 {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{}", r.summary()))
        }
    })
    .await;
    // Every request comes from the same source IP: one endpoint gets them all (without the
    // peer address the hash is missing and requests spread over both).
    let t = tally(&client, "sticky", "/", 30).await;
    assert!(t.errors.is_empty(), "{t:?}");
    assert!(t.count("a") == 30 || t.count("b") == 30, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_rate_limit_closes_excess_connections() {
    let web_ip = next_loopback_ip();
    let port = free_port(web_ip);
    let policies = PolicyDir::with_file(
        "svc.yaml",
        &format!(
            "services:
  - name: web
  - name: store
    protocol: tcp
    port: {port}
    rate_limit: {{requests_per_second: 1, burst: 2}}
"
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let store = Instance::tcp(&cp, "store", "store-1").await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    web.wait_endpoint(store.endpoint(), true).await;
    // 6 connections at once against 1/s with a burst of 2 at store's inbound listener.
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..6 {
        let mut t = tokio::net::TcpStream::connect((web_ip, port))
            .await
            .expect("connect tcp listener");
        let echoed = tokio::time::timeout(Duration::from_secs(5), async {
            t.write_all(b"ping").await?;
            let mut got = [0u8; 4];
            t.read_exact(&mut got).await?;
            anyhow::Ok(got)
        })
        .await;
        match echoed {
            Ok(Ok(got)) if &got == b"ping" => ok += 1,
            Ok(_) => refused += 1,
            Err(_) => panic!("neither echoed nor closed within 5s"),
        }
    }
    assert!(
        (1..=3).contains(&ok) && refused >= 3,
        "ok {ok}, refused {refused}"
    );
    let m = store.proxy.metrics().await;
    assert!(
        m.sum("weft_rate_limited_total", &[("scope", "listener")]) >= 3.0,
        "{}",
        m.lines_for("weft_rate_limited_total")
    );
}
