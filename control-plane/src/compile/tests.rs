//! Compilation tests on a small policy set: each resource type as documented, default routes,
//! tcp listeners, and version stability.

use std::time::{Duration, SystemTime};

use super::*;
use crate::policy::SourceFile;
use weft_proto::v1::path_match;
use weft_proto::v1::{LbPolicy, UpstreamProtocol};

const POLICY: &str = "\
services:
  - name: web
    dependencies: [backend, db]
  - name: backend
    request_timeout: 2s
    endpoints:
      - address: 10.0.0.1:9001
        weight: 2
  - name: backend-v2
    protocol: grpc
    request_timeout: 0s
  - name: db
    protocol: tcp
    port: 7000
  - name: other
routes:
  - name: backend-canary
    service: backend
    hosts: [API.example.com]
    match:
      path: {prefix: /api}
      headers:
        - {name: X-Canary, exact: \"true\"}
        - {name: x-debug, present: false}
      methods: [get]
    destinations:
      - {service: backend-v2, weight: 90}
      - {service: backend, weight: 10}
    timeout: 2s
  - name: other-route
    service: other
    destinations: [{service: other}]
";

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

fn registry() -> Registry {
    Registry::new(Duration::from_secs(5))
}

#[test]
fn listeners() {
    let r = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("web"),
    );
    let l = &r.listeners.listeners;
    let names: Vec<&str> = l.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["inbound", "outbound", "outbound-tcp-db.default"]);
    assert_eq!(l[0].address, "127.0.0.2:15006");
    assert_eq!(l[0].direction, Direction::Inbound as i32);
    assert_eq!(l[0].protocol, ListenerProtocol::Http as i32);
    assert_eq!(l[0].cluster, "inbound");
    assert_eq!(l[1].address, "127.0.0.2:15001");
    assert_eq!(l[1].route_table, "outbound");
    assert_eq!(l[1].protocol, ListenerProtocol::Http as i32);
    assert_eq!(l[2].address, "127.0.0.2:7000");
    assert_eq!(l[2].protocol, ListenerProtocol::Tcp as i32);
    assert_eq!(l[2].direction, Direction::Outbound as i32);
    assert_eq!(l[2].cluster, "db.default");
}

#[test]
fn tcp_service_gets_a_tcp_inbound_listener() {
    let r = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("db"),
    );
    let inbound = r
        .listeners
        .listeners
        .iter()
        .find(|l| l.name == "inbound")
        .unwrap();
    assert_eq!(inbound.protocol, ListenerProtocol::Tcp as i32);
    // db declares no dependencies: it may call every service, including itself over tcp.
    assert!(r
        .listeners
        .listeners
        .iter()
        .any(|l| l.name == "outbound-tcp-db.default"));
}

#[test]
fn route_table_has_user_routes_then_defaults() {
    let r = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("web"),
    );
    assert_eq!(r.routes.tables.len(), 1);
    let table = &r.routes.tables[0];
    assert_eq!(table.name, "outbound");
    let names: Vec<&str> = table.routes.iter().map(|r| r.name.as_str()).collect();
    // web may call backend and db (tcp: no HTTP routes); other's route is not its business.
    assert_eq!(names, ["backend-canary", "default-backend.default"]);

    let canary = &table.routes[0];
    let m = canary.r#match.as_ref().unwrap();
    assert_eq!(
        m.hosts,
        [
            "backend",
            "backend.default",
            "backend.default.svc",
            "backend.default.svc.cluster.local",
            "api.example.com"
        ]
    );
    assert_eq!(
        m.path.as_ref().unwrap().kind,
        Some(path_match::Kind::Prefix("/api".into()))
    );
    assert_eq!(m.headers[0].name, "x-canary");
    assert_eq!(
        m.headers[0].kind,
        Some(header_match::Kind::Exact("true".into()))
    );
    assert!(!m.headers[0].invert);
    assert_eq!(m.headers[1].kind, Some(header_match::Kind::Present(true)));
    assert!(
        m.headers[1].invert,
        "present: false is an inverted presence"
    );
    assert_eq!(m.methods, ["GET"]);
    assert_eq!(canary.timeout_ms, 2000);
    let dests: Vec<(&str, u32)> = canary
        .destinations
        .iter()
        .map(|d| (d.cluster.as_str(), d.weight))
        .collect();
    assert_eq!(dests, [("backend-v2.default", 90), ("backend.default", 10)]);

    let default = &table.routes[1];
    let m = default.r#match.as_ref().unwrap();
    assert!(m.path.is_none() && m.headers.is_empty() && m.methods.is_empty());
    assert_eq!(m.hosts, canary.r#match.as_ref().unwrap().hosts);
    assert_eq!(default.destinations.len(), 1);
    assert_eq!(default.destinations[0].cluster, "backend.default");
    assert_eq!(default.destinations[0].weight, 100);
    assert_eq!(default.timeout_ms, 0);
}

#[test]
fn without_dependencies_every_service_is_callable_in_declared_order() {
    let r = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("unknown"),
    );
    let names: Vec<&str> = r.routes.tables[0]
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "default-web.default",
            "backend-canary",
            "default-backend.default",
            "default-backend-v2.default",
            "other-route",
            "default-other.default",
        ]
    );
    let single = &r.routes.tables[0].routes[4];
    assert_eq!(single.destinations[0].weight, 100);
}

#[test]
fn clusters() {
    let r = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("web"),
    );
    let c = &r.clusters.clusters;
    let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
    // backend-v2 is not a dependency but a destination of backend's route.
    assert_eq!(
        names,
        [
            "backend-v2.default",
            "backend.default",
            "db.default",
            "inbound"
        ]
    );
    assert_eq!(c[0].protocol, UpstreamProtocol::Http2 as i32, "grpc -> h2");
    assert_eq!(c[0].request_timeout_ms, 0);
    // backend has static endpoints (outside the mesh): HTTP/1.1 unless it says otherwise.
    assert_eq!(c[1].protocol, UpstreamProtocol::Http1 as i32);
    assert_eq!(c[1].service, "backend");
    assert_eq!(c[1].namespace, "default");
    assert_eq!(c[1].connect_timeout_ms, 1000);
    assert_eq!(c[1].request_timeout_ms, 2000);
    assert_eq!(c[1].lb, LbPolicy::P2cPeakEwma as i32);
    assert_eq!(c[3].service, "");
    assert_eq!(c[3].protocol, UpstreamProtocol::Preserve as i32);
}

#[test]
fn endpoints_are_static_plus_registered_sidecars() {
    let mut reg = registry();
    let mut backend = node("backend");
    backend.id = "backend-b".into();
    backend.inbound_address = "127.0.0.3:15006".into();
    backend.labels = [("version".to_owned(), "v1".to_owned())].into();
    reg.register(backend, SystemTime::now());
    let mut backend2 = node("backend");
    backend2.id = "backend-a".into();
    backend2.inbound_address = "127.0.0.4:15006".into();
    reg.register(backend2, SystemTime::now());

    let r = compile(&policy(POLICY), &reg, &TrustBundle::default(), &node("web"));
    let e = &r.endpoints.clusters;
    let clusters: Vec<&str> = e.iter().map(|c| c.cluster.as_str()).collect();
    assert_eq!(
        clusters,
        [
            "backend-v2.default",
            "backend.default",
            "db.default",
            "inbound"
        ]
    );
    let backend: Vec<(&str, u32, &str)> = e[1]
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight, e.proxy_id.as_str()))
        .collect();
    assert_eq!(
        backend,
        [
            ("10.0.0.1:9001", 2, ""),
            ("127.0.0.4:15006", 1, "backend-a"),
            ("127.0.0.3:15006", 1, "backend-b"),
        ]
    );
    assert_eq!(e[1].endpoints[2].labels["version"], "v1");
    assert!(e[0].endpoints.is_empty());
    assert_eq!(e[3].endpoints[0].address, "127.0.0.2:8080");
}

#[test]
fn same_input_same_versions() {
    let p = policy(POLICY);
    let mut reg = registry();
    let mut n = node("backend");
    n.labels = (0..20)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    reg.register(n, SystemTime::now());
    let a = compile(&p, &reg, &TrustBundle::default(), &node("web"));
    let b = compile(&policy(POLICY), &reg, &TrustBundle::default(), &node("web"));
    assert_eq!(a.versions(), b.versions());
    for (_, v) in a.versions() {
        assert_eq!(v.len(), 16);
    }
}

#[test]
fn endpoint_only_change_changes_only_the_endpoints_version() {
    let p = policy(POLICY);
    let mut reg = registry();
    let before = compile(&p, &reg, &TrustBundle::default(), &node("web"));
    let mut n = node("backend");
    n.inbound_address = "127.0.0.9:15006".into();
    reg.register(n, SystemTime::now());
    let after = compile(&p, &reg, &TrustBundle::default(), &node("web"));
    assert_eq!(before.listeners.version, after.listeners.version);
    assert_eq!(before.routes.version, after.routes.version);
    assert_eq!(before.clusters.version, after.clusters.version);
    assert_ne!(before.endpoints.version, after.endpoints.version);
}

#[test]
fn route_change_leaves_listeners_and_endpoints_alone() {
    let before = compile(
        &policy(POLICY),
        &registry(),
        &TrustBundle::default(),
        &node("web"),
    );
    let changed = POLICY.replace(
        "timeout: 2s\n  - name: other-route",
        "timeout: 3s\n  - name: other-route",
    );
    assert_ne!(changed, POLICY);
    let after = compile(
        &policy(&changed),
        &registry(),
        &TrustBundle::default(),
        &node("web"),
    );
    assert_eq!(before.listeners.version, after.listeners.version);
    assert_ne!(before.routes.version, after.routes.version);
    assert_eq!(before.clusters.version, after.clusters.version);
    assert_eq!(before.endpoints.version, after.endpoints.version);
}

/// Versions are content hashes: a registry rebuilt in another process (registered in another
/// order, other sessions and connect times, or restored from the state file) compiles to the
/// same versions, so a proxy reconnecting to a restarted control plane is pushed nothing.
#[test]
fn versions_do_not_depend_on_process_local_registry_data() {
    let p = policy(POLICY);
    let sidecar = |id: &str, addr: &str| {
        let mut n = node("backend");
        n.id = id.into();
        n.inbound_address = addr.into();
        n.labels = (0..8).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        n
    };
    let mut first = registry();
    first.register(sidecar("backend-a", "127.0.0.3:15006"), SystemTime::now());
    first.register(sidecar("backend-b", "127.0.0.4:15006"), SystemTime::now());
    let mut other_order = registry();
    other_order.register(
        sidecar("backend-b", "127.0.0.4:15006"),
        SystemTime::UNIX_EPOCH,
    );
    other_order.register(
        sidecar("backend-b", "127.0.0.4:15006"),
        SystemTime::UNIX_EPOCH,
    );
    other_order.register(
        sidecar("backend-a", "127.0.0.3:15006"),
        SystemTime::UNIX_EPOCH,
    );
    let now = std::time::Instant::now();
    let mut restored = registry();
    restored.restore(
        first.persisted(now, SystemTime::now()),
        now,
        SystemTime::now(),
        Duration::from_secs(15),
    );
    let want = compile(&p, &first, &TrustBundle::default(), &node("web"));
    for reg in [&other_order, &restored] {
        let got = compile(&policy(POLICY), reg, &TrustBundle::default(), &node("web"));
        assert_eq!(got.versions(), want.versions());
        assert_eq!(got.endpoints, want.endpoints);
    }
}
