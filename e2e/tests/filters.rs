//! Route filters and query matches with real processes (control plane, sidecars, demo apps)
//! and `curl` as the client: every rewrite and redirect checked on what the upstream saw (the
//! demo app echoes method, path, query, host and headers) and what the client got; header
//! mutations with each variable; direct responses; query parameters choosing the service; fault
//! injection shares, delays and gRPC aborts (metrics and access-log flags `FI` / `DI`); and
//! mirroring: the mirror target gets its share while the primary request is unaffected when
//! the mirror target is slow or down.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft_e2e::{
    caller_proxy, caller_proxy_config, instance_of, require_tool, wait_for_instance, Instance,
};
use weft_testkit::echo::echo_client::EchoClient;
use weft_testkit::echo::EchoRequest;
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, PolicyDir, Proxy, DEFAULT_WAIT,
};

/// What `curl` got: status, headers of the last response, body.
#[derive(Debug)]
struct Curl {
    status: u16,
    body: String,
    /// Every response head curl saw (`-D`), in order (several with `-L`).
    headers: String,
}

impl Curl {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// `name` in the last response head.
    fn header(&self, name: &str) -> Option<String> {
        let last = self.headers.rsplit("HTTP/").next().unwrap_or("");
        last.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The status lines of every response head, in order.
    fn statuses(&self) -> Vec<u16> {
        self.headers
            .lines()
            .filter(|l| l.starts_with("HTTP/"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }
}

/// `curl -sS -x http://<proxy> <args>` (bounded): the sidecar is the app's HTTP proxy, so
/// absolute URLs name mesh services and `-L` follows redirects through it too.
async fn curl(proxy: SocketAddr, args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("temp dir");
    let headers = dir.path().join("headers");
    let mut cmd = tokio::process::Command::new(require_tool("curl"));
    cmd.args(["-sS", "--max-time", "10", "--noproxy", "", "-x"])
        .arg(format!("http://{proxy}"))
        .arg("-D")
        .arg(&headers)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("curl {args:?} did not finish"))
        .unwrap_or_else(|e| panic!("running curl: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Curl {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
    }
}

/// A header the app saw (the demo app joins repeated values with ", ").
fn seen(app: &serde_json::Value, name: &str) -> String {
    app["headers"][name].as_str().unwrap_or("").to_owned()
}

fn is_request_id(s: &str) -> bool {
    s.len() == 36 && s.split('-').map(str::len).eq([8, 4, 4, 4, 12])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_header_mutations_reach_upstream_and_client() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: api-v2
routes:
  - name: moved-api
    service: api
    match: {path: {prefix: /old}}
    filters:
      rewrite: {path_prefix: /new, host: internal.example}
      request_headers:
        add: {x-added: "route=${route}"}
        set: {x-set: "id=${request_id}", x-peer: "peer=${peer_identity}"}
        remove: [x-drop]
      response_headers:
        add: {x-resp-route: "${route}"}
        set: {x-resp-id: "${request_id}", x-resp-peer: "[${peer_identity}]"}
        remove: [x-demo-instance]
    destinations: [{service: api-v2, weight: 100}]
  - name: whole-path
    service: api
    match: {path: {exact: /full}}
    filters:
      rewrite: {path: /replaced/path}
    destinations: [{service: api, weight: 100}]
"#;
    let policies = PolicyDir::with_file("filters.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let _v2 = Instance::http(&cp, "api-v2", "v2-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    wait_for_instance(&client, "api-v2", "/", "v2-1").await;
    let out = web.outbound_addr();

    // Prefix and host rewrite, request headers: what the upstream saw.
    let r = curl(
        out,
        &[
            "-H",
            "x-drop: secret",
            "-H",
            "x-set: from-client",
            "-H",
            "x-added: first",
            "http://api/old/items?q=a%20b&n=1",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let app = r.json();
    assert_eq!(app["instance"], "v2-1", "{app}");
    assert_eq!(app["path"], "/new/items", "{app}");
    assert_eq!(app["query"], "q=a%20b&n=1", "{app}");
    assert_eq!(app["host"], "internal.example", "{app}");
    assert_eq!(seen(&app, "x-added"), "first, route=moved-api", "{app}");
    assert_eq!(seen(&app, "x-drop"), "", "{app}");
    // No x-request-id from the client: one is generated, forwarded, and used by the variable.
    let id = seen(&app, "x-request-id");
    assert!(is_request_id(&id), "generated x-request-id {id:?}: {app}");
    assert_eq!(seen(&app, "x-set"), format!("id={id}"), "{app}");
    // Outbound requests have no verified peer: the variable is empty.
    assert_eq!(seen(&app, "x-peer"), "peer=", "{app}");
    // ...and what the client got.
    assert_eq!(
        r.header("x-resp-route").as_deref(),
        Some("moved-api"),
        "{r:?}"
    );
    assert_eq!(r.header("x-resp-id"), Some(id.clone()), "{r:?}");
    assert_eq!(r.header("x-resp-peer").as_deref(), Some("[]"), "{r:?}");
    assert_eq!(r.header("x-demo-instance"), None, "{r:?}");

    // A client-sent x-request-id is kept and used on both sides.
    let r = curl(out, &["-H", "x-request-id: req-42", "http://api/old"]).await;
    let app = r.json();
    assert_eq!(app["path"], "/new", "{app}");
    assert_eq!(seen(&app, "x-request-id"), "req-42", "{app}");
    assert_eq!(seen(&app, "x-set"), "id=req-42", "{app}");
    assert_eq!(r.header("x-resp-id").as_deref(), Some("req-42"), "{r:?}");

    // The same over HTTP/2 (h2c; curl speaks HTTP/1.1 to a forward proxy): the authority is
    // rewritten.
    let h2 = web.h2c();
    let resp = h2.get("api", "/old/h2?x=1").await.expect("h2c GET");
    assert_eq!(resp.status, 200, "{}", resp.summary());
    let app = resp.json();
    assert_eq!(app["path"], "/new/h2", "{app}");
    assert_eq!(app["query"], "x=1", "{app}");
    assert_eq!(app["host"], "internal.example", "{app}");
    assert_eq!(resp.header("x-resp-route"), Some("moved-api"));

    // Whole-path rewrite keeps the query; other paths of the service are untouched.
    let r = curl(out, &["http://api/full?keep=me"]).await;
    let app = r.json();
    assert_eq!(app["path"], "/replaced/path", "{app}");
    assert_eq!(app["query"], "keep=me", "{app}");
    assert_eq!(app["host"], "api", "{app}");
    let r = curl(out, &["http://api/full/not?x"]).await;
    assert_eq!(r.json()["path"], "/full/not");
    assert_eq!(r.header("x-resp-route"), None, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses_answer_without_the_upstream() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: other
routes:
  - name: moved
    service: api
    match: {path: {prefix: /moved}}
    filters:
      redirect: {path_prefix: /here, status: 301}
    # A route that answers itself has no destinations (the policy model still wants the key).
    destinations: []
  - name: to-https
    service: api
    match: {path: {exact: /secure}}
    filters:
      redirect: {scheme: https, host: secure.example.com, port: 8443}
    destinations: []
  - name: login
    service: api
    match: {path: {exact: /account}}
    filters:
      redirect: {path: /login, status: 307}
    destinations: []
  - name: elsewhere
    service: api
    match: {path: {exact: /elsewhere}}
    filters:
      redirect: {host: other}
    destinations: []
  - name: maintenance
    service: api
    match: {path: {prefix: /maintenance}}
    filters:
      direct_response: {status: 503, body: "{\"down\": true}", content_type: application/json}
      response_headers: {set: {x-route: "${route}", x-id: "${request_id}"}}
    destinations: []
"#;
    let policies = PolicyDir::with_file("filters.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let _other = Instance::http(&cp, "other", "other-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    let out = web.outbound_addr();

    // Prefix replacement keeps the rest of the path and the query; -L follows it to the app.
    let r = curl(out, &["http://api/moved/a/b?c=1&d"]).await;
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location").as_deref(),
        Some("http://api/here/a/b?c=1&d"),
        "{r:?}"
    );
    assert_eq!(
        r.header("x-demo-instance"),
        None,
        "the app never saw it: {r:?}"
    );
    let r = curl(out, &["-L", "http://api/moved/a/b?c=1&d"]).await;
    assert_eq!(r.statuses(), [301, 200], "{r:?}");
    let app = r.json();
    assert_eq!(app["path"], "/here/a/b", "{app}");
    assert_eq!(app["query"], "c=1&d", "{app}");
    // The request's port is kept when the scheme stays.
    let r = curl(out, &["http://api:8080/moved"]).await;
    assert_eq!(
        r.header("location").as_deref(),
        Some("http://api:8080/here"),
        "{r:?}"
    );

    // Scheme, host and port replaced (default status 302).
    let r = curl(out, &["http://api/secure?x=1"]).await;
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://secure.example.com:8443/secure?x=1"),
        "{r:?}"
    );

    // 307 keeps the method and body when followed.
    let r = curl(
        out,
        &["-L", "-d", "payload", "http://api/account?next=%2Fhome"],
    )
    .await;
    assert_eq!(r.statuses(), [307, 200], "{r:?}");
    let app = r.json();
    assert_eq!(app["method"], "POST", "{app}");
    assert_eq!(app["path"], "/login", "{app}");
    assert_eq!(app["query"], "next=%2Fhome", "{app}");

    // Another host, followed to the other service.
    let r = curl(out, &["-L", "http://api/elsewhere"]).await;
    assert_eq!(r.statuses(), [302, 200], "{r:?}");
    assert_eq!(r.json()["instance"], "other-1", "{r:?}");

    // Direct response: fixed status, body and type, with the route's response headers.
    for path in ["/maintenance", "/maintenance/x?y=1"] {
        let r = curl(out, &["-X", "DELETE", &format!("http://api{path}")]).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json(), serde_json::json!({"down": true}), "{r:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json"),
            "{r:?}"
        );
        assert_eq!(r.header("x-route").as_deref(), Some("maintenance"), "{r:?}");
        assert!(
            r.header("x-id").is_some_and(|id| is_request_id(&id)),
            "{r:?}"
        );
        assert_eq!(r.header("x-demo-instance"), None, "{r:?}");
        assert_eq!(r.header("x-weft-error"), None, "{r:?}");
    }
    // Counted under the route, with no cluster.
    let m = web.metrics().await;
    assert_eq!(
        m.sum(
            "weft_requests_total",
            &[("route", "maintenance"), ("cluster", ""), ("code", "503")]
        ),
        2.0,
        "{}",
        m.lines_for("weft_requests_total")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_choose_the_service() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: api-b
routes:
  - name: beta
    service: api
    match: {query: [{name: version, exact: beta}]}
    destinations: [{service: api-b, weight: 100}]
  - name: users
    service: api
    match: {query: [{name: user, regex: "u[0-9]+"}]}
    destinations: [{service: api-b, weight: 100}]
  - name: flagged
    service: api
    match: {query: [{name: flag, present: true}]}
    destinations: [{service: api-b, weight: 100}]
  - name: spaced
    service: api
    match:
      path: {prefix: /tags}
      query: [{name: tag, exact: "a b"}, {name: lang, present: true}]
    destinations: [{service: api-b, weight: 100}]
"#;
    let policies = PolicyDir::with_file("query.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _a = Instance::http(&cp, "api", "a-1").await;
    let _b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "a-1").await;
    wait_for_instance(&client, "api-b", "/", "b-1").await;
    let cases = [
        ("/?version=beta", "b-1"),
        ("/x?a=1&version=beta&z", "b-1"),
        ("/?version=be%74a", "b-1"),
        ("/?version=Beta", "a-1"),
        ("/?version=beta2", "a-1"),
        // The first value of a repeated parameter decides (Gateway API's recommendation).
        ("/?version=alpha&version=beta", "a-1"),
        ("/?user=u42", "b-1"),
        // Regexes match the whole value.
        ("/?user=u42x", "a-1"),
        ("/?user=", "a-1"),
        ("/?flag", "b-1"),
        ("/?flag=", "b-1"),
        ("/?flag=0", "b-1"),
        ("/?flags=1", "a-1"),
        ("/?xflag", "a-1"),
        // `+` is a space (form encoding), like %20; every condition must hold.
        ("/tags?tag=a+b&lang", "b-1"),
        ("/tags?lang=en&tag=a%20b", "b-1"),
        ("/tags?tag=a+b", "a-1"),
        ("/tags?tag=a%2Bb&lang", "a-1"),
        ("/", "a-1"),
    ];
    let mut failures = Vec::new();
    for (path, want) in cases {
        let r = client.get("api", path).await.expect("GET");
        if r.status != 200 || instance_of(&r) != want {
            failures.push(format!(
                "GET {path}: want {want}, got {} from {:?}",
                r.summary(),
                instance_of(&r)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// JSON lines of an access log whose path starts with `prefix`, waiting (bounded) for `n`.
async fn log_lines(file: &Path, prefix: &str, n: usize) -> Vec<serde_json::Value> {
    let what = format!("{} has {n} lines for {prefix}*", file.display());
    wait_until(DEFAULT_WAIT, &what, async || {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect();
        if lines.len() >= n {
            Ok(lines)
        } else {
            Err(format!("{} so far", lines.len()))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_their_share() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: echo
    protocol: grpc
routes:
  - name: flaky
    service: api
    match: {path: {prefix: /flaky}}
    filters:
      fault:
        abort: {http_status: 503, percent: 50}
    destinations: [{service: api, weight: 100}]
  - name: slow
    service: api
    match: {path: {prefix: /slow}}
    filters:
      fault:
        delay: {fixed: 300ms, percent: 100}
    destinations: [{service: api, weight: 100}]
  - name: grpc-down
    service: echo
    filters:
      fault:
        abort: {grpc_status: 14}
    destinations: [{service: echo, weight: 100}]
"#;
    let policies = PolicyDir::with_file("faults.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let log_dir = tempfile::tempdir().expect("temp dir");
    let log = log_dir.path().join("access.log");
    let mut config = caller_proxy_config(&cp, "web", "web-1");
    config.resolve_security();
    let yaml = format!(
        "{}observability:\n  access_log: {{listeners: [outbound], format: json, path: {}}}\n",
        config.to_yaml(),
        serde_json::Value::from(log.display().to_string())
    );
    let mut web = Proxy::spawn_yaml(config, &yaml);
    web.wait_ready().await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    // 50% aborts over 400 requests: 35..65% (binomial sd = 10 requests; +-60 is 6 sd).
    const N: usize = 400;
    let (mut aborted, mut passed) = (0usize, 0usize);
    for i in 0..N {
        let r = client
            .get("api", &format!("/flaky/{i}"))
            .await
            .expect("GET /flaky");
        match (r.status.as_u16(), r.header("x-weft-error")) {
            (503, Some("fault-abort")) => {
                assert_eq!(instance_of(&r), "", "an abort never reaches the app");
                aborted += 1;
            }
            (200, None) if instance_of(&r) == "api-1" => passed += 1,
            _ => panic!("request {i}: {}", r.summary()),
        }
    }
    eprintln!("fault abort 50%: {aborted} of {N} aborted");
    assert_eq!(aborted + passed, N);
    assert!((140..=260).contains(&aborted), "{aborted}/{N} aborted");
    let m = web.metrics().await;
    assert_eq!(
        m.sum(
            "weft_faults_injected_total",
            &[("route", "flaky"), ("kind", "abort")]
        ),
        aborted as f64,
        "{}",
        m.lines_for("weft_faults_injected")
    );
    // Aborts are proxy answers counted under the route and the cluster it would have used.
    assert_eq!(
        m.sum(
            "weft_requests_total",
            &[("route", "flaky"), ("code", "503")]
        ),
        aborted as f64
    );
    let lines = log_lines(&log, "/flaky/", N).await;
    let fi = lines.iter().filter(|v| v["response_flags"] == "FI").count();
    assert_eq!(fi, aborted, "FI lines");
    assert!(
        lines
            .iter()
            .all(|v| v["response_flags"] == "FI" || v["response_flags"] == "-"),
        "{lines:?}"
    );

    // Delays: each request takes at least the delay (no upper bound: shared machines).
    for i in 0..5 {
        let t = Instant::now();
        let r = client
            .get("api", &format!("/slow/{i}"))
            .await
            .expect("GET /slow");
        let took = t.elapsed();
        assert_eq!(r.status, 200, "{}", r.summary());
        assert_eq!(instance_of(&r), "api-1");
        assert!(took >= Duration::from_millis(300), "took {took:?}");
    }
    let m = web.metrics().await;
    assert_eq!(
        m.sum(
            "weft_faults_injected_total",
            &[("route", "slow"), ("kind", "delay")]
        ),
        5.0
    );
    let lines = log_lines(&log, "/slow/", 5).await;
    assert!(
        lines.iter().all(|v| v["response_flags"] == "DI"),
        "{lines:?}"
    );

    // gRPC: a trailers-only answer, HTTP 200 with grpc-status 14 (no backend needed).
    let mut echo = EchoClient::new(web.grpc("echo"));
    let status = echo
        .unary(EchoRequest {
            message: "hi".into(),
            ..Default::default()
        })
        .await
        .expect_err("aborted");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "fault filter abort", "{status:?}");
    // A plain HTTP request to the same route gets the gRPC code's HTTP equivalent.
    let r = client.get("echo", "/").await.expect("GET echo");
    assert_eq!(r.status, 503, "{}", r.summary());
    let m = web.metrics().await;
    assert_eq!(
        m.sum(
            "weft_requests_total",
            &[
                ("route", "grpc-down"),
                ("code", "200"),
                ("grpc_status", "14")
            ]
        ),
        1.0,
        "{}",
        m.lines_for("weft_requests_total")
    );
    let lines = log_lines(&log, "/weft.demo.v1.Echo/", 1).await;
    assert_eq!(lines[0]["response_flags"], "FI", "{lines:?}");
}

/// A request a [`Sink`] received.
#[derive(Debug, Clone)]
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn path(&self) -> String {
        self.head.split_whitespace().nth(1).unwrap_or("").to_owned()
    }
}

/// A plain HTTP/1.1 server outside the mesh that records what it receives and never answers
/// (a mirror target as slow as can be): connections stay open until the client gives up.
struct Sink {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind(free_addr(next_loopback_ip()))
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    // One request per connection is enough: the client waits for an answer
                    // that never comes, then closes.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) if buf.len() < 1 << 20 => buf.extend_from_slice(&chunk[..n]),
                            Ok(_) => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let want = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = buf[head_end..].to_vec();
                    while body.len() < want {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => body.extend_from_slice(&chunk[..n]),
                        }
                    }
                    log.lock().expect("sink log").push(Received { head, body });
                    // Never answer: wait for the client to close.
                    while let Ok(n) = conn.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = conn.shutdown().await;
                });
            }
        });
        Sink {
            addr,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("sink log").clone()
    }

    async fn wait_received(&self, n: usize) -> Vec<Received> {
        let what = format!("the sink at {} received {n} requests", self.addr);
        wait_until(DEFAULT_WAIT, &what, async || {
            let r = self.received();
            if r.len() >= n {
                Ok(r)
            } else {
                Err(format!("{} so far", r.len()))
            }
        })
        .await
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `weft_mirror_requests_total{route,result}` of `proxy` reaches `n`.
async fn wait_mirrored(proxy: &Proxy, route: &str, result: &str, n: f64) -> weft_testkit::Metrics {
    let what = format!("weft_mirror_requests_total{{route={route},result={result}}} >= {n}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = proxy.metrics().await;
        let v = m.sum(
            "weft_mirror_requests_total",
            &[("route", route), ("result", result)],
        );
        if v >= n {
            Ok(m)
        } else {
            Err(m.lines_for("weft_mirror_requests_total"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_sends_its_share_to_the_mirror_target() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: shadow
routes:
  - name: mirrored
    service: api
    filters:
      mirror: {service: shadow, percent: 50}
    destinations: [{service: api, weight: 100}]
"#;
    let policies = PolicyDir::with_file("mirror.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let shadow = Instance::http(&cp, "shadow", "shadow-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "shadow", "/", "shadow-1").await;
    wait_for_instance(&client, "api", "/", "api-1").await;
    // What the shadow's sidecar counted before the run (the waits above).
    let inbound = async |p: &Proxy| {
        p.metrics()
            .await
            .sum("weft_requests_total", &[("direction", "inbound")])
    };
    let before = inbound(&shadow.proxy).await;
    let mirrored_before = web.metrics().await.sum(
        "weft_mirror_requests_total",
        &[("route", "mirrored"), ("result", "sent")],
    );

    const N: usize = 200;
    for i in 0..N {
        let r = client.get("api", &format!("/m/{i}")).await.expect("GET");
        assert_eq!(r.status, 200, "{}", r.summary());
        assert_eq!(instance_of(&r), "api-1", "the primary answers");
    }
    // Every mirror finished (sent), none failed or was dropped; the shadow's sidecar saw as many.
    let what = "the shadow's sidecar counted every mirrored request";
    let (sent, seen) = wait_until(DEFAULT_WAIT, what, async || {
        let m = web.metrics().await;
        let sent = m.sum(
            "weft_mirror_requests_total",
            &[("route", "mirrored"), ("result", "sent")],
        ) - mirrored_before;
        let seen = inbound(&shadow.proxy).await - before;
        if sent > 0.0 && seen == sent {
            Ok((sent, seen))
        } else {
            Err(format!("sent {sent}, shadow saw {seen}"))
        }
    })
    .await;
    eprintln!("mirror 50%: {sent} of {N} mirrored, shadow saw {seen}");
    // sd = 7 requests; +-35 is 5 sd.
    assert!((65.0..=135.0).contains(&sent), "{sent}/{N} mirrored");
    let m = web.metrics().await;
    for result in ["failed", "dropped"] {
        assert_eq!(
            m.sum(
                "weft_mirror_requests_total",
                &[("route", "mirrored"), ("result", result)]
            ),
            0.0,
            "{}",
            m.lines_for("weft_mirror_requests_total")
        );
    }
    // The primary's requests are counted once, for api.
    assert_eq!(
        m.sum(
            "weft_requests_total",
            &[("route", "mirrored"), ("cluster", "shadow.default")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_target_slow_or_down_never_affects_the_primary() {
    let sink = Sink::start().await;
    let down = free_addr(next_loopback_ip());
    let policy = format!(
        r#"
services:
  - name: web
  - name: api
  - name: slow-shadow
    request_timeout: 2s
    endpoints: [{{address: "{sink}"}}]
  - name: down-shadow
    endpoints: [{{address: "{down}"}}]
routes:
  - name: mirror-slow
    service: api
    match: {{headers: [{{name: x-mirror, exact: slow}}]}}
    filters:
      mirror: {{service: slow-shadow, percent: 100, max_body_bytes: 1024}}
    destinations: [{{service: api, weight: 100}}]
  - name: mirror-down
    service: api
    match: {{headers: [{{name: x-mirror, exact: down}}]}}
    filters:
      mirror: {{service: down-shadow}}
    destinations: [{{service: api, weight: 100}}]
"#,
        sink = sink.addr
    );
    let policies = PolicyDir::with_file("mirror.yaml", &policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    // Slow mirror target (it never answers): every primary request succeeds meanwhile.
    let slow = [("x-mirror", "slow")];
    for i in 0..10 {
        let r = client
            .request(Method::GET, "api", &format!("/get/{i}"), &slow, "")
            .await
            .expect("GET");
        assert_eq!(r.status, 200, "{}", r.summary());
        assert_eq!(instance_of(&r), "api-1");
    }
    // Bodies stream to the primary untouched, within the mirror's cap or beyond it.
    let small = "s".repeat(100);
    let large = "L".repeat(4096);
    for body in [&small, &large] {
        let r = client
            .request(Method::POST, "api", "/echo", &slow, body.clone())
            .await
            .expect("POST /echo");
        assert_eq!(r.status, 200, "{}", r.summary());
        assert_eq!(r.text(), *body, "the primary echoes the whole body");
    }

    // The sink got every copy: host suffixed -shadow, small body copied, large headers-only.
    let got = sink.wait_received(12).await;
    for g in &got {
        assert_eq!(g.header("host").as_deref(), Some("api-shadow"), "{g:?}");
        assert_eq!(g.header("x-mirror").as_deref(), Some("slow"), "{g:?}");
    }
    let gets = got.iter().filter(|g| g.path().starts_with("/get/")).count();
    assert_eq!(gets, 10, "{got:?}");
    let posts: Vec<&Received> = got.iter().filter(|g| g.path() == "/echo").collect();
    assert_eq!(posts.len(), 2, "{got:?}");
    let with_body = posts
        .iter()
        .find(|p| !p.body.is_empty())
        .unwrap_or_else(|| panic!("the small body is mirrored: {posts:?}"));
    assert_eq!(with_body.body, small.as_bytes(), "{with_body:?}");
    assert_eq!(
        with_body.header("content-length").as_deref(),
        Some("100"),
        "{with_body:?}"
    );
    let headers_only = posts
        .iter()
        .find(|p| p.body.is_empty())
        .unwrap_or_else(|| panic!("the large body is mirrored headers-only: {posts:?}"));
    assert!(
        matches!(
            headers_only.header("content-length").as_deref(),
            None | Some("0")
        ),
        "{headers_only:?}"
    );
    assert_eq!(
        headers_only.header("transfer-encoding"),
        None,
        "{headers_only:?}"
    );
    // The copies time out at the mirror cluster's request timeout: failed, the primary fine.
    wait_mirrored(&web, "mirror-slow", "failed", 12.0).await;

    // Mirror target down: connections refused; the primary succeeds.
    for i in 0..10 {
        let r = client
            .request(
                Method::POST,
                "api",
                &format!("/echo?{i}"),
                &[("x-mirror", "down")],
                small.clone(),
            )
            .await
            .expect("POST");
        assert_eq!(r.status, 200, "{}", r.summary());
        assert_eq!(r.text(), small);
    }
    let m = wait_mirrored(&web, "mirror-down", "failed", 10.0).await;
    assert_eq!(
        m.sum(
            "weft_mirror_requests_total",
            &[("route", "mirror-down"), ("result", "sent")]
        ),
        0.0
    );
    assert_eq!(
        m.sum(
            "weft_requests_total",
            &[("route", "mirror-down"), ("code", "200")]
        ),
        10.0
    );
}
