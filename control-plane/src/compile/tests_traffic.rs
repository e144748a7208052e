//! Compilation of the traffic knobs: the upstream HTTP version's defaults, subset clusters and
//! their endpoints, and the operator's log level in the LISTENERS set.

use std::time::SystemTime;

use super::*;
use crate::policy::SourceFile;
use weft_proto::v1::UpstreamProtocol;

fn policy(content: &str) -> PolicySet {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .unwrap()
}

fn node(id: &str, service: &str, addr: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: addr.into(),
        outbound_address: "127.0.0.9:15001".into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn cluster<'a>(r: &'a Resources, name: &str) -> &'a Cluster {
    r.clusters
        .clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

#[test]
fn upstream_protocol_defaults_and_overrides() {
    let p = policy(
        "services:
  - name: web
  - name: mesh-svc
  - name: rpc
    protocol: grpc
  - name: outside
    endpoints: [{address: 10.0.0.1:80}]
  - name: outside-h2
    upstream_protocol: http2
    endpoints: [{address: 10.0.0.2:80}]
",
    );
    let r = compile(
        &p,
        &Registry::new(std::time::Duration::from_secs(5)),
        &TrustBundle::default(),
        &node("web-1", "web", "127.0.0.2:15006", &[]),
    );
    let proto = |name: &str| UpstreamProtocol::try_from(cluster(&r, name).protocol).unwrap();
    assert_eq!(proto("mesh-svc.default"), UpstreamProtocol::Preserve);
    assert_eq!(proto("rpc.default"), UpstreamProtocol::Http2);
    assert_eq!(proto("outside.default"), UpstreamProtocol::Http1);
    assert_eq!(proto("outside-h2.default"), UpstreamProtocol::Http2);
}

#[test]
fn subsets_are_clusters_of_the_matching_endpoints() {
    let p = policy(
        "services:
  - name: web
  - name: api
routes:
  - name: api-v2
    service: api
    match: {headers: [{name: x-v2, present: true}]}
    destinations: [{service: api, subset: {version: v2}}]
",
    );
    let mut registry = Registry::new(std::time::Duration::from_secs(5));
    registry.register(
        node("api-1", "api", "127.0.0.3:15006", &[("version", "v1")]),
        SystemTime::now(),
    );
    registry.register(
        node("api-2", "api", "127.0.0.4:15006", &[("version", "v2")]),
        SystemTime::now(),
    );
    let r = compile(
        &p,
        &registry,
        &TrustBundle::default(),
        &node("web-1", "web", "127.0.0.2:15006", &[]),
    );
    let subset = "api.default~version=v2";
    let c = cluster(&r, subset);
    assert_eq!(
        c.service, "api",
        "a subset is still the service (identity, mTLS)"
    );
    let eps = r
        .endpoints
        .clusters
        .iter()
        .find(|e| e.cluster == subset)
        .unwrap();
    let addrs: Vec<&str> = eps.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, ["127.0.0.4:15006"]);
    let all = r
        .endpoints
        .clusters
        .iter()
        .find(|e| e.cluster == "api.default")
        .unwrap();
    assert_eq!(all.endpoints.len(), 2);
    let route = r.routes.tables[0]
        .routes
        .iter()
        .find(|r| r.name == "api-v2")
        .unwrap();
    assert_eq!(route.destinations[0].cluster, subset);
}

#[test]
fn the_log_level_travels_in_the_listeners_set() {
    let p = policy("services:\n  - name: web\n");
    let mut registry = Registry::new(std::time::Duration::from_secs(5));
    let web = node("web-1", "web", "127.0.0.2:15006", &[]);
    registry.register(web.clone(), SystemTime::now());
    let before = compile(&p, &registry, &TrustBundle::default(), &web);
    assert_eq!(before.listeners.log_level, "");
    assert!(registry.set_log_level("web-1", Some("debug".into())));
    let after = compile(&p, &registry, &TrustBundle::default(), &web);
    assert_eq!(after.listeners.log_level, "debug");
    assert_ne!(before.listeners.version, after.listeners.version);
    assert_eq!(before.routes.version, after.routes.version);
    // A reconnect of the same node keeps it.
    registry.register(web.clone(), SystemTime::now());
    assert_eq!(
        compile(&p, &registry, &TrustBundle::default(), &web)
            .listeners
            .log_level,
        "debug"
    );
    assert!(!registry.set_log_level("nobody", None));
}
