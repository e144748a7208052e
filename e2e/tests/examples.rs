//! Every policy in `config-examples/policies` must load: a control plane started on a copy of
//! the directory reports no error, and serves the services the files declare.

use std::path::PathBuf;

use std::collections::BTreeMap;

use weft_testkit::{
    http_get, next_loopback_ip, wait_until, ControlPlane, PolicyDir, ProcessGuard, DEFAULT_WAIT,
};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config-examples/policies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_policy_file_parses() {
    let src = examples_dir();
    let entries =
        std::fs::read_dir(&src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    // A copy: the control plane may write its store, and must not touch the repository.
    let policies = PolicyDir::new();
    let mut names = Vec::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("reading {}: {e}", src.display()))
            .path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_file() && (name.ends_with(".yaml") || name.ends_with(".yml")) {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            policies.write(&name, &text);
            names.push(name);
        }
    }
    names.sort();
    assert!(
        !names.is_empty(),
        "{} holds no *.yaml/*.yml file",
        src.display()
    );

    let cp = ControlPlane::start(policies.path()).await;
    let p = cp.policies().await;
    assert!(
        p["error"].is_null(),
        "config-examples/policies must load without error: {}",
        p["error"]
    );
    let loaded = p["files"].to_string();
    for name in &names {
        assert!(
            loaded.contains(name.as_str()),
            "{name} missing from GET /v1/policies: {p}"
        );
    }
    let m = cp.metrics().await;
    assert_eq!(
        m.get("weft_control_policy_errors", &[]),
        Some(0.0),
        "{}",
        m.lines_for("weft_control_policy")
    );
    let services = cp.get_json("/v1/services").await;
    assert!(
        services.as_array().is_some_and(|s| !s.is_empty()),
        "the examples declare at least one service: {services}"
    );
}

/// Replaces every `127.a.b.c` IPv4 literal with a fresh loopback IP (one per distinct IP, ports
/// kept), so an example bootstrap can run beside anything else on the machine.
fn relocate_loopback_ips(text: &str) -> (String, BTreeMap<String, String>) {
    let mut map = BTreeMap::new();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("127.") {
        out.push_str(&rest[..i]);
        let candidate = &rest[i..];
        let end = candidate
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(candidate.len());
        let ip = candidate[..end].trim_end_matches('.');
        if ip.parse::<std::net::Ipv4Addr>().is_ok() {
            let fresh = map
                .entry(ip.to_string())
                .or_insert_with(|| next_loopback_ip().to_string());
            out.push_str(fresh);
            rest = &candidate[ip.len()..];
        } else {
            out.push_str("127.");
            rest = &candidate[4..];
        }
    }
    out.push_str(rest);
    (out, map)
}

/// Every bootstrap in `config-examples/bootstrap` is accepted by weft-proxy: started on it (its
/// IPs moved to fresh loopback IPs), the proxy stays up and its admin port answers `/live`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_bootstrap_is_accepted_by_weft_proxy() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config-examples/bootstrap");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no bootstrap", src.display());
    let dir = PolicyDir::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let (relocated, map) = relocate_loopback_ips(&text);
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Not *.yaml: the directory is only a scratch place here.
        let copy = dir.path().join(format!("{name}.bootstrap"));
        std::fs::write(&copy, &relocated)
            .unwrap_or_else(|e| panic!("writing {}: {e}", copy.display()));
        let admin = relocated
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin:"))
            .map(|a| {
                a.split('#')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_else(|| panic!("{name} has no admin: line"));
        let mut cmd = std::process::Command::new(weft_testkit::bin_path("weft-proxy"));
        cmd.arg("--config").arg(&copy);
        let mut proxy = ProcessGuard::spawn(&format!("weft-proxy[{name}]"), cmd);
        let url = format!("http://{admin}/live");
        let what = format!("weft-proxy on {name} (IPs moved: {map:?}) answers GET /live");
        wait_until(DEFAULT_WAIT, &what, async || {
            if let Some(status) = proxy.try_exit_status() {
                panic!(
                    "weft-proxy rejected {name} ({status})\n{}",
                    proxy.describe()
                );
            }
            let r = http_get(&url).await?;
            if r.status == 200 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        })
        .await;
    }
}
