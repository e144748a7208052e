//! Operating a running mesh: a sidecar's log filter changed at run time through its own admin
//! port (curl, loopback) and through the control plane for a proxy by id (`weftctl log-level`),
//! without a restart, and reset.

use std::time::Duration;

use weft_e2e::{caller_proxy, require_tool, weftctl};
use weft_testkit::{wait_until, ControlPlane, PolicyDir, Proxy, DEFAULT_WAIT};

/// `curl -sS [-X PUT --data BODY] URL` (10 s bounded): (HTTP status, body).
async fn curl(url: &str, put: Option<&str>) -> (u16, String) {
    let mut cmd = tokio::process::Command::new(require_tool("curl"));
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(body) = put {
        cmd.args(["-X", "PUT", "--data-binary", body]);
    }
    cmd.arg(url).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .expect("curl finished")
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.trim().to_owned())
}

/// Waits until `GET /log_level` on `proxy` answers `want`.
async fn wait_level(proxy: &Proxy, want: &str) {
    let url = proxy.admin_url("/log_level");
    wait_until(
        DEFAULT_WAIT,
        &format!("{} runs log filter {want:?}", proxy.id()),
        async || {
            let (status, body) = curl(&url, None).await;
            if status == 200 && body == want {
                Ok(())
            } else {
                Err(format!("{status} {body:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_changes_at_run_time_locally_and_through_the_control_plane() {
    let policies = PolicyDir::with_file("mesh.yaml", "services:\n  - name: web\n");
    let cp = ControlPlane::start(policies.path()).await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let url = web.admin_url("/log_level");
    wait_level(&web, "info").await;
    assert!(
        !web.process.log().contains(" DEBUG "),
        "no debug lines at info"
    );

    // On the admin port (the test is a loopback caller).
    let (status, body) = curl(&url, Some("debug")).await;
    assert_eq!((status, body.as_str()), (200, "debug"));
    // Debug lines start to appear (the config dump below makes some).
    wait_until(DEFAULT_WAIT, "web-1 logs at debug", async || {
        let _ = curl(&web.admin_url("/config_dump"), None).await;
        if web.process.log().contains(" DEBUG ") {
            Ok(())
        } else {
            Err("no DEBUG line yet")
        }
    })
    .await;
    let (status, body) = curl(&url, Some("not a [filter")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a log filter"), "{body}");
    let (status, _) = curl(&url, Some("")).await;
    assert_eq!(status, 200);
    wait_level(&web, "info").await;

    // Through the control plane, by proxy id: pushed to the sidecar wherever it runs.
    let (out, desc) = weftctl(&cp, &["log-level", "web-1", "warn,weft_proxy=trace"]).await;
    assert!(out.status.success(), "{desc}");
    wait_level(&web, "warn,weft_proxy=trace").await;
    let (out, desc) = weftctl(&cp, &["log-level", "web-1", "--reset"]).await;
    assert!(out.status.success(), "{desc}");
    wait_level(&web, "info").await;

    // Refusals: an unknown proxy, a filter that does not parse.
    let (out, desc) = weftctl(&cp, &["log-level", "nobody", "debug"]).await;
    assert_eq!(out.status.code(), Some(1), "{desc}");
    assert!(desc.contains("no proxy \"nobody\""), "{desc}");
    let (out, desc) = weftctl(&cp, &["log-level", "web-1", "debug[oops"]).await;
    assert_eq!(out.status.code(), Some(1), "{desc}");
    assert!(desc.contains("not a log filter"), "{desc}");
    wait_level(&web, "info").await;
}
