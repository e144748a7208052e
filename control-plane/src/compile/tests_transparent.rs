//! Compilation of transparent mode: VIPs, per-port clusters, endpoints and route tables,
//! captured listeners with the mesh's protocol detection, and a transparent node's
//! `inbound:<port>` clusters.

use std::time::SystemTime;

use super::*;
use crate::policy::SourceFile;

fn policy(content: &str) -> PolicySet {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .unwrap()
}

fn node(id: &str, service: &str, ip: &str, ports: &[u32]) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: format!("{ip}:15006"),
        outbound_address: "127.0.0.1:15001".into(),
        app_address: "127.0.0.1:8080".into(),
        instance_ip: ip.into(),
        app_ports: ports.to_vec(),
        ..Default::default()
    }
}

const POLICY: &str = "mesh:
  vip_range: 240.240.0.0/16
  protocol_detection: {timeout: 150ms, server_first_ports: [3306], opaque_ports: [9000]}
services:
  - name: web
  - name: api
    vip: 10.96.0.10
  - name: api-v2
  - name: db
    protocol: tcp
    port: 3306
routes:
  - name: api-canary
    service: api
    match: {headers: [{name: x-canary, exact: 'true'}]}
    destinations: [{service: api-v2}]
";

#[test]
fn per_port_clusters_tables_and_vips() {
    let p = policy(POLICY);
    let mut registry = Registry::new(std::time::Duration::from_secs(5));
    let now = SystemTime::now();
    registry.register(node("api-1", "api", "10.0.0.3", &[8080, 9090]), now);
    registry.register(node("api-2", "api", "10.0.0.4", &[8080]), now);
    registry.register(node("v2-1", "api-v2", "10.0.0.5", &[8080]), now);
    registry.register(node("db-1", "db", "10.0.0.6", &[3306]), now);
    // An explicit-mode instance has no per-port endpoints.
    let mut explicit = node("api-3", "api", "127.0.0.7", &[]);
    explicit.instance_ip.clear();
    registry.register(explicit, now);
    let web = node("web-1", "web", "10.0.0.2", &[8080]);
    let r = compile(&p, &registry, &TrustBundle::default(), &web);
    let cluster = |name: &str| {
        r.clusters
            .clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    };
    let endpoints = |name: &str| -> Vec<String> {
        r.endpoints
            .clusters
            .iter()
            .find(|e| e.cluster == name)
            .unwrap_or_else(|| panic!("no endpoints of {name}"))
            .endpoints
            .iter()
            .map(|e| e.address.clone())
            .collect()
    };
    // VIPs: declared, and allocated from the range.
    assert_eq!(cluster("api.default").vip, "10.96.0.10");
    let db_vip: std::net::IpAddr = cluster("db.default").vip.parse().unwrap();
    assert!(db_vip.to_string().starts_with("240.240."), "{db_vip}");
    // Per-port clusters: the service's settings, no VIP, the port, instance endpoints with the
    // service's identity.
    let api80 = cluster("api.default:8080");
    assert_eq!((api80.port, api80.vip.as_str()), (8080, ""));
    assert_eq!(api80.service, "api");
    assert_eq!(
        endpoints("api.default:8080"),
        ["10.0.0.3:8080", "10.0.0.4:8080"]
    );
    assert_eq!(endpoints("api.default:9090"), ["10.0.0.3:9090"]);
    let ep = &r
        .endpoints
        .clusters
        .iter()
        .find(|e| e.cluster == "api.default:9090")
        .unwrap()
        .endpoints[0];
    assert_eq!(ep.identity, "spiffe://cluster.local/ns/default/sa/api");
    assert_eq!(ep.proxy_id, "api-1");
    assert_eq!(endpoints("db.default:3306"), ["10.0.0.6:3306"]);
    // The service cluster keeps every sidecar's inbound address.
    assert_eq!(endpoints("api.default").len(), 3);
    // Per-port tables: http services only; routes with any host, destinations on the port.
    let table = |name: &str| r.routes.tables.iter().find(|t| t.name == name);
    assert!(table("db.default:3306").is_none());
    let t = table("api.default:8080").expect("api's table for 8080");
    let names: Vec<&str> = t.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["api-canary", "default-api.default:8080"]);
    assert!(t
        .routes
        .iter()
        .all(|r| r.r#match.as_ref().unwrap().hosts.is_empty()));
    assert_eq!(t.routes[0].destinations[0].cluster, "api-v2.default:8080");
    assert_eq!(t.routes[1].destinations[0].cluster, "api.default:8080");
    // api-v2 has no instance on 9090: the canary falls back to its service cluster there.
    let t = table("api.default:9090").unwrap();
    assert_eq!(t.routes[0].destinations[0].cluster, "api-v2.default");
    // Captured listeners with the mesh's detection (the explicit tcp ports stay as they are).
    for l in &r.listeners.listeners {
        let captured = l.name == INBOUND || l.name == OUTBOUND;
        assert_eq!(l.captured, captured, "{}", l.name);
        if captured {
            let d = l.detection.as_ref().unwrap();
            assert_eq!(d.timeout_ms, 150);
            assert_eq!(d.skip_ports, [3306, 9000]);
        }
    }
    // The node's own app ports.
    let inbound = cluster("inbound:8080");
    assert_eq!(inbound.port, 8080);
    assert_eq!(inbound.mtls, MtlsMode::Disabled as i32);
    assert_eq!(endpoints("inbound:8080"), ["10.0.0.2:8080"]);
    assert_eq!(endpoints("inbound"), ["127.0.0.1:8080"]);
    // Sorted sets, versions stable.
    let names: Vec<&str> = r
        .clusters
        .clusters
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    let again = compile(&p, &registry, &TrustBundle::default(), &web);
    assert_eq!(r.versions(), again.versions());
}

#[test]
fn explicit_nodes_get_nothing_new() {
    let p = policy(POLICY);
    let registry = Registry::new(std::time::Duration::from_secs(5));
    let mut web = node("web-1", "web", "127.0.0.2", &[]);
    web.instance_ip.clear();
    let r = compile(&p, &registry, &TrustBundle::default(), &web);
    assert!(r
        .listeners
        .listeners
        .iter()
        .all(|l| !l.captured && l.detection.is_none()));
    assert!(r.clusters.clusters.iter().all(|c| !c.name.contains(':')));
    assert_eq!(r.routes.tables.len(), 1);
}

#[test]
fn bad_transparent_policy_is_refused() {
    for (yaml, field) in [
        ("mesh: {vip_range: 10.0.0.0/31}\n", "mesh.vip_range"),
        ("mesh: {vip_range: nope}\n", "mesh.vip_range"),
        (
            "mesh: {vip_range: 10.0.0.0/30}\nservices: [{name: a}, {name: b}, {name: c}]\n",
            "mesh.vip_range",
        ),
        ("mesh: {protocol_detection: {timeout: 0s}}\n", "timeout"),
        (
            "mesh: {protocol_detection: {opaque_ports: [0]}}\n",
            "opaque_ports[0]",
        ),
        ("services: [{name: a, vip: 127.0.0.1}]\n", "services[0].vip"),
        (
            "services: [{name: a, vip: 10.1.1.1}, {name: b, vip: 10.1.1.1}]\n",
            "services[1].vip",
        ),
    ] {
        let e = PolicySet::from_files(vec![SourceFile {
            name: "p.yaml".into(),
            content: yaml.into(),
        }])
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains(field), "{yaml}: {text}");
    }
}
