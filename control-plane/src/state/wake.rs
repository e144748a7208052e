//! Which discovery streams a change wakes (see `crate::push::wake`): a registry change only
//! the streams whose scope holds the endpoints of a service it touched, a policy change only
//! the streams of the scopes whose recorded reads it answers differently; and the generation
//! every change bumps.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use weft_proto::v1::Node;

use super::{lock, ControlPlane, CHANGE_HISTORY};
use crate::compile::Resources;
use crate::policy::{PolicySet, ServiceKey};

impl ControlPlane {
    /// Bumps the generation and hands it to `wake` (which wakes the streams concerned).
    pub(super) fn publish(&self, wake: impl FnOnce(u64)) {
        let mut changes = lock(&self.changes);
        // Record the instant before publishing, so a stream that sees the new generation always
        // finds its instant. Bumps are serialized by the `changes` lock.
        let next = changes.back().map_or(0, |(g, _)| *g) + 1;
        changes.push_back((next, Instant::now()));
        while changes.len() > CHANGE_HISTORY {
            changes.pop_front();
        }
        wake(next);
    }

    /// The current generation (the number of changes so far).
    pub fn generation(&self) -> u64 {
        lock(&self.changes).back().map_or(0, |(g, _)| *g)
    }

    /// [`ControlPlane::compile_for`], with the policy set it compiled under. The reads the
    /// node's own part made are noted in its scope's entry, so a policy change that answers one
    /// of them differently wakes the node's stream ([`ControlPlane::bump_policy`]); a stream
    /// whose set is no longer served when this returns compiles again
    /// ([`ControlPlane::serves`]): the change may have been checked before its reads were noted.
    pub fn compile_for_at(&self, node: &Node) -> (Resources, Arc<PolicySet>) {
        let (policy, trust) = crate::push::load(&self.policy, &self.trust);
        let registry = lock(&self.registry);
        let key = crate::compile::scope_of(node);
        let scope = self.scopes.get(&policy, &trust, &registry, &key);
        let (resources, reads) =
            crate::compile::assemble_recorded(&policy, &registry, &scope, node);
        drop(registry);
        self.scopes.note_assembled(&key, reads);
        (resources, policy)
    }

    /// Whether `policy` is the set served now.
    pub fn serves(&self, policy: &Arc<PolicySet>) -> bool {
        Arc::ptr_eq(&self.policy.load(), policy)
    }

    /// A new policy set is served (`old` was): bumps the generation and wakes the streams of
    /// the scopes whose compiled resources or proxies' own parts read something that answers
    /// differently now ([`crate::push::ScopeCache::affected_by_policy`]).
    pub(super) fn bump_policy(&self, old: &PolicySet) {
        let new = self.policy.load_full();
        let affected = self.scopes.affected_by_policy(old, &new);
        self.publish(|next| {
            let woken = self.wakers.wake(&affected, next);
            tracing::debug!(scopes = affected.len(), woken, "policy change");
        });
    }

    /// A receiver woken by registry changes that may affect the proxies of `scope` (their
    /// service and namespace). A stream watches it and [`ControlPlane::subscribe`].
    pub fn subscribe_scope(&self, scope: &ServiceKey) -> watch::Receiver<u64> {
        self.wakers.subscribe(scope)
    }

    /// The registrations of the services `changed` changed, and something of a proxy of each
    /// of the scopes `own` did (its log level): bumps the generation and wakes the streams of
    /// every scope holding endpoints of a `changed` service, and of the `own` scopes. Nothing
    /// happens when both are empty. (A scope's compiled resources read registrations only
    /// through its recorded inputs, so no other scope can be affected.)
    pub(super) fn bump_services(&self, changed: &[ServiceKey], own: &[ServiceKey]) {
        if changed.is_empty() && own.is_empty() {
            return;
        }
        let mut affected = self.scopes.affected_by(changed);
        affected.extend(own.iter().cloned());
        self.publish(|next| {
            let woken = self.wakers.wake(&affected, next);
            tracing::trace!(
                changed = changed.len(),
                scopes = affected.len(),
                woken,
                "registry change"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::testing::sidecar_node as node;

    #[tokio::test]
    async fn a_registration_wakes_only_the_streams_of_scopes_holding_its_service() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            "services:\n  - {name: web, dependencies: [api]}\n  - {name: api, dependencies: []}\n  - {name: other, dependencies: [db]}\n  - {name: db, dependencies: []}\n",
        )
        .unwrap();
        let cp = ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir.path())),
            Duration::from_secs(5),
            Metrics::new().unwrap(),
        );
        cp.reload().await.unwrap();
        let key = |s: &str| ServiceKey::new(s, "default");
        let mut all = cp.subscribe();
        let mut rx: Vec<_> = ["web", "api", "other", "db"]
            .iter()
            .map(|s| cp.subscribe_scope(&key(s)))
            .collect();
        // Every proxy connected and compiled once (what its stream does first).
        for (i, s) in ["web", "api", "other", "db"].iter().enumerate() {
            let n = node(&format!("{s}-1"), s, &format!("127.0.0.{}:15006", i + 2));
            cp.connect(&n).unwrap();
            cp.compile_for(&n);
        }
        all.borrow_and_update();
        for r in &mut rx {
            r.borrow_and_update();
        }
        let generation = cp.generation();
        cp.connect(&node("api-2", "api", "127.0.0.9:15006"))
            .unwrap();
        assert_eq!(cp.generation(), generation + 1);
        let woken: Vec<bool> = rx.iter().map(|r| r.has_changed().unwrap()).collect();
        assert_eq!(woken, [true, false, false, false], "only web calls api");
        assert!(!all.has_changed().unwrap());
        for r in &mut rx {
            r.borrow_and_update();
        }
        // A policy change wakes the streams of the scopes it changes: a new service, none
        // (every scope names its dependencies); a new dependency of other's, other's.
        let woken = |rx: &mut Vec<watch::Receiver<u64>>| -> Vec<bool> {
            rx.iter_mut()
                .map(|r| {
                    let changed = r.has_changed().unwrap();
                    r.borrow_and_update();
                    changed
                })
                .collect()
        };
        let generation = cp.generation();
        cp.apply("q.yaml", Some("services: [{name: extra}]\n"), false)
            .await
            .unwrap();
        assert_eq!(cp.generation(), generation + 1);
        assert_eq!(woken(&mut rx), [false, false, false, false]);
        let other = |deps: &str| {
            format!("services:\n  - {{name: web, dependencies: [api]}}\n  - {{name: api, dependencies: []}}\n  - {{name: other, dependencies: [{deps}]}}\n  - {{name: db, dependencies: []}}\n")
        };
        cp.apply("p.yaml", Some(&other("db, extra")), false)
            .await
            .unwrap();
        assert_eq!(woken(&mut rx), [false, false, true, false]);
        // mesh.http is read by every proxy's listeners: every stream.
        cp.apply(
            "m.yaml",
            Some("mesh: {http: {merge_slashes: false}}\n"),
            false,
        )
        .await
        .unwrap();
        assert_eq!(woken(&mut rx), [true, true, true, true]);
        assert!(!all.has_changed().unwrap(), "policy changes wake per scope");
        // A new trust bundle wakes every stream.
        cp.set_trust(crate::compile::TrustBundle {
            trust_domain: "example.org".into(),
            roots_pem: Vec::new(),
        });
        assert!(all.has_changed().unwrap());
    }
}
