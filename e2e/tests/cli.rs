//! The binaries' command lines: `--help` of each, and `weftctl` against a running control plane.

use std::process::Output;
use std::time::Duration;

use weft_e2e::{caller_proxy, http_services_yaml, tally, wait_for_instance, Instance};
use weft_testkit::{bin_path, free_addr, next_loopback_ip, ControlPlane, PolicyDir};

const CLI_TIMEOUT: Duration = Duration::from_secs(20);

async fn run(bin: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(bin_path(bin));
    cmd.args(args).kill_on_drop(true);
    tokio::time::timeout(CLI_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`{bin} {}` did not finish within {CLI_TIMEOUT:?}",
                args.join(" ")
            )
        })
        .unwrap_or_else(|e| panic!("cannot run `{bin}`: {e}"))
}

fn describe(bin: &str, args: &[&str], out: &Output) -> String {
    format!(
        "`{bin} {}` exited {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `weftctl --server <cp admin> args...`.
async fn weftctl(cp: &ControlPlane, args: &[&str]) -> (Output, String) {
    let reach = cp.weftctl_args();
    let mut full: Vec<&str> = reach.iter().map(String::as_str).collect();
    full.extend_from_slice(args);
    let out = run("weftctl", &full).await;
    let desc = describe("weftctl", &full, &out);
    (out, desc)
}

#[tokio::test]
async fn help_of_every_binary_exits_zero() {
    for bin in ["weft-control", "weftctl", "weft-proxy", "weft-demo-app"] {
        let out = run(bin, &["--help"]).await;
        let desc = describe(bin, &["--help"], &out);
        assert!(out.status.success(), "{desc}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Usage"), "--help prints usage: {desc}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_get_and_apply_against_a_running_control_plane() {
    let policies = PolicyDir::with_file(
        "00-mesh.yaml",
        &http_services_yaml(&["web", "api", "api-b"]),
    );
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let _b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    // get: services (table), policies (json), proxies.
    let (out, desc) = weftctl(&cp, &["get", "services"]).await;
    assert!(out.status.success(), "{desc}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["web", "api", "api-b"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "service {name} listed: {desc}"
        );
    }
    let (out, desc) = weftctl(&cp, &["get", "policies", "-o", "json"]).await;
    assert!(out.status.success(), "{desc}");
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {desc}"));
    assert!(json["files"].to_string().contains("00-mesh.yaml"), "{desc}");
    let (out, desc) = weftctl(&cp, &["get", "proxies"]).await;
    assert!(out.status.success(), "{desc}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("web-1") && stdout.contains("api-1"),
        "{desc}"
    );

    // apply -f: a route file goes into the store and reaches the proxy.
    let scratch = PolicyDir::new();
    scratch.write(
        "canary.yaml",
        "routes:\n  - name: api-to-b\n    service: api\n    destinations:\n      - {service: api-b, weight: 100}\n",
    );
    let file = scratch.file("canary.yaml");
    let file = file.to_string_lossy();
    let (out, desc) = weftctl(&cp, &["apply", "-f", &file]).await;
    assert!(out.status.success(), "{desc}");
    assert!(
        policies.file("canary.yaml").is_file(),
        "apply writes the file into the store: {desc}"
    );
    let p = cp.policies().await;
    assert!(p["files"].to_string().contains("canary.yaml"), "{p}");
    wait_for_instance(&client, "api", "/", "b-1").await;
    let t = tally(&client, "api", "/", 10).await;
    assert_eq!(t.count("b-1"), 10, "{t:?}");
    let (out, desc) = weftctl(&cp, &["get", "routes"]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("api-to-b"),
        "{desc}"
    );

    // apply -f of an invalid file: rejected with file:line, exit 1, nothing stored.
    scratch.write(
        "bad.yaml",
        "routes:\n  - name: to-nowhere\n    service: api\n    destinations:\n      - {service: paymnts, weight: 100}\n",
    );
    let bad = scratch.file("bad.yaml");
    let bad = bad.to_string_lossy();
    let version = cp.policies().await["version"].clone();
    let (out, desc) = weftctl(&cp, &["apply", "-f", &bad]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an invalid policy is rejected with exit 1: {desc}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:") && stderr.contains("paymnts"),
        "the error names file:line and the bad service: {desc}"
    );
    assert!(
        !policies.file("bad.yaml").exists(),
        "a rejected file is not stored: {desc}"
    );
    assert_eq!(
        cp.policies().await["version"],
        version,
        "a rejected apply changes nothing"
    );

    // delete: the route goes away and traffic returns to api.
    let (out, desc) = weftctl(&cp, &["delete", "canary.yaml"]).await;
    assert!(out.status.success(), "{desc}");
    wait_for_instance(&client, "api", "/", "api-1").await;

    // status lists every proxy with its versions.
    let (out, desc) = weftctl(&cp, &["status"]).await;
    assert!(out.status.success(), "{desc}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("web-1") && stdout.contains("b-1"), "{desc}");
}

#[tokio::test]
async fn weftctl_reports_an_unreachable_control_plane() {
    let nowhere = format!("http://{}", free_addr(next_loopback_ip()));
    let args = ["--server", nowhere.as_str(), "get", "services"];
    let out = run("weftctl", &args).await;
    let desc = describe("weftctl", &args, &out);
    assert!(!out.status.success(), "{desc}");
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit 3 = server unreachable: {desc}"
    );
}
