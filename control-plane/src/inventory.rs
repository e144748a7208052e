//! The mesh-wide catalog of compiled clusters and their endpoints, for `GET /v1/clusters` and
//! `GET /v1/endpoints` (`weftctl get clusters|endpoints`): the cluster every caller of a
//! service receives, with the endpoints the registry currently gives it.

use serde::Serialize;

use crate::compile::service_cluster;
use crate::policy::{LbPolicy, MtlsMode, PolicySet, Protocol, Service, ServiceKey};
use crate::registry::Registry;
use weft_proto::v1::UpstreamProtocol;

/// Where an endpoint comes from, and whether its sidecar is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    /// Declared in YAML.
    Static,
    /// A registered sidecar with an open stream.
    Connected,
    /// A sidecar whose stream ended, kept until its deregistration grace expires.
    Disconnected,
}

/// One endpoint of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointView {
    pub cluster: String,
    pub address: String,
    pub weight: u32,
    pub state: EndpointState,
    /// The sidecar's node id (registered endpoints only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_id: Option<String>,
}

/// One service's compiled cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// `<service>.<namespace>`.
    pub name: String,
    pub service: String,
    pub namespace: String,
    pub protocol: Protocol,
    /// How the proxy talks to the endpoints: `preserve` (the downstream's HTTP version) or
    /// `http2`.
    pub upstream_protocol: &'static str,
    pub lb: LbPolicy,
    /// The service's effective inbound mTLS mode (its own, else `mesh.mtls`).
    pub mtls: MtlsMode,
    /// Humantime, e.g. `1s`, `250ms`.
    pub connect_timeout: String,
    /// Humantime; `0s` = no timeout.
    pub request_timeout: String,
    /// tcp services: the outbound port on each caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    pub endpoints: Vec<EndpointView>,
}

fn endpoints_of(service: &Service, registry: &Registry) -> Vec<EndpointView> {
    let key = ServiceKey::new(&service.name, &service.namespace);
    let cluster = key.cluster_name();
    let mut out: Vec<EndpointView> = service
        .endpoints
        .iter()
        .map(|e| EndpointView {
            cluster: cluster.clone(),
            address: e.address.clone(),
            weight: e.weight,
            state: EndpointState::Static,
            proxy_id: None,
        })
        .collect();
    out.extend(registry.endpoints_of(&key).map(|p| EndpointView {
        cluster: cluster.clone(),
        address: p.node.inbound_address.clone(),
        weight: 1,
        state: if p.is_connected() {
            EndpointState::Connected
        } else {
            EndpointState::Disconnected
        },
        proxy_id: Some(p.node.id.clone()),
    }));
    out
}

/// Every service's cluster, sorted by cluster name.
pub fn clusters(policy: &PolicySet, registry: &Registry) -> Vec<ClusterView> {
    let mut out: Vec<ClusterView> = policy
        .services()
        .iter()
        .map(|s| {
            let c = service_cluster(policy, s);
            ClusterView {
                upstream_protocol: match UpstreamProtocol::try_from(c.protocol) {
                    Ok(UpstreamProtocol::Http2) => "http2",
                    Ok(UpstreamProtocol::Http1) => "http1",
                    _ => "preserve",
                },
                name: c.name,
                service: s.name.clone(),
                namespace: s.namespace.clone(),
                protocol: s.protocol,
                lb: s.lb,
                mtls: policy.mtls_of(Some(s)),
                connect_timeout: humantime::format_duration(s.connect_timeout).to_string(),
                request_timeout: humantime::format_duration(s.request_timeout).to_string(),
                port: s.port,
                endpoints: endpoints_of(s, registry),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Every endpoint of every cluster, sorted by cluster (static first, then sidecars by id).
pub fn endpoints(policy: &PolicySet, registry: &Registry) -> Vec<EndpointView> {
    clusters(policy, registry)
        .into_iter()
        .flat_map(|c| c.endpoints)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SourceFile;
    use std::time::{Duration, Instant, SystemTime};
    use weft_proto::v1::Node;

    #[test]
    fn lists_clusters_with_static_and_registered_endpoints() {
        let policy = PolicySet::from_files(vec![SourceFile {
            name: "p.yaml".into(),
            content: "services:\n  - name: web\n  - {name: api, protocol: grpc, request_timeout: 0s, endpoints: [{address: \"10.0.0.1:80\", weight: 3}]}\n  - {name: db, protocol: tcp, port: 5432, connect_timeout: 250ms}\n".into(),
        }])
        .unwrap();
        let mut registry = Registry::new(Duration::from_secs(5));
        let node = |id: &str, addr: &str| Node {
            id: id.into(),
            service: "api".into(),
            inbound_address: addr.into(),
            ..Node::default()
        };
        registry.register(node("api-1", "127.0.0.2:15006"), SystemTime::now());
        let s = registry.register(node("api-2", "127.0.0.3:15006"), SystemTime::now());
        registry.disconnect("api-2", s, Instant::now());

        let list = clusters(&policy, &registry);
        let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["api.default", "db.default", "web.default"]);
        let api = &list[0];
        assert_eq!(api.upstream_protocol, "http2");
        assert_eq!(api.request_timeout, "0s");
        let states: Vec<(&str, EndpointState)> = api
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.state))
            .collect();
        assert_eq!(
            states,
            [
                ("10.0.0.1:80", EndpointState::Static),
                ("127.0.0.2:15006", EndpointState::Connected),
                ("127.0.0.3:15006", EndpointState::Disconnected),
            ]
        );
        assert_eq!(list[1].connect_timeout, "250ms");
        assert_eq!(list[1].port, Some(5432));
        assert_eq!(endpoints(&policy, &registry).len(), 3);
        let json = serde_json::to_value(&list[1]).unwrap();
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["lb"], "p2c_peak_ewma");
        assert_eq!(json["mtls"], "permissive");
    }
}
