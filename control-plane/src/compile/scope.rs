//! The part of a proxy's resources every proxy of its service shares: its route table, clusters,
//! endpoints (but its own `inbound` one), authorization policy and trust set. Compiled once per
//! scope (service and namespace) and reused for every proxy of it (see `crate::push`), so a
//! change costs one compilation per affected scope instead of one per proxy; a change in
//! endpoints alone not even that: the cached scope is patched ([`super::patch`]).

use std::collections::BTreeMap;

use weft_proto::v1::{
    Cluster, ClusterEndpoints, ClusterSet, Endpoint, LbPolicy, MtlsMode,
    PolicySet as AuthorizationSet, RouteSet, TrustSet, UpstreamProtocol,
};

use super::{
    authz, callable_services, cluster_of, compile_route_table, endpoints_of, idle_timeout_of,
    key_of, millis, routes_of_services, traffic, transparent, version_of_endpoints,
    version_of_messages, Inputs, ScopeInputs, TrustBundle, INBOUND,
};
use crate::policy::{PolicySet, Protocol, Service, ServiceKey};
use crate::registry::Registry;

/// What every proxy of `service` receives alike.
#[derive(Debug, Clone, PartialEq)]
pub struct ScopeResources {
    pub service: ServiceKey,
    pub routes: RouteSet,
    /// Every cluster, `inbound` included (it depends on the local service only); no zone
    /// preference yet (per node: [`super::assemble`]).
    pub clusters: ClusterSet,
    /// Every cluster's endpoints but `inbound`'s (the node's app address), sorted by cluster.
    pub endpoints: Vec<ClusterEndpoints>,
    /// Hash of `endpoints`.
    pub endpoints_version: String,
    pub policies: AuthorizationSet,
    pub trust: TrustSet,
    /// The authorization policy guarding the service, if any.
    pub authorization: Option<String>,
    /// The tcp services it may call (their outbound listeners are per node).
    pub tcp_services: Vec<ServiceKey>,
    /// Whether a cluster prefers its caller's zone (per-node patch needed).
    pub locality: bool,
    /// The services whose registrations these resources hold (clusters' endpoints): a change
    /// to any other service's registrations leaves them as they are. Derived from the reads
    /// the compilation made ([`ScopeInputs::depends_on`]).
    pub depends_on: Vec<ServiceKey>,
    /// The subset clusters, by name: what their endpoints are selected from, so an endpoint
    /// change can be patched in ([`super::patch`]).
    pub subsets: Vec<SubsetCluster>,
}

/// A subset cluster: the endpoints of `service` carrying every one of `labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubsetCluster {
    pub cluster: String,
    pub service: ServiceKey,
    pub labels: BTreeMap<String, String>,
}

impl SubsetCluster {
    /// The endpoints of `all` (the service's) this subset holds.
    pub fn select(&self, all: Vec<Endpoint>) -> Vec<Endpoint> {
        select(&self.labels, all)
    }
}

fn select(labels: &BTreeMap<String, String>, all: Vec<Endpoint>) -> Vec<Endpoint> {
    all.into_iter()
        .filter(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
        .collect()
}

/// Compiles the shared resources of the proxies of `service`.
pub fn compile_scope(
    policy: &PolicySet,
    registry: &Registry,
    trust: &TrustBundle,
    service: &ServiceKey,
) -> ScopeResources {
    compile_scope_recorded(policy, registry, trust, service).0
}

/// [`compile_scope`], with every read of the policy set and the registry it made: the
/// scope's fingerprint (see [`super::inputs`]). The trust bundle is read whole.
pub fn compile_scope_recorded(
    policy: &PolicySet,
    registry: &Registry,
    trust: &TrustBundle,
    service: &ServiceKey,
) -> (ScopeResources, ScopeInputs) {
    let inputs = Inputs::recording(policy, registry);
    let mut resources = compile(&inputs, trust, service);
    let mut read = inputs.finish();
    read.registrations = read
        .depends_on()
        .into_iter()
        .map(|s| {
            let version = registry.service_version(&s);
            (s, version)
        })
        .collect();
    resources.depends_on = read.depends_on();
    (resources, read)
}

fn compile(inputs: &Inputs<'_>, trust: &TrustBundle, service: &ServiceKey) -> ScopeResources {
    let local = inputs.service(service);
    let callable = callable_services(inputs, local);
    let trust_domain = authz::trust_domain(inputs, trust);
    let authorization = authz::policy_for(inputs, service, trust_domain);
    let table = compile_route_table(inputs, &callable);

    // Clusters: callable services, every destination (and mirror) of their routes, subsets of
    // those, and `inbound`.
    let mut cluster_services: BTreeMap<String, &Service> = BTreeMap::new();
    let mut subsets: BTreeMap<String, (&Service, &BTreeMap<String, String>)> = BTreeMap::new();
    for s in &callable {
        cluster_services.insert(key_of(s).cluster_name(), s);
    }
    for route in routes_of_services(inputs, &callable) {
        let ns = inputs
            .resolve(&route.service, None)
            .map(|k| k.namespace)
            .unwrap_or_default();
        let resolve = |name: &str| {
            inputs
                .resolve(name, Some(&ns))
                .and_then(|k| inputs.service(&k))
        };
        for d in &route.destinations {
            if let Some(s) = resolve(&d.service) {
                if d.subset.is_empty() {
                    cluster_services.insert(key_of(s).cluster_name(), s);
                } else {
                    subsets.insert(
                        traffic::subset_cluster_name(&key_of(s), &d.subset),
                        (s, &d.subset),
                    );
                }
            }
        }
        if let Some(mirror) = route.filters.as_ref().and_then(|f| f.mirror.as_ref()) {
            if let Some(s) = resolve(&mirror.service) {
                cluster_services.insert(key_of(s).cluster_name(), s);
            }
        }
    }

    let mut clusters: Vec<Cluster> = cluster_services
        .values()
        .map(|s| cluster_of(inputs, s))
        .chain(subsets.iter().map(|(name, (s, _))| Cluster {
            name: name.clone(),
            ..cluster_of(inputs, s)
        }))
        .collect();
    let locality = cluster_services
        .values()
        .chain(subsets.values().map(|(s, _)| s))
        .any(|s| s.locality.is_some());
    // Transparent mode: per-port clusters of the same services and their route tables.
    let base: BTreeMap<String, Cluster> = clusters
        .iter()
        .filter(|c| cluster_services.contains_key(&c.name))
        .map(|c| (c.name.clone(), c.clone()))
        .collect();
    let ports =
        transparent::port_resources(inputs, trust_domain, &cluster_services, &callable, &base);
    clusters.extend(ports.clusters);
    clusters.push(Cluster {
        name: INBOUND.to_owned(),
        service: String::new(),
        namespace: String::new(),
        lb: LbPolicy::RoundRobin as i32,
        connect_timeout_ms: local.map_or(1000, |s| millis(s.connect_timeout)),
        // The caller's sidecar enforces the request timeout.
        request_timeout_ms: 0,
        protocol: UpstreamProtocol::Preserve as i32,
        // The local app is plain and alone: no breaker, ejection or health checks.
        idle_timeout_ms: millis(idle_timeout_of(local)),
        mtls: MtlsMode::Disabled as i32,
        ..Default::default()
    });
    clusters.sort_by(|a, b| a.name.cmp(&b.name));

    let mut endpoints: Vec<ClusterEndpoints> = cluster_services
        .iter()
        .map(|(name, s)| ClusterEndpoints {
            cluster: name.clone(),
            endpoints: endpoints_of(s, inputs, trust_domain),
        })
        .chain(subsets.iter().map(|(name, (s, labels))| ClusterEndpoints {
            cluster: name.clone(),
            endpoints: select(labels, endpoints_of(s, inputs, trust_domain)),
        }))
        .chain(ports.endpoints)
        .collect();
    endpoints.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    let subsets: Vec<SubsetCluster> = subsets
        .into_iter()
        .map(|(cluster, (s, labels))| SubsetCluster {
            cluster,
            service: key_of(s),
            labels: labels.clone(),
        })
        .collect();

    let mut tables = vec![table];
    tables.extend(ports.tables);
    let authorization_name = authorization.as_ref().map(|p| p.name.clone());
    let policies: Vec<_> = authorization.into_iter().collect();
    let trust_set = TrustSet {
        version: String::new(),
        trust_domain: trust_domain.to_owned(),
        roots_pem: trust.roots_pem.clone(),
    };
    ScopeResources {
        service: service.clone(),
        routes: RouteSet {
            version: version_of_messages(&tables),
            tables,
        },
        clusters: ClusterSet {
            version: version_of_messages(&clusters),
            clusters,
        },
        endpoints_version: version_of_endpoints(&endpoints),
        endpoints,
        policies: AuthorizationSet {
            version: version_of_messages(&policies),
            policies,
        },
        trust: TrustSet {
            version: version_of_messages(std::slice::from_ref(&trust_set)),
            ..trust_set
        },
        authorization: authorization_name,
        tcp_services: callable
            .iter()
            .filter(|s| s.protocol == Protocol::Tcp)
            .map(|s| key_of(s))
            .collect(),
        locality,
        // Filled in from the reads by `compile_scope_recorded`.
        depends_on: Vec::new(),
        subsets,
    }
}
