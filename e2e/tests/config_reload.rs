//! Policy files changed on disk reach running proxies without a restart: observed through
//! traffic, `/config_dump` versions (only the changed type moves) and the control plane's view.

use weft_e2e::{caller_proxy, instance_of, tally, wait_for_instance, Instance};
use weft_testkit::{wait_until, ControlPlane, PolicyDir, DEFAULT_WAIT};

const SERVICES: &str = "\
services:
  - name: web
  - name: api
  - name: api-a
  - name: api-b
";

fn route_to(service: &str) -> String {
    format!(
        "routes:\n  - name: api-route\n    service: api\n    destinations:\n      - {{service: {service}, weight: 100}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_change_in_a_file_reaches_the_proxy_without_restart() {
    let policies = PolicyDir::with_file("00-services.yaml", SERVICES);
    policies.write("10-routes.yaml", &route_to("api-a"));
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let b = Instance::http(&cp, "api-b", "b-1").await;
    let mut web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(a.endpoint(), true).await;
    web.wait_endpoint(b.endpoint(), true).await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "a-1").await;
    let t = tally(&client, "api", "/", 20).await;
    assert_eq!(
        t.count("a-1"),
        20,
        "before the change everything goes to api-a: {t:?}"
    );

    let before = web.versions().await;
    assert!(
        !before.routes.is_empty(),
        "config_dump has no routes version: {before:?}"
    );
    let policy_version_before = cp.policies().await["version"].clone();
    let pid = web.process.pid();

    // A slow request in flight while the route changes finishes where it started.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.get("api", "/delay/1500").await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    policies.write("10-routes.yaml", &route_to("api-b"));
    wait_for_instance(&client, "api", "/", "b-1").await;
    let slow = slow
        .await
        .expect("the slow request's task")
        .expect("the in-flight request completes");
    assert_eq!(
        slow.status,
        200,
        "in-flight request across a route change: {}",
        slow.summary()
    );
    assert_eq!(
        instance_of(&slow),
        "a-1",
        "the in-flight request stays on its original route"
    );
    let t = tally(&client, "api", "/", 20).await;
    assert_eq!(
        t.count("b-1"),
        20,
        "after the change everything goes to api-b: {t:?}"
    );

    // Same process, new routes version; the other types' contents did not change, so neither
    // did their versions.
    web.process.assert_running();
    assert_eq!(web.process.pid(), pid);
    let after = web.versions().await;
    assert_ne!(after.routes, before.routes, "routes version must change");
    assert_eq!(
        after.listeners, before.listeners,
        "listeners did not change"
    );
    assert_eq!(after.clusters, before.clusters, "clusters did not change");
    assert_eq!(
        after.endpoints, before.endpoints,
        "endpoints did not change"
    );
    let dump = web.config_dump().await;
    let routes = dump["routes"].to_string();
    assert!(
        routes.contains("api-b.default"),
        "config_dump routes point at api-b: {routes}"
    );

    // The control plane's view: a new policy version, and web-1 has acked the new routes.
    let policies_now = cp.policies().await;
    assert_ne!(
        policies_now["version"], policy_version_before,
        "{policies_now}"
    );
    assert!(policies_now["error"].is_null(), "{policies_now}");
    let want = after.routes.clone();
    wait_until(
        DEFAULT_WAIT,
        "GET /v1/proxies shows web-1 acked the new routes version",
        async || {
            let proxies = cp.proxies().await;
            let acked = proxies
                .as_array()
                .and_then(|a| a.iter().find(|p| p["id"] == "web-1"))
                .map(|p| p["versions"].to_string())
                .unwrap_or_default();
            if acked.contains(&want) {
                Ok(())
            } else {
                Err(format!("web-1 versions {acked}; proxies {proxies}"))
            }
        },
    )
    .await;
    let m = web.metrics().await;
    assert_eq!(
        m.get(
            "weft_config_version_info",
            &[("type", "routes"), ("version", &after.routes)]
        ),
        Some(1.0),
        "weft_config_version_info reports the running routes version: {}",
        m.lines_for("weft_config_version_info")
    );
    let cm = cp.metrics().await;
    let policy_version = policies_now["version"].as_str().unwrap_or_default();
    assert_eq!(
        cm.get(
            "weft_control_policy_version_info",
            &[("version", policy_version)]
        ),
        Some(1.0),
        "weft_control_policy_version_info reports the served policy version: {}",
        cm.lines_for("weft_control_policy_version_info")
    );
    weft_e2e::wait_metric_at_least(
        "web-1 counts an acked routes update beyond the first",
        "weft_config_updates_total",
        &[("type", "routes"), ("result", "ack")],
        2.0,
        async || web.metrics().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_removed_files_add_and_remove_services() {
    let policies = PolicyDir::with_file("00-services.yaml", SERVICES);
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api-a", "/", "a-1").await;

    // A new file declares a service outside the mesh: a static endpoint (a-1's app, directly).
    let r = client.get("legacy", "/").await.expect("GET http://legacy/");
    assert_eq!(
        r.status,
        404,
        "legacy is not a service yet: {}",
        r.summary()
    );
    policies.write(
        "20-legacy.yaml",
        &format!(
            "services:\n  - name: legacy\n    endpoints:\n      - address: {}\n",
            a.app.http_addr()
        ),
    );
    let r = wait_for_instance(&client, "legacy", "/from-legacy", "a-1").await;
    assert_eq!(r.json()["path"], "/from-legacy");

    // Removing the file removes the service again.
    policies.remove("20-legacy.yaml");
    wait_until(
        DEFAULT_WAIT,
        "http://legacy/ answers 404 no-route after its file is deleted",
        async || {
            let r = client.get("legacy", "/").await?;
            if r.status == 404 && r.header("x-weft-error") == Some("no-route") {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "{} from {:?}",
                    r.summary(),
                    instance_of(&r)
                ))
            }
        },
    )
    .await;
}
