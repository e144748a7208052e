//! Parsing, defaults and validation of the resilience knobs: each rule with the line it names.

use super::*;

fn set(content: &str) -> Result<PolicySet, Vec<String>> {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .map_err(|e| e.messages())
}

fn one_error(content: &str) -> String {
    let errs = set(content).expect_err("expected errors");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap_or_default()
}

fn service(extra: &str) -> String {
    format!("services:\n  - name: api\n{extra}")
}

#[test]
fn defaults_are_filled() {
    let s = set("services: [{name: api}]\n").unwrap();
    let api = &s.services()[0];
    assert_eq!(api.lb, LbPolicy::P2cPeakEwma);
    assert_eq!(api.circuit_breaker, CircuitBreaker::default());
    assert_eq!(api.circuit_breaker.max_connections, 1024);
    assert_eq!(api.circuit_breaker.max_retries, 3);
    let o = &api.outlier_detection;
    assert!(!o.disabled);
    assert_eq!(o.consecutive_failures, 5);
    assert_eq!(o.base_ejection_time, Duration::from_secs(30));
    assert_eq!(o.max_ejection_time, Duration::from_secs(300));
    assert_eq!(o.max_ejection_percent, 50);
    assert_eq!(o.interval, Duration::from_secs(10));
    assert!((o.success_rate_stdev_factor - 1.9).abs() < f64::EPSILON);
    assert_eq!(o.min_healthy_percent, 50);
    assert!(api.health_check.is_none());
    assert_eq!(api.idle_timeout, Duration::from_secs(60));
    assert!(api.retry.is_none() && api.rate_limit.is_none() && api.mtls.is_none());
    let r = RetryPolicy::default();
    assert_eq!(r.attempts, 2);
    let on: Vec<&str> = r.on.iter().map(|o| o.0.as_str()).collect();
    assert_eq!(on, ["connect-failure", "502", "503", "504", "unavailable"]);
    assert_eq!(r.per_try_timeout, Duration::ZERO);
    assert_eq!(r.backoff.base, Duration::from_millis(25));
    assert_eq!(r.backoff.max, Duration::from_millis(250));
    assert_eq!(r.max_body_bytes, 65536);
    assert!((r.budget.ratio - 0.2).abs() < f64::EPSILON);
    assert_eq!(r.budget.min_per_second, 10);
    assert_eq!(r.budget.window, Duration::from_secs(10));
}

#[test]
fn parses_every_knob() {
    let s = set(&service(
        "    lb: ring_hash
    hash: {header: x-user}
    circuit_breaker: {max_connections: 10}
    outlier_detection: {consecutive_failures: 3, base_ejection_time: 250ms}
    health_check:
      http: {path: /healthz, expected_statuses: [200, 204]}
      interval: 2s
    idle_timeout: 5s
    retry: {attempts: 3, on: [reset, 503, deadline-exceeded], per_try_timeout: 1s}
    rate_limit: {requests_per_second: 100}
    mtls: strict
",
    ))
    .unwrap();
    let api = &s.services()[0];
    assert_eq!(api.lb, LbPolicy::RingHash);
    assert_eq!(api.hash.as_ref().unwrap().header.as_deref(), Some("x-user"));
    assert_eq!(api.circuit_breaker.max_connections, 10);
    assert_eq!(
        api.circuit_breaker.max_requests, 1024,
        "others keep defaults"
    );
    assert_eq!(api.outlier_detection.consecutive_failures, 3);
    assert_eq!(
        api.outlier_detection.base_ejection_time,
        Duration::from_millis(250)
    );
    assert_eq!(api.outlier_detection.max_ejection_percent, 50);
    let hc = api.health_check.as_ref().unwrap();
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (2, 3));
    assert_eq!(api.idle_timeout, Duration::from_secs(5));
    let retry = api.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert_eq!(
        retry.on[1],
        RetryOn::from("503"),
        "YAML integers are accepted"
    );
    assert_eq!(
        retry.backoff,
        Backoff::default(),
        "absent fields: mesh default"
    );
    assert_eq!(
        api.rate_limit.unwrap().burst(),
        100,
        "burst defaults to rps"
    );
    assert_eq!(api.mtls, Some(MtlsMode::Strict));
    let off = set(&service("    outlier_detection: {disabled: true}\n")).unwrap();
    assert!(off.services()[0].outlier_detection.disabled);
}

#[test]
fn unknown_enum_values_and_fields_are_rejected() {
    let e = one_error(&service("    lb: random\n"));
    assert!(
        e.starts_with("p.yaml:3: services[0].lb: unknown variant `random`"),
        "{e}"
    );
    let e = one_error(&service("    mtls: sometimes\n"));
    assert!(
        e.starts_with("p.yaml:3: services[0].mtls: unknown variant `sometimes`"),
        "{e}"
    );
    let e = one_error(&service("    circuit_breaker: {max_conections: 1}\n"));
    assert!(e.contains("unknown field `max_conections`"), "{e}");
}

#[test]
fn ring_hash_needs_a_hash_and_hash_needs_ring_hash() {
    let e = one_error(&service("    lb: ring_hash\n"));
    assert!(
        e.starts_with("p.yaml:3: services[0].lb: ring_hash needs a hash"),
        "{e}"
    );
    let e = one_error(&service("    hash: {cookie: session}\n"));
    assert_eq!(
        e,
        "p.yaml:3: services[0].hash: hash is only used by lb: ring_hash"
    );
    let e = one_error(&service(
        "    lb: ring_hash\n    hash: {header: x-user, source_ip: true}\n",
    ));
    assert!(
        e.starts_with("p.yaml:4: services[0].hash: exactly one of header, cookie, source_ip: true"),
        "{e}"
    );
    set(&service("    lb: ring_hash\n    hash: {source_ip: true}\n")).unwrap();
}

#[test]
fn percentages_are_0_to_100() {
    let e = one_error(&service(
        "    outlier_detection:\n      max_ejection_percent: 101\n",
    ));
    assert_eq!(
        e,
        "p.yaml:4: services[0].outlier_detection.max_ejection_percent: 101 is not a percentage (0..=100)"
    );
    let e = one_error(&service(
        "    outlier_detection:\n      min_healthy_percent: 150\n",
    ));
    assert!(e.starts_with("p.yaml:4: services[0].outlier_detection.min_healthy_percent"));
    set(&service(
        "    outlier_detection: {max_ejection_percent: 100, min_healthy_percent: 0}\n",
    ))
    .unwrap();
}

#[test]
fn stdev_factor_must_be_positive() {
    let e = one_error(&service(
        "    outlier_detection:\n      success_rate_stdev_factor: 0\n",
    ));
    assert_eq!(
        e,
        "p.yaml:4: services[0].outlier_detection.success_rate_stdev_factor: must be greater than 0 (got 0)"
    );
}

#[test]
fn health_check_thresholds_and_kind() {
    let e = one_error(&service(
        "    health_check:\n      tcp: true\n      healthy_threshold: 0\n",
    ));
    assert_eq!(
        e,
        "p.yaml:5: services[0].health_check.healthy_threshold: must be at least 1"
    );
    let e = one_error(&service(
        "    health_check:\n      tcp: true\n      unhealthy_threshold: 0\n",
    ));
    assert!(e.starts_with("p.yaml:5: services[0].health_check.unhealthy_threshold"));
    let e = one_error(&service("    health_check: {interval: 1s}\n"));
    assert!(
        e.contains(
            "services[0].health_check: exactly one of http, tcp: true is required (0 given)"
        ),
        "{e}"
    );
    let e = one_error(&service("    health_check:\n      http: {path: healthz}\n"));
    assert!(
        e.starts_with("p.yaml:4: services[0].health_check.http.path"),
        "{e}"
    );
}

#[test]
fn retry_conditions_must_be_known() {
    let e = one_error(&service("    retry:\n      on: [connect-failure, 404]\n"));
    assert_eq!(
        e,
        "p.yaml:4: services[0].retry.on[1]: HTTP status 404 can't be retried (only 500..=599)"
    );
    let e = one_error(
        "services: [{name: api}]\nroutes:\n  - name: r\n    service: api\n    destinations: [{service: api}]\n    retry:\n      on:\n        - 503\n        - unavalable\n",
    );
    assert!(
        e.starts_with("p.yaml:9: routes[0].retry.on[1]: unknown retry condition \"unavalable\""),
        "{e}"
    );
    let s = set("services: [{name: api}]\nroutes:\n  - name: r\n    service: api\n    destinations: [{service: api}]\n    retry: {on: [reset, resource-exhausted, internal, 599]}\n").unwrap();
    for on in &s.routes()[0].retry.as_ref().unwrap().on {
        on.condition().unwrap();
    }
}

#[test]
fn retry_body_limit_and_backoff() {
    let e = one_error(&service("    retry:\n      max_body_bytes: 16777217\n"));
    assert_eq!(
        e,
        "p.yaml:4: services[0].retry.max_body_bytes: 16777217 is more than 16 MiB (16777216)"
    );
    set(&service("    retry: {max_body_bytes: 16777216}\n")).unwrap();
    let e = one_error(&service(
        "    retry:\n      backoff: {base: 1s, max: 100ms}\n",
    ));
    assert!(e.starts_with("p.yaml:4: services[0].retry.backoff"), "{e}");
    let e = one_error(&service("    retry:\n      budget: {ratio: 1.5}\n"));
    assert!(e.starts_with("p.yaml:4: services[0].retry.budget"), "{e}");
}

#[test]
fn rate_limits_need_at_least_one() {
    let e = one_error(&service("    rate_limit:\n      requests_per_second: 0\n"));
    assert_eq!(
        e,
        "p.yaml:4: services[0].rate_limit.requests_per_second: must be at least 1"
    );
    let e = one_error(
        "services: [{name: api}]\nroutes:\n  - name: r\n    service: api\n    destinations: [{service: api}]\n    rate_limit:\n      requests_per_second: 5\n      burst: 0\n",
    );
    assert_eq!(
        e,
        "p.yaml:8: routes[0].rate_limit.burst: must be at least 1"
    );
}
