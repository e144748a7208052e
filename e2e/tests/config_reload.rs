//! Policy files changed on disk reach running proxies without a restart: observed through
//! traffic, `/config_dump` versions (only the changed type moves) and the control plane's view.

use std::collections::{BTreeMap, BTreeSet};

use weft_e2e::{caller_proxy, instance_of, tally, wait_for_instance, Instance};
use weft_testkit::{
    wait_until, ConfigVersions, ControlPlane, Metrics, PolicyDir, Proxy, DEFAULT_WAIT,
};

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

/// Waits until `proxy` (id `id`) runs a version of one resource type (`pick` of its
/// `/config_dump` versions) other than `before`'s, and the control plane lists it as acked by
/// the proxy; returns the new version.
async fn wait_acked_change(
    cp: &ControlPlane,
    proxy: &Proxy,
    id: &str,
    before: &ConfigVersions,
    pick: fn(&ConfigVersions) -> &String,
) -> String {
    let old = pick(before).clone();
    let new = wait_until(
        DEFAULT_WAIT,
        &format!("{id} runs a new config version (was {old:?})"),
        async || {
            let now = proxy.versions().await;
            let v = pick(&now).clone();
            if v != old && !v.is_empty() {
                Ok(v)
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
    wait_until(
        DEFAULT_WAIT,
        &format!("GET /v1/proxies shows {id} acked version {new}"),
        async || match weft_e2e::proxy_status(cp, id).await {
            Some(p) if p["versions"].to_string().contains(&new) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    new
}

/// The families whose series must go with a removed route or cluster (the per-cluster resilience
/// families are not covered yet).
const REQUEST_FAMILIES: &[&str] = &[
    "weft_requests_total",
    "weft_request_duration_seconds_bucket",
    "weft_request_duration_seconds_sum",
    "weft_request_duration_seconds_count",
    "weft_response_headers_duration_seconds_bucket",
    "weft_response_headers_duration_seconds_sum",
    "weft_response_headers_duration_seconds_count",
    "weft_request_body_bytes_total",
    "weft_response_body_bytes_total",
    "weft_upstream_connect_errors_total",
    "weft_tcp_connections_total",
    "weft_tcp_connections_closed_total",
    "weft_tcp_connections",
    "weft_tcp_bytes_total",
];

/// The samples of [`REQUEST_FAMILIES`] whose label `label` is `value`, as text.
fn series_with(m: &Metrics, label: &str, value: &str) -> Vec<String> {
    m.samples
        .iter()
        .filter(|s| {
            REQUEST_FAMILIES.contains(&s.name.as_str())
                && s.labels.get(label).map(String::as_str) == Some(value)
        })
        .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
        .collect()
}

/// Outbound `weft_requests_total` by (route, cluster, code).
fn outbound_requests(m: &Metrics) -> BTreeMap<(String, String, String), f64> {
    m.matching("weft_requests_total", &[("direction", "outbound")])
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            ((l("route"), l("cluster"), l("code")), s.value)
        })
        .collect()
}

/// Waits until `web`'s scrape has no sample of [`REQUEST_FAMILIES`] with `label` = `value`;
/// returns that scrape.
async fn wait_series_gone(web: &Proxy, label: &str, value: &str) -> Metrics {
    wait_until(
        DEFAULT_WAIT,
        &format!(
            "{}'s /metrics has no series with {label}={value:?}",
            web.id()
        ),
        async || {
            let m = web.metrics().await;
            let left = series_with(&m, label, value);
            if left.is_empty() {
                Ok(m)
            } else {
                Err(format!("{left:#?}"))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_removed_routes_and_services_leave_the_sidecars_metrics() {
    let policies = PolicyDir::with_file("00-services.yaml", SERVICES);
    policies.write("10-routes.yaml", &route_to("api-a"));
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(a.endpoint(), true).await;
    web.wait_endpoint(b.endpoint(), true).await;

    // Traffic through route `api-route` (to api-a), and the default routes of api-a and api-b.
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "a-1").await;
    wait_for_instance(&client, "api-a", "/", "a-1").await;
    wait_for_instance(&client, "api-b", "/", "b-1").await;
    for (host, n) in [("api", 4), ("api-a", 3), ("api-b", 5)] {
        let t = tally(&client, host, "/", n).await;
        assert!(t.errors.is_empty(), "{host}: {t:?}");
    }
    // The client's pooled connections hold the listener they were accepted on (and with it
    // that snapshot's handles): close them, as idle clients eventually do.
    drop(client);
    // Exactly one 200 per `wait_for_instance` plus the tallies (a request is counted when its
    // response body ends, which may be just after the client read it).
    let want = [
        ("api-route", "api-a.default", 5.0),
        ("default-api-a.default", "api-a.default", 4.0),
        ("default-api-b.default", "api-b.default", 6.0),
    ];
    let (m, before) = wait_until(
        DEFAULT_WAIT,
        "web-1 counts the requests per route",
        async || {
            let m = web.metrics().await;
            let counts = outbound_requests(&m);
            let all_there = want.iter().all(|(route, cluster, n)| {
                counts.get(&((*route).into(), (*cluster).into(), "200".into())) == Some(n)
            });
            if all_there {
                Ok((m, counts))
            } else {
                Err(format!("{counts:#?}"))
            }
        },
    )
    .await;
    assert!(!series_with(&m, "route", "api-route").is_empty());
    assert!(!series_with(&m, "cluster", "api-a.default").is_empty());

    // Remove the route: its series go; the other routes keep theirs, with their counts.
    let versions = web.versions().await;
    policies.remove("10-routes.yaml");
    wait_acked_change(&cp, &web, "web-1", &versions, |v| &v.routes).await;
    let m = wait_series_gone(&web, "route", "api-route").await;
    let after = outbound_requests(&m);
    for (route, cluster) in [
        ("default-api-a.default", "api-a.default"),
        ("default-api-b.default", "api-b.default"),
    ] {
        let key = (route.to_owned(), cluster.to_owned(), "200".to_owned());
        assert_eq!(
            after.get(&key),
            before.get(&key),
            "{route} untouched: {after:#?}"
        );
    }
    assert_eq!(
        m.get(
            "weft_upstream_connect_errors_total",
            &[("cluster", "api-a.default")]
        ),
        Some(0.0),
        "api-a is still a service: {}",
        m.lines_for("weft_upstream_connect_errors_total")
    );
    // Counting goes on from there.
    let client = web.http1();
    let t = tally(&client, "api-b", "/", 2).await;
    assert!(t.errors.is_empty(), "{t:?}");
    drop(client);
    let b_key = (
        "default-api-b.default".to_owned(),
        "api-b.default".to_owned(),
        "200".to_owned(),
    );
    let b_now = before[&b_key] + 2.0;
    wait_until(
        DEFAULT_WAIT,
        "api-b's default route counts on from its count before the push",
        async || {
            let now = outbound_requests(&web.metrics().await).get(&b_key).copied();
            if now == Some(b_now) {
                Ok(())
            } else {
                Err(format!("{now:?}, want {b_now}"))
            }
        },
    )
    .await;

    // Remove the whole service api-a (its instance first): every series of its cluster goes.
    drop(a);
    let versions = web.versions().await;
    policies.write(
        "00-services.yaml",
        "services:\n  - name: web\n  - name: api\n  - name: api-b\n",
    );
    wait_acked_change(&cp, &web, "web-1", &versions, |v| &v.clusters).await;
    let m = wait_series_gone(&web, "cluster", "api-a.default").await;
    assert!(series_with(&m, "route", "default-api-a.default").is_empty());
    assert_eq!(outbound_requests(&m)[&b_key], b_now, "api-b untouched");
    assert_eq!(
        m.get(
            "weft_upstream_connect_errors_total",
            &[("cluster", "api-b.default")]
        ),
        Some(0.0),
        "{}",
        m.lines_for("weft_upstream_connect_errors_total")
    );
    // The version info keeps its one series per type.
    assert_eq!(
        m.matching("weft_config_version_info", &[("type", "clusters")])
            .count(),
        1,
        "{}",
        m.lines_for("weft_config_version_info")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_churn_keeps_the_request_series_bounded() {
    const GENERATIONS: usize = 20;
    let routes = |generation: usize| {
        format!(
            "routes:\n  - name: gen-{generation}\n    service: api\n    match:\n      path: {{exact: /gen-{generation}}}\n    destinations:\n      - {{service: api-a, weight: 100}}\n"
        )
    };
    let policies = PolicyDir::with_file("00-services.yaml", SERVICES);
    policies.write("10-routes.yaml", &routes(0));
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(a.endpoint(), true).await;

    for generation in 0..GENERATIONS {
        if generation > 0 {
            let versions = web.versions().await;
            policies.write("10-routes.yaml", &routes(generation));
            wait_acked_change(&cp, &web, "web-1", &versions, |v| &v.routes).await;
        }
        // One request through this generation's route, on a connection closed afterwards.
        let client = web.http1();
        let path = format!("/gen-{generation}");
        wait_for_instance(&client, "api", &path, "a-1").await;
        drop(client);
        // Only the live generation's series are left.
        let route = format!("gen-{generation}");
        wait_until(
            DEFAULT_WAIT,
            &format!("generation {generation}: the only outbound request series are {route}'s"),
            async || {
                let m = web.metrics().await;
                let routes: BTreeSet<&str> = m
                    .matching("weft_requests_total", &[])
                    .filter_map(|s| s.labels.get("route").map(String::as_str))
                    .collect();
                if routes == BTreeSet::from([route.as_str()]) {
                    Ok(())
                } else {
                    Err(m.lines_for("weft_requests_total"))
                }
            },
        )
        .await;
    }
    // And the other request families did not keep the old generations either.
    let m = web.metrics().await;
    let old: Vec<String> = (0..GENERATIONS - 1)
        .flat_map(|g| series_with(&m, "route", &format!("gen-{g}")))
        .collect();
    assert!(old.is_empty(), "{old:#?}");
}
