//! Control-plane restarts: the registry is persisted in the state dir, so a restarted control
//! plane serves the endpoints the proxies hold; a proxy reconnecting with what it holds is pushed
//! nothing, and a registration nobody reclaims goes when the restart grace ends.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;
use weft_control::persist::{default_state_dir, REGISTRY_FILE};
use weft_proto::v1::{DiscoveryResponse, TypeVersion};

/// A proxy's session as it holds it: its node, its stream, what it ACKed.
struct Sidecar {
    id: &'static str,
    service: &'static str,
    inbound: &'static str,
    stream: Proxy,
    held: Vec<TypeVersion>,
}

impl Sidecar {
    async fn connect(
        cp: &Running,
        id: &'static str,
        service: &'static str,
        inbound: &'static str,
    ) -> Self {
        let mut stream = connect(&cp.grpc, hello(node(id, service, inbound), vec![])).await;
        let first = next(&mut stream).await;
        let mut held = Vec::new();
        ack(&stream, &first, &mut held).await;
        Self {
            id,
            service,
            inbound,
            stream,
            held,
        }
    }

    async fn apply(&mut self, update: &DiscoveryResponse) {
        ack(&self.stream, update, &mut self.held).await;
    }

    /// The proxy reconnects to `cp`, announcing what it holds.
    async fn reconnect(&mut self, cp: &Running) {
        self.stream = connect(
            &cp.grpc,
            hello(node(self.id, self.service, self.inbound), self.held.clone()),
        )
        .await;
    }
}

fn backend_addrs(r: &DiscoveryResponse) -> Vec<String> {
    r.endpoints
        .as_ref()
        .expect("an endpoints push")
        .clusters
        .iter()
        .find(|c| c.cluster == "backend.default")
        .expect("backend.default")
        .endpoints
        .iter()
        .map(|e| e.address.clone())
        .collect()
}

/// Waits until `<state_dir>/registry.json` names exactly `ids`.
async fn wait_persisted(state_dir: &Path, ids: &[&str]) {
    let path = state_dir.join(REGISTRY_FILE);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found: Option<Vec<String>> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v["proxies"].as_array().map(|a| {
                    a.iter()
                        .map(|p| p["id"].as_str().unwrap_or_default().to_owned())
                        .collect()
                })
            });
        if found.as_deref().is_some_and(|f| f == ids) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never named {ids:?}: {found:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts web-1 and backend-1, lets every push settle, and waits until both are persisted.
async fn settled_mesh(cp: &Running, state_dir: &Path) -> (Sidecar, Sidecar) {
    let mut web = Sidecar::connect(cp, "web-1", "web", "127.0.0.2:15006").await;
    let backend = Sidecar::connect(cp, "backend-1", "backend", "127.0.0.3:15006").await;
    let update = next(&mut web.stream).await;
    assert_eq!(backend_addrs(&update), ["10.0.0.1:80", "127.0.0.3:15006"]);
    web.apply(&update).await;
    wait_persisted(state_dir, &["backend-1", "web-1"]).await;
    (web, backend)
}

fn pushes_total(cp: &Running) -> u64 {
    let m = cp.cp.metrics();
    [
        "listeners",
        "routes",
        "clusters",
        "endpoints",
        "policies",
        "trust",
    ]
    .iter()
    .flat_map(|t| ["ack", "nack", "timeout"].map(|r| (t, r)))
    .map(|(t, r)| m.pushes_total.with_label_values(&[t, r]).get())
    .sum()
}

#[tokio::test]
async fn reconnecting_proxies_with_held_versions_are_pushed_nothing_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), POLICY).unwrap();
    let config = local_config(dir.path());
    let state_dir = default_state_dir(dir.path());

    let cp = serve(config.clone()).await;
    let (mut web, mut backend) = settled_mesh(&cp, &state_dir).await;
    cp.stop().await;

    let cp = serve(config).await;
    // Until they reconnect, both are listed as disconnected and their endpoints kept.
    let proxies = get_json(&cp.admin, "/v1/proxies").await;
    let states: Vec<(&str, &str)> = proxies
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("backend-1", "disconnected"), ("web-1", "disconnected")]
    );
    let endpoints = get_json(&cp.admin, "/v1/endpoints").await;
    assert!(
        endpoints
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["address"] == "127.0.0.3:15006"
                && e["state"] == "disconnected"
                && e["proxy_id"] == "backend-1"),
        "{endpoints}"
    );

    // web-1 reconnects first: backend-1's endpoint is still served, so web-1's held versions
    // are current and nothing is pushed; nor is anything when backend-1 reclaims its entry.
    web.reconnect(&cp).await;
    assert_silent(&mut web.stream).await;
    backend.reconnect(&cp).await;
    assert_silent(&mut backend.stream).await;
    assert_silent(&mut web.stream).await;
    assert_eq!(pushes_total(&cp), 0);
    assert_eq!(cp.cp.metrics().proxies_connected.get(), 2);
    let proxies = get_json(&cp.admin, "/v1/proxies").await;
    for p in proxies.as_array().unwrap() {
        assert_eq!(p["state"], "connected", "{p}");
        assert!(p["removing_in_seconds"].is_null(), "{p}");
    }
    assert_eq!(
        proxies[1]["versions"]["endpoints"],
        web.held
            .iter()
            .find(|tv| tv.r#type == weft_proto::v1::ResourceType::Endpoints as i32)
            .unwrap()
            .version
            .as_str()
    );
}

#[tokio::test]
async fn an_entry_nobody_reclaims_is_removed_when_the_restart_grace_ends() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("a.yaml"), POLICY).unwrap();
    let state_dir = dir.path().join("state");
    let mut config = local_config(&policies);
    config.state_dir = Some(state_dir.clone());
    config.restart_grace = Duration::from_millis(1500);

    let cp = serve(config.clone()).await;
    let (mut web, backend) = settled_mesh(&cp, &state_dir).await;
    assert!(
        !default_state_dir(&policies).exists(),
        "--state-dir is used"
    );
    cp.stop().await;
    drop(backend); // gone for good

    let cp = serve(config).await;
    let restarted = tokio::time::Instant::now();
    web.reconnect(&cp).await;
    assert_silent(&mut web.stream).await;
    // When the restart grace ends, backend-1's removal is pushed like any other change.
    let update = next(&mut web.stream).await;
    let waited = restarted.elapsed();
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    assert!(update.listeners.is_none() && update.routes.is_none() && update.clusters.is_none());
    assert_eq!(backend_addrs(&update), ["10.0.0.1:80"]);
    web.apply(&update).await;
    assert_silent(&mut web.stream).await;
    let proxies = get_json(&cp.admin, "/v1/proxies").await;
    assert_eq!(proxies.as_array().unwrap().len(), 1, "{proxies}");
    assert_eq!(proxies[0]["id"], "web-1");
    wait_persisted(&state_dir, &["web-1"]).await;
}

#[tokio::test]
async fn a_corrupt_state_file_starts_an_empty_registry() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), POLICY).unwrap();
    let state_dir = default_state_dir(dir.path());
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::write(state_dir.join(REGISTRY_FILE), "{\"format\": 1, \"prox").unwrap();

    let cp = serve(local_config(dir.path())).await;
    assert_eq!(
        get_json(&cp.admin, "/v1/proxies").await,
        serde_json::json!([])
    );
    assert_eq!(cp.cp.policy_error(), None, "the state dir is no policy");
    let web = Sidecar::connect(&cp, "web-1", "web", "127.0.0.2:15006").await;
    assert!(!web.held.is_empty());
    // Replaced by the next write.
    wait_persisted(&state_dir, &["web-1"]).await;
}
