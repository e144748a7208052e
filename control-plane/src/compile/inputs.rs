//! What compilation reads, and the record of it that makes a compiled scope's freshness exact.
//!
//! Compilation sees the policy set and the registry only through [`Inputs`]: its fields are
//! private to this module, so no compile helper can read the policy any other way. While a
//! scope compiles ([`super::compile_scope_recorded`]) every read is logged as a [`Read`]; the
//! log is the scope's fingerprint ([`ScopeInputs`]). A compiled scope is still valid under a new
//! policy set exactly when every logged read answers the same there ([`ScopeInputs::unchanged`]):
//! compilation is a pure function of the answers to its reads, and which reads it makes depends
//! only on earlier answers, so equal answers mean an equal output. Registrations are read per
//! service ([`Read::Registrations`]) and checked against the registry's per-service versions.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};

use crate::policy::transparent::ProtocolDetection;
use crate::policy::{
    AuthorizationPolicy, AuthzAction, Egress, HttpHygiene, MtlsMode, PolicySet, Route, Service,
    ServiceKey, StaticEndpoint,
};
use crate::registry::{RegisteredProxy, Registry};

/// A mesh-wide setting compilation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeshField {
    TrustDomain,
    Mtls,
    Http,
    Egress,
    ProtocolDetection,
}

/// One read of the policy set or the registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Read {
    /// A mesh-wide setting.
    Mesh(MeshField),
    /// `mesh.namespaces[ns]`'s default authorization action.
    NamespaceDefault(String),
    /// Every service, in declared order (a scope without `dependencies:`).
    Services,
    /// One service's definition (or its absence).
    Service(ServiceKey),
    /// The declared order of these services (each also read as [`Read::Service`]).
    Order(Vec<ServiceKey>),
    /// The routes attached to a service, in declared order.
    RoutesOf(ServiceKey),
    /// The authorization policy guarding a service.
    AuthorizationOf(ServiceKey),
    /// A service reference resolved in a namespace context.
    Resolve(String, Option<String>),
    /// A service's virtual IP.
    Vip(ServiceKey),
    /// The registrations (endpoints) of a service.
    Registrations(ServiceKey),
}

/// The policy set and registry as compilation reads them, optionally logging every read.
pub struct Inputs<'a> {
    policy: &'a PolicySet,
    registry: &'a Registry,
    log: Option<RefCell<HashSet<Read>>>,
}

impl<'a> Inputs<'a> {
    /// A view that logs nothing (per-node assembly, read-only views).
    pub fn new(policy: &'a PolicySet, registry: &'a Registry) -> Self {
        Self {
            policy,
            registry,
            log: None,
        }
    }

    /// A view that logs every read ([`Inputs::finish`] hands the log back).
    pub fn recording(policy: &'a PolicySet, registry: &'a Registry) -> Self {
        Self {
            policy,
            registry,
            log: Some(RefCell::new(HashSet::new())),
        }
    }

    /// The reads logged, sorted (empty when not recording).
    pub fn finish(self) -> ScopeInputs {
        let mut reads: Vec<Read> = self
            .log
            .map(|l| l.into_inner().into_iter().collect())
            .unwrap_or_default();
        reads.sort();
        ScopeInputs {
            reads,
            registrations: Vec::new(),
        }
    }

    fn record(&self, read: Read) {
        if let Some(log) = &self.log {
            log.borrow_mut().insert(read);
        }
    }

    /// `mesh.trust_domain`.
    pub fn mesh_trust_domain(&self) -> Option<&'a str> {
        self.record(Read::Mesh(MeshField::TrustDomain));
        self.policy.mesh().trust_domain.as_deref()
    }

    /// `mesh.http`.
    pub fn mesh_http(&self) -> HttpHygiene {
        self.record(Read::Mesh(MeshField::Http));
        self.policy.mesh().http
    }

    /// `mesh.egress`.
    pub fn mesh_egress(&self) -> &'a Egress {
        self.record(Read::Mesh(MeshField::Egress));
        &self.policy.mesh().egress
    }

    /// `mesh.protocol_detection`.
    pub fn mesh_protocol_detection(&self) -> &'a ProtocolDetection {
        self.record(Read::Mesh(MeshField::ProtocolDetection));
        &self.policy.mesh().protocol_detection
    }

    /// [`PolicySet::mtls_of`]: the service's own mode (part of its definition), else `mesh.mtls`.
    pub fn mtls_of(&self, service: Option<&Service>) -> MtlsMode {
        match service.and_then(|s| s.mtls) {
            Some(mode) => mode,
            None => {
                self.record(Read::Mesh(MeshField::Mtls));
                self.policy.mesh().mtls
            }
        }
    }

    /// [`PolicySet::namespace_default`].
    pub fn namespace_default(&self, namespace: &str) -> AuthzAction {
        self.record(Read::NamespaceDefault(namespace.to_owned()));
        self.policy.namespace_default(namespace)
    }

    /// Every service, in declared order.
    pub fn services(&self) -> &'a [Service] {
        self.record(Read::Services);
        self.policy.services()
    }

    /// The service `key`.
    pub fn service(&self, key: &ServiceKey) -> Option<&'a Service> {
        self.record(Read::Service(key.clone()));
        self.policy.service(key)
    }

    /// The services of `keys` that exist, in declared order.
    pub fn services_in_order(&self, keys: &HashSet<ServiceKey>) -> Vec<&'a Service> {
        let mut found: Vec<&'a Service> = keys.iter().filter_map(|k| self.service(k)).collect();
        found.sort_by_key(|s| position(self.policy, s));
        self.record(Read::Order(
            found
                .iter()
                .map(|s| ServiceKey::new(&s.name, &s.namespace))
                .collect(),
        ));
        found
    }

    /// [`PolicySet::resolve`].
    pub fn resolve(&self, reference: &str, context_namespace: Option<&str>) -> Option<ServiceKey> {
        self.record(Read::Resolve(
            reference.to_owned(),
            context_namespace.map(str::to_owned),
        ));
        self.policy.resolve(reference, context_namespace)
    }

    /// [`PolicySet::routes_of`].
    pub fn routes_of(&self, key: &ServiceKey) -> Vec<&'a Route> {
        self.record(Read::RoutesOf(key.clone()));
        self.policy.routes_of(key).collect()
    }

    /// [`PolicySet::authorization_of`].
    pub fn authorization_of(&self, key: &ServiceKey) -> Option<&'a AuthorizationPolicy> {
        self.record(Read::AuthorizationOf(key.clone()));
        self.policy.authorization_of(key)
    }

    /// [`PolicySet::vip_of`].
    pub fn vip_of(&self, key: &ServiceKey) -> Option<std::net::IpAddr> {
        self.record(Read::Vip(key.clone()));
        self.policy.vip_of(key)
    }

    /// [`Registry::endpoints_of`]: the registered sidecars of `key`.
    pub fn registrations(&self, key: &ServiceKey) -> Vec<&'a RegisteredProxy> {
        self.record(Read::Registrations(key.clone()));
        self.registry.endpoints_of(key).collect()
    }
}

/// Where `s` (a service of `policy`) stands in its declared order.
fn position(policy: &PolicySet, s: &Service) -> usize {
    let base = policy.services().as_ptr() as usize;
    (s as *const Service as usize).saturating_sub(base) / std::mem::size_of::<Service>().max(1)
}

/// What one scope's compilation read: its fingerprint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScopeInputs {
    /// Every read, sorted, deduplicated.
    pub reads: Vec<Read>,
    /// `(service, registration version)` of each [`Read::Registrations`] at compile time.
    pub registrations: Vec<(ServiceKey, u64)>,
}

impl ScopeInputs {
    /// The services whose registrations the scope holds, sorted.
    pub fn depends_on(&self) -> Vec<ServiceKey> {
        self.reads
            .iter()
            .filter_map(|r| match r {
                Read::Registrations(k) => Some(k.clone()),
                _ => None,
            })
            .collect()
    }

    /// Adds `other`'s reads (kept sorted and deduplicated).
    pub fn merge(&mut self, other: ScopeInputs) {
        if other
            .reads
            .iter()
            .all(|r| self.reads.binary_search(r).is_ok())
        {
            return;
        }
        self.reads.extend(other.reads);
        self.reads.sort();
        self.reads.dedup();
    }

    /// Whether every read answers the same in `new` as in `old` (registrations aside).
    pub fn unchanged(&self, old: &PolicySet, new: &PolicySet) -> bool {
        self.reads.iter().all(|r| read_unchanged(r, old, new))
    }

    /// The services whose definitions read answer differently in `new` than in `old` in their
    /// static endpoints only, when every other read answers the same (else `None`): what an
    /// endpoint patch recomputes ([`super::patch`]). "Only" includes what compilation derives
    /// from the endpoints besides the endpoints themselves: whether there are any (the
    /// upstream protocol's default) and the endpoints by DNS name (in the cluster, and names of
    /// the service) must stay as they are. Registrations are not checked here.
    pub fn endpoint_changes(
        &self,
        old: &PolicySet,
        new: &PolicySet,
    ) -> Option<BTreeSet<ServiceKey>> {
        let mut changed = BTreeSet::new();
        // Set once every service was compared in declared order (`Read::Services` sorts before
        // any `Read::Service`): the two lists then hold the same keys pairwise, so each
        // service's definitions were compared already.
        let mut all_compared = false;
        for read in &self.reads {
            match read {
                Read::Service(_) if all_compared => {}
                Read::Service(k) => match (old.service(k), new.service(k)) {
                    (Some(a), Some(b)) if a != b => {
                        if !endpoints_only(a, b) {
                            return None;
                        }
                        changed.insert(k.clone());
                    }
                    (a, b) if a == b => {}
                    _ => return None,
                },
                Read::Services => {
                    let (a, b) = (old.services(), new.services());
                    if a.len() != b.len() {
                        return None;
                    }
                    for (a, b) in a.iter().zip(b) {
                        if a != b {
                            if !endpoints_only(a, b) {
                                return None;
                            }
                            changed.insert(ServiceKey::new(&b.name, &b.namespace));
                        }
                    }
                    all_compared = true;
                }
                other => {
                    if !read_unchanged(other, old, new) {
                        return None;
                    }
                }
            }
        }
        Some(changed)
    }

    /// Whether the registrations read are at the versions they were compiled at.
    pub fn registrations_unchanged(&self, registry: &Registry) -> bool {
        self.registrations
            .iter()
            .all(|(s, v)| registry.service_version(s) == *v)
    }
}

/// Whether `a` and `b` (definitions of one service) differ at most in their static endpoints by
/// address, without one set of them being empty and the other not. Every field is named, so a
/// new one must be placed on one side or the other.
fn endpoints_only(a: &Service, b: &Service) -> bool {
    let Service {
        name,
        namespace,
        protocol,
        port,
        lb,
        connect_timeout,
        request_timeout,
        dependencies,
        endpoints,
        hash,
        circuit_breaker,
        outlier_detection,
        health_check,
        idle_timeout,
        retry,
        rate_limit,
        mtls,
        upstream_protocol,
        tls,
        locality,
        vip,
    } = a;
    let by_dns = |e: &&StaticEndpoint| e.host.is_some();
    *name == b.name
        && *namespace == b.namespace
        && *protocol == b.protocol
        && *port == b.port
        && *lb == b.lb
        && *connect_timeout == b.connect_timeout
        && *request_timeout == b.request_timeout
        && *dependencies == b.dependencies
        && endpoints.is_empty() == b.endpoints.is_empty()
        && endpoints
            .iter()
            .filter(by_dns)
            .eq(b.endpoints.iter().filter(by_dns))
        && *hash == b.hash
        && *circuit_breaker == b.circuit_breaker
        && *outlier_detection == b.outlier_detection
        && *health_check == b.health_check
        && *idle_timeout == b.idle_timeout
        && *retry == b.retry
        && *rate_limit == b.rate_limit
        && *mtls == b.mtls
        && *upstream_protocol == b.upstream_protocol
        && *tls == b.tls
        && *locality == b.locality
        && *vip == b.vip
}

fn read_unchanged(read: &Read, old: &PolicySet, new: &PolicySet) -> bool {
    let (a, b) = (old.mesh(), new.mesh());
    match read {
        Read::Mesh(MeshField::TrustDomain) => a.trust_domain == b.trust_domain,
        Read::Mesh(MeshField::Mtls) => a.mtls == b.mtls,
        Read::Mesh(MeshField::Http) => a.http == b.http,
        Read::Mesh(MeshField::Egress) => a.egress == b.egress,
        Read::Mesh(MeshField::ProtocolDetection) => a.protocol_detection == b.protocol_detection,
        Read::NamespaceDefault(ns) => old.namespace_default(ns) == new.namespace_default(ns),
        Read::Services => old.services() == new.services(),
        Read::Service(k) => old.service(k) == new.service(k),
        Read::Order(keys) => {
            let mut found: Vec<&Service> = keys.iter().filter_map(|k| new.service(k)).collect();
            found.sort_by_key(|s| position(new, s));
            found.len() == keys.len()
                && found
                    .iter()
                    .zip(keys)
                    .all(|(s, k)| s.name == k.name && s.namespace == k.namespace)
        }
        Read::RoutesOf(k) => old.routes_of(k).eq(new.routes_of(k)),
        Read::AuthorizationOf(k) => old.authorization_of(k) == new.authorization_of(k),
        Read::Resolve(r, ns) => old.resolve(r, ns.as_deref()) == new.resolve(r, ns.as_deref()),
        Read::Vip(k) => old.vip_of(k) == new.vip_of(k),
        // Checked against the registry's versions.
        Read::Registrations(_) => true,
    }
}
