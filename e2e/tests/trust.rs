//! The mesh's trust model with real processes on loopback:
//!
//! - discovery is authenticated: a registration needs the proxy's SVID as the TLS client
//!   certificate, may only announce the service that SVID names, cannot take over a node id
//!   another identity holds, and is bounded (ids, labels, addresses, message size) so a bad one
//!   never reaches the callers' config; every refusal is counted by reason;
//! - origination fails closed: a sidecar without a mesh identity never sends plaintext to an
//!   endpoint that expects mTLS (`strict` or `permissive`), only to `disabled` services and to
//!   endpoints outside the mesh;
//! - the control plane's admin API is HTTPS (verified by `curl` and `openssl s_client`) and needs
//!   a credential (bearer tokens with read/write roles, admin client certificates from
//!   `weft-control admin-cert`), counts refusals, audits changes, and an unauthenticated
//!   (`--insecure-admin`) admin API is only served on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tonic::Code;
use weft_e2e::{
    caller_proxy, caller_proxy_config, http_services_yaml, instance_of, proxy_status, tally,
    wait_for_instance, Instance, SETTLE,
};
use weft_proto::v1::Node;
use weft_testkit::security::{
    certify_with_openssl, foreign_cert, try_register_node, CertFiles, FakeNode,
};
use weft_testkit::{
    bin_path, free_addr, free_addrs, free_port, next_loopback_ip, raw_exchange, wait_until,
    AdminAccess, ConfigVersions, ControlPlane, ControlPlaneConfig, DemoApp, HttpResponse, Metrics,
    PolicyDir, ProcessGuard, Proxy, DEFAULT_WAIT,
};

const REFUSED: &str = "weft_control_registrations_refused_total";
const REFUSAL_REASONS: [&str; 6] = [
    "unauthenticated",
    "identity_mismatch",
    "id_taken",
    "invalid",
    "too_many",
    "hello_timeout",
];
const ADMIN_DENIED: &str = "weft_control_admin_requests_denied_total";
const ORIGINATION_REFUSED: &str = "weft_tls_origination_refused_total";

/// How long one external command (curl, openssl, weftctl, weft-control) may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A node of `default/<service>` announcing `inbound`.
fn node(id: &str, service: &str, inbound: &str) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: inbound.into(),
        ..Default::default()
    }
}

/// An address nothing listens on, on a fresh loopback IP: what a registration announces when
/// nobody is meant to reach it.
fn spare_inbound() -> String {
    free_addr(next_loopback_ip()).to_string()
}

/// An SVID for `default/<service>` from the control plane's `Identity.Certify`.
async fn svid(cp: &ControlPlane, service: &str) -> CertFiles {
    certify_with_openssl(cp.grpc_addr, service, "default", Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("Certify default/{service}: {e}"))
}

/// [`try_register_node`], bounded by [`DEFAULT_WAIT`].
async fn register(
    cp: &ControlPlane,
    cert: Option<&CertFiles>,
    node: Node,
) -> Result<FakeNode, tonic::Status> {
    let what = format!(
        "registration of {:.40?} as {:?} (certificate {:?})",
        node.id,
        node.service,
        cert.map(|c| c.spiffe_id.as_str())
    );
    tokio::time::timeout(DEFAULT_WAIT, try_register_node(cp.grpc_addr, cert, node))
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {DEFAULT_WAIT:?}"))
}

/// A registration that must be refused: the status it was refused with.
async fn refused(cp: &ControlPlane, cert: Option<&CertFiles>, node: Node) -> tonic::Status {
    let what = format!("{:.40?} as {:?}", node.id, node.service);
    match register(cp, cert, node).await {
        Ok(_registered) => panic!(
            "the registration of {what} was accepted (it got a push)\n{}",
            cp.process.describe()
        ),
        Err(status) => status,
    }
}

/// `weft_control_registrations_refused_total` of every reason, in [`REFUSAL_REASONS`] order.
fn refusals(m: &Metrics) -> Vec<(&'static str, f64)> {
    REFUSAL_REASONS
        .iter()
        .map(|r| (*r, m.sum(REFUSED, &[("reason", r)])))
        .collect()
}

/// Asserts the refusal counter of every reason: `want` lists the non-zero ones, the others must
/// be 0.
async fn assert_refusals(cp: &ControlPlane, want: &[(&str, f64)]) {
    let m = cp.metrics().await;
    let expected: Vec<(&'static str, f64)> = REFUSAL_REASONS
        .iter()
        .map(|r| {
            let v = want.iter().find(|(w, _)| w == r).map_or(0.0, |(_, v)| *v);
            (*r, v)
        })
        .collect();
    assert_eq!(refusals(&m), expected, "{}", m.lines_for(REFUSED));
}

/// The `GET /v1/proxies` ids, sorted.
async fn proxy_ids(cp: &ControlPlane) -> Vec<String> {
    let proxies = cp.proxies().await;
    let mut ids: Vec<String> = proxies
        .as_array()
        .unwrap_or_else(|| panic!("/v1/proxies is not an array: {proxies}"))
        .iter()
        .map(|p| p["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// Waits until `p`'s `/config_dump` versions stay the same across [`SETTLE`]; returns them.
async fn settled_versions(p: &Proxy) -> ConfigVersions {
    let what = format!("{}'s config versions hold still for {SETTLE:?}", p.id());
    wait_until(DEFAULT_WAIT, &what, async || {
        let before = p.versions().await;
        tokio::time::sleep(SETTLE).await;
        let after = p.versions().await;
        if before == after {
            Ok(after)
        } else {
            Err(format!("{before:?} -> {after:?}"))
        }
    })
    .await
}

/// Inbound requests `p` (an instance's sidecar) has served: what reached its app.
async fn inbound_requests(p: &Proxy) -> f64 {
    p.metrics()
        .await
        .sum("weft_requests_total", &[("direction", "inbound")])
}

/// `method path` through `access`, panicking on a transport error.
async fn admin_call(access: &AdminAccess, method: Method, path: &str, body: &str) -> HttpResponse {
    access
        .request(method.clone(), path, Bytes::from(body.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{method} {}{path}: {e:#}", access.base_url()))
}

/// Asserts `resp` is a 401 asking for a bearer token.
fn assert_unauthorized(what: &str, resp: &HttpResponse) {
    assert_eq!(resp.status, 401, "{what}: {}", resp.summary());
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer realm=\"weft-control\""),
        "{what}: {:?}",
        resp.headers
    );
}

/// Runs `program args` (with `env_remove` unset) within [`TOOL_TIMEOUT`]; returns its output
/// and a description (command line, exit status, stdout, stderr) for assertion messages.
async fn run_tool(program: &Path, args: &[&str], env_remove: &[&str]) -> (Output, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for var in env_remove {
        cmd.env_remove(var);
    }
    let line = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`{line}` did not finish within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    let desc = format!(
        "`{line}` exited {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, desc)
}

/// The variables through which `weftctl` could pick up a credential the test did not give it.
const WEFTCTL_ENV: [&str; 5] = [
    "WEFT_CA_DIR",
    "WEFT_ADMIN_CA",
    "WEFT_ADMIN_TOKEN_FILE",
    "WEFT_ADMIN_CERT",
    "WEFT_ADMIN_KEY",
];

/// `weftctl args...` with nothing but the given flags.
async fn weftctl(args: &[&str]) -> (Output, String) {
    run_tool(&bin_path("weftctl"), args, &WEFTCTL_ENV).await
}

/// The HTTP status `curl -i` printed first (`HTTP/1.1 200 OK` -> 200).
fn curl_status(out: &Output) -> Option<u16> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// Discovery: authenticated, admitted registrations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_requires_the_callers_svid() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let mut config = ControlPlaneConfig::new(policies.path());
    config.ca = true;
    config.grpc_tls = true;
    let cp = ControlPlane::start_with(config).await;
    assert!(cp.grpc_url().starts_with("https://"), "{}", cp.grpc_url());
    assert_refusals(&cp, &[]).await;
    let web_svid = svid(&cp, "web").await;
    assert_eq!(
        web_svid.spiffe_id,
        "spiffe://cluster.local/ns/default/sa/web"
    );
    let inbound = spare_inbound();

    // TLS without a client certificate: refused before any Hello is considered.
    let status = refused(&cp, None, node("web-1", "web", &inbound)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_refusals(&cp, &[("unauthenticated", 1.0)]).await;

    // web's SVID announcing api: refused, naming both.
    let status = refused(&cp, Some(&web_svid), node("web-1", "api", &inbound)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("web") && status.message().contains("api"),
        "{status:?}"
    );
    assert_refusals(&cp, &[("unauthenticated", 1.0), ("identity_mismatch", 1.0)]).await;
    assert_eq!(
        proxy_ids(&cp).await,
        Vec::<String>::new(),
        "a refused registration is not listed"
    );

    // web as itself: registered, pushed its config, listed as web.
    let _web = register(&cp, Some(&web_svid), node("web-1", "web", &inbound))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "web's SVID registering web-1 as web: {e:?}\n{}",
                cp.process.describe()
            )
        });
    let listed = cp.proxies().await;
    let status = proxy_status(&cp, "web-1")
        .await
        .unwrap_or_else(|| panic!("web-1 is not listed: {listed}"));
    assert_eq!(status["service"], "web", "{status}");
    assert_eq!(status["namespace"], "default", "{status}");
    assert_eq!(status["inbound_address"], inbound.as_str(), "{status}");
    // Each refusal was counted exactly once, the registration not at all.
    assert_refusals(&cp, &[("unauthenticated", 1.0), ("identity_mismatch", 1.0)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_cannot_be_taken_over_by_another_identity() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    assert!(cp.grpc_tls(), "this test needs authenticated discovery");
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    let versions = settled_versions(&web).await;

    // web's SVID (a workload holding web's join token) announces the id api-1, pointing at an
    // app of its own.
    let impostor = DemoApp::start("impostor", "impostor-1").await;
    let web_svid = svid(&cp, "web").await;
    let status = refused(
        &cp,
        Some(&web_svid),
        node("api-1", "web", &impostor.http_addr().to_string()),
    )
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("api-1"), "{status:?}");
    assert_refusals(&cp, &[("id_taken", 1.0)]).await;

    // api-1 is still api's instance at api's sidecar, and web's traffic still reaches it.
    let listed = cp.proxies().await;
    let status = proxy_status(&cp, "api-1")
        .await
        .unwrap_or_else(|| panic!("api-1 is not listed: {listed}"));
    assert_eq!(status["service"], "api", "{status}");
    assert_eq!(status["state"], "connected", "{status}");
    assert_eq!(
        status["inbound_address"],
        api.endpoint().to_string().as_str(),
        "{status}"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        web.versions().await,
        versions,
        "the refused registration changed web's config"
    );
    let t = tally(&web.http1(), "api", "/", 20).await;
    assert_eq!(t.count("api-1"), 20, "{t:?}");
    assert_eq!(
        proxy_ids(&cp).await,
        vec!["api-1".to_string(), "web-1".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_oversized_registrations_change_no_callers_config() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    assert!(cp.grpc_tls(), "this test needs authenticated discovery");
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
    web.wait_endpoint(api.endpoint(), true).await;
    let versions = settled_versions(&web).await;
    let api_svid = svid(&cp, "api").await;

    // Each carries a fresh, valid inbound address (but the first): accepted, it would add an
    // endpoint of api to web's config.
    let mut many_labels = node("api-many-labels", "api", &spare_inbound());
    many_labels.labels = (0..40).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let mut big_label = node("api-big-label", "api", &spare_inbound());
    big_label
        .labels
        .insert("zone".into(), "z".repeat(100 * 1024));
    let long_id = node(&"a".repeat(10 * 1024), "api", &spare_inbound());
    let cases = [
        (
            "inbound_address \"nonsense\"",
            node("api-nonsense", "api", "nonsense"),
            "inbound_address",
        ),
        ("40 labels", many_labels, "labels"),
        ("a 100 KiB label value", big_label, "labels[zone]"),
        ("a 10 KiB id", long_id, "id"),
    ];
    for (what, n, field) in cases {
        let status = refused(&cp, Some(&api_svid), n).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(field),
            "{what}: the refusal names {field:?}: {status:?}"
        );
    }
    assert_refusals(&cp, &[("invalid", 4.0)]).await;

    // About 2 MiB of labels: over the 1 MiB gRPC message cap. Refused one way or another.
    let mut huge = node("api-huge", "api", &spare_inbound());
    huge.labels = (0..32)
        .map(|i| (format!("k{i}"), "v".repeat(64 * 1024)))
        .collect();
    let status = refused(&cp, Some(&api_svid), huge).await;
    assert_ne!(status.code(), Code::Ok, "{status:?}");
    println!("the ~2 MiB Hello was refused with {status:?}");
    // An unreadable Hello (here: over the message cap) counts as invalid too.
    assert_refusals(&cp, &[("invalid", 5.0)]).await;

    // Nothing reached web: same versions, api-1 still answers, the registry holds only the two
    // real proxies, and the control plane is still serving.
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        web.versions().await,
        versions,
        "a refused registration changed web's config: {}",
        web.config_dump().await["endpoints"]
    );
    let t = tally(&web.http1(), "api", "/", 10).await;
    assert_eq!(t.count("api-1"), 10, "{t:?}");
    assert_eq!(
        proxy_ids(&cp).await,
        vec!["api-1".to_string(), "web-1".to_string()]
    );
    let web_status = proxy_status(&cp, "web-1").await.expect("web-1 listed");
    assert_eq!(web_status["nacking"], false, "{web_status}");
}

// ---------------------------------------------------------------------------------------------
// Origination fails closed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_without_identity_never_sends_plaintext() {
    let ext = DemoApp::start("ext", "ext-1").await;
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &format!(
            "services:
  - name: web
  - name: backend
    mtls: strict
  - name: open
    mtls: permissive
  - name: plainsvc
    mtls: disabled
  - name: ext
    endpoints:
      - address: {}
",
            ext.http_addr()
        ),
    );
    // Plaintext gRPC: the one way a proxy without a join token can register.
    let mut config = ControlPlaneConfig::new(policies.path());
    config.ca = true;
    config.grpc_tls = false;
    let cp = ControlPlane::start_with(config).await;
    assert!(cp.grpc_url().starts_with("http://"), "{}", cp.grpc_url());
    wait_until(
        DEFAULT_WAIT,
        "weft-control warns that --insecure-grpc leaves registrations unauthenticated",
        async || {
            let log = cp.process.log();
            if log.contains("WARN") && log.contains("INSECURE: the gRPC port is plaintext") {
                Ok(())
            } else {
                Err(cp.process.log_tail(10))
            }
        },
    )
    .await;

    let backend = Instance::http(&cp, "backend", "backend-1").await;
    let open = Instance::http(&cp, "open", "open-1").await;
    let plain = Instance::http(&cp, "plainsvc", "plainsvc-1").await;
    for i in [&backend, &open, &plain] {
        assert!(
            i.proxy.config.join_token.is_some(),
            "{} has a mesh identity",
            i.proxy.id()
        );
    }
    let mut web_config = caller_proxy_config(&cp, "web", "web-1");
    web_config.secure = false;
    let web = Proxy::start_with(web_config).await;
    assert_eq!(web.config.join_token, None, "web runs without identity");
    let client = web.http1();

    // Plaintext where plaintext is right: a disabled mesh service, an endpoint outside the mesh.
    wait_for_instance(&client, "plainsvc", "/", "plainsvc-1").await;
    wait_for_instance(&client, "ext", "/", "ext-1").await;
    web.wait_endpoint(backend.endpoint(), true).await;
    web.wait_endpoint(open.endpoint(), true).await;

    // strict and permissive expect mTLS: refused at web's sidecar, nothing sent.
    for (service, instance) in [("backend", &backend), ("open", &open)] {
        let resp = client
            .get(service, "/from-web")
            .await
            .unwrap_or_else(|e| panic!("GET http://{service}/from-web: {e:#}"));
        assert_eq!(resp.status, 503, "{service}: {}", resp.summary());
        assert_eq!(
            resp.header("x-weft-error"),
            Some("connect-failed"),
            "{service}: {}",
            resp.summary()
        );
        assert!(
            resp.text().contains("no mesh identity"),
            "{service}: the body says why: {}",
            resp.summary()
        );
        assert_eq!(instance_of(&resp), "", "{service}: {}", resp.summary());
        assert_eq!(
            inbound_requests(&instance.proxy).await,
            0.0,
            "no request reached {service}'s sidecar (so its app): {}",
            instance
                .proxy
                .metrics()
                .await
                .lines_for("weft_requests_total")
        );
    }

    let t = tally(&client, "plainsvc", "/", 5).await;
    assert_eq!(t.count("plainsvc-1"), 5, "{t:?}");
    let t = tally(&client, "ext", "/", 5).await;
    assert_eq!(t.count("ext-1"), 5, "{t:?}");
    // The inbound counter does count what reaches a sidecar (so the zeros above mean something).
    assert!(inbound_requests(&plain.proxy).await >= 5.0);

    let m = web.metrics().await;
    let refused = m.sum(ORIGINATION_REFUSED, &[("reason", "no_identity")]);
    assert!(refused >= 2.0, "{}", m.lines_for(ORIGINATION_REFUSED));
}

// ---------------------------------------------------------------------------------------------
// The admin API
// ---------------------------------------------------------------------------------------------

const OPS_TOKEN: &str = "ops-token-0123456789abcdef";
const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_a_credential() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web"]));
    let secrets = PolicyDir::new();
    secrets.write(
        "admin-tokens",
        &format!("# name role token\nops write {OPS_TOKEN}\nviewer read {VIEWER_TOKEN}\n"),
    );
    let mut config = ControlPlaneConfig::new(policies.path());
    config.extra_args = vec![
        "--admin-tokens".into(),
        path_str(&secrets.file("admin-tokens")),
    ];
    let cp = ControlPlane::start_with(config).await;
    assert!(cp.admin_tls(), "{}", cp.admin_url(""));
    let roots = cp.roots_pem();
    let anon = AdminAccess::tls(cp.admin_addr, &roots, None);
    let viewer = anon.with_token(Some(VIEWER_TOKEN));
    let ops = anon.with_token(Some(OPS_TOKEN));
    let stranger = anon.with_token(Some("not-a-token-anyone-issued-0123"));
    let x_policy = "services:\n  - name: x\n";
    let mut unauthenticated = 0.0;

    let r = admin_call(&anon, Method::GET, "/healthz", "").await;
    assert_eq!(r.status, 200, "/healthz is public: {}", r.summary());

    let r = admin_call(&anon, Method::GET, "/v1/proxies", "").await;
    assert_unauthorized("GET /v1/proxies without a credential", &r);
    unauthenticated += 1.0;
    let r = admin_call(&anon, Method::PUT, "/v1/policies/x.yaml", x_policy).await;
    assert_unauthorized("PUT /v1/policies/x.yaml without a credential", &r);
    unauthenticated += 1.0;
    let r = admin_call(&stranger, Method::GET, "/v1/proxies", "").await;
    assert_unauthorized("GET /v1/proxies with an unknown token", &r);
    unauthenticated += 1.0;

    let r = admin_call(&viewer, Method::GET, "/v1/proxies", "").await;
    assert_eq!(r.status, 200, "viewer (read) GET: {}", r.summary());
    let r = admin_call(&viewer, Method::PUT, "/v1/policies/x.yaml", x_policy).await;
    assert_eq!(r.status, 403, "viewer (read) PUT: {}", r.summary());
    assert!(
        r.text().contains("viewer") && r.text().contains("write"),
        "the 403 names the caller and the role it lacks: {}",
        r.summary()
    );
    assert!(
        !policies.file("x.yaml").exists(),
        "refused PUTs stored nothing"
    );

    let r = admin_call(&ops, Method::PUT, "/v1/policies/x.yaml", x_policy).await;
    assert_eq!(r.status, 200, "ops (write) PUT: {}", r.summary());
    assert!(policies.file("x.yaml").is_file(), "ops' PUT was stored");
    // The bootstrap token (cp.admin()) reads and writes.
    let p = cp.policies().await;
    assert!(p["files"].to_string().contains("x.yaml"), "{p}");
    let r = cp
        .put("/v1/policies/y.yaml", "services:\n  - name: y\n")
        .await;
    assert_eq!(r.status, 200, "bootstrap PUT: {}", r.summary());

    // curl, a client nobody here wrote: an allowed and a refused call, and no trust without
    // the control plane's roots.
    let url = cp.admin_url("/v1/proxies");
    let roots_arg = path_str(&roots);
    let bearer = format!("authorization: Bearer {VIEWER_TOKEN}");
    let curl = Path::new("curl");
    let base = ["-sS", "-i", "--max-time", "10"];
    let mut args = base.to_vec();
    args.extend(["--cacert", &roots_arg, "-H", &bearer, &url]);
    let (out, desc) = run_tool(curl, &args, &[]).await;
    assert!(out.status.success(), "{desc}");
    assert_eq!(curl_status(&out), Some(200), "{desc}");
    let mut args = base.to_vec();
    args.extend(["--cacert", &roots_arg, &url]);
    let (out, desc) = run_tool(curl, &args, &[]).await;
    assert!(out.status.success(), "{desc}");
    assert_eq!(curl_status(&out), Some(401), "{desc}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer realm=\"weft-control\""),
        "{desc}"
    );
    unauthenticated += 1.0;
    let mut args = base.to_vec();
    args.extend(["-H", &bearer, &url]);
    let (out, desc) = run_tool(curl, &args, &[]).await;
    assert!(
        !out.status.success() && curl_status(&out).is_none(),
        "curl without the control plane's roots must not trust the admin certificate: {desc}"
    );

    // openssl verifies the admin certificate against roots.pem (chain and IP); a foreign CA
    // does not.
    let connect = cp.admin_addr.to_string();
    let ip = cp.admin_addr.ip().to_string();
    let openssl = Path::new("openssl");
    let (out, desc) = run_tool(
        openssl,
        &[
            "s_client",
            "-connect",
            &connect,
            "-CAfile",
            &roots_arg,
            "-verify_return_error",
            "-verify_ip",
            &ip,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{desc}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0 (ok)"),
        "{desc}"
    );
    let foreign = foreign_cert("spiffe://evil.example/ns/default/sa/web");
    let foreign_ca = path_str(&foreign.dir.path().join("ca.pem"));
    let (out, desc) = run_tool(
        openssl,
        &[
            "s_client",
            "-connect",
            &connect,
            "-CAfile",
            &foreign_ca,
            "-verify_return_error",
        ],
        &[],
    )
    .await;
    assert!(!out.status.success(), "a foreign CA verified it: {desc}");

    // Plain HTTP to the admin port: no HTTP answer at all (so no 200).
    let raw = raw_exchange(
        cp.admin_addr,
        b"GET /healthz HTTP/1.1\r\nhost: weft-control\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|e| panic!("plaintext to the admin port: {e:#}"));
    // (What comes back is a TLS alert, and the connection is closed.)
    assert!(
        !raw.text().contains("HTTP/") && raw.closed,
        "plaintext HTTP was answered: {raw:?}"
    );

    let m = cp.metrics().await;
    assert_eq!(
        m.sum(ADMIN_DENIED, &[("reason", "unauthenticated")]),
        unauthenticated,
        "{}",
        m.lines_for(ADMIN_DENIED)
    );
    assert_eq!(
        m.sum(ADMIN_DENIED, &[("reason", "forbidden")]),
        1.0,
        "{}",
        m.lines_for(ADMIN_DENIED)
    );
}

/// Runs `weft-control admin-cert` for `name` with `role` into `out`; returns (cert, key).
async fn admin_cert(
    ca_dir: &Path,
    name: &str,
    role: &str,
    out: &Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (output, desc) = run_tool(
        &bin_path("weft-control"),
        &[
            "admin-cert",
            "--ca-dir",
            &path_str(ca_dir),
            "--name",
            name,
            "--role",
            role,
            "--out",
            &path_str(out),
        ],
        &[],
    )
    .await;
    assert!(output.status.success(), "{desc}");
    let cert = out.join(format!("{name}.pem"));
    let key = out.join(format!("{name}-key.pem"));
    assert!(cert.is_file() && key.is_file(), "{desc}");
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_with_an_admin_certificate_and_the_audit_log() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web"]));
    let cp = ControlPlane::start(policies.path()).await;
    assert!(cp.admin_tls(), "{}", cp.admin_url(""));
    let ca_dir = cp.ca_dir().expect("the control plane runs a CA");
    let creds = PolicyDir::new();
    let (alice_cert, alice_key) = admin_cert(&ca_dir, "alice", "write", creds.path()).await;
    let (bob_cert, bob_key) = admin_cert(&ca_dir, "bob", "read", creds.path()).await;

    let scratch = PolicyDir::new();
    scratch.write("extra.yaml", "services:\n  - name: extra\n");
    scratch.write("bobs.yaml", "services:\n  - name: bobs\n");
    let server = cp.admin_url("");
    let roots = path_str(&cp.roots_pem());
    let as_user = |cert: &Path, key: &Path, file: &str| {
        vec![
            "--server".to_owned(),
            server.clone(),
            "--ca".to_owned(),
            roots.clone(),
            "--cert".to_owned(),
            path_str(cert),
            "--key".to_owned(),
            path_str(key),
            "apply".to_owned(),
            "-f".to_owned(),
            path_str(&scratch.file(file)),
        ]
    };

    // alice (write): applied, stored and served.
    let args = as_user(&alice_cert, &alice_key, "extra.yaml");
    let (out, desc) = weftctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(0), "{desc}");
    assert!(policies.file("extra.yaml").is_file(), "{desc}");
    let services = cp.get_json("/v1/services").await;
    assert!(
        services.to_string().contains("\"extra\""),
        "the applied service is served: {services}"
    );

    // bob (read): refused, naming the role he lacks; nothing stored.
    let args = as_user(&bob_cert, &bob_key, "bobs.yaml");
    let (out, desc) = weftctl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(out.status.code(), Some(1), "{desc}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bob") && stderr.contains("needs role write"),
        "{desc}"
    );
    assert!(!policies.file("bobs.yaml").exists(), "{desc}");

    // --ca but no credential at all: refused (401), nothing stored.
    let bobs = path_str(&scratch.file("bobs.yaml"));
    let (out, desc) = weftctl(&["--server", &server, "--ca", &roots, "apply", "-f", &bobs]).await;
    assert_eq!(out.status.code(), Some(1), "{desc}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a credential"),
        "{desc}"
    );
    assert!(!policies.file("bobs.yaml").exists(), "{desc}");

    let m = cp.metrics().await;
    assert_eq!(
        m.sum(ADMIN_DENIED, &[("reason", "forbidden")]),
        1.0,
        "{}",
        m.lines_for(ADMIN_DENIED)
    );
    assert_eq!(
        m.sum(ADMIN_DENIED, &[("reason", "unauthenticated")]),
        1.0,
        "{}",
        m.lines_for(ADMIN_DENIED)
    );

    // The audit log names alice, her credential and what she changed.
    let line = wait_until(
        DEFAULT_WAIT,
        "weft-control's log has a weft::audit line for alice's apply",
        async || {
            let log = cp.process.log();
            log.lines()
                .find(|l| {
                    l.contains("weft::audit")
                        && l.contains("alice (certificate, write)")
                        && l.contains("/v1/policies/extra.yaml")
                })
                .map(str::to_owned)
                .ok_or_else(|| {
                    let audit: Vec<&str> =
                        log.lines().filter(|l| l.contains("weft::audit")).collect();
                    format!("audit lines: {audit:?}")
                })
        },
    )
    .await;
    assert!(line.contains("PUT"), "{line}");
    println!("audit line: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_admin_api_refuses_a_public_address() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web"]));
    let state = PolicyDir::new();
    let ca_dir = path_str(&state.path().join("ca"));
    let policies_arg = path_str(policies.path());
    let ip = next_loopback_ip();
    let [grpc, admin] = <[SocketAddr; 2]>::try_from(free_addrs(ip, 2))
        .unwrap_or_else(|_| unreachable!("free_addrs returns exactly n addresses"));
    let grpc = grpc.to_string();
    let public_admin = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        free_port(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    )
    .to_string();
    let args = |admin: &str| {
        vec![
            "--policies".to_owned(),
            policies_arg.clone(),
            "--grpc".to_owned(),
            grpc.clone(),
            "--admin".to_owned(),
            admin.to_owned(),
            "--ca-dir".to_owned(),
            ca_dir.clone(),
            "--insecure-admin".to_owned(),
        ]
    };

    // On 0.0.0.0: refuses to start (run_tool bounds the wait).
    let public = args(&public_admin);
    let (out, desc) = run_tool(
        &bin_path("weft-control"),
        &public.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )
    .await;
    assert!(!out.status.success(), "{desc}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "refusing to serve the admin API on {public_admin}"
        )),
        "{desc}"
    );

    // The same flags on loopback: serves plaintext /healthz until stopped.
    let mut cmd = std::process::Command::new(bin_path("weft-control"));
    cmd.args(args(&admin.to_string()));
    let mut guard = ProcessGuard::spawn("weft-control[insecure-admin]", cmd);
    let plain = AdminAccess::plain(admin);
    let process = &mut guard;
    wait_until(
        DEFAULT_WAIT,
        "weft-control --insecure-admin on loopback answers GET /healthz with 200",
        async || {
            if let Some(status) = process.try_exit_status() {
                panic!("it exited ({status})\n{}", process.describe());
            }
            match plain.request(Method::GET, "/healthz", Bytes::new()).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(r.summary()),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await;
    // Open means open: no credential needed.
    let r = admin_call(&plain, Method::GET, "/v1/proxies", "").await;
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(
        guard.log().contains("INSECURE: the admin API is plaintext"),
        "{}",
        guard.describe()
    );
    guard.assert_running();
    let status = guard.stop();
    assert!(status.is_some(), "{}", guard.describe());
}
