//! Compilation: policy set + registry + node -> the resources one proxy needs.
//!
//! Follows ARCHITECTURE.md "Compilation for a proxy". Every resource list is sorted by name
//! (route order inside a table is semantic and kept), and each type's version is a stable hash
//! of its encoded contents, so identical input always yields identical versions and a change to
//! one type (say endpoints) leaves the other versions alone.
//!
//! Defaults are filled here, so the proxy receives explicit values for every knob; the
//! resilience knobs live in `resilience`, identities/authorization/trust in `authz`.

mod authz;
pub mod inputs;
mod patch;
mod resilience;
mod scope;
pub mod traffic;
pub mod transparent;

pub use inputs::{Inputs, Read, ScopeInputs};
pub use patch::EndpointPatch;
pub use scope::{compile_scope, compile_scope_recorded, ScopeResources, SubsetCluster};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use prost::Message;
use weft_proto::v1::{
    header_match, Cluster, ClusterEndpoints, ClusterSet, Direction, Endpoint, EndpointSet,
    HeaderMatch, Listener, ListenerProtocol, ListenerSet, MtlsMode, Node,
    PolicySet as AuthorizationSet, ResourceType, Route, RouteMatch, RouteSet, RouteTable, TrustSet,
    WeightedCluster,
};

use crate::hash::StableHasher;
use crate::policy::{self, spiffe_id, PolicySet, Protocol, Service, ServiceKey};
use crate::registry::Registry;

/// The trust bundle compilation hands to proxies (TRUST): the CA's trust domain and its root
/// certificates (two during a root rotation). Set by the CA through
/// [`crate::state::ControlPlane::set_trust`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots_pem: Vec<String>,
}

impl Default for TrustBundle {
    fn default() -> Self {
        Self {
            trust_domain: policy::DEFAULT_TRUST_DOMAIN.to_owned(),
            roots_pem: Vec::new(),
        }
    }
}

/// Name of the local app's cluster and of the inbound listener.
pub const INBOUND: &str = "inbound";
/// Name of the outbound HTTP listener and of its route table.
pub const OUTBOUND: &str = "outbound";

/// Every resource of one proxy, each set carrying its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub listeners: ListenerSet,
    pub routes: RouteSet,
    pub clusters: ClusterSet,
    pub endpoints: EndpointSet,
    /// The authorization policy guarding the proxy's own service (at most one).
    pub policies: AuthorizationSet,
    pub trust: TrustSet,
}

impl Resources {
    /// (type, version) of each set.
    pub fn versions(&self) -> [(ResourceType, &str); 6] {
        [
            (ResourceType::Listeners, self.listeners.version.as_str()),
            (ResourceType::Routes, self.routes.version.as_str()),
            (ResourceType::Clusters, self.clusters.version.as_str()),
            (ResourceType::Endpoints, self.endpoints.version.as_str()),
            (ResourceType::Policies, self.policies.version.as_str()),
            (ResourceType::Trust, self.trust.version.as_str()),
        ]
    }
}

/// The short lower-case name of a resource type, for metrics and JSON.
pub fn type_name(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Listeners => "listeners",
        ResourceType::Routes => "routes",
        ResourceType::Clusters => "clusters",
        ResourceType::Endpoints => "endpoints",
        ResourceType::Policies => "policies",
        ResourceType::Trust => "trust",
        ResourceType::Unspecified => "unspecified",
    }
}

/// Compiles the resources of the proxy `node`: its scope's shared part ([`compile_scope`]) and
/// its own ([`assemble`]).
pub fn compile(
    policy: &PolicySet,
    registry: &Registry,
    trust: &TrustBundle,
    node: &Node,
) -> Resources {
    let scope = compile_scope(policy, registry, trust, &scope_of(node));
    assemble(policy, registry, &scope, node)
}

/// The scope of `node`: its service and namespace.
pub fn scope_of(node: &Node) -> ServiceKey {
    let namespace = if node.namespace.is_empty() {
        "default"
    } else {
        node.namespace.as_str()
    };
    ServiceKey::new(&node.service, namespace)
}

/// The resources of `node` from its scope's shared ones: its listeners (its addresses, its log
/// level), its `inbound` endpoint (its app address), and zone preferences (its zone label).
/// Versions are hashes of what differs per node combined with the scope's, so this costs
/// time proportional to the node's own part plus copying the shared sets.
pub fn assemble(
    policy: &PolicySet,
    registry: &Registry,
    scope: &ScopeResources,
    node: &Node,
) -> Resources {
    assemble_with(&Inputs::new(policy, registry), registry, scope, node)
}

/// [`assemble`], with the reads of the policy set it made (which the node's own part depends
/// on besides its scope: see `crate::push`).
pub fn assemble_recorded(
    policy: &PolicySet,
    registry: &Registry,
    scope: &ScopeResources,
    node: &Node,
) -> (Resources, ScopeInputs) {
    let inputs = Inputs::recording(policy, registry);
    let resources = assemble_with(&inputs, registry, scope, node);
    (resources, inputs.finish())
}

fn assemble_with(
    inputs: &Inputs<'_>,
    registry: &Registry,
    scope: &ScopeResources,
    node: &Node,
) -> Resources {
    let local = inputs.service(&scope.service);
    let tcp: Vec<&Service> = scope
        .tcp_services
        .iter()
        .filter_map(|k| inputs.service(k))
        .collect();
    let listeners = compile_listeners(inputs, node, local, &tcp, scope.authorization.as_deref());
    let log_level = registry
        .get(&node.id)
        .and_then(|p| p.log_level.clone())
        .unwrap_or_default();
    let mut h = StableHasher::new();
    h.write_field(version_of_messages(&listeners).as_bytes());
    h.write_field(log_level.as_bytes());
    let listeners = ListenerSet {
        version: h.finish_hex(),
        listeners,
        log_level,
    };

    let mut clusters = scope.clusters.clone();
    if scope.locality {
        let mut patched = false;
        for c in &mut clusters.clusters {
            let service = ServiceKey::new(&c.service, &c.namespace);
            if let Some(s) = inputs.service(&service) {
                c.locality = traffic::locality(s, node);
                patched |= c.locality.is_some();
            }
        }
        if patched {
            clusters.version = version_of_messages(&clusters.clusters);
        }
    }

    // Transparent nodes: a cluster per app port, for captured inbound connections.
    let (port_clusters, port_endpoints) = transparent::inbound_port_clusters(
        node,
        clusters.clusters.iter().find(|c| c.name == INBOUND),
    );
    if !port_clusters.is_empty() {
        clusters.clusters.extend(port_clusters);
        clusters.clusters.sort_by(|a, b| a.name.cmp(&b.name));
        clusters.version = version_of_messages(&clusters.clusters);
    }
    let inbound = ClusterEndpoints {
        cluster: INBOUND.to_owned(),
        endpoints: if node.app_address.is_empty() {
            Vec::new()
        } else {
            vec![Endpoint {
                address: node.app_address.clone(),
                weight: 1,
                ..Default::default()
            }]
        },
    };
    let mut h = StableHasher::new();
    h.write_field(scope.endpoints_version.as_bytes());
    h.write_field(&inbound.encode_to_vec());
    for e in &port_endpoints {
        h.write_field(&e.encode_to_vec());
    }
    let version = h.finish_hex();
    let mut sets = scope.endpoints.clone();
    for set in std::iter::once(inbound).chain(port_endpoints) {
        let at = sets.partition_point(|e| e.cluster < set.cluster);
        sets.insert(at, set);
    }
    Resources {
        listeners,
        routes: scope.routes.clone(),
        clusters,
        endpoints: EndpointSet {
            version,
            clusters: sets,
        },
        policies: scope.policies.clone(),
        trust: scope.trust.clone(),
    }
}

/// A service's idle timeout (the default 60s for a service the policy does not know).
fn idle_timeout_of(service: Option<&Service>) -> std::time::Duration {
    service.map_or(std::time::Duration::from_secs(60), |s| s.idle_timeout)
}

/// The cluster of a mesh service, as every proxy that may call it receives it. `mtls` is the
/// service's effective inbound mode: a caller originates mTLS to its endpoints that have an
/// identity unless it is `DISABLED`.
pub fn service_cluster(policy: &PolicySet, s: &Service) -> Cluster {
    let registry = Registry::new(std::time::Duration::ZERO);
    cluster_of(&Inputs::new(policy, &registry), s)
}

/// [`service_cluster`], reading through `inputs`.
fn cluster_of(inputs: &Inputs<'_>, s: &Service) -> Cluster {
    Cluster {
        name: key_of(s).cluster_name(),
        service: s.name.clone(),
        namespace: s.namespace.clone(),
        lb: resilience::lb(s.lb) as i32,
        connect_timeout_ms: millis(s.connect_timeout),
        request_timeout_ms: millis(s.request_timeout),
        protocol: traffic::upstream_protocol(s) as i32,
        hash: resilience::hash(s),
        breaker: Some(resilience::breaker(&s.circuit_breaker)),
        outlier: resilience::outlier(&s.outlier_detection),
        health_check: resilience::health_check(s),
        idle_timeout_ms: millis(s.idle_timeout),
        mtls: authz::mtls(inputs.mtls_of(Some(s))) as i32,
        upstream_tls: traffic::upstream_tls(s),
        locality: None,
        dns_endpoints: traffic::dns_endpoints(s),
        vip: inputs
            .vip_of(&key_of(s))
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        port: 0,
    }
}

fn key_of(s: &Service) -> ServiceKey {
    ServiceKey::new(&s.name, &s.namespace)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The services the local service may call, in declared order: its `dependencies`, or every
/// service when it declares none (or is unknown to the policy set).
fn callable_services<'a>(inputs: &Inputs<'a>, local: Option<&Service>) -> Vec<&'a Service> {
    match local.and_then(|s| s.dependencies.as_ref().map(|d| (s, d))) {
        Some((s, deps)) => {
            let keys: std::collections::HashSet<ServiceKey> = deps
                .iter()
                .filter_map(|d| inputs.resolve(d, Some(&s.namespace)))
                .collect();
            inputs.services_in_order(&keys)
        }
        None => inputs.services().iter().collect(),
    }
}

/// The routes attached to each of `services` (per service, in declared order), from the set's
/// index: no scan over every route.
fn routes_of_services<'a>(
    inputs: &Inputs<'a>,
    services: &[&Service],
) -> impl Iterator<Item = &'a policy::Route> {
    services
        .iter()
        .flat_map(|s| inputs.routes_of(&key_of(s)))
        .collect::<Vec<_>>()
        .into_iter()
}

/// Outbound listeners accept the local app's plaintext (`mtls: DISABLED`, no authorization);
/// the inbound listener carries the local service's mTLS mode, rate limit and authorization.
fn compile_listeners(
    inputs: &Inputs<'_>,
    node: &Node,
    local: Option<&Service>,
    callable: &[&Service],
    authorization: Option<&str>,
) -> Vec<Listener> {
    let mut listeners = Vec::new();
    let idle_timeout_ms = millis(idle_timeout_of(local));
    let detection = transparent::detection(inputs, node);
    let captured = detection.is_some();
    if !node.outbound_address.is_empty() {
        listeners.push(Listener {
            name: OUTBOUND.to_owned(),
            address: node.outbound_address.clone(),
            direction: Direction::Outbound as i32,
            protocol: ListenerProtocol::Http as i32,
            route_table: OUTBOUND.to_owned(),
            cluster: String::new(),
            mtls: MtlsMode::Disabled as i32,
            idle_timeout_ms,
            hygiene: authz::hygiene(inputs),
            egress: traffic::egress(inputs),
            captured,
            detection: detection.clone(),
            ..Default::default()
        });
    }
    if !node.inbound_address.is_empty() {
        let tcp = local.is_some_and(|s| s.protocol == Protocol::Tcp);
        listeners.push(Listener {
            name: INBOUND.to_owned(),
            address: node.inbound_address.clone(),
            direction: Direction::Inbound as i32,
            protocol: if tcp {
                ListenerProtocol::Tcp
            } else {
                ListenerProtocol::Http
            } as i32,
            route_table: String::new(),
            cluster: INBOUND.to_owned(),
            mtls: authz::mtls(inputs.mtls_of(local)) as i32,
            rate_limit: local
                .and_then(|s| s.rate_limit.as_ref())
                .map(resilience::rate_limit),
            idle_timeout_ms,
            authorization: authorization.unwrap_or_default().to_owned(),
            hygiene: if tcp { None } else { authz::hygiene(inputs) },
            egress: None,
            captured,
            detection,
        });
    }
    let bind_ip = tcp_bind_ip(node);
    for s in callable.iter().filter(|s| s.protocol == Protocol::Tcp) {
        let Some(port) = s.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let cluster = key_of(s).cluster_name();
        listeners.push(Listener {
            name: format!("outbound-tcp-{cluster}"),
            address: SocketAddr::new(bind_ip, port).to_string(),
            direction: Direction::Outbound as i32,
            protocol: ListenerProtocol::Tcp as i32,
            route_table: String::new(),
            cluster,
            mtls: MtlsMode::Disabled as i32,
            idle_timeout_ms: millis(s.idle_timeout),
            ..Default::default()
        });
    }
    listeners.sort_by(|a, b| a.name.cmp(&b.name));
    listeners
}

/// The node's `tcp_bind_ip`, else the IP of its outbound listener, else loopback.
fn tcp_bind_ip(node: &Node) -> IpAddr {
    node.tcp_bind_ip
        .parse::<IpAddr>()
        .ok()
        .or_else(|| {
            node.outbound_address
                .parse::<SocketAddr>()
                .ok()
                .map(|a| a.ip())
        })
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Host names of a service: the standard four plus every extra host of its routes.
fn service_hosts(inputs: &Inputs<'_>, service: &Service) -> Vec<String> {
    let (n, ns) = (&service.name, &service.namespace);
    let mut hosts = vec![
        n.clone(),
        format!("{n}.{ns}"),
        format!("{n}.{ns}.svc"),
        format!("{n}.{ns}.svc.cluster.local"),
    ];
    // An external service is also called by its own name (`api.stripe.com`).
    for e in &service.endpoints {
        if let Some(h) = &e.host {
            push_unique(&mut hosts, h.to_ascii_lowercase());
        }
    }
    for route in routes_of_services(inputs, &[service]) {
        for h in &route.hosts {
            push_unique(&mut hosts, h.to_ascii_lowercase());
        }
    }
    hosts
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn compile_route_table(inputs: &Inputs<'_>, callable: &[&Service]) -> RouteTable {
    let default_retry = policy::RetryPolicy::default();
    let mut routes = Vec::new();
    for service in callable.iter().filter(|s| s.protocol != Protocol::Tcp) {
        // A route's `hosts` are extra names of its service: every route of the service (and its
        // default route) answers to all of them.
        let hosts = service_hosts(inputs, service);
        for route in routes_of_services(inputs, &[service]) {
            routes.push(compile_route(inputs, service, route, hosts.clone()));
        }
        let cluster = key_of(service).cluster_name();
        routes.push(Route {
            name: format!("default-{cluster}"),
            r#match: Some(RouteMatch {
                hosts,
                path: None,
                headers: Vec::new(),
                methods: Vec::new(),
                query: Vec::new(),
            }),
            destinations: vec![WeightedCluster {
                cluster,
                weight: 100,
            }],
            timeout_ms: 0,
            retry: Some(resilience::retry(
                service.retry.as_ref().unwrap_or(&default_retry),
            )),
            rate_limit: None,
            filters: traffic::external_host(service).map(|host| weft_proto::v1::RouteFilters {
                rewrite_host: host,
                ..Default::default()
            }),
        });
    }
    RouteTable {
        name: OUTBOUND.to_owned(),
        routes,
    }
}

fn compile_route(
    inputs: &Inputs<'_>,
    service: &Service,
    route: &policy::Route,
    hosts: Vec<String>,
) -> Route {
    let m = route.matcher.clone().unwrap_or_default();
    let path = m.path.as_ref().map(authz::path);
    let query = traffic::query(&m);
    let headers = m
        .headers
        .into_iter()
        .map(|h| {
            let mut invert = h.invert;
            let kind = if let Some(e) = h.exact {
                Some(header_match::Kind::Exact(e))
            } else if let Some(r) = h.regex {
                Some(header_match::Kind::Regex(r))
            } else {
                // `present: false` is "absent": present, inverted.
                h.present.map(|p| {
                    if !p {
                        invert = !invert;
                    }
                    header_match::Kind::Present(true)
                })
            };
            HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                kind,
                invert,
            }
        })
        .collect();
    let single = route.destinations.len() == 1;
    let destinations = route
        .destinations
        .iter()
        .filter_map(|d| {
            let key = inputs.resolve(&d.service, Some(&service.namespace))?;
            Some(WeightedCluster {
                cluster: if d.subset.is_empty() {
                    key.cluster_name()
                } else {
                    traffic::subset_cluster_name(&key, &d.subset)
                },
                weight: if single { 100 } else { d.weight.unwrap_or(0) },
            })
        })
        .collect();
    Route {
        name: route.name.clone(),
        r#match: Some(RouteMatch {
            hosts,
            path,
            headers,
            methods: m.methods.iter().map(|x| x.to_ascii_uppercase()).collect(),
            query,
        }),
        destinations,
        timeout_ms: route.timeout.map_or(0, millis),
        retry: Some(resilience::retry(
            route
                .retry
                .as_ref()
                .or(service.retry.as_ref())
                .unwrap_or(&policy::RetryPolicy::default()),
        )),
        rate_limit: route.rate_limit.as_ref().map(resilience::rate_limit),
        filters: traffic::filters(inputs, service, route),
    }
}

/// The endpoints of a service: static ones (declared order, plaintext: no identity) then
/// registered sidecars (by node id, including those within their deregistration grace), whose
/// identity is the service's SPIFFE ID in `trust_domain`.
pub fn endpoints_of(service: &Service, inputs: &Inputs<'_>, trust_domain: &str) -> Vec<Endpoint> {
    let key = key_of(service);
    // Endpoints by DNS name travel in the cluster (`dns_endpoints`): each sidecar resolves them.
    let mut out: Vec<Endpoint> = service
        .endpoints
        .iter()
        .filter(|e| e.host.is_none())
        .map(|e| Endpoint {
            address: e.address.clone(),
            weight: e.weight,
            proxy_id: String::new(),
            labels: Default::default(),
            ..Default::default()
        })
        .collect();
    let identity = spiffe_id(trust_domain, &key.namespace, &key.name);
    out.extend(inputs.registrations(&key).into_iter().map(|p| Endpoint {
        address: p.node.inbound_address.clone(),
        weight: 1,
        proxy_id: p.node.id.clone(),
        labels: p.node.labels.clone(),
        identity: identity.clone(),
    }));
    out
}

fn version_of_messages<M: Message>(items: &[M]) -> String {
    let mut h = StableHasher::new();
    for item in items {
        h.write_field(&item.encode_to_vec());
    }
    h.finish_hex()
}

/// Like [`version_of_messages`], but endpoint labels (a hash map, whose encoding order varies)
/// are hashed in sorted order.
fn version_of_endpoints(sets: &[ClusterEndpoints]) -> String {
    let mut h = StableHasher::new();
    for set in sets {
        hash_cluster_endpoints(&mut h, set);
    }
    h.finish_hex()
}

/// Feeds one cluster's endpoints to `h`, labels in sorted order: the unit of
/// [`version_of_endpoints`], and of the per-cluster digests endpoint deltas are computed from
/// ([`crate::push::delta`]).
pub(crate) fn hash_cluster_endpoints(h: &mut StableHasher, set: &ClusterEndpoints) {
    h.write_field(set.cluster.as_bytes());
    h.write(&(set.endpoints.len() as u64).to_le_bytes());
    for e in &set.endpoints {
        let mut without_labels = e.clone();
        without_labels.labels.clear();
        h.write_field(&without_labels.encode_to_vec());
        let labels: BTreeMap<&String, &String> = e.labels.iter().collect();
        h.write(&(labels.len() as u64).to_le_bytes());
        for (k, v) in labels {
            h.write_field(k.as_bytes());
            h.write_field(v.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_patch;
#[cfg(test)]
mod tests_resilience;
#[cfg(test)]
mod tests_security;
#[cfg(test)]
mod tests_traffic;
#[cfg(test)]
mod tests_transparent;
