//! Registration: a sidecar that connects registers its inbound address as an endpoint of its
//! service; when it goes away the endpoint is removed after the grace period. Proxies keep
//! serving without a control plane and catch up when it is back.

use std::time::Duration;

use weft_e2e::{caller_proxy, http_services_yaml, tally, wait_for_instance, Instance, SETTLE};
use weft_testkit::{
    free_addr, http_get, next_loopback_ip, wait_until, ControlPlane, ControlPlaneConfig, PolicyDir,
    Proxy, DEFAULT_WAIT,
};

/// The ids `GET /v1/proxies` lists, sorted.
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

async fn wait_proxy_ids(cp: &ControlPlane, want: &[&str]) {
    let what = format!("GET /v1/proxies lists exactly {want:?}");
    wait_until(DEFAULT_WAIT, &what, async || {
        let ids = proxy_ids(cp).await;
        if ids == want {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_instance_receives_traffic_and_stopped_instance_stops_receiving() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    // deregister grace 1s (the testkit default)
    let cp = ControlPlane::start(policies.path()).await;
    let api1 = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let t = tally(&client, "api", "/", 20).await;
    assert_eq!(
        t.count("api-1"),
        20,
        "one instance: all traffic to api-1: {t:?}"
    );

    // A second instance registers and starts receiving traffic.
    let before = web.versions().await;
    let api2 = Instance::http(&cp, "api", "api-2").await;
    web.wait_endpoint(api2.endpoint(), true).await;
    // Only the endpoints changed, so only their version moves.
    let after = web.versions().await;
    assert_ne!(
        after.endpoints, before.endpoints,
        "endpoints version must change"
    );
    assert_eq!(
        (&after.listeners, &after.routes, &after.clusters),
        (&before.listeners, &before.routes, &before.clusters),
        "a registration changes endpoints only: before {before:?}, after {after:?}"
    );
    wait_until(
        DEFAULT_WAIT,
        "api-1 and api-2 both answer within 20 requests",
        async || {
            let t = tally(&client, "api", "/", 20).await;
            if t.count("api-1") > 0 && t.count("api-2") > 0 && t.errors.is_empty() {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await;
    let t = tally(&client, "api", "/", 100).await;
    assert!(
        t.errors.is_empty(),
        "errors with two instances: {:?}",
        t.errors
    );
    assert!(
        t.count("api-1") >= 25 && t.count("api-2") >= 25,
        "round robin over two instances should share 100 requests: {t:?}"
    );
    wait_proxy_ids(&cp, &["api-1", "api-2", "web-1"]).await;
    let proxies = cp.proxies().await;
    let api2_entry = proxies
        .as_array()
        .and_then(|a| a.iter().find(|p| p["id"] == "api-2"))
        .unwrap_or_else(|| panic!("api-2 missing from {proxies}"));
    assert_eq!(api2_entry["service"], "api", "{api2_entry}");
    assert_eq!(
        api2_entry["inbound_address"],
        api2.endpoint().to_string(),
        "{api2_entry}"
    );
    weft_e2e::wait_metric_at_least(
        "the control plane counts 3 connected proxies",
        "weft_control_proxies_connected",
        &[],
        3.0,
        async || cp.metrics().await,
    )
    .await;

    // The second instance stops: after the grace period its endpoint is gone everywhere and
    // traffic goes to api-1 only, without errors.
    let api2_endpoint = api2.endpoint();
    drop(api2);
    web.wait_endpoint(api2_endpoint, false).await;
    wait_proxy_ids(&cp, &["api-1", "web-1"]).await;
    let t = tally(&client, "api", "/", 100).await;
    assert!(
        t.errors.is_empty(),
        "errors after api-2 was deregistered: {:?}",
        t.errors
    );
    assert_eq!(t.count("api-1"), 100, "all traffic back on api-1: {t:?}");
    drop(api1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_without_control_plane_and_resync_after_restart() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    // Long enough that nothing is deregistered while the control plane restarts.
    cp_config.deregister_grace = Duration::from_secs(5);
    let cp = ControlPlane::start_with(cp_config).await;
    let api = Instance::http(&cp, "api", "api-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    let before = web.versions().await;

    // Control plane down: the last good snapshot keeps serving.
    let cp_config = cp.config.clone();
    drop(cp);
    tokio::time::sleep(SETTLE).await;
    let t = tally(&client, "api", "/", 30).await;
    assert!(
        t.errors.is_empty(),
        "errors while the control plane is down: {:?}",
        t.errors
    );
    assert_eq!(t.count("api-1"), 30, "{t:?}");
    let ready = http_get(&web.admin_url("/ready"))
        .await
        .expect("GET /ready");
    assert_eq!(
        ready.status,
        200,
        "a proxy with a snapshot stays ready: {}",
        ready.summary()
    );

    // Control plane back on the same addresses: both proxies reconnect and re-register.
    let cp = ControlPlane::start_with(cp_config).await;
    wait_proxy_ids(&cp, &["api-1", "web-1"]).await;
    web.wait_endpoint(api.endpoint(), true).await;
    let t = tally(&client, "api", "/", 30).await;
    assert!(
        t.errors.is_empty(),
        "errors after the control plane came back: {:?}",
        t.errors
    );
    // Same policies and same registry: same content, so the same versions.
    let what = "web's config versions after the resync equal those before the restart";
    wait_until(DEFAULT_WAIT, what, async || {
        let now = web.versions().await;
        if now == before {
            Ok(())
        } else {
            Err(format!("before {before:?}, now {now:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_is_not_ready_and_binds_nothing_before_its_first_snapshot() {
    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web", "api"]));
    let cp_ip = next_loopback_ip();
    let mut cp_config = ControlPlaneConfig::new(policies.path());
    cp_config.grpc = Some(free_addr(cp_ip));
    cp_config.admin = Some(free_addr(cp_ip));
    let grpc_url = format!(
        "http://{}",
        cp_config.grpc.unwrap_or_else(|| unreachable!())
    );

    // The proxy starts first, with no control plane to talk to.
    let ip = next_loopback_ip();
    let config = weft_testkit::ProxyConfig::on_ip(ip, &grpc_url, "web", "web-1", free_addr(ip));
    let mut web = Proxy::spawn(config);
    let url = web.admin_url("/ready");
    wait_until(
        DEFAULT_WAIT,
        "the proxy's admin port answers /ready with 503 (no snapshot yet)",
        async || {
            let r = http_get(&url).await?;
            if r.status == 503 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{}", r.summary()))
            }
        },
    )
    .await;
    let live = http_get(&web.admin_url("/live")).await.expect("GET /live");
    assert_eq!(live.status, 200, "/live: {}", live.summary());
    for addr in [web.outbound_addr(), web.inbound_addr()] {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} accepts connections before the first snapshot"
        );
    }

    // The control plane appears: the proxy connects, becomes ready and binds its listeners.
    let cp = ControlPlane::start_with(cp_config).await;
    web.wait_ready().await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    wait_for_instance(&web.http1(), "api", "/", "api-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_serves_grpc_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let policies = PolicyDir::with_file("mesh.yaml", &http_services_yaml(&["web"]));
    let cp = ControlPlane::start(policies.path()).await;
    // TLS verified with the CA's roots.pem, as proxies connect.
    let mut health = HealthClient::new(weft_testkit::security::control_channel(cp.grpc_addr).await);
    let resp = wait_until(
        DEFAULT_WAIT,
        "grpc.health.v1.Health/Check on weft-control answers",
        async || {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        },
    )
    .await;
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
}
