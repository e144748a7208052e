//! Request hygiene with real processes and `curl` as the client: authorization and routing see
//! the path and host the app acts on. Path tricks (`..`, `%2e%2e`, `//`, prefix look-alikes)
//! cannot reach what an authorization policy allowing only `/public/` protects; escaped slashes
//! are refused; an absolute-form target decides the forwarded `Host`; an HTTP/2 request whose
//! `host` differs from `:authority` is refused; header names with `_` never reach the app.

use std::net::SocketAddr;
use std::time::Duration;

use weft_e2e::{caller_proxy, require_tool, wait_for_instance, Instance};
use weft_testkit::{ControlPlane, PolicyDir};

/// What `curl` got: status, the app's JSON echo (if the app answered) and headers.
#[derive(Debug)]
struct Curl {
    status: u16,
    body: String,
    headers: String,
}

impl Curl {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The path the app saw ("" when no app answered).
    fn app_path(&self) -> String {
        self.json()["path"].as_str().unwrap_or("").to_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// Runs `curl -sS --path-as-is <args>` (10 s bounded) and parses status, headers and body.
async fn curl(args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("temp dir");
    let headers = dir.path().join("headers");
    let mut cmd = tokio::process::Command::new(require_tool("curl"));
    cmd.args(["-sS", "--path-as-is", "--max-time", "10", "-D"])
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

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

const POLICIES: &str = "services:
  - name: web
  - name: backend
  - name: backend-api
routes:
  - name: api-prefix
    service: backend
    match: {path: {prefix: /api}}
    destinations: [{service: backend-api, weight: 100}]
authorization:
  - name: backend-public
    service: backend
    default: deny
    rules:
      - name: public-only
        from: {services: [web]}
        to: {paths: [{prefix: /public/}]}
  - name: backend-api-public
    service: backend-api
    default: deny
    rules:
      - name: public
        from: {services: [web]}
        to: {paths: [{prefix: /api/public}]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_cannot_bypass_an_authorization_policy() {
    let policies = PolicyDir::with_file("mesh.yaml", POLICIES);
    let cp = ControlPlane::start(policies.path()).await;
    let _backend = Instance::http(&cp, "backend", "backend-1").await;
    let _api = Instance::http(&cp, "backend-api", "backend-api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "backend", "/public/x", "backend-1").await;
    let out = web.outbound_addr();
    let host = ["-H", "host: backend"];

    let ok = curl(&[&host[..], &[&url(out, "/public/x")]].concat()).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.app_path(), "/public/x");

    // Each spelling reaches /admin once normalized: denied by the policy, never seen by the
    // app. (Matched on raw paths, the first three were allowed.)
    for trick in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2e/admin",
        "/public/./../admin",
        "//admin",
        "/public//../admin",
    ] {
        let r = curl(&[&host[..], &[&url(out, trick)]].concat()).await;
        assert_eq!(r.status, 403, "{trick}: {r:?}");
        assert_eq!(
            r.header("x-weft-error").as_deref(),
            Some("forbidden"),
            "{trick}"
        );
        assert_eq!(r.app_path(), "", "{trick}: the app saw it");
    }
    // An allowed spelling is forwarded normalized: the app sees the path the policy judged.
    let r = curl(&[&host[..], &[&url(out, "/x/../public/%7Ea//b")]].concat()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.app_path(), "/public/~a/b");

    // Escaped slashes and backslashes: refused before routing (400 invalid-request).
    for bad in [
        "/public%2F..%2Fadmin",
        "/public/%5C../admin",
        "/public/..\\admin",
    ] {
        let r = curl(&[&host[..], &[&url(out, bad)]].concat()).await;
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert_eq!(
            r.header("x-weft-error").as_deref(),
            Some("invalid-request"),
            "{bad}"
        );
    }

    // Prefixes match whole segments: /api routes to backend-api, /api-internal does not (it
    // stays on backend, whose policy denies it), and /api/publicity is not /api/public.
    let r = curl(&[&host[..], &[&url(out, "/api/public/x")]].concat()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["service"], "backend-api");
    let r = curl(&[&host[..], &[&url(out, "/api-internal/public/x")]].concat()).await;
    assert_eq!(r.status, 403, "routed to backend, denied there: {r:?}");
    let r = curl(&[&host[..], &[&url(out, "/api/publicity")]].concat()).await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = curl(&[&host[..], &[&url(out, "/public")]].concat()).await;
    assert_eq!(
        r.status, 403,
        "the policy allows /public/, not /public: {r:?}"
    );

    // The callee normalizes too: a client straight at backend's inbound (no identity, so
    // denied anyway) gets the same refusal for an escaped slash.
    let inbound = _backend.endpoint();
    let r = curl(&[&host[..], &[&url(inbound, "/public%2fx")]].concat()).await;
    assert_eq!(r.status, 400, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slashes_redirect_when_configured() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "mesh:\n  http: {escaped_slashes: redirect}\nservices:\n  - name: web\n  - name: backend\n",
    );
    let cp = ControlPlane::start(policies.path()).await;
    let _backend = Instance::http(&cp, "backend", "backend-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;
    let out = web.outbound_addr();
    let r = curl(&["-H", "host: backend", &url(out, "/a%2Fb?q=1")]).await;
    assert_eq!(r.status, 307, "{r:?}");
    assert_eq!(r.header("location").as_deref(), Some("/a/b?q=1"));
    // curl follows it to the normalized path.
    let r = curl(&["-L", "-H", "host: backend", &url(out, "/a%2Fb?q=1")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.app_path(), "/a/b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_decides_the_host_and_underscore_headers_are_dropped() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:\n  - name: web\n  - name: backend\n  - name: other\n",
    );
    let cp = ControlPlane::start(policies.path()).await;
    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let _other = Instance::http(&cp, "other", "other-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "backend", "/", "backend-1").await;
    wait_for_instance(&web.http1(), "other", "/", "other-1").await;
    let proxy = format!("http://{}", web.outbound_addr());

    // curl through the sidecar as an HTTP proxy: absolute-form `GET http://backend/x` with a
    // contradicting Host. The target decides the service, and the app sees that host.
    let r = curl(&["-x", &proxy, "-H", "host: other", "http://backend/x"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["service"], "backend");
    assert_eq!(r.json()["headers"]["host"], "backend", "{r:?}");

    // HTTP/2: a host header that contradicts :authority is refused.
    let h2 = weft_testkit::HttpClient::h2c(web.outbound_addr());
    let r = h2
        .request(http::Method::GET, "backend", "/", &[("host", "other")], "")
        .await
        .expect("h2 request");
    assert_eq!(r.status, 400, "{}", r.summary());
    assert_eq!(r.header("x-weft-error"), Some("invalid-request"));
    let r = h2
        .request(
            http::Method::GET,
            "backend",
            "/",
            &[("host", "backend")],
            "",
        )
        .await
        .expect("h2 request");
    assert_eq!(r.status, 200, "{}", r.summary());

    // Underscore spellings of the identity header (and any other) never reach the app,
    // whichever side they are sent to.
    let forged = "x_weft_peer_identity: spiffe://cluster.local/ns/default/sa/admin";
    let r = curl(&[
        "-H",
        "host: backend",
        "-H",
        forged,
        "-H",
        "x_custom: 1",
        &url(web.outbound_addr(), "/"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = &r.json()["headers"];
    assert!(seen.get("x_weft_peer_identity").is_none(), "{seen}");
    assert!(seen.get("x_custom").is_none(), "{seen}");
    assert_eq!(
        seen["x-weft-peer-identity"], "spiffe://cluster.local/ns/default/sa/web",
        "the verified identity is the only one: {seen}"
    );
    let r = curl(&[
        "-H",
        "host: backend",
        "-H",
        forged,
        &url(backend.endpoint(), "/"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["headers"].get("x_weft_peer_identity").is_none());
    assert_eq!(instance_of_body(&r), "backend-1");
}

fn instance_of_body(r: &Curl) -> String {
    r.json()["instance"].as_str().unwrap_or("").to_owned()
}
