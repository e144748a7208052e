//! Compilation of the resilience knobs: explicit defaults on clusters and routes, overrides,
//! and the retry fallback chain (route -> service -> mesh default).

use std::time::Duration;

use weft_proto::v1::{
    hash_policy, health_check, HttpHealthCheck, RateLimit, RetryBudget, RetryPolicy,
};

use super::*;
use crate::policy::SourceFile;
use weft_proto::v1::LbPolicy;

fn policy(content: &str) -> PolicySet {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .unwrap()
}

fn node(service: &str) -> Node {
    Node {
        id: format!("{service}-1"),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: "127.0.0.2:15006".into(),
        outbound_address: "127.0.0.2:15001".into(),
        app_address: "127.0.0.2:8080".into(),
        tcp_bind_ip: "127.0.0.2".into(),
        ..Node::default()
    }
}

fn build(content: &str, service: &str) -> Resources {
    compile(
        &policy(content),
        &Registry::new(Duration::from_secs(5)),
        &TrustBundle::default(),
        &node(service),
    )
}

fn cluster<'a>(r: &'a Resources, name: &str) -> &'a Cluster {
    r.clusters
        .clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn route<'a>(r: &'a Resources, name: &str) -> &'a Route {
    r.routes.tables[0]
        .routes
        .iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("no route {name}"))
}

#[test]
fn clusters_carry_explicit_defaults() {
    let r = build("services: [{name: web}, {name: api}]\n", "web");
    let c = cluster(&r, "api.default");
    assert_eq!(c.lb, LbPolicy::P2cPeakEwma as i32);
    assert!(c.hash.is_none());
    let b = c.breaker.as_ref().unwrap();
    assert_eq!(
        (
            b.max_connections,
            b.max_pending_requests,
            b.max_requests,
            b.max_retries
        ),
        (1024, 1024, 1024, 3)
    );
    let o = c.outlier.as_ref().unwrap();
    assert_eq!(o.consecutive_failures, 5);
    assert_eq!(o.base_ejection_ms, 30_000);
    assert_eq!(o.max_ejection_ms, 300_000);
    assert_eq!(o.max_ejection_percent, 50);
    assert_eq!(o.interval_ms, 10_000);
    assert_eq!(o.success_rate_min_hosts, 5);
    assert_eq!(o.success_rate_min_requests, 100);
    assert!((o.success_rate_stdev_factor - 1.9).abs() < f64::EPSILON);
    assert_eq!(o.min_healthy_percent, 50);
    assert!(c.health_check.is_none());
    assert_eq!(c.idle_timeout_ms, 60_000);
    assert_eq!(c.mtls, MtlsMode::Permissive as i32);

    let inbound = cluster(&r, "inbound");
    assert_eq!(inbound.mtls, MtlsMode::Disabled as i32);
    assert!(inbound.breaker.is_none() && inbound.outlier.is_none());
    assert_eq!(inbound.idle_timeout_ms, 60_000);
}

#[test]
fn cluster_knobs_are_compiled() {
    let r = build(
        "services:
  - name: web
  - name: api
    lb: ring_hash
    hash: {header: X-User}
    circuit_breaker: {max_connections: 0, max_retries: 10}
    outlier_detection: {disabled: true}
    health_check:
      http: {path: /healthz, expected_statuses: [200]}
      interval: 2s
      timeout: 500ms
      healthy_threshold: 1
      unhealthy_threshold: 4
    idle_timeout: 5s
  - name: db
    protocol: tcp
    port: 5432
    lb: least_request
    health_check: {tcp: true}
",
        "web",
    );
    let c = cluster(&r, "api.default");
    assert_eq!(c.lb, LbPolicy::RingHash as i32);
    assert_eq!(
        c.hash.as_ref().unwrap().kind,
        Some(hash_policy::Kind::Header("x-user".into()))
    );
    let b = c.breaker.as_ref().unwrap();
    assert_eq!(
        (b.max_connections, b.max_retries, b.max_requests),
        (0, 10, 1024)
    );
    assert!(c.outlier.is_none(), "disabled: true turns it off");
    let hc = c.health_check.as_ref().unwrap();
    assert_eq!(
        hc.kind,
        Some(health_check::Kind::Http(HttpHealthCheck {
            path: "/healthz".into(),
            expected_statuses: vec![200],
            host: "api".into(),
        }))
    );
    assert_eq!(
        (
            hc.interval_ms,
            hc.timeout_ms,
            hc.healthy_threshold,
            hc.unhealthy_threshold
        ),
        (2000, 500, 1, 4)
    );
    assert_eq!(c.idle_timeout_ms, 5000);
    let db = cluster(&r, "db.default");
    assert_eq!(db.lb, LbPolicy::LeastRequest as i32);
    assert_eq!(
        db.health_check.as_ref().unwrap().kind,
        Some(health_check::Kind::Tcp(true))
    );
    let tcp = r
        .listeners
        .listeners
        .iter()
        .find(|l| l.name == "outbound-tcp-db.default")
        .unwrap();
    assert_eq!(tcp.idle_timeout_ms, 60_000);
}

#[test]
fn retry_falls_back_from_route_to_service_to_mesh_default() {
    let r = build(
        "services:
  - name: web
  - name: api
    retry: {attempts: 4, on: [reset]}
  - name: other
routes:
  - name: own
    service: api
    match: {path: {prefix: /own}}
    destinations: [{service: api}]
    retry:
      attempts: 1
      on: [connect-failure, 503, unavailable, resource-exhausted]
      non_idempotent: true
      per_try_timeout: 1s
      backoff: {base: 10ms, max: 1s}
      max_body_bytes: 1024
      budget: {ratio: 0.5, min_per_second: 1, window: 1s}
    rate_limit: {requests_per_second: 100, burst: 50}
  - name: inherited
    service: api
    match: {path: {prefix: /inherited}}
    destinations: [{service: api}]
",
        "web",
    );
    let own = route(&r, "own").retry.clone().unwrap();
    assert_eq!(
        own,
        RetryPolicy {
            max_retries: 1,
            on_connect_failure: true,
            on_reset: false,
            on_status: vec![503],
            on_grpc_status: vec![8, 14],
            non_idempotent: true,
            per_try_timeout_ms: 1000,
            backoff_base_ms: 10,
            backoff_max_ms: 1000,
            max_body_bytes: 1024,
            budget: Some(RetryBudget {
                ratio: 0.5,
                min_per_second: 1,
                window_ms: 1000
            }),
        }
    );
    assert_eq!(
        route(&r, "own").rate_limit,
        Some(RateLimit {
            requests_per_second: 100,
            burst: 50
        })
    );
    // The service's retry: for its routes without one, and for its default route.
    for name in ["inherited", "default-api.default"] {
        let retry = route(&r, name).retry.clone().unwrap();
        assert_eq!(retry.max_retries, 4, "{name}");
        assert!(retry.on_reset && !retry.on_connect_failure, "{name}");
        assert!(retry.on_status.is_empty(), "{name}");
        assert_eq!(retry.backoff_base_ms, 25, "{name}: other fields default");
        assert!(route(&r, name).rate_limit.is_none());
    }
    // No retry anywhere: the mesh default, on with its budget.
    let d = route(&r, "default-other.default").retry.clone().unwrap();
    assert_eq!(
        d,
        RetryPolicy {
            max_retries: 2,
            on_connect_failure: true,
            on_reset: false,
            on_status: vec![502, 503, 504],
            on_grpc_status: vec![14],
            non_idempotent: false,
            per_try_timeout_ms: 0,
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            max_body_bytes: 65536,
            budget: Some(RetryBudget {
                ratio: 0.2,
                min_per_second: 10,
                window_ms: 10_000
            }),
        }
    );
}

#[test]
fn inbound_listener_gets_the_services_rate_limit_and_idle_timeout() {
    let r = build(
        "services:\n  - name: api\n    idle_timeout: 30s\n    rate_limit: {requests_per_second: 1000, burst: 2000}\n",
        "api",
    );
    let l = &r.listeners.listeners;
    let inbound = l.iter().find(|l| l.name == INBOUND).unwrap();
    assert_eq!(
        inbound.rate_limit,
        Some(RateLimit {
            requests_per_second: 1000,
            burst: 2000
        })
    );
    assert_eq!(inbound.idle_timeout_ms, 30_000);
    let outbound = l.iter().find(|l| l.name == OUTBOUND).unwrap();
    assert!(outbound.rate_limit.is_none());
    assert_eq!(outbound.idle_timeout_ms, 30_000);
    assert_eq!(outbound.mtls, MtlsMode::Disabled as i32);
    assert!(outbound.authorization.is_empty());
}
