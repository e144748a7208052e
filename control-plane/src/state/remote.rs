//! Registrations other replicas own (etcd store), as the store hands them to this replica: kept
//! in the registry as endpoints like any other (so every replica computes the same endpoints),
//! listed by `GET /v1/proxies` with their replica, and replaced by a local registration when
//! their proxy connects here.

use std::collections::HashSet;
use std::time::Instant;

use super::{lock, ControlPlane};
use crate::policy::ServiceKey;
use crate::registry::{PersistedProxy, Registry};
use crate::store::OwnRegistration;

impl ControlPlane {
    /// Other replicas' registrations as the store holds them now: the remote entries become
    /// exactly these (one missing gets the grace if its proxy was connected, see
    /// [`Registry::remote_gone`]). Returns how many there are.
    pub fn replace_remote_registrations(&self, entries: Vec<PersistedProxy>) -> usize {
        let count = entries.len();
        let now = Instant::now();
        let mut own = Vec::new();
        let changed = {
            let mut registry = lock(&self.registry);
            let present: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let gone: Vec<String> = registry
                .proxies()
                .filter(|p| p.is_remote() && !present.contains(p.node.id.as_str()))
                .map(|p| p.node.id.clone())
                .collect();
            for id in gone {
                registry.remote_gone(&id, now);
            }
            for entry in entries {
                if let Some(service) = self.upsert_remote(&mut registry, entry) {
                    own.push(service);
                }
            }
            registry.take_changed()
        };
        self.bump_services(&changed, &own);
        count
    }

    /// One registration of another replica was written (`Some`: it replaces a local entry of
    /// the same id, which that replica now has) or its key went away (`None`).
    pub fn remote_registration(&self, id: &str, entry: Option<PersistedProxy>) {
        let (changed, own) = {
            let mut registry = lock(&self.registry);
            let own: Vec<_> = match entry {
                Some(entry) => self
                    .upsert_remote(&mut registry, entry)
                    .into_iter()
                    .collect(),
                None => {
                    registry.remote_gone(id, Instant::now());
                    Vec::new()
                }
            };
            (registry.take_changed(), own)
        };
        self.bump_services(&changed, &own);
    }

    /// Records `entry` (its `replica` set) as a remote registration; returns its service when
    /// its proxies' streams must be woken (its endpoint changed, or it took the place of a
    /// local entry, or its log level changed). Services whose endpoints changed are also in
    /// [`Registry::take_changed`].
    fn upsert_remote(&self, registry: &mut Registry, entry: PersistedProxy) -> Option<ServiceKey> {
        let replica = entry.replica.clone().unwrap_or_default();
        let replaces_local = registry.get(&entry.id).is_some_and(|p| !p.is_remote());
        if replaces_local {
            // The proxy is another replica's now: a stream still open here is stale.
            lock(&self.statuses).remove(&entry.id);
            tracing::info!(proxy = %entry.id, replica = %replica, "the proxy's registration moved to another replica");
        }
        let log_level_changed = registry
            .get(&entry.id)
            .is_some_and(|p| p.log_level != entry.log_level);
        let service = ServiceKey::new(
            &entry.service,
            if entry.namespace.is_empty() {
                "default"
            } else {
                entry.namespace.as_str()
            },
        );
        (registry.upsert_remote(entry, replica) || replaces_local || log_level_changed)
            .then_some(service)
    }

    /// This replica's registration `id`, if it has one.
    pub fn own_registration(&self, id: &str) -> Option<OwnRegistration> {
        lock(&self.registry)
            .get(id)
            .filter(|p| !p.is_remote())
            .map(|p| OwnRegistration {
                connected: p.is_connected(),
                connected_since: p.connected_since,
            })
    }

    /// The store holds another log level for this replica's registration `id` (an operator
    /// set it through another replica): push it.
    pub fn set_own_log_level(&self, id: &str, level: Option<String>) {
        let changed = {
            let mut registry = lock(&self.registry);
            match registry.get(id) {
                Some(p) if !p.is_remote() && p.log_level != level => {
                    let service = p.service.clone();
                    registry.set_log_level(id, level).then_some(service)
                }
                _ => None,
            }
        };
        if let Some(service) = changed {
            self.bump_services(&[], &[service]);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Replicas compute identical versions: a proxy's resources do not depend on whether the
    //! registrations they list are this replica's own or another's (the premise of a proxy
    //! moving between replicas without being re-pushed).

    use std::sync::Arc;
    use std::time::Duration;

    use weft_proto::v1::Node;

    use crate::compile::Resources;
    use crate::metrics::Metrics;
    use crate::state::ControlPlane;
    use crate::store::RegistryHost as _;

    const POLICY: &str = "services:\n  - name: web\n  - name: api\n    lb: round_robin\n";

    /// A replica serving `POLICY` from its own directory.
    async fn replica(dir: &std::path::Path) -> ControlPlane {
        std::fs::write(dir.join("mesh.yaml"), POLICY).unwrap();
        let cp = ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir)),
            Duration::from_secs(5),
            Metrics::new().unwrap(),
        );
        cp.reload().await.unwrap();
        cp
    }

    fn node(id: &str, service: &str, ip: &str) -> Node {
        Node {
            id: id.into(),
            service: service.into(),
            namespace: "default".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            inbound_address: format!("{ip}:15006"),
            outbound_address: format!("{ip}:15001"),
            app_address: format!("{ip}:8080"),
            tcp_bind_ip: ip.into(),
            build_version: "0.1.0".into(),
            ..Node::default()
        }
    }

    fn versions(r: &Resources) -> [String; 6] {
        [
            r.listeners.version.clone(),
            r.routes.version.clone(),
            r.clusters.version.clone(),
            r.endpoints.version.clone(),
            r.policies.version.clone(),
            r.trust.version.clone(),
        ]
    }

    #[tokio::test]
    async fn a_remote_registration_compiles_like_a_local_one() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cp1, cp2) = (replica(d1.path()).await, replica(d2.path()).await);
        let (api1, api2, web) = (
            node("api-1", "api", "127.0.0.2"),
            node("api-2", "api", "127.0.0.3"),
            node("web-1", "web", "127.0.0.4"),
        );
        // cp-1 holds api-1 and web-1; cp-2 holds api-2. Each learns the other's registrations
        // the way the etcd store hands them over.
        cp1.connect(&api1).unwrap();
        cp1.connect(&web).unwrap();
        cp2.connect(&api2).unwrap();
        let own = |cp: &ControlPlane, replica: &str| {
            let mut entries = cp.own_registrations();
            for e in &mut entries {
                e.replica = Some(replica.to_owned());
            }
            entries
        };
        cp2.replace_remote_registrations(own(&cp1, "cp-1"));
        cp1.replace_remote_registrations(own(&cp2, "cp-2"));
        let on_cp1 = cp1.compile_for(&web);
        let on_cp2 = cp2.compile_for(&web);
        assert_eq!(versions(&on_cp1), versions(&on_cp2));
        assert_eq!(on_cp1, on_cp2, "same versions, same contents");
        assert_eq!(
            on_cp1
                .endpoints
                .clusters
                .iter()
                .flat_map(|c| &c.endpoints)
                .filter(|e| e.proxy_id.starts_with("api-"))
                .count(),
            2,
            "{:?}",
            on_cp1.endpoints
        );

        // web-1 moves to cp-2 (its registration there turns local): nothing it holds changes.
        cp2.connect(&web).unwrap();
        assert_eq!(versions(&cp2.compile_for(&web)), versions(&on_cp1));
        // Nor for a proxy on cp-2 whose endpoints include web-1.
        assert_eq!(
            versions(&cp2.compile_for(&api2)),
            versions(&cp1.compile_for(&api2))
        );
    }
}
