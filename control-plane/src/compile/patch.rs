//! Patching a compiled scope for an endpoint-only change, instead of compiling it again.
//!
//! At mesh scale most changes touch endpoints alone: an apply that moves one static endpoint of
//! one service, a sidecar that registers or leaves. Compiling a scope holding thousands of
//! services again for that costs O(whole scope) (every cluster, route and endpoint); a patch
//! recomputes the endpoints of the clusters built from the changed services only (their plain
//! cluster, their subset clusters and their transparent per-port clusters) and the endpoint
//! set's version, and keeps everything else as compiled.
//!
//! A patch applies only when compiling again would give exactly the patched result
//! ([`EndpointPatch::plan`]): every read the scope's compilation recorded answers the same under
//! the new set, except definitions of services that differ in their static `endpoints` alone
//! (and not in what else compilation derives from them: whether there are any, which sets the
//! upstream protocol, or the endpoints by DNS name, which ride in the cluster and name the
//! service); and the registrations that changed leave the ports of each service's per-port
//! clusters as they are (a new port is a new cluster and route table). The reads such a
//! compilation makes are the same ones (none depends on an endpoint), so the recorded inputs
//! stay, with the registration versions moved forward. Anything else: `None`, compile.

use std::collections::BTreeSet;

use weft_proto::v1::{ClusterEndpoints, Endpoint};

use super::{
    authz, endpoints_of, transparent, version_of_endpoints, Inputs, ScopeInputs, ScopeResources,
    TrustBundle,
};
use crate::policy::{PolicySet, ServiceKey};
use crate::registry::Registry;

/// The services whose endpoints changed for a compiled scope, when patching it gives what a
/// compilation would (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPatch {
    services: BTreeSet<ServiceKey>,
}

impl EndpointPatch {
    /// The patch taking `scope`, compiled (with `inputs` recorded) under `old` and the
    /// registrations at the versions `inputs` holds, to what compiling it under `new` and
    /// `registry` gives; `None` when something besides endpoints may differ. The trust bundle
    /// must be the one the scope was compiled with.
    pub fn plan(
        old: &PolicySet,
        new: &PolicySet,
        registry: &Registry,
        scope: &ScopeResources,
        inputs: &ScopeInputs,
    ) -> Option<Self> {
        let mut services = inputs.endpoint_changes(old, new)?;
        let view = Inputs::new(new, registry);
        for (key, version) in &inputs.registrations {
            if registry.service_version(key) == *version {
                continue;
            }
            // The per-port clusters exist for services with a plain cluster only.
            if scope_has(scope, &key.cluster_name()) {
                let service = new.service(key)?;
                let now = transparent::ports_of(service, &view);
                if now != ports_held(scope, &key.cluster_name()) {
                    return None;
                }
            }
            services.insert(key.clone());
        }
        Some(Self { services })
    }

    /// Whether nothing changed for the scope (it is fresh as it is).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Applies the patch to `scope` and `inputs` (the planned ones) under `new`, `registry` and
    /// `trust` (the bundle the scope was compiled with).
    pub fn apply(
        &self,
        new: &PolicySet,
        registry: &Registry,
        trust: &TrustBundle,
        scope: &mut ScopeResources,
        inputs: &mut ScopeInputs,
    ) {
        let view = Inputs::new(new, registry);
        let trust_domain = authz::trust_domain(&view, trust);
        for key in &self.services {
            let Some(service) = new.service(key) else {
                continue;
            };
            let cluster = key.cluster_name();
            let all = endpoints_of(service, &view, trust_domain);
            for subset in scope.subsets.iter().filter(|s| s.service == *key) {
                let endpoints = subset.select(all.clone());
                set_endpoints(&mut scope.endpoints, &subset.cluster, endpoints);
            }
            let ports = ports_held(scope, &cluster);
            if !ports.is_empty() {
                let identity = crate::policy::spiffe_id(trust_domain, &key.namespace, &key.name);
                for port in ports {
                    let endpoints = transparent::port_endpoints(&view, key, port, &identity);
                    set_endpoints(
                        &mut scope.endpoints,
                        &transparent::port_cluster_name(&cluster, port),
                        endpoints,
                    );
                }
            }
            set_endpoints(&mut scope.endpoints, &cluster, all);
        }
        scope.endpoints_version = version_of_endpoints(&scope.endpoints);
        for (key, version) in &mut inputs.registrations {
            *version = registry.service_version(key);
        }
    }
}

/// Whether the scope holds endpoints of the cluster `name`.
fn scope_has(scope: &ScopeResources, name: &str) -> bool {
    scope
        .endpoints
        .binary_search_by(|e| e.cluster.as_str().cmp(name))
        .is_ok()
}

/// The ports of the per-port clusters `<cluster>:<port>` the scope holds (a cluster name has no
/// `:`, so the prefix is exactly those).
fn ports_held(scope: &ScopeResources, cluster: &str) -> BTreeSet<u32> {
    let prefix = format!("{cluster}:");
    let from = scope
        .endpoints
        .partition_point(|e| e.cluster.as_str() < prefix.as_str());
    scope.endpoints[from..]
        .iter()
        .map_while(|e| e.cluster.strip_prefix(&prefix))
        .filter_map(|port| port.parse().ok())
        .collect()
}

/// Replaces the endpoints of the cluster `name` (which the scope holds: the patch only touches
/// clusters a compilation made).
fn set_endpoints(sets: &mut [ClusterEndpoints], name: &str, endpoints: Vec<Endpoint>) {
    if let Ok(i) = sets.binary_search_by(|e| e.cluster.as_str().cmp(name)) {
        sets[i].endpoints = endpoints;
    }
}
