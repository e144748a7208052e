//! `weftctl check` against real processes: a green mesh passes (exit 0, every line ✔), and a
//! stale proxy (stopped with SIGSTOP while a policy change is pushed), an invalid local policy
//! file, an expiring webhook certificate and a control plane that is down each produce the
//! right failing line and exit code.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use weft_e2e::{caller_proxy, weftctl, Instance};
use weft_testkit::{
    free_addr, wait_until, ControlPlane, ControlPlaneConfig, PolicyDir, DEFAULT_WAIT,
};

const SERVICES: &str = "services:\n  - name: web\n  - name: api\n";

const INJECT_YAML: &str = "proxy: {image: weft/weft-proxy:0.1.0}\ncontrolPlane: {address: 'https://weft-control.weft-system.svc:15010'}\n";

/// A self-signed serving certificate for `ip`, valid `days`, at `dir/<name>.crt|key`; it is
/// also the CA file that verifies it.
fn serving_cert(dir: &Path, name: &str, ip: &str, days: u32) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-days", &days.to_string(), "-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=IP:{ip}")])
        // A serving certificate, not a CA (webpki refuses a CA as the end entity).
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (crt, key)
}

/// The checklist line of `name` in `stdout`.
fn line<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| {
            l.split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with(name))
        })
        .unwrap_or_else(|| panic!("no `{name}` line in\n{stdout}"))
}

fn swap_in(from: &Path, to: &Path) {
    let tmp = to.with_extension("swap");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_green_mesh_and_names_each_failure() {
    let policies = PolicyDir::with_file("services.yaml", SERVICES);
    let dir = tempfile::tempdir().unwrap();
    let ip = weft_testkit::next_loopback_ip();
    let webhook_addr = free_addr(ip);
    let (crt, key) = serving_cert(dir.path(), "webhook", &ip.to_string(), 365);
    let (serving_crt, serving_key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    swap_in(&crt, &serving_crt);
    swap_in(&key, &serving_key);
    let inject = dir.path().join("inject.yaml");
    std::fs::write(&inject, INJECT_YAML).unwrap();
    let mut config = ControlPlaneConfig::new(policies.path());
    config.extra_args = [
        "--inject-addr",
        &webhook_addr.to_string(),
        "--inject-tls-cert",
        &serving_crt.display().to_string(),
        "--inject-tls-key",
        &serving_key.display().to_string(),
        "--inject-config",
        &inject.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut cp = ControlPlane::start_with(config).await;
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(api.endpoint(), true).await;

    let local = tempfile::tempdir().unwrap();
    std::fs::write(
        local.path().join("routes.yaml"),
        "routes:\n  - name: r\n    service: api\n    destinations: [{service: api}]\n",
    )
    .unwrap();
    let webhook_url = format!("https://{webhook_addr}");
    let crt_arg = crt.display().to_string();
    let local_arg = local.path().display().to_string();
    let check = [
        "check",
        "--webhook",
        &webhook_url,
        "--webhook-ca",
        &crt_arg,
        "-f",
        &local_arg,
    ];

    // Green: every line ✔, exit 0.
    let (out, desc) = weftctl(&cp, &check).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{desc}");
    for name in [
        "control plane reachable",
        "control plane ready",
        "CA root",
        "CA intermediate",
        "policies",
        "local policy files",
        "proxies in sync",
        "injection webhook",
    ] {
        assert!(line(&stdout, name).starts_with('✔'), "{name}: {desc}");
    }
    assert!(
        line(&stdout, "proxies in sync").contains("2 proxies ACKed the current config"),
        "{desc}"
    );
    assert!(
        line(&stdout, "injection webhook").contains("/healthz ok"),
        "{desc}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("✔ all 8 checks passed"),
        "{desc}"
    );
    let (out, desc) = weftctl(&cp, &["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{desc}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {desc}"));
    assert_eq!(json["ok"], true, "{desc}");
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "pass"),
        "{desc}"
    );

    // An invalid local file: its line fails, naming the problem.
    std::fs::write(
        local.path().join("bad.yaml"),
        "routes:\n  - name: r2\n    service: nope\n    destinations: [{service: api}]\n",
    )
    .unwrap();
    let (out, desc) = weftctl(&cp, &check).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{desc}");
    let l = line(&stdout, "local policy files");
    assert!(l.starts_with('✘') && l.contains("nope"), "{desc}");
    std::fs::remove_file(local.path().join("bad.yaml")).unwrap();

    // A stale proxy: web-1 is stopped, then a route change is pushed that it cannot ACK.
    signal(web.process.pid(), "-STOP");
    policies.write("routes.yaml", "routes:\n  - name: r\n    service: api\n    destinations: [{service: api}]\n    timeout: 7s\n");
    wait_until(
        DEFAULT_WAIT,
        "the control plane serves the new policy",
        async || {
            let p = cp.policies().await;
            if p["files"].as_array().is_some_and(|f| f.len() == 2) {
                Ok(())
            } else {
                Err(format!("{p}"))
            }
        },
    )
    .await;
    let (out, desc) = weftctl(&cp, &check).await;
    signal(web.process.pid(), "-CONT");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{desc}");
    let l = line(&stdout, "proxies in sync");
    assert!(l.starts_with('✘'), "{desc}");
    assert!(
        l.contains("web-1 stale (") && l.contains("routes"),
        "{desc}"
    );
    assert!(!l.contains("api-1"), "api-1 ACKed: {desc}");
    assert!(
        stdout.lines().last().unwrap().starts_with("✘ 1 failed"),
        "{desc}"
    );
    // Resumed, it ACKs: green again.
    wait_until(
        DEFAULT_WAIT,
        "weftctl check passes once web-1 ACKed",
        async || {
            let (out, desc) = weftctl(&cp, &check).await;
            if out.status.code() == Some(0) {
                Ok(())
            } else {
                Err(desc)
            }
        },
    )
    .await;

    // An expiring webhook certificate (rotated in like a Secret update): a warning, exit 1.
    let (soon_crt, soon_key) = serving_cert(dir.path(), "soon", &ip.to_string(), 10);
    swap_in(&soon_key, &serving_key);
    swap_in(&soon_crt, &serving_crt);
    let soon_arg = soon_crt.display().to_string();
    let (out, desc) = weftctl(
        &cp,
        &[
            "check",
            "--webhook",
            &webhook_url,
            "--webhook-ca",
            &soon_arg,
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{desc}");
    let l = line(&stdout, "injection webhook");
    assert!(
        l.starts_with('!') && (l.contains("expires in 9 days") || l.contains("expires in 10 days")),
        "{desc}"
    );
    assert!(
        stdout.lines().last().unwrap().contains("1 warning"),
        "{desc}"
    );
    // The old CA no longer verifies what is served: a failure naming it.
    let (out, desc) = weftctl(
        &cp,
        &["check", "--webhook", &webhook_url, "--webhook-ca", &crt_arg],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{desc}");
    assert!(
        line(&stdout, "injection webhook").starts_with('✘'),
        "{desc}"
    );
    assert!(
        line(&stdout, "injection webhook").contains("not trusted by --webhook-ca"),
        "{desc}"
    );

    // The control plane is down: its line fails, exit 3; what needs no control plane still runs.
    cp.process.stop();
    let (out, desc) = weftctl(&cp, &["check", "--webhook", &webhook_url]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{desc}");
    let l = line(&stdout, "control plane reachable");
    assert!(l.starts_with('✘') && l.contains("cannot reach"), "{desc}");
    assert!(line(&stdout, "CA root").starts_with('✔'), "{desc}");
    assert!(
        line(&stdout, "injection webhook").starts_with('✘'),
        "the webhook died with it: {desc}"
    );
    assert!(!stdout.contains("proxies in sync"), "{desc}");
    drop(api);
    drop(web);
}
