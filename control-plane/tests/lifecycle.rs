//! Config lifecycle on the real server: scoped snapshots, pushes only on relevant changes,
//! lost pushes, convergence metrics, NACK reporting, proxies in grace, diff and inventory.

mod support;

use std::fmt::Write as _;
use std::time::Duration;

use clap::Parser;
use http::{Method, StatusCode};
use support::*;
use weft_control::ctl::{run, Cli, EXIT_REJECTED};
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::{DiscoveryRequest, DiscoveryResponse, Nack};

/// 50 services `svc-00`..`svc-49`, plus `web`, which calls only svc-03 and svc-07.
fn mesh_of_50() -> String {
    let mut yaml = String::from("services:\n  - name: web\n    dependencies: [svc-03, svc-07]\n");
    for i in 0..50 {
        let _ = writeln!(yaml, "  - name: svc-{i:02}");
        let _ = writeln!(yaml, "    endpoints: [{{address: \"10.0.{i}.1:80\"}}]");
    }
    yaml
}

fn cluster_names(r: &DiscoveryResponse) -> Vec<String> {
    r.clusters
        .as_ref()
        .map(|c| c.clusters.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

async fn metrics(cp: &Running) -> String {
    cp.admin
        .send(Method::GET, "/metrics", None)
        .await
        .unwrap()
        .text()
}

/// The value of the sample line starting with `series ` in a Prometheus text page.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

async fn put(cp: &Running, name: &str, content: &str) {
    let r = cp
        .admin
        .send(
            Method::PUT,
            &format!("/v1/policies/{name}"),
            Some(content.into()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn scoped_snapshot_holds_only_dependencies_and_ignores_unrelated_changes() {
    let mesh = mesh_of_50();
    let cp = start(&[("mesh.yaml", &mesh)], Duration::from_millis(200)).await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let first = next(&mut web).await;
    assert_eq!(
        cluster_names(&first),
        ["inbound", "svc-03.default", "svc-07.default"],
        "a proxy holds clusters only for its service's dependencies"
    );
    let endpoint_clusters: Vec<&str> = first
        .endpoints
        .as_ref()
        .unwrap()
        .clusters
        .iter()
        .map(|c| c.cluster.as_str())
        .collect();
    assert_eq!(
        endpoint_clusters,
        ["inbound", "svc-03.default", "svc-07.default"]
    );
    let route_names: Vec<&str> = first.routes.as_ref().unwrap().tables[0]
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        route_names,
        ["default-svc-03.default", "default-svc-07.default"]
    );
    let mut held = Vec::new();
    ack(&web, &first, &mut held).await;
    assert_silent(&mut web).await;
    let before = get_json(&cp.admin, "/v1/proxies").await[0]["versions"].clone();

    // Unrelated changes: a policy edit of svc-20 and a svc-20 sidecar registering. Nothing is
    // pushed to web and its versions stay put.
    put(
        &cp,
        "mesh.yaml",
        &mesh.replace(
            "  - name: svc-20\n",
            "  - name: svc-20\n    request_timeout: 3s\n",
        ),
    )
    .await;
    let mut svc20 = connect(
        &cp.grpc,
        hello(node("svc-20-1", "svc-20", "127.0.0.3:15006"), vec![]),
    )
    .await;
    let _ = next(&mut svc20).await;
    assert_silent(&mut web).await;
    let after = get_json(&cp.admin, "/v1/proxies").await;
    let web_status = after
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "web-1")
        .unwrap();
    assert_eq!(web_status["versions"], before);

    // A sidecar of a dependency registers: an endpoints-only push.
    let mut svc03 = connect(
        &cp.grpc,
        hello(node("svc-03-1", "svc-03", "127.0.0.4:15006"), vec![]),
    )
    .await;
    let _ = next(&mut svc03).await;
    let update = next(&mut web).await;
    assert!(update.endpoints.is_some());
    assert!(update.listeners.is_none() && update.routes.is_none() && update.clusters.is_none());
    ack(&web, &update, &mut held).await;

    // A route of a dependency pointing at svc-11: svc-11's cluster is added (derived from
    // routes), listeners are untouched.
    put(
        &cp,
        "routes.yaml",
        "routes:\n  - name: split\n    service: svc-07\n    match: {path: {prefix: /v2}}\n    destinations: [{service: svc-11}]\n",
    )
    .await;
    let update = next(&mut web).await;
    assert!(update.listeners.is_none());
    assert_eq!(
        cluster_names(&update),
        [
            "inbound",
            "svc-03.default",
            "svc-07.default",
            "svc-11.default"
        ]
    );
    assert!(update.routes.is_some() && update.endpoints.is_some());
}

#[tokio::test]
async fn unanswered_push_times_out_and_the_next_change_pushes_again() {
    let cp = start_with(
        &[("a.yaml", POLICY)],
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let lost = next(&mut web).await;
    // No answer. After the timeout the push counts as lost...
    tokio::time::sleep(Duration::from_millis(600)).await;
    let text = metrics(&cp).await;
    assert_eq!(
        sample(
            &text,
            "weft_control_pushes_total{result=\"timeout\",type=\"routes\"}"
        ),
        1.0
    );
    assert_silent(&mut web).await;
    // ...and the next change pushes everything the proxy never ACKed, under a new nonce.
    put(&cp, "a.yaml", &POLICY.replace("10.0.0.1:80", "10.0.0.2:80")).await;
    let retry = next(&mut web).await;
    assert_ne!(retry.nonce, lost.nonce);
    assert!(retry.listeners.is_some() && retry.routes.is_some());
    assert!(retry.clusters.is_some() && retry.endpoints.is_some());
    let mut held = Vec::new();
    ack(&web, &retry, &mut held).await;
    assert_silent(&mut web).await;
    let text = metrics(&cp).await;
    assert_eq!(
        sample(
            &text,
            "weft_control_pushes_total{result=\"ack\",type=\"routes\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn convergence_is_measured_to_the_ack_and_nacks_are_reported() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let first = next(&mut web).await;
    let mut held = Vec::new();
    // The proxy takes a while to apply: convergence includes that time.
    tokio::time::sleep(Duration::from_millis(250)).await;
    ack(&web, &first, &mut held).await;
    assert_silent(&mut web).await;
    let text = metrics(&cp).await;
    assert_eq!(
        sample(&text, "weft_control_push_duration_seconds_count"),
        1.0
    );
    assert!(sample(&text, "weft_control_push_duration_seconds_sum") >= 0.25);
    assert_eq!(sample(&text, "weft_control_proxies_connected"), 1.0);

    // A change the proxy rejects: counted as nack, not as converged; status shows the reason.
    put(
        &cp,
        "b.yaml",
        "routes:\n  - name: r\n    service: backend\n    match: {path: {prefix: /x}}\n    destinations: [{service: web}]\n",
    )
    .await;
    let update = next(&mut web).await;
    web.tx
        .send(DiscoveryRequest {
            kind: Some(Kind::Nack(Nack {
                nonce: update.nonce.clone(),
                error: "routes: route \"r\": cannot apply".into(),
                rejected: versions(&update),
            })),
        })
        .await
        .unwrap();
    assert_silent(&mut web).await;
    let text = metrics(&cp).await;
    assert_eq!(
        sample(&text, "weft_control_push_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "weft_control_pushes_total{result=\"nack\",type=\"routes\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "weft_control_proxies_nacking"), 1.0);
    let status = &get_json(&cp.admin, "/v1/proxies").await[0];
    assert_eq!(status["nacking"], true);
    assert_eq!(status["last_nack"], "routes: route \"r\": cannot apply");
    assert!(status["last_nack_at"].is_string(), "{status}");
    // The proxy keeps the versions it ACKed before.
    assert_eq!(
        status["versions"]["routes"],
        first.routes.as_ref().unwrap().version.as_str()
    );
}

#[tokio::test]
async fn disconnected_proxies_are_listed_until_removed() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_secs(2)).await;
    let web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    drop(web);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let proxies = get_json(&cp.admin, "/v1/proxies").await;
        if proxies[0]["state"] == "disconnected" {
            let left = proxies[0]["removing_in_seconds"].as_u64().unwrap();
            assert!((1..=2).contains(&left), "{proxies}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "web-1 never shown as disconnected: {proxies}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sample(&metrics(&cp).await, "weft_control_proxies_connected"),
        0.0
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get_json(&cp.admin, "/v1/proxies").await != serde_json::json!([]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "web-1 never removed after its grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn diff_and_inventory_over_the_admin_api_and_weftctl() {
    let cp = start(&[("a.yaml", POLICY)], Duration::from_millis(200)).await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let _ = next(&mut web).await;

    let body = serde_json::json!({"files": [{"name": "b.yaml", "content":
        "routes:\n  - name: r\n    service: backend\n    match: {path: {prefix: /x}}\n    destinations: [{service: web}]\n"}]});
    let r = cp
        .admin
        .send(Method::POST, "/v1/diff", Some(body.to_string()))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let d = r.json().unwrap();
    assert_eq!(d["changed"], serde_json::json!(["route/r created"]));
    assert_eq!(d["proxies"][0]["id"], "web-1");
    assert_eq!(
        d["proxies"][0]["types"]["routes"]["added"],
        serde_json::json!(["outbound/r"])
    );
    assert_eq!(
        d["proxies"][0]["types"]["endpoints"]["version_changes"],
        false
    );
    // Nothing was written.
    assert_eq!(
        get_json(&cp.admin, "/v1/policies").await["files"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Invalid input: 422 with file:line.
    let bad = serde_json::json!({"files": [{"name": "b.yaml", "content":
        "routes:\n  - name: r\n    service: backend\n    destinations: [{service: paymnts}]\n"}]});
    let r = cp
        .admin
        .send(Method::POST, "/v1/diff", Some(bad.to_string()))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.text()
            .contains("b.yaml:4: routes[0].destinations[0].service"),
        "{}",
        r.text()
    );

    // Compiled clusters with their endpoints (static + the registered sidecar).
    let clusters = get_json(&cp.admin, "/v1/clusters").await;
    let web_cluster = clusters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web.default")
        .unwrap();
    assert_eq!(web_cluster["endpoints"][0]["address"], "127.0.0.2:15006");
    assert_eq!(web_cluster["endpoints"][0]["state"], "connected");
    let endpoints = get_json(&cp.admin, "/v1/endpoints").await;
    assert_eq!(endpoints.as_array().unwrap().len(), 2, "{endpoints}");

    // weftctl diff: exit 0 when computed, 1 when invalid.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("b.yaml");
    std::fs::write(&good, body["files"][0]["content"].as_str().unwrap()).unwrap();
    let server = cp.admin.base().to_owned();
    let cli = |file: &std::path::Path| {
        Cli::try_parse_from([
            "weftctl",
            "--server",
            server.as_str(),
            "diff",
            "-f",
            file.to_str().unwrap(),
        ])
        .unwrap()
    };
    run(cli(&good)).await.unwrap();
    let invalid = dir.path().join("c.yaml");
    std::fs::write(
        &invalid,
        "routes:\n  - name: r\n    service: nope\n    destinations: [{service: web}]\n",
    )
    .unwrap();
    let err = run(cli(&invalid)).await.unwrap_err();
    assert_eq!(err.code, EXIT_REJECTED);
    for kind in ["clusters", "endpoints"] {
        let cli =
            Cli::try_parse_from(["weftctl", "--server", server.as_str(), "get", kind]).unwrap();
        run(cli).await.unwrap();
    }
}

#[tokio::test]
async fn policies_and_trust_are_pushed_per_type_only_when_changed() {
    use weft_control::compile::TrustBundle;
    let policy = "services:\n  - name: web\n  - name: api\nauthorization:\n  - name: api-callers\n    service: api\n    default: deny\n    rules:\n      - name: web\n        from: {services: [web]}\n";
    let cp = start(&[("a.yaml", policy)], Duration::from_millis(200)).await;
    let mut api = connect(
        &cp.grpc,
        hello(node("api-1", "api", "127.0.0.2:15006"), vec![]),
    )
    .await;
    let first = next(&mut api).await;
    let policies = first.policies.as_ref().expect("policies in the first push");
    assert_eq!(policies.policies.len(), 1);
    assert_eq!(
        policies.policies[0].rules[0].identities,
        ["spiffe://cluster.local/ns/default/sa/web"]
    );
    let trust = first.trust.as_ref().expect("trust in the first push");
    assert_eq!(trust.trust_domain, "cluster.local");
    let inbound = first
        .listeners
        .as_ref()
        .unwrap()
        .listeners
        .iter()
        .find(|l| l.name == "inbound")
        .unwrap();
    assert_eq!(inbound.authorization, "api-callers");
    let mut api_held = Vec::new();
    ack(&api, &first, &mut api_held).await;
    let mut web = connect(
        &cp.grpc,
        hello(node("web-1", "web", "127.0.0.3:15006"), vec![]),
    )
    .await;
    let web_first = next(&mut web).await;
    assert!(web_first.policies.as_ref().unwrap().policies.is_empty());
    let mut web_held = Vec::new();
    ack(&web, &web_first, &mut web_held).await;
    // web's registration changes api's endpoints (web is callable by api): drain that push.
    let update = next(&mut api).await;
    assert!(update.policies.is_none() && update.trust.is_none());
    ack(&api, &update, &mut api_held).await;
    assert_silent(&mut api).await;
    assert_silent(&mut web).await;

    // A rule change reaches only the guarded service's proxy, as a policies-only push.
    put(
        &cp,
        "a.yaml",
        &policy.replace(
            "{services: [web]}",
            "{services: [web], namespaces: [default]}",
        ),
    )
    .await;
    let update = next(&mut api).await;
    assert!(update.policies.is_some());
    assert!(update.listeners.is_none() && update.routes.is_none());
    assert!(update.clusters.is_none() && update.endpoints.is_none() && update.trust.is_none());
    ack(&api, &update, &mut api_held).await;
    assert_silent(&mut web).await;

    // A root rotation: every proxy gets a trust-only push.
    assert!(cp.cp.set_trust(TrustBundle {
        trust_domain: "cluster.local".into(),
        roots_pem: vec!["OLD".into(), "NEW".into()],
    }));
    for (proxy, held) in [(&mut api, &mut api_held), (&mut web, &mut web_held)] {
        let update = next(proxy).await;
        let trust = update.trust.as_ref().expect("a trust push");
        assert_eq!(trust.roots_pem, ["OLD", "NEW"]);
        assert!(update.policies.is_none() && update.listeners.is_none());
        assert!(update.clusters.is_none() && update.endpoints.is_none());
        ack(proxy, &update, held).await;
    }
    assert_silent(&mut api).await;

    // Status and metrics name the new types.
    let status = get_json(&cp.admin, "/v1/proxies").await;
    let api_status = status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "api-1")
        .unwrap();
    assert_eq!(
        api_status["versions"].as_object().unwrap().len(),
        6,
        "{api_status}"
    );
    let text = metrics(&cp).await;
    assert_eq!(
        sample(
            &text,
            "weft_control_pushes_total{result=\"ack\",type=\"trust\"}"
        ),
        4.0
    );

    // Resync with everything held: nothing is resent.
    drop(api);
    let mut again = connect(
        &cp.grpc,
        hello(node("api-1", "api", "127.0.0.2:15006"), api_held.clone()),
    )
    .await;
    assert_silent(&mut again).await;
}
