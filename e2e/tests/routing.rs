//! Route tables: weighted splits between services and request matching (headers, paths,
//! methods, extra host names).

use http::Method;
use weft_e2e::{caller_proxy, instance_of, tally, wait_for_instance, Instance};
use weft_testkit::{wait_until, ControlPlane, PolicyDir, DEFAULT_WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_follows_the_weights() {
    let policy = "\
services:
  - name: web
  - name: api
  - name: api-a
  - name: api-b
routes:
  - name: api-split
    service: api
    destinations:
      - {service: api-a, weight: 80}
      - {service: api-b, weight: 20}
";
    let policies = PolicyDir::with_file("split.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let a = Instance::http(&cp, "api-a", "a-1").await;
    let b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    web.wait_endpoint(a.endpoint(), true).await;
    web.wait_endpoint(b.endpoint(), true).await;
    let client = web.http1();
    // Both destinations answer before counting starts.
    wait_until(
        DEFAULT_WAIT,
        "requests to api reach both a-1 and b-1",
        async || {
            let t = tally(&client, "api", "/", 20).await;
            if t.count("a-1") > 0 && t.count("b-1") > 0 {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        },
    )
    .await;

    const N: usize = 500;
    let t = tally(&client, "api", "/", N).await;
    assert!(
        t.errors.is_empty(),
        "errors during the split: {:?}",
        t.errors
    );
    let (na, nb) = (t.count("a-1"), t.count("b-1"));
    eprintln!("weighted split over {N} requests: api-a {na}, api-b {nb}");
    assert_eq!(na + nb, N, "every request answered by a-1 or b-1: {t:?}");
    // Expected 400/100; binomial sd ~ 9, so +-45 is 5 sd: deterministic or random picking passes.
    assert!(
        (355..=445).contains(&na),
        "api-a got {na}/{N} (want ~400), api-b {nb}"
    );
}

/// method, host, path, request headers, the instance that must answer.
type Case<'a> = (Method, &'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_headers_paths_methods_and_hosts() {
    let policy = r#"
services:
  - name: web
  - name: api
  - name: api-b
routes:
  - name: canary-header
    service: api
    match:
      headers:
        - {name: x-canary, exact: "true"}
    destinations:
      - {service: api-b, weight: 100}
  - name: v2-prefix
    service: api
    match:
      path: {prefix: /v2}
    destinations:
      - {service: api-b, weight: 100}
  - name: item-regex
    service: api
    match:
      path: {regex: "^/items/[0-9]+$"}
    destinations:
      - {service: api-b, weight: 100}
  - name: deletes
    service: api
    match:
      methods: [DELETE]
    destinations:
      - {service: api-b, weight: 100}
  - name: no-debug-flag
    service: api
    match:
      path: {exact: /flagged}
      headers:
        - {name: x-debug, present: true, invert: true}
    destinations:
      - {service: api-b, weight: 100}
  - name: vanity-host
    service: api-b
    hosts: [b.example.com]
    destinations:
      - {service: api-b, weight: 100}
"#;
    let policies = PolicyDir::with_file("routes.yaml", policy);
    let cp = ControlPlane::start(policies.path()).await;
    let _api = Instance::http(&cp, "api", "api-1").await;
    let _b = Instance::http(&cp, "api-b", "b-1").await;
    let web = caller_proxy(&cp, "web", "web-1").await;
    let client = web.http1();
    wait_for_instance(&client, "api", "/", "api-1").await;
    wait_for_instance(&client, "api-b", "/", "b-1").await;

    let cases: &[Case<'_>] = &[
        (Method::GET, "api", "/", &[], "api-1"),
        (Method::GET, "api", "/", &[("x-canary", "true")], "b-1"),
        (Method::GET, "api", "/", &[("x-canary", "false")], "api-1"),
        (Method::GET, "api", "/v2/users", &[], "b-1"),
        (Method::GET, "api", "/v1/users", &[], "api-1"),
        (Method::GET, "api", "/items/42", &[], "b-1"),
        (Method::GET, "api", "/items/abc", &[], "api-1"),
        (Method::DELETE, "api", "/items/abc", &[], "b-1"),
        (Method::POST, "api", "/anything", &[], "api-1"),
        (Method::GET, "api", "/flagged", &[], "b-1"),
        (Method::GET, "api", "/flagged", &[("x-debug", "1")], "api-1"),
        (Method::GET, "b.example.com", "/", &[], "b-1"),
        (Method::GET, "B.Example.com:8080", "/", &[], "b-1"),
    ];
    let mut failures = Vec::new();
    for (method, host, path, headers, want) in cases {
        match client
            .request(method.clone(), host, path, headers, "")
            .await
        {
            Ok(r) if r.status == 200 && instance_of(&r) == *want => {}
            Ok(r) => failures.push(format!(
                "{method} http://{host}{path} {headers:?}: want 200 from {want}, got {} from {:?}",
                r.summary(),
                instance_of(&r)
            )),
            Err(e) => failures.push(format!("{method} http://{host}{path} {headers:?}: {e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "routing mismatches:\n{}",
        failures.join("\n")
    );
}
