//! Bad input: broken policy files, garbage on HTTP listeners, and an invalid proxy bootstrap.
//! Each must be reported and must not disturb what already works.

use std::time::Duration;

use weft_e2e::{
    caller_proxy, caller_proxy_on, http_services_yaml, tally, wait_for_instance, Instance, SETTLE,
};
use weft_testkit::{
    free_addr, next_loopback_ip, raw_exchange, wait_until, ControlPlane, Metrics, PolicyDir, Proxy,
    ProxyConfig, DEFAULT_WAIT,
};

/// Waits until `GET /v1/policies` reports an error containing every one of `needles`.
async fn wait_policy_error(cp: &ControlPlane, needles: &[&str]) -> String {
    let what = format!("GET /v1/policies reports an error mentioning {needles:?}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let p = cp.policies().await;
        match p["error"].as_str() {
            Some(e) if needles.iter().all(|n| e.contains(n)) => Ok(e.to_string()),
            _ => Err(format!("error = {}", p["error"])),
        }
    })
    .await
}

async fn wait_policy_errors_gauge(cp: &ControlPlane, want: f64) -> Metrics {
    let what = format!("weft_control_policy_errors is {want}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let m = cp.metrics().await;
        match m.get("weft_control_policy_errors", &[]) {
            Some(v) if v == want => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_policy_files_keep_the_last_good_config() {
    let policies = PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let good = cp.policies().await;
    assert!(
        good["error"].is_null(),
        "a good policy set has no error: {good}"
    );
    wait_policy_errors_gauge(&cp, 0.0).await;
    let versions = web.versions().await;

    // 1. Not YAML at all.
    policies.write(
        "50-broken.yaml",
        "services: [ {name: \"oops\n  ::: - ]]\n\t garbage",
    );
    let err = wait_policy_error(&cp, &["50-broken.yaml"]).await;
    let m = wait_policy_errors_gauge(&cp, 1.0).await;
    assert!(
        m.sum("weft_control_policy_reloads_total", &[("result", "error")]) >= 1.0,
        "a failed reload is counted: {}",
        m.lines_for("weft_control_policy_reloads_total")
    );
    assert_eq!(
        cp.policies().await["version"],
        good["version"],
        "the policy version must not move on a bad file ({err})"
    );
    let t = tally(&client, "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "traffic with a malformed file present: {t:?}"
    );

    // 2. Valid YAML, unknown field: the error names the field.
    policies.write(
        "50-broken.yaml",
        "services:\n  - name: extra\n    colour: blue\n",
    );
    wait_policy_error(&cp, &["50-broken.yaml", "colour"]).await;

    // 3. Valid YAML, bad reference: the error names the file, line and the unknown service.
    policies.write(
        "50-broken.yaml",
        "routes:\n  - name: bad-ref\n    service: api\n    destinations:\n      - {service: paymnts, weight: 100}\n",
    );
    let err = wait_policy_error(&cp, &["50-broken.yaml", "paymnts"]).await;
    assert!(
        err.contains("50-broken.yaml:"),
        "the error names file:line: {err}"
    );
    wait_policy_errors_gauge(&cp, 1.0).await;

    // Nothing reached the proxy, and traffic is unaffected.
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        web.versions().await,
        versions,
        "a rejected policy must not change the proxy's config"
    );
    let t = tally(&client, "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "traffic with an invalid file present: {t:?}"
    );

    // Removing the bad file clears the error.
    policies.remove("50-broken.yaml");
    wait_until(
        DEFAULT_WAIT,
        "GET /v1/policies error is null again",
        async || {
            let p = cp.policies().await;
            if p["error"].is_null() {
                Ok(())
            } else {
                Err(format!("{}", p["error"]))
            }
        },
    )
    .await;
    wait_policy_errors_gauge(&cp, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_http_listeners_is_refused_and_the_proxy_keeps_serving() {
    let policies = PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let mut api = Instance::http(&cp, "api", "api-1").await;
    let mut web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    let huge_header = format!(
        "GET / HTTP/1.1\r\nhost: api\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        (
            "binary junk",
            b"\x00\x01\x02\x03\xff\xfe garbage \r\n\r\n".to_vec(),
        ),
        ("bad request line", b"GET\r\n\r\n".to_vec()),
        (
            "bad header",
            b"GET / HTTP/1.1\r\nhost api no colon\r\n\r\n".to_vec(),
        ),
        (
            "h2 preface then junk",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xde\xad\xbe\xef\x00\x00\x00\x00\x00".to_vec(),
        ),
        ("huge header", huge_header.into_bytes()),
    ];
    let targets = [
        ("web outbound", web.outbound_addr()),
        ("api inbound", api.proxy.inbound_addr()),
    ];
    for (target, addr) in targets {
        for (name, bytes) in &inputs {
            let out = raw_exchange(addr, bytes, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{target}: {name}: {e:#}"));
            let text = out.text();
            let first_line = text.lines().next().unwrap_or("");
            eprintln!(
                "{target}: {name}: closed={} reset={} first line {first_line:?} ({} bytes)",
                out.closed,
                out.reset,
                out.received.len()
            );
            let is_http_error =
                first_line.starts_with("HTTP/1.1 4") || first_line.starts_with("HTTP/1.0 4");
            assert!(
                out.closed,
                "{target} ({addr}): {name}: the connection must be closed within 5s; got {first_line:?}"
            );
            // An HTTP/2 peer answers with binary frames (SETTINGS, GOAWAY).
            let lenient = name.starts_with("h2");
            assert!(
                out.received.is_empty() || is_http_error || lenient,
                "{target} ({addr}): {name}: want a 4xx or a closed connection, got {:?}",
                &text[..text.len().min(200)]
            );
        }
    }

    // Bounded burst of garbage connections, then normal service.
    for i in 0..30 {
        raw_exchange(
            web.outbound_addr(),
            b"\x16\x03\x01 not tls either\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("garbage connection {i}: {e:#}"));
    }
    web.process.assert_running();
    api.proxy.process.assert_running();
    let t = tally(&client, "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "traffic after garbage: {t:?}"
    );
    let r = weft_testkit::HttpClient::h2c(web.outbound_addr())
        .get("api", "/")
        .await
        .expect("h2c after garbage");
    assert_eq!(r.status, 200, "{}", r.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bootstrap_is_rejected_naming_the_field() {
    let ip = next_loopback_ip();
    let config = ProxyConfig::on_ip(ip, "http://127.0.0.1:1", "web", "web-1", free_addr(ip));
    let yaml = format!("{}bogus_setting: 42\n", config.to_yaml());
    let mut proxy = Proxy::spawn_yaml(config, &yaml);
    let status = proxy.process.wait_exit(DEFAULT_WAIT).await;
    assert!(
        !status.success(),
        "weft-proxy must refuse an unknown bootstrap field, exited {status}"
    );
    let log = proxy.process.log();
    assert!(
        log.contains("bogus_setting"),
        "the error must name the field:\n{log}"
    );

    // A missing required field (node.service).
    let ip = next_loopback_ip();
    let config = ProxyConfig::on_ip(ip, "http://127.0.0.1:1", "web", "web-1", free_addr(ip));
    let yaml = config.to_yaml().replace("  service: \"web\"\n", "");
    let mut proxy = Proxy::spawn_yaml(config, &yaml);
    let status = proxy.process.wait_exit(DEFAULT_WAIT).await;
    assert!(
        !status.success(),
        "weft-proxy must refuse a bootstrap without node.service, exited {status}"
    );
    let log = proxy.process.log();
    assert!(
        log.contains("service"),
        "the error must name the missing field:\n{log}"
    );
}

/// A config the proxy cannot apply (a tcp service port already taken on its IP) is NACKed: the
/// proxy keeps its previous config whole, keeps serving, and the control plane shows the NACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unappliable_config_is_nacked_and_the_old_one_kept() {
    let web_ip = next_loopback_ip();
    let taken = std::net::TcpListener::bind((web_ip, 0)).expect("occupy a port on web's IP");
    let port = taken.local_addr().expect("local addr").port();

    let policies = PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy_on(&cp, web_ip, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let versions = web.versions().await;

    // Valid policy, but web's sidecar cannot bind <web_ip>:<port> for it.
    policies.write(
        "10-store.yaml",
        &format!("services:\n  - name: store\n    protocol: tcp\n    port: {port}\n    endpoints:\n      - address: 127.0.0.1:9\n"),
    );
    let nack = wait_until(
        DEFAULT_WAIT,
        "GET /v1/proxies shows a last_nack for web-1",
        async || {
            let proxies = cp.proxies().await;
            let web1 = proxies
                .as_array()
                .and_then(|a| a.iter().find(|p| p["id"] == "web-1"))
                .cloned()
                .unwrap_or_default();
            match web1["last_nack"].as_str() {
                Some(n) if !n.is_empty() => Ok(n.to_string()),
                _ => Err(format!("web-1: {web1}")),
            }
        },
    )
    .await;
    assert!(
        cp.policies().await["error"].is_null(),
        "the policy itself is valid"
    );
    weft_e2e::wait_metric_at_least(
        "web-1 counts a nacked update",
        "weft_config_updates_total",
        &[("result", "nack")],
        1.0,
        async || web.metrics().await,
    )
    .await;
    assert_eq!(
        web.versions().await,
        versions,
        "a NACKed update leaves every version as it was ({nack})"
    );
    let t = tally(&client, "api", "/", 20).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 20,
        "traffic after a NACK: {t:?}"
    );
    drop(taken);
}

/// A request whose head is fine but whose chunked body is not (chunk size `zz`) is still
/// unparsable request bytes: ARCHITECTURE.md says 400 or a closed connection. It is the
/// client's fault, so it must not be reported as the upstream's (`502 upstream-reset`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_is_a_client_error() {
    let policies = PolicyDir::with_file("00-mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp = ControlPlane::start(policies.path()).await;
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;

    let request = b"POST /echo HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
    for (target, addr) in [
        ("web outbound", web.outbound_addr()),
        ("api inbound", api.proxy.inbound_addr()),
    ] {
        let out = raw_exchange(addr, request, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{target}: {e:#}"));
        let text = out.text();
        let first_line = text.lines().next().unwrap_or("");
        assert!(
            out.closed,
            "{target}: the connection must be closed within 5s; got {first_line:?}"
        );
        assert!(
            out.received.is_empty() || first_line.starts_with("HTTP/1.1 4"),
            "{target} ({addr}): a malformed chunked body wants 400 or a close, got:\n{text}"
        );
    }
    let t = tally(&client, "api", "/", 10).await;
    assert!(
        t.errors.is_empty() && t.count("api-1") == 10,
        "traffic afterwards: {t:?}"
    );
}
