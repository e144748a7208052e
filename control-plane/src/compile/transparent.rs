//! Transparent mode's resources (ARCHITECTURE.md "Transparent mode"): what a sidecar needs to
//! route a captured connection by its original destination.
//!
//! - **Per-port clusters** `<service>.<namespace>:<port>`: for each port the registered
//!   transparent instances of a service announce (`Node.app_ports`), a cluster with the service's
//!   settings whose endpoints are `instance_ip:port` of the instances serving that port, with the
//!   service's identity (the callee's sidecar captures the connection and terminates mTLS).
//! - **Per-port route tables** of the same name, for the http/grpc services the proxy may call:
//!   the service's routes with any host (the destination was chosen by address, not by name),
//!   their destinations moved to the per-port cluster of the same port where there is one, then
//!   the default route to the service's per-port cluster.
//! - **VIPs** ride in the service clusters (`Cluster.vip`); per-port clusters carry `port`.
//! - **Listeners** of a transparent node are `captured`, with the mesh's protocol detection.
//! - **`inbound:<port>`** clusters, per node: the app port a captured inbound connection was
//!   sent to (`instance_ip:port`), with the `inbound` cluster's settings.

use std::collections::{BTreeMap, BTreeSet};

use weft_proto::v1::{
    Cluster, ClusterEndpoints, Endpoint, Node, ProtocolDetection, Route, RouteMatch, RouteTable,
    WeightedCluster,
};

use super::{compile_route, key_of, millis, resilience, routes_of_services, Inputs, INBOUND};
use crate::policy::{self, spiffe_id, Protocol, Service, ServiceKey};

/// `<cluster>:<port>`: the per-port cluster (and route table) of a service cluster.
pub fn port_cluster_name(cluster: &str, port: u32) -> String {
    format!("{cluster}:{port}")
}

/// The ports registered transparent instances of `service` serve.
pub(super) fn ports_of(service: &Service, inputs: &Inputs<'_>) -> BTreeSet<u32> {
    let key = key_of(service);
    inputs
        .registrations(&key)
        .into_iter()
        .filter(|p| !p.node.instance_ip.is_empty())
        .flat_map(|p| p.node.app_ports.iter().copied())
        .collect()
}

/// The endpoints of the per-port cluster of `key` on `port`: `instance_ip:port` of each
/// registered transparent instance serving it, with the service's `identity`.
pub(super) fn port_endpoints(
    inputs: &Inputs<'_>,
    key: &ServiceKey,
    port: u32,
    identity: &str,
) -> Vec<Endpoint> {
    inputs
        .registrations(key)
        .into_iter()
        .filter(|p| p.node.app_ports.contains(&port))
        .filter_map(|p| {
            let ip: std::net::IpAddr = p.node.instance_ip.parse().ok()?;
            Some(Endpoint {
                address: std::net::SocketAddr::new(ip, u16::try_from(port).ok()?).to_string(),
                weight: 1,
                proxy_id: p.node.id.clone(),
                labels: p.node.labels.clone(),
                identity: identity.to_owned(),
            })
        })
        .collect()
}

/// The per-port clusters of the service clusters `services` (by cluster name), their endpoints
/// and, for the `callable` http/grpc services, their route tables.
pub(super) struct PortResources {
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterEndpoints>,
    pub tables: Vec<RouteTable>,
}

/// See [`PortResources`]. `base` is the service cluster of each service (the per-port one is a
/// copy, renamed, with `port` set and no VIP).
pub(super) fn port_resources(
    inputs: &Inputs<'_>,
    trust_domain: &str,
    services: &BTreeMap<String, &Service>,
    callable: &[&Service],
    base: &BTreeMap<String, Cluster>,
) -> PortResources {
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    let mut names = BTreeSet::new();
    let mut ports: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (name, s) in services {
        let Some(template) = base.get(name) else {
            continue;
        };
        let serving = ports_of(s, inputs);
        let key = key_of(s);
        let identity = spiffe_id(trust_domain, &key.namespace, &key.name);
        for &port in &serving {
            let port_name = port_cluster_name(name, port);
            clusters.push(Cluster {
                name: port_name.clone(),
                vip: String::new(),
                port,
                ..template.clone()
            });
            endpoints.push(ClusterEndpoints {
                cluster: port_name.clone(),
                endpoints: port_endpoints(inputs, &key, port, &identity),
            });
            names.insert(port_name);
        }
        ports.insert(name.clone(), serving);
    }
    let mut tables = Vec::new();
    for s in callable.iter().filter(|s| s.protocol != Protocol::Tcp) {
        let name = key_of(s).cluster_name();
        for &port in ports.get(&name).into_iter().flatten() {
            tables.push(port_table(inputs, s, port, &names));
        }
    }
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    PortResources {
        clusters,
        endpoints,
        tables,
    }
}

/// The route table of `service`'s per-port cluster on `port` (see the module docs).
fn port_table(
    inputs: &Inputs<'_>,
    service: &Service,
    port: u32,
    port_clusters: &BTreeSet<String>,
) -> RouteTable {
    let cluster = port_cluster_name(&key_of(service).cluster_name(), port);
    let mut routes: Vec<Route> = routes_of_services(inputs, &[service])
        .map(|r| {
            let mut route = compile_route(inputs, service, r, Vec::new());
            for d in &mut route.destinations {
                let moved = port_cluster_name(&d.cluster, port);
                if port_clusters.contains(&moved) {
                    d.cluster = moved;
                }
            }
            route
        })
        .collect();
    let default_retry = policy::RetryPolicy::default();
    routes.push(Route {
        name: format!("default-{cluster}"),
        r#match: Some(RouteMatch::default()),
        destinations: vec![WeightedCluster {
            cluster: cluster.clone(),
            weight: 100,
        }],
        retry: Some(resilience::retry(
            service.retry.as_ref().unwrap_or(&default_retry),
        )),
        ..Default::default()
    });
    RouteTable {
        name: cluster,
        routes,
    }
}

/// A transparent node's listeners' protocol detection (`None`: not a transparent node).
pub(super) fn detection(inputs: &Inputs<'_>, node: &Node) -> Option<ProtocolDetection> {
    if node.instance_ip.is_empty() {
        return None;
    }
    let d = inputs.mesh_protocol_detection();
    Some(ProtocolDetection {
        timeout_ms: millis(d.timeout),
        skip_ports: d.skip_ports().into_iter().map(u32::from).collect(),
    })
}

/// The `inbound:<port>` clusters of a transparent node (copies of `inbound`) and their
/// endpoints (`instance_ip:port`), sorted by name; empty for other nodes.
pub(super) fn inbound_port_clusters(
    node: &Node,
    inbound: Option<&Cluster>,
) -> (Vec<Cluster>, Vec<ClusterEndpoints>) {
    let (Some(inbound), Ok(ip)) = (inbound, node.instance_ip.parse::<std::net::IpAddr>()) else {
        return (Vec::new(), Vec::new());
    };
    let mut ports: Vec<u32> = node.app_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    for port in ports {
        let Ok(p) = u16::try_from(port) else { continue };
        let name = port_cluster_name(INBOUND, port);
        clusters.push(Cluster {
            name: name.clone(),
            port,
            ..inbound.clone()
        });
        endpoints.push(ClusterEndpoints {
            cluster: name,
            endpoints: vec![Endpoint {
                address: std::net::SocketAddr::new(ip, p).to_string(),
                weight: 1,
                ..Default::default()
            }],
        });
    }
    (clusters, endpoints)
}
