//! Replays the `policy_yaml` fuzz corpus and its minimized crashes (`fuzz/corpus/policy_yaml/`,
//! `fuzz/regressions/policy_yaml/`) through the fuzz entry point, on the stable toolchain.
//!
//! `write_seeds` (ignored) regenerates the seeds of `policy_yaml` and `snapshot_from_proto`:
//! `cargo test -p weft-control --test fuzz_corpus -- --ignored write_seeds`.

use std::fs;
use std::path::Path;
use std::time::Duration;

use prost::Message;
use weft_control::ca::{Ca, CaConfig};
use weft_control::compile::{compile, TrustBundle};
use weft_control::fuzzing::{self, FILE_SEPARATOR};
use weft_control::policy::{PolicySet, SourceFile};
use weft_control::registry::Registry;
use weft_proto::v1::{DiscoveryResponse, Node};
use weft_testkit::fuzz_corpus::{fuzz_dir, replay};

#[test]
fn policy_yaml_corpus() {
    replay("policy_yaml", fuzzing::policy);
}

/// A valid set touching most knobs (ARCHITECTURE.md "Policy YAML").
const KNOBS: &str = r#"mesh:
  trust_domain: cluster.local
  mtls: permissive
  namespaces:
    batch: {default_authorization: deny}
  http: {escaped_slashes: redirect, merge_slashes: false, headers_with_underscores: reject}
services:
  - name: web
    dependencies: [backend, db, jobs.batch]
  - name: backend
    lb: ring_hash
    hash: {header: x-user}
    connect_timeout: 500ms
    request_timeout: 15s
    idle_timeout: 60s
    circuit_breaker: {max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3}
    outlier_detection: {consecutive_failures: 5, base_ejection_time: 30s}
    health_check: {http: {path: /healthz}, interval: 5s}
    retry: {attempts: 3}
    rate_limit: {requests_per_second: 1000, burst: 2000}
    mtls: strict
    endpoints:
      - address: 127.0.0.1:9001
        weight: 2
  - name: backend-v2
    protocol: grpc
    lb: least_request
    request_timeout: 0s
    outlier_detection: {disabled: true}
  - name: db
    protocol: tcp
    port: 7000
    health_check: {tcp: true, interval: 2s}
    endpoints: [{address: 127.0.0.9:5432}]
  - name: jobs
    namespace: batch
    lb: round_robin
routes:
  - name: backend-canary
    service: backend
    hosts: [api.example.com]
    match:
      path: {prefix: /api}
      headers:
        - {name: x-canary, exact: "true"}
        - {name: x-debug, present: true, invert: true}
      methods: [GET, POST]
    destinations:
      - {service: backend-v2, weight: 90}
      - {service: backend, weight: 10}
    timeout: 2s
    retry:
      attempts: 2
      on: [connect-failure, 502, 503, 504, unavailable]
      per_try_timeout: 0s
      backoff: {base: 25ms, max: 250ms}
      max_body_bytes: 65536
      budget: {ratio: 0.2, min_per_second: 10, window: 10s}
    rate_limit: {requests_per_second: 100, burst: 50}
  - name: backend-regex
    service: backend
    match:
      path: {regex: "^/v[0-9]+/items$"}
    destinations: [{service: backend}]
authorization:
  - name: backend-callers
    service: backend
    default: deny
    rules:
      - name: web-reads
        from: {services: [web], identities: ["spiffe://cluster.local/ns/batch/sa/*"], namespaces: [default]}
        to: {methods: [GET], paths: [{prefix: /api}]}
"#;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn parse(files: &[(&str, &str)]) -> PolicySet {
    PolicySet::from_files(
        files
            .iter()
            .map(|(name, content)| SourceFile {
                name: (*name).to_owned(),
                content: (*content).to_owned(),
            })
            .collect(),
    )
    .unwrap_or_else(|e| panic!("seed policy is invalid: {e}"))
}

fn node(service: &str, namespace: &str) -> Node {
    Node {
        id: format!("{service}-1"),
        service: service.into(),
        namespace: namespace.into(),
        inbound_address: "127.0.0.2:15006".into(),
        outbound_address: "127.0.0.2:15001".into(),
        app_address: "127.0.0.2:8080".into(),
        tcp_bind_ip: "127.0.0.2".into(),
        ..Node::default()
    }
}

/// Regenerates the seeds of `policy_yaml` (the example policies, alone and as one set split on
/// NUL, and [`KNOBS`]) and of `snapshot_from_proto` (`compiled-*.pb`: the full DiscoveryResponse
/// the control plane sends a proxy of each example service, with a real CA root; `proxy/tests/
/// fuzz_corpus.rs` checks that the proxy accepts them).
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seeds() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples/policies");
    let mut names: Vec<_> = fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let contents: Vec<String> = names
        .iter()
        .map(|n| fs::read_to_string(examples.join(n)).unwrap())
        .collect();
    let mut joined = Vec::new();
    for (i, c) in contents.iter().enumerate() {
        if i > 0 {
            joined.push(FILE_SEPARATOR);
        }
        joined.extend_from_slice(c.as_bytes());
        write(
            "policy_yaml",
            &format!("example-{}", names[i]),
            c.as_bytes(),
        );
    }
    write("policy_yaml", "examples-set", &joined);
    write("policy_yaml", "knobs.yaml", KNOBS.as_bytes());

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&CaConfig::new(dir.path())).unwrap();
    let trust = TrustBundle {
        trust_domain: ca.trust_domain().to_owned(),
        roots_pem: ca.roots_pem(),
    };
    let registry = Registry::new(Duration::from_secs(5));
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(contents.iter().map(String::as_str))
        .collect();
    let sets = [
        (
            "examples",
            parse(&pairs),
            vec![("web", "demo"), ("api", "demo")],
        ),
        (
            "knobs",
            parse(&[("knobs.yaml", KNOBS)]),
            vec![
                ("web", "default"),
                ("backend", "default"),
                ("db", "default"),
            ],
        ),
    ];
    for (label, set, nodes) in &sets {
        for (service, namespace) in nodes {
            let r = compile(set, &registry, &trust, &node(service, namespace));
            // Every type, as a first push carries; fields the protocol may add stay default.
            #[allow(clippy::needless_update)]
            let resp = DiscoveryResponse {
                nonce: "1".into(),
                listeners: Some(r.listeners),
                routes: Some(r.routes),
                clusters: Some(r.clusters),
                endpoints: Some(r.endpoints),
                policies: Some(r.policies),
                trust: Some(r.trust),
                ..DiscoveryResponse::default()
            };
            let name = format!("compiled-{label}-{service}.pb");
            write("snapshot_from_proto", &name, &resp.encode_to_vec());
        }
    }
    // A push of endpoints alone (what a registration triggers), and an empty response.
    let r = compile(&sets[0].1, &registry, &trust, &node("web", "demo"));
    let endpoints = DiscoveryResponse {
        nonce: "2".into(),
        endpoints: Some(r.endpoints),
        ..DiscoveryResponse::default()
    };
    write(
        "snapshot_from_proto",
        "endpoints-only.pb",
        &endpoints.encode_to_vec(),
    );
    write("snapshot_from_proto", "empty.pb", b"");
}
