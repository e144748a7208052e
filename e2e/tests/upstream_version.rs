//! The HTTP version a sidecar speaks upstream: an h2c client (curl --http2-prior-knowledge)
//! calling a service outside the mesh that only speaks HTTP/1.1 (Python's `http.server`) is
//! translated to HTTP/1.1 (the default for services with static endpoints), and a service can
//! force a version with `upstream_protocol`.

use std::process::Command;
use std::time::Duration;

use weft_e2e::{caller_proxy, require_tool};
use weft_testkit::{
    free_addr, next_loopback_ip, wait_until, ControlPlane, PolicyDir, ProcessGuard, DEFAULT_WAIT,
};

/// `curl` through `proxy` for `host`: (status, body, HTTP version curl used).
async fn curl(args: &[&str]) -> (u16, String) {
    let mut cmd = tokio::process::Command::new(require_tool("curl"));
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("curl finished")
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_reach_an_http1_only_service_outside_the_mesh() {
    // An HTTP/1.1-only server nobody here wrote.
    let python = require_tool("python3");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("hello.txt"), "hello from http.server\n").expect("write");
    let addr = free_addr(next_loopback_ip());
    let mut cmd = Command::new(python);
    cmd.args(["-m", "http.server", &addr.port().to_string(), "--bind"])
        .arg(addr.ip().to_string())
        .current_dir(dir.path());
    let _server = ProcessGuard::spawn("python-http.server", cmd);

    let policies = PolicyDir::with_file(
        "mesh.yaml",
        &format!(
            "services:
  - name: web
  - name: legacy
    endpoints: [{{address: \"{addr}\"}}]
  - name: forced-h2
    upstream_protocol: http2
    endpoints: [{{address: \"{addr}\"}}]
"
        ),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let url = format!("http://{}/hello.txt", web.outbound_addr());

    // HTTP/1.1 client first (also waits for the config).
    wait_until(
        DEFAULT_WAIT,
        "GET http://legacy/hello.txt over HTTP/1.1",
        async || match curl(&["-H", "host: legacy", &url]).await {
            (200, body) if body.contains("hello from http.server") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // h2c prior knowledge from the client, HTTP/1.1 to the server: translated.
    let (status, body) = curl(&["--http2-prior-knowledge", "-H", "host: legacy", &url]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello from http.server"), "{body}");
    // Forcing HTTP/2 to an HTTP/1.1-only server fails, as configured.
    let (status, body) = curl(&["--http2-prior-knowledge", "-H", "host: forced-h2", &url]).await;
    assert!(status == 502 || status == 503, "{status} {body}");
}
