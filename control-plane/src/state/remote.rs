//! Registrations other replicas own (etcd store), as the store hands them to this replica: kept
//! in the registry as endpoints like any other (so every replica computes the same endpoints),
//! listed by `GET /v1/proxies` with their replica, and replaced by a local registration when
//! their proxy connects here.

use std::collections::HashSet;
use std::time::Instant;

use super::{lock, ControlPlane};
use crate::registry::{PersistedProxy, Registry};
use crate::store::OwnRegistration;

impl ControlPlane {
    /// Other replicas' registrations as the store holds them now: the remote entries become
    /// exactly these (one missing gets the grace if its proxy was connected, see
    /// [`Registry::remote_gone`]). Returns how many there are.
    pub fn replace_remote_registrations(&self, entries: Vec<PersistedProxy>) -> usize {
        let count = entries.len();
        let now = Instant::now();
        let mut changed = false;
        {
            let mut registry = lock(&self.registry);
            let present: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            let gone: Vec<String> = registry
                .proxies()
                .filter(|p| p.is_remote() && !present.contains(p.node.id.as_str()))
                .map(|p| p.node.id.clone())
                .collect();
            for id in gone {
                changed |= registry.remote_gone(&id, now);
            }
            for entry in entries {
                changed |= self.upsert_remote(&mut registry, entry);
            }
        }
        if changed {
            self.bump();
        }
        count
    }

    /// One registration of another replica was written (`Some`: it replaces a local entry of
    /// the same id, which that replica now has) or its key went away (`None`).
    pub fn remote_registration(&self, id: &str, entry: Option<PersistedProxy>) {
        let changed = {
            let mut registry = lock(&self.registry);
            match entry {
                Some(entry) => self.upsert_remote(&mut registry, entry),
                None => registry.remote_gone(id, Instant::now()),
            }
        };
        if changed {
            self.bump();
        }
    }

    /// Records `entry` (its `replica` set) as a remote registration; returns whether proxies
    /// must be recompiled (its endpoint changed, or it took the place of a local entry).
    fn upsert_remote(&self, registry: &mut Registry, entry: PersistedProxy) -> bool {
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
        registry.upsert_remote(entry, replica) || replaces_local || log_level_changed
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
                    registry.set_log_level(id, level)
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }
}
