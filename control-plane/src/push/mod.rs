//! Compiling once per scope: the resources every proxy of a service shares
//! ([`crate::compile::ScopeResources`]) are compiled once and reused by each of its proxies'
//! discovery streams, and recompiled only when something they were compiled from changed: one
//! of the policy objects the compilation read (its fingerprint,
//! [`crate::compile::ScopeInputs`]: the definitions, routes and authorization policies it
//! looked up, the mesh-wide settings it used), the trust bundle, or the registrations of a
//! service whose endpoints it holds. A `weftctl apply` that changes one service's route
//! recompiles the scopes that hold that service, a registry change for `api` the scopes that
//! call `api`, and N proxies of one service cost one compilation, not N.
//!
//! The cache also answers which scopes a change affects, so only their streams are woken
//! ([`wake`]): a registry change, the scopes holding the changed services' endpoints
//! ([`ScopeCache::affected_by`]); a policy change, the scopes one of whose recorded reads
//! answers differently in the new set ([`ScopeCache::affected_by_policy`]). Those reads include
//! the ones each proxy's own part made (its listeners: [`crate::compile::assemble_recorded`],
//! noted per scope by [`ScopeCache::note_assembled`]).
//!
//! A scope whose inputs changed in endpoints alone (a static endpoint of a service it holds, a
//! registration of one) is not compiled again but patched: only the endpoints of the clusters
//! built from those services, and the endpoint set's version, are recomputed
//! ([`crate::compile::EndpointPatch`]; the result equals a compilation's). One moved endpoint
//! in a scope of 5,000 services thus costs those clusters, not the scope.
//!
//! `weft_control_compilations_total{result=compiled|patched|reused}` counts scope lookups by
//! outcome.
//!
//! What a stream remembers of the endpoints its proxy holds, to push only what changed, is in
//! [`delta`].

pub mod delta;
pub mod wake;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use prometheus::IntCounter;

use crate::compile::{
    compile_scope_recorded, EndpointPatch, ScopeInputs, ScopeResources, TrustBundle,
};
use crate::policy::{PolicySet, ServiceKey};
use crate::registry::Registry;

pub use wake::Wakers;

/// A compiled scope and what it was compiled from.
#[derive(Debug)]
struct Cached {
    /// The policy set the fingerprint was last checked against (every read answers the same
    /// in it as in the set the scope was compiled from).
    policy: Arc<PolicySet>,
    trust: Arc<TrustBundle>,
    inputs: ScopeInputs,
    scope: Arc<ScopeResources>,
    /// Every read the per-proxy part of the scope's proxies made ([`ScopeCache::note_assembled`]).
    assembled: ScopeInputs,
}

impl Cached {
    /// Whether `scope` is still what compiling under these inputs would give; moves the
    /// checked policy set forward when it is.
    fn fresh(
        &mut self,
        policy: &Arc<PolicySet>,
        trust: &Arc<TrustBundle>,
        registry: &Registry,
    ) -> bool {
        let fresh = (Arc::ptr_eq(&self.trust, trust) || *self.trust == **trust)
            && self.inputs.registrations_unchanged(registry)
            && (Arc::ptr_eq(&self.policy, policy) || self.inputs.unchanged(&self.policy, policy));
        if fresh {
            self.policy = Arc::clone(policy);
            self.trust = Arc::clone(trust);
        }
        fresh
    }

    /// Brings `scope` (not [`Cached::fresh`]) to what compiling it under these inputs would give
    /// by patching its endpoints, when nothing else may differ ([`EndpointPatch`]); whether it
    /// did. The scope is patched in place unless a stream still holds it.
    fn patch(
        &mut self,
        policy: &Arc<PolicySet>,
        trust: &Arc<TrustBundle>,
        registry: &Registry,
    ) -> bool {
        if !(Arc::ptr_eq(&self.trust, trust) || *self.trust == **trust) {
            return false;
        }
        let Some(patch) =
            EndpointPatch::plan(&self.policy, policy, registry, &self.scope, &self.inputs)
        else {
            return false;
        };
        let scope = Arc::make_mut(&mut self.scope);
        patch.apply(policy, registry, trust, scope, &mut self.inputs);
        self.policy = Arc::clone(policy);
        self.trust = Arc::clone(trust);
        true
    }
}

/// The scope cache of one control plane.
#[derive(Debug)]
pub struct ScopeCache {
    /// One slot per scope; a slot's lock is held while its scope compiles, so the proxies of a
    /// scope that wake together wait for one compilation instead of each doing it.
    slots: Mutex<HashMap<ServiceKey, Arc<Mutex<Option<Cached>>>>>,
    /// Reverse of each cached scope's `depends_on`: service -> the scopes holding its endpoints.
    dependents: Mutex<HashMap<ServiceKey, HashSet<ServiceKey>>>,
    compiled: IntCounter,
    reused: IntCounter,
    patched: IntCounter,
}

impl ScopeCache {
    pub fn new(compiled: IntCounter, reused: IntCounter, patched: IntCounter) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            dependents: Mutex::new(HashMap::new()),
            compiled,
            reused,
            patched,
        }
    }

    /// The shared resources of `scope` under `policy`, `trust` and `registry`: the cached ones
    /// if nothing they were compiled from changed, patched if only endpoints did (static ones
    /// of the policy, or registrations: [`EndpointPatch`]), else freshly compiled (and cached).
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
        if let Some(cached) = slot.as_mut() {
            if cached.fresh(policy, trust, registry) {
                self.reused.inc();
                return Arc::clone(&cached.scope);
            }
            // The reads stay those the scope made: `depends_on` and the index are unchanged.
            if cached.patch(policy, trust, registry) {
                self.patched.inc();
                return Arc::clone(&cached.scope);
            }
        }
        let (compiled, inputs) = compile_scope_recorded(policy, registry, trust, scope);
        let compiled = Arc::new(compiled);
        self.compiled.inc();
        let old = slot
            .as_ref()
            .map(|c| c.scope.depends_on.as_slice())
            .unwrap_or_default();
        if old != compiled.depends_on.as_slice() {
            self.index(scope, old, &compiled.depends_on);
        }
        // The proxies' own reads stay theirs whatever the scope compiled to.
        let assembled = slot.take().map(|c| c.assembled).unwrap_or_default();
        *slot = Some(Cached {
            policy: Arc::clone(policy),
            trust: Arc::clone(trust),
            inputs,
            scope: Arc::clone(&compiled),
            assembled,
        });
        compiled
    }

    /// Adds the reads a proxy of `scope` made assembling its own part (listeners, zone
    /// preferences) to the scope's: a policy change answering one of them differently wakes the
    /// scope's streams.
    pub fn note_assembled(&self, scope: &ServiceKey, reads: ScopeInputs) {
        let Some(slot) = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
            .cloned()
        else {
            return;
        };
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = slot.as_mut() {
            cached.assembled.merge(reads);
        }
    }

    /// The cached scopes whose compiled resources, or whose proxies' own parts, may differ
    /// under `new` from under `old` (the set served until now): some read they made answers
    /// differently. Their streams are the ones a policy change must wake. (A scope not cached
    /// has no stream that compiled it yet: those streams compile when they first push.)
    pub fn affected_by_policy(&self, old: &PolicySet, new: &PolicySet) -> HashSet<ServiceKey> {
        let slots: Vec<(ServiceKey, Arc<Mutex<Option<Cached>>>)> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), Arc::clone(s)))
            .collect();
        slots
            .into_iter()
            .filter(|(_, slot)| {
                let slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.as_ref().is_none_or(|c| {
                    !c.inputs.unchanged(old, new) || !c.assembled.unchanged(old, new)
                })
            })
            .map(|(k, _)| k)
            .collect()
    }

    fn index(&self, scope: &ServiceKey, old: &[ServiceKey], new: &[ServiceKey]) {
        let mut dependents = self
            .dependents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for s in old {
            if let Some(scopes) = dependents.get_mut(s) {
                scopes.remove(scope);
                if scopes.is_empty() {
                    dependents.remove(s);
                }
            }
        }
        for s in new {
            dependents
                .entry(s.clone())
                .or_default()
                .insert(scope.clone());
        }
    }

    /// The scopes a change to the registrations of `services` may affect: every cached scope
    /// holding one's endpoints (its recorded inputs read them). A scope not cached has no
    /// compiled resources to be stale: its streams compile it when they first push.
    pub fn affected_by<'a>(
        &self,
        services: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> HashSet<ServiceKey> {
        let dependents = self
            .dependents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = HashSet::new();
        for s in services {
            if let Some(scopes) = dependents.get(s) {
                out.extend(scopes.iter().cloned());
            }
        }
        out
    }

    /// Drops the scopes no proxy asked for since `keep` was computed (bounded memory when
    /// services come and go).
    pub fn retain(&self, keep: impl Fn(&ServiceKey) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped: HashSet<ServiceKey> = slots.keys().filter(|k| !keep(k)).cloned().collect();
        if dropped.is_empty() {
            return;
        }
        let mut dependents = self
            .dependents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for k in &dropped {
            slots.remove(k);
        }
        for scopes in dependents.values_mut() {
            scopes.retain(|s| !dropped.contains(s));
        }
        dependents.retain(|_, scopes| !scopes.is_empty());
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
    use crate::compile::compile_scope;
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
        let cache = ScopeCache::new(counter(), counter(), counter());
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
        // One of api: patched, with the endpoint (a copy: `first` is still held).
        registry.register(node("api-1", "api", "127.0.0.4:15006"), SystemTime::now());
        let after = cache.get(&policy, &trust, &registry, &web);
        assert!(!Arc::ptr_eq(&first, &after));
        assert!(after
            .endpoints
            .iter()
            .any(|e| e.cluster == "api.default" && e.endpoints.len() == 1));
        assert_eq!(*after, compile_scope(&policy, &registry, &trust, &web));
        assert_eq!((cache.compiled.get(), cache.patched.get()), (1, 1));
        // Nobody else holding it: patched in place.
        drop((first, after));
        registry.register(node("api-2", "api", "127.0.0.5:15006"), SystemTime::now());
        let held = Arc::as_ptr(&cache.get(&policy, &trust, &registry, &web));
        registry.register(node("api-3", "api", "127.0.0.6:15006"), SystemTime::now());
        let after = cache.get(&policy, &trust, &registry, &web);
        assert_eq!(Arc::as_ptr(&after), held);
        assert_eq!(*after, compile_scope(&policy, &registry, &trust, &web));
        assert_eq!((cache.compiled.get(), cache.patched.get()), (1, 3));
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

#[cfg(test)]
mod fingerprint_tests {
    //! A policy change recompiles exactly the scopes whose recorded reads it changes, and every
    //! scope served after it equals a fresh compilation (nothing stale).

    use super::*;
    use crate::compile::compile_scope;
    use crate::policy::SourceFile;
    use std::collections::BTreeSet;
    use std::time::{Duration, SystemTime};
    use weft_proto::v1::Node;

    const BASE: &str = "\
mesh:
  mtls: permissive
  namespaces:
    demo: {default_authorization: deny}
services:
  - {name: web, dependencies: [api]}
  - {name: api, dependencies: [db]}
  - {name: db, dependencies: []}
  - {name: admin}
  - {name: shop, namespace: demo, dependencies: [cart]}
  - {name: cart, namespace: demo, dependencies: []}
routes:
  - name: api-v2
    service: api
    match: {path: {prefix: /v2}}
    destinations: [{service: api}]
authorization:
  - name: db-callers
    service: db
    default: deny
    rules:
      - name: api-may
        from: {services: [api]}
";

    const SCOPES: [(&str, &str); 6] = [
        ("web", "default"),
        ("api", "default"),
        ("db", "default"),
        ("admin", "default"),
        ("shop", "demo"),
        ("cart", "demo"),
    ];

    fn policy(content: &str) -> Arc<PolicySet> {
        Arc::new(
            PolicySet::from_files(vec![SourceFile {
                name: "p.yaml".into(),
                content: content.into(),
            }])
            .unwrap_or_else(|e| panic!("{e:?}\n{content}")),
        )
    }

    fn counter() -> IntCounter {
        IntCounter::new("c", "c").unwrap()
    }

    fn keys() -> Vec<ServiceKey> {
        SCOPES
            .iter()
            .map(|(n, ns)| ServiceKey::new(*n, *ns))
            .collect()
    }

    /// Compiles every scope under `before`, then looks each up under `after`: returns the
    /// scopes that were recompiled, after checking each served scope against a fresh
    /// compilation.
    fn recompiled_by(before: &str, after: &str, registry: &Registry) -> BTreeSet<String> {
        let trust = Arc::new(TrustBundle::default());
        let cache = ScopeCache::new(counter(), counter(), counter());
        let (before, after) = (policy(before), policy(after));
        let first: Vec<_> = keys()
            .iter()
            .map(|k| cache.get(&before, &trust, registry, k))
            .collect();
        let mut out = BTreeSet::new();
        for (k, first) in keys().iter().zip(first) {
            let served = cache.get(&after, &trust, registry, k);
            assert_eq!(
                *served,
                compile_scope(&after, registry, &trust, k),
                "scope {k:?} served stale"
            );
            if !Arc::ptr_eq(&first, &served) {
                out.insert(format!("{}.{}", k.name, k.namespace));
            }
            // Checked once: the next lookup under the same set is a plain reuse.
            assert!(Arc::ptr_eq(
                &served,
                &cache.get(&after, &trust, registry, k)
            ));
        }
        out
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn each_kind_of_policy_object_recompiles_exactly_its_dependent_scopes() {
        let registry = Registry::new(Duration::from_secs(5));
        let all = [
            "web.default",
            "api.default",
            "db.default",
            "admin.default",
            "shop.demo",
            "cart.demo",
        ];
        let table: &[(&str, &str, &str, &[&str])] = &[
            ("nothing changed", "", "", &[]),
            // A route: the scopes that may call its service (admin may call every service).
            (
                "a route of api",
                "prefix: /v2}",
                "prefix: /v3}",
                &["web.default", "admin.default"],
            ),
            // One service's definition: its callers, itself (its local settings), admin.
            (
                "the definition of db",
                "{name: db, dependencies: []}",
                "{name: db, dependencies: [], mtls: strict}",
                &["api.default", "db.default", "admin.default"],
            ),
            (
                "a service's dependencies",
                "{name: web, dependencies: [api]}",
                "{name: web, dependencies: [api, db]}",
                &["web.default", "admin.default"],
            ),
            // An authorization policy: only the scope of the service it guards.
            (
                "the authorization policy of db",
                "name: api-may",
                "name: api-may-call",
                &["db.default"],
            ),
            // A namespace default: the scopes of that namespace.
            (
                "a namespace's default authorization",
                "demo: {default_authorization: deny}",
                "demo: {default_authorization: allow}",
                &["shop.demo", "cart.demo"],
            ),
            // mesh.mtls: the scopes holding a cluster of a service without its own mode.
            (
                "mesh.mtls",
                "mtls: permissive",
                "mtls: strict",
                &["web.default", "api.default", "admin.default", "shop.demo"],
            ),
            // mesh.trust_domain: every identity, so every scope.
            (
                "mesh.trust_domain",
                "  mtls: permissive\n",
                "  mtls: permissive\n  trust_domain: corp.example\n",
                &all,
            ),
            // VIPs (mesh.vip_range): every scope holding a service cluster.
            (
                "mesh.vip_range",
                "  mtls: permissive\n",
                "  mtls: permissive\n  vip_range: 240.240.0.0/16\n",
                &["web.default", "api.default", "admin.default", "shop.demo"],
            ),
            // mesh.http is per listener (assembled per proxy on every push): no scope.
            (
                "mesh.http",
                "  mtls: permissive\n",
                "  mtls: permissive\n  http: {merge_slashes: false}\n",
                &[],
            ),
            // A new service nobody depends on: only the scope that may call everything.
            (
                "a new service",
                "  - {name: admin}\n",
                "  - {name: admin}\n  - {name: extra}\n",
                &["admin.default"],
            ),
            // The declared order of services: only a scope holding several of them.
            (
                "the order of the services",
                "  - {name: web, dependencies: [api]}\n  - {name: api, dependencies: [db]}\n",
                "  - {name: api, dependencies: [db]}\n  - {name: web, dependencies: [api]}\n",
                &["admin.default"],
            ),
        ];
        for (what, from, to, expected) in table {
            let after = BASE.replacen(from, to, 1);
            assert!(
                from.is_empty() || after != BASE,
                "{what}: {from:?} not in the policy"
            );
            assert_eq!(
                recompiled_by(BASE, &after, &registry),
                set(expected),
                "{what}"
            );
        }
    }

    #[test]
    fn a_registration_recompiles_only_the_scopes_holding_its_endpoints() {
        let trust = Arc::new(TrustBundle::default());
        let cache = ScopeCache::new(counter(), counter(), counter());
        let policy = policy(BASE);
        let mut registry = Registry::new(Duration::from_secs(5));
        for k in keys() {
            cache.get(&policy, &trust, &registry, &k);
        }
        assert_eq!(cache.compiled.get(), 6);
        registry.register(
            Node {
                id: "db-1".into(),
                service: "db".into(),
                inbound_address: "127.0.0.9:15006".into(),
                ..Default::default()
            },
            SystemTime::now(),
        );
        let changed = registry.take_changed();
        assert_eq!(changed, [ServiceKey::new("db", "default")]);
        let affected: BTreeSet<ServiceKey> = cache.affected_by(&changed).into_iter().collect();
        assert_eq!(
            affected,
            [
                ServiceKey::new("admin", "default"),
                ServiceKey::new("api", "default")
            ]
            .into_iter()
            .collect()
        );
        for k in keys() {
            let served = cache.get(&policy, &trust, &registry, &k);
            assert_eq!(*served, compile_scope(&policy, &registry, &trust, &k));
        }
        assert_eq!(
            (cache.compiled.get(), cache.patched.get()),
            (6, 2),
            "api and admin patched, no other"
        );
        // A scope dropped from the cache is no one's dependent any more.
        cache.retain(|k| k.name != "api");
        let affected = cache.affected_by(&changed);
        assert_eq!(affected.len(), 1);
    }

    #[test]
    fn an_endpoint_only_change_patches_the_scopes_holding_the_service() {
        const EXT: &str = "\
services:
  - {name: web, dependencies: [ext]}
  - {name: ext, endpoints: [{address: \"127.0.9.1:80\"}, {address: \"127.0.9.2:80\"}]}
  - {name: other, dependencies: []}
  - {name: admin}
";
        let trust = Arc::new(TrustBundle::default());
        let cache = ScopeCache::new(counter(), counter(), counter());
        let registry = Registry::new(Duration::from_secs(5));
        let (before, after) = (policy(EXT), policy(&EXT.replacen(".2:80", ".2:81", 1)));
        let scopes = ["web", "ext", "other", "admin"].map(|n| ServiceKey::new(n, "default"));
        for k in &scopes {
            cache.get(&before, &trust, &registry, k);
        }
        let affected: BTreeSet<ServiceKey> = cache
            .affected_by_policy(&before, &after)
            .into_iter()
            .collect();
        assert_eq!(
            affected,
            [&scopes[0], &scopes[1], &scopes[3]]
                .into_iter()
                .cloned()
                .collect()
        );
        for k in &scopes {
            let served = cache.get(&after, &trust, &registry, k);
            assert_eq!(*served, compile_scope(&after, &registry, &trust, k));
        }
        assert_eq!(
            (
                cache.compiled.get(),
                cache.patched.get(),
                cache.reused.get()
            ),
            (4, 3, 1)
        );
        // Back again: patched again, equal to a compilation.
        for k in &scopes {
            let served = cache.get(&before, &trust, &registry, k);
            assert_eq!(*served, compile_scope(&before, &registry, &trust, k));
        }
        assert_eq!((cache.compiled.get(), cache.patched.get()), (4, 6));
    }
}
