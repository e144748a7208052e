//! Compiling once per scope: the resources every proxy of a service shares
//! ([`crate::compile::ScopeResources`]) are compiled once and reused by each of its proxies'
//! discovery streams, and recompiled only when something they depend on changed: the policy set,
//! the trust bundle, or the registrations of a service whose endpoints they hold. A registry
//! change for `api` recompiles the scopes that call `api`, not every scope, and N proxies of one
//! service cost one compilation, not N.
//!
//! `weft_control_compilations_total{result=compiled|reused}` counts scope lookups by outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use prometheus::IntCounter;

use crate::compile::{compile_scope, ScopeResources, TrustBundle};
use crate::policy::{PolicySet, ServiceKey};
use crate::registry::Registry;

/// A compiled scope and what it was compiled from.
#[derive(Debug)]
struct Cached {
    policy: Arc<PolicySet>,
    trust: Arc<TrustBundle>,
    /// (service, registration version) for each service the scope holds endpoints of.
    registrations: Vec<(ServiceKey, u64)>,
    scope: Arc<ScopeResources>,
}

/// The scope cache of one control plane.
#[derive(Debug)]
pub struct ScopeCache {
    /// One slot per scope; a slot's lock is held while its scope compiles, so the proxies of a
    /// scope that wake together wait for one compilation instead of each doing it.
    slots: Mutex<HashMap<ServiceKey, Arc<Mutex<Option<Cached>>>>>,
    compiled: IntCounter,
    reused: IntCounter,
}

impl ScopeCache {
    pub fn new(compiled: IntCounter, reused: IntCounter) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            compiled,
            reused,
        }
    }

    /// The shared resources of `scope` under `policy`, `trust` and `registry`: the cached ones
    /// if nothing they depend on changed, else freshly compiled (and cached).
    pub fn get(
        &self,
        policy: &Arc<PolicySet>,
        trust: &Arc<TrustBundle>,
        registry: &Registry,
        scope: &ServiceKey,
    ) -> Arc<ScopeResources> {
        let slot = Arc::clone(
            self.slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(scope.clone())
                .or_default(),
        );
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = slot.as_ref() {
            let fresh = Arc::ptr_eq(&cached.policy, policy)
                && (Arc::ptr_eq(&cached.trust, trust) || *cached.trust == **trust)
                && cached
                    .registrations
                    .iter()
                    .all(|(service, version)| registry.service_version(service) == *version);
            if fresh {
                self.reused.inc();
                return Arc::clone(&cached.scope);
            }
        }
        let compiled = Arc::new(compile_scope(policy, registry, trust, scope));
        self.compiled.inc();
        *slot = Some(Cached {
            policy: Arc::clone(policy),
            trust: Arc::clone(trust),
            registrations: compiled
                .depends_on
                .iter()
                .map(|s| (s.clone(), registry.service_version(s)))
                .collect(),
            scope: Arc::clone(&compiled),
        });
        compiled
    }

    /// Drops the scopes no proxy asked for since `keep` was computed (bounded memory when
    /// services come and go).
    pub fn retain(&self, keep: impl Fn(&ServiceKey) -> bool) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keep(k));
    }
}

/// The policy and trust currently served, loaded together.
pub fn load(
    policy: &ArcSwap<PolicySet>,
    trust: &ArcSwap<TrustBundle>,
) -> (Arc<PolicySet>, Arc<TrustBundle>) {
    (policy.load_full(), trust.load_full())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SourceFile;
    use std::time::{Duration, SystemTime};
    use weft_proto::v1::Node;

    fn counter() -> IntCounter {
        IntCounter::new("c", "c").unwrap()
    }

    fn node(id: &str, service: &str, addr: &str) -> Node {
        Node {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            inbound_address: addr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_scope_is_compiled_once_and_again_only_when_its_inputs_change() {
        let policy = Arc::new(
            PolicySet::from_files(vec![SourceFile {
                name: "p.yaml".into(),
                content: "services:\n  - name: web\n    dependencies: [api]\n  - name: api\n  - name: db\n"
                    .into(),
            }])
            .unwrap(),
        );
        let trust = Arc::new(TrustBundle::default());
        let mut registry = Registry::new(Duration::from_secs(5));
        let cache = ScopeCache::new(counter(), counter());
        let web = ServiceKey::new("web", "default");
        let first = cache.get(&policy, &trust, &registry, &web);
        let again = cache.get(&policy, &trust, &registry, &web);
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!((cache.compiled.get(), cache.reused.get()), (1, 1));
        // A registration of a service web does not call: reused.
        registry.register(node("db-1", "db", "127.0.0.3:15006"), SystemTime::now());
        assert!(Arc::ptr_eq(
            &first,
            &cache.get(&policy, &trust, &registry, &web)
        ));
        // One of api: recompiled, with the endpoint.
        registry.register(node("api-1", "api", "127.0.0.4:15006"), SystemTime::now());
        let after = cache.get(&policy, &trust, &registry, &web);
        assert!(!Arc::ptr_eq(&first, &after));
        assert!(after
            .endpoints
            .iter()
            .any(|e| e.cluster == "api.default" && e.endpoints.len() == 1));
        assert_eq!(cache.compiled.get(), 2);
        // A new trust bundle (same content: reused; new content: recompiled).
        let same = Arc::new(TrustBundle::default());
        assert!(Arc::ptr_eq(
            &after,
            &cache.get(&policy, &same, &registry, &web)
        ));
        let rotated = Arc::new(TrustBundle {
            roots_pem: vec!["x".into()],
            ..TrustBundle::default()
        });
        assert!(!Arc::ptr_eq(
            &after,
            &cache.get(&policy, &rotated, &registry, &web)
        ));
    }
}
