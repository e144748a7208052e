//! Locality-aware balancing with real processes: endpoints in two zones (node labels), a caller
//! in zone `a` is served by zone `a` only while enough of zone `a` is healthy, spills over to
//! every zone when too few are (active health checks fail as apps stop), and comes back.

use weft_e2e::{caller_proxy_config, tally};
use weft_testkit::{
    wait_until, ControlPlane, DemoApp, HttpClient, PolicyDir, Proxy, ProxyConfig, DEFAULT_WAIT,
};

const ZONE: &str = "topology.kubernetes.io/zone";

/// An `api` instance in `zone`: its app and its sidecar (labelled with the zone).
async fn instance(cp: &ControlPlane, id: &str, zone: &str) -> (DemoApp, Proxy) {
    let app = DemoApp::start("api", id).await;
    let mut config = ProxyConfig::new(&cp.grpc_url(), "api", id, app.http_addr());
    config.labels = vec![(ZONE.to_owned(), zone.to_owned())];
    let proxy = Proxy::start_with(config).await;
    (app, proxy)
}

/// The instances that answered `n` bounded requests, waiting until exactly `want` do.
async fn wait_serving(client: &HttpClient, want: &[&str], what: &str) {
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    wait_until(DEFAULT_WAIT, what, async || {
        let t = tally(client, "api", "/", 40).await;
        let seen: Vec<String> = t.by_instance.keys().cloned().collect();
        if seen == want && t.errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_zone_is_preferred_and_spills_over_below_the_threshold() {
    let policies = PolicyDir::with_file(
        "mesh.yaml",
        "services:
  - name: web
  - name: api
    lb: round_robin
    locality: {min_healthy_percent: 60}
    health_check:
      http: {path: /healthz}
      interval: 300ms
      healthy_threshold: 1
      unhealthy_threshold: 1
",
    );
    let cp = ControlPlane::start(policies.path()).await;
    let (a1_app, _a1) = instance(&cp, "api-a1", "a").await;
    let (_a2_app, _a2) = instance(&cp, "api-a2", "a").await;
    let (_b1_app, _b1) = instance(&cp, "api-b1", "b").await;
    let mut web = caller_proxy_config(&cp, "web", "web-1");
    web.labels = vec![(ZONE.to_owned(), "a".to_owned())];
    let web = Proxy::start_with(web).await;
    let client = web.http1();

    // Zone a only, although zone b has an endpoint too.
    wait_serving(
        &client,
        &["api-a1", "api-a2"],
        "web (zone a) is served by zone a only",
    )
    .await;

    // api-a1's app stops: its health check fails, zone a is 50% healthy (< 60%): every
    // available endpoint of every zone serves.
    drop(a1_app);
    wait_serving(
        &client,
        &["api-a2", "api-b1"],
        "zone a below its threshold spills over to zone b",
    )
    .await;
    let m = web.metrics().await;
    assert!(
        m.sum(
            "weft_locality_spillover_total",
            &[("cluster", "api.default")]
        ) > 0.0,
        "{}",
        m.lines_for("weft_locality_spillover_total")
    );
}
