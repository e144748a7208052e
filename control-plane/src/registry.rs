//! The registry of proxies: which sidecars are (or were, within the grace period) connected,
//! and so which inbound addresses are endpoints of which service.
//!
//! Pure state with an explicit clock (`now` arguments) so the grace logic is unit-testable; the
//! discovery server drives it and the sweeper calls [`Registry::expire`].
//!
//! The registry survives a control-plane restart: [`Registry::persisted`] is what the state file
//! (`registry.json`, see `persist`) holds, and [`Registry::restore`] brings those entries back as
//! disconnected, each within a restart grace. A proxy that reconnects (same node id) within it
//! reclaims its entry; the others are dropped by [`Registry::expire`] when it ends.
//!
//! With several replicas (the etcd store) the registry also holds the registrations other
//! replicas own, as the store shows them ([`Registry::upsert_remote`]): they are endpoints like
//! any other, bind their node id to their identity the same way, and are replaced by a local
//! registration when their proxy connects here. When one's key disappears from the store (its
//! replica's lease expired: the replica died or lost etcd), it gets the deregistration grace
//! from then ([`Registry::remote_gone`]), so a proxy moving to another replica keeps its
//! endpoint and a dead one is gone within the lease TTL plus the grace.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use weft_proto::v1::Node;

use crate::policy::ServiceKey;

/// One registered proxy.
#[derive(Debug, Clone)]
pub struct RegisteredProxy {
    pub node: Node,
    /// The node's service (namespace defaulted to "default").
    pub service: ServiceKey,
    /// Distinguishes successive streams of the same node id.
    pub session: u64,
    /// Wall-clock time the current stream started.
    pub connected_since: SystemTime,
    /// Set once the stream ended: the entry is dropped at this instant unless it reconnects.
    pub remove_at: Option<Instant>,
    /// Set on an entry restored from the state file and not reclaimed yet: how it was persisted
    /// (it is persisted the same way again, so a restart during the restart grace does not
    /// shorten a proxy's chance to reconnect).
    pub restored: Option<Restored>,
    /// The log filter an operator set for this proxy (`weftctl log-level`), pushed in its
    /// LISTENERS set; persisted with the registration, kept across reconnects of the same id.
    pub log_level: Option<String>,
    /// Set on a registration another replica owns (etcd store): never connected here.
    pub remote: Option<Remote>,
}

/// Where a registration another replica owns stands, as its key in the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The owning replica (`--replica-id`).
    pub replica: String,
    /// Whether its proxy is connected to that replica (else it is within its grace there).
    pub connected: bool,
}

/// How a restored entry was persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The persisted wall-clock removal deadline; `None`: it was connected.
    pub remove_at: Option<SystemTime>,
}

/// One registration as persisted in the state file: the node as announced in its `Hello`, and
/// when its registration ends (absent while connected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedProxy {
    pub id: String,
    pub service: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub inbound_address: String,
    #[serde(default)]
    pub outbound_address: String,
    #[serde(default)]
    pub app_address: String,
    #[serde(default)]
    pub tcp_bind_ip: String,
    #[serde(default)]
    pub build_version: String,
    /// Transparent mode: the address callers reach this instance at (empty otherwise).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_ip: String,
    /// Transparent mode: the application's ports on `instance_ip`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_ports: Vec<u32>,
    /// Unix milliseconds.
    #[serde(default)]
    pub connected_since_unix_ms: u64,
    /// Unix milliseconds: the end of a disconnected entry's deregistration grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_at_unix_ms: Option<u64>,
    /// The log filter an operator set for this proxy (`weftctl log-level`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// The replica that owns the registration (etcd store; absent in `registry.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl PersistedProxy {
    fn node(&self) -> Node {
        Node {
            id: self.id.clone(),
            service: self.service.clone(),
            namespace: self.namespace.clone(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            inbound_address: self.inbound_address.clone(),
            outbound_address: self.outbound_address.clone(),
            app_address: self.app_address.clone(),
            tcp_bind_ip: self.tcp_bind_ip.clone(),
            build_version: self.build_version.clone(),
            instance_ip: self.instance_ip.clone(),
            app_ports: self.app_ports.clone(),
            // Per stream (read at its Hello), never persisted.
            capabilities: Vec::new(),
        }
    }
}

impl PersistedProxy {
    /// Whether its proxy is connected (no removal deadline).
    pub fn is_connected(&self) -> bool {
        self.remove_at_unix_ms.is_none()
    }

    /// When its current stream started.
    pub fn connected_since(&self) -> SystemTime {
        from_unix_ms(self.connected_since_unix_ms)
    }
}

impl RegisteredProxy {
    /// Connected: to this replica, or (a remote entry whose key is in the store) to its own.
    pub fn is_connected(&self) -> bool {
        self.remove_at.is_none() && self.remote.as_ref().is_none_or(|r| r.connected)
    }

    /// Whether another replica owns it.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }
}

/// Registered proxies by node id.
#[derive(Debug)]
pub struct Registry {
    grace: Duration,
    proxies: BTreeMap<String, RegisteredProxy>,
    /// Node ids by service: a service's endpoints without scanning every proxy.
    by_service: BTreeMap<ServiceKey, BTreeSet<String>>,
    /// Bumped whenever a service's registrations change (a scope's compiled resources depend on
    /// the versions of the services it holds endpoints of: see `crate::push`).
    service_versions: BTreeMap<ServiceKey, u64>,
    /// Services whose version moved since the last [`Registry::take_changed`] (the streams
    /// to wake: see `crate::push::wake`).
    changed: BTreeSet<ServiceKey>,
    /// The last version handed out.
    last_version: u64,
    next_session: u64,
}

impl Registry {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            proxies: BTreeMap::new(),
            by_service: BTreeMap::new(),
            service_versions: BTreeMap::new(),
            changed: BTreeSet::new(),
            last_version: 0,
            next_session: 1,
        }
    }

    /// Registers (or re-registers) a node; cancels any pending removal of the same id. Returns
    /// the session id the stream must present on [`Registry::disconnect`].
    pub fn register(&mut self, mut node: Node, connected_since: SystemTime) -> u64 {
        if node.namespace.is_empty() {
            node.namespace = "default".to_owned();
        }
        let session = self.next_session;
        self.next_session += 1;
        let service = ServiceKey::new(&node.service, &node.namespace);
        // A reconnect of the same identity keeps the operator's log level.
        let log_level = self
            .proxies
            .get(&node.id)
            .filter(|p| p.service == service)
            .and_then(|p| p.log_level.clone());
        self.index(&node.id, &service);
        let replaced = self.proxies.insert(
            node.id.clone(),
            RegisteredProxy {
                node,
                service: service.clone(),
                session,
                connected_since,
                remove_at: None,
                restored: None,
                log_level,
                remote: None,
            },
        );
        if let Some(old) = replaced.filter(|old| old.service != service) {
            self.unindex(&old.node.id, &old.service);
        }
        session
    }

    /// The version of `service`'s registrations (0: none ever).
    pub fn service_version(&self, service: &ServiceKey) -> u64 {
        self.service_versions.get(service).copied().unwrap_or(0)
    }

    fn touch(&mut self, service: &ServiceKey) {
        self.last_version += 1;
        self.service_versions
            .insert(service.clone(), self.last_version);
        self.changed.insert(service.clone());
    }

    /// The services whose registrations changed since the last call (at most one entry per
    /// service, however many changes).
    pub fn take_changed(&mut self) -> Vec<ServiceKey> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    fn index(&mut self, id: &str, service: &ServiceKey) {
        self.touch(service);
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(id.to_owned());
    }

    fn unindex(&mut self, id: &str, service: &ServiceKey) {
        self.touch(service);
        if let Some(ids) = self.by_service.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Sets the log filter pushed to proxy `id` (`None`: its own setting). `false` when no such
    /// proxy is registered.
    pub fn set_log_level(&mut self, id: &str, level: Option<String>) -> bool {
        match self.proxies.get_mut(id) {
            Some(p) => {
                p.log_level = level;
                true
            }
            None => false,
        }
    }

    /// [`Registry::register`] for a node that must not take over an id another identity holds
    /// (a registration, connected or within its grace, of another service or namespace: node
    /// ids are bound to the identity that registered them first) nor grow the registry past
    /// `max_total` entries or `max_per_service` entries of its service. A node re-registering
    /// its own id never counts against the caps.
    pub fn try_register(
        &mut self,
        node: Node,
        connected_since: SystemTime,
        max_total: usize,
        max_per_service: usize,
    ) -> Result<u64, crate::admission::Refusal> {
        use crate::admission::Refusal;
        let namespace = if node.namespace.is_empty() {
            "default"
        } else {
            node.namespace.as_str()
        };
        let service = ServiceKey::new(&node.service, namespace);
        match self.proxies.get(&node.id) {
            Some(existing) if existing.service != service => {
                return Err(Refusal::IdTaken {
                    id: node.id,
                    owner: format!("{}/{}", existing.node.namespace, existing.node.service),
                });
            }
            Some(_) => {}
            None => {
                if self.proxies.len() >= max_total {
                    return Err(Refusal::TooMany(format!(
                        "{} registrations (--max-registrations)",
                        self.proxies.len()
                    )));
                }
                let of_service = self.by_service.get(&service).map_or(0, BTreeSet::len);
                if of_service >= max_per_service {
                    return Err(Refusal::TooMany(format!(
                        "{of_service} registrations of {namespace}/{} (--max-registrations-per-service)",
                        node.service
                    )));
                }
            }
        }
        Ok(self.register(node, connected_since))
    }

    /// Every registration this replica owns (not the remote ones) as the store holds it,
    /// sorted by id. A disconnected entry's deadline is converted to wall-clock time (`now` and
    /// `wall_now` are the same moment).
    pub fn persisted(&self, now: Instant, wall_now: SystemTime) -> Vec<PersistedProxy> {
        self.proxies
            .values()
            .filter(|p| p.remote.is_none())
            .map(|p| {
                let remove_at = match p.restored {
                    Some(r) => r.remove_at,
                    None => p
                        .remove_at
                        .map(|at| wall_now + at.saturating_duration_since(now)),
                };
                let n = &p.node;
                PersistedProxy {
                    id: n.id.clone(),
                    service: n.service.clone(),
                    namespace: n.namespace.clone(),
                    labels: n
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    inbound_address: n.inbound_address.clone(),
                    outbound_address: n.outbound_address.clone(),
                    app_address: n.app_address.clone(),
                    tcp_bind_ip: n.tcp_bind_ip.clone(),
                    build_version: n.build_version.clone(),
                    instance_ip: n.instance_ip.clone(),
                    app_ports: n.app_ports.clone(),
                    connected_since_unix_ms: unix_ms(p.connected_since),
                    remove_at_unix_ms: remove_at.map(unix_ms),
                    log_level: p.log_level.clone(),
                    replica: None,
                }
            })
            .collect()
    }

    /// Records a registration another replica owns, as the store holds it, replacing whatever
    /// this registry had for its id (a local entry too: the caller decided the other replica
    /// has it now). Its endpoint counts as changed (and its service's version moves) only when
    /// its service, address or labels did. Returns whether they did. Entries without id or
    /// service are ignored.
    pub fn upsert_remote(&mut self, entry: PersistedProxy, replica: String) -> bool {
        if entry.id.is_empty() || entry.service.is_empty() {
            return false;
        }
        let mut node = entry.node();
        if node.namespace.is_empty() {
            node.namespace = "default".to_owned();
        }
        let service = ServiceKey::new(&node.service, &node.namespace);
        let existing = self.proxies.get(&entry.id);
        let same_endpoint = existing.is_some_and(|p| {
            p.service == service
                && p.node.inbound_address == node.inbound_address
                && p.node.labels == node.labels
        });
        // A remote entry keeps its session; one replacing a local entry gets a new one, so
        // the end of a stream still open here is stale and changes nothing.
        let session = match existing {
            Some(p) if p.remote.is_some() => p.session,
            _ => {
                let s = self.next_session;
                self.next_session += 1;
                s
            }
        };
        let old_service = existing.map(|p| p.service.clone());
        if !same_endpoint {
            if let Some(old) = old_service {
                self.unindex(&entry.id, &old);
            }
            self.index(&entry.id, &service);
        }
        let connected = entry.is_connected();
        let connected_since = entry.connected_since();
        self.proxies.insert(
            entry.id,
            RegisteredProxy {
                node,
                service,
                session,
                connected_since,
                remove_at: None,
                restored: None,
                log_level: entry.log_level,
                remote: Some(Remote { replica, connected }),
            },
        );
        !same_endpoint
    }

    /// The store no longer holds remote registration `id` (local entries are untouched): one
    /// whose proxy was connected gets the deregistration grace from `now` (its replica's lease
    /// expired: the proxy may be reconnecting elsewhere); one already disconnected there (its
    /// owner ended it) is dropped now. Returns whether the entry was dropped.
    pub fn remote_gone(&mut self, id: &str, now: Instant) -> bool {
        let Some(p) = self.proxies.get_mut(id) else {
            return false;
        };
        let Some(remote) = &p.remote else {
            return false;
        };
        if remote.connected {
            if p.remove_at.is_none() {
                p.remove_at = Some(now + self.grace);
            }
            return false;
        }
        let service = p.service.clone();
        self.proxies.remove(id);
        self.unindex(id, &service);
        true
    }

    /// Brings persisted registrations back after a restart, each as disconnected and removed
    /// after `restart_grace` unless its node reconnects (an entry that was already in its
    /// deregistration grace keeps its earlier deadline when that comes first; one already past
    /// it is skipped). Ids registered meanwhile and entries without id or service are skipped.
    /// Returns the restored entries' ids.
    pub fn restore(
        &mut self,
        entries: Vec<PersistedProxy>,
        now: Instant,
        wall_now: SystemTime,
        restart_grace: Duration,
    ) -> Vec<String> {
        let mut restored = Vec::new();
        for e in entries {
            if e.id.is_empty() || e.service.is_empty() || self.proxies.contains_key(&e.id) {
                continue;
            }
            let persisted_deadline = e.remove_at_unix_ms.map(from_unix_ms);
            let left = match persisted_deadline {
                None => restart_grace,
                Some(deadline) => match deadline.duration_since(wall_now) {
                    Ok(left) if !left.is_zero() => left.min(restart_grace),
                    _ => continue,
                },
            };
            let mut node = e.node();
            if node.namespace.is_empty() {
                node.namespace = "default".to_owned();
            }
            let session = self.next_session;
            self.next_session += 1;
            let service = ServiceKey::new(&node.service, &node.namespace);
            restored.push(e.id.clone());
            self.index(&e.id, &service);
            self.proxies.insert(
                e.id,
                RegisteredProxy {
                    node,
                    service,
                    session,
                    connected_since: from_unix_ms(e.connected_since_unix_ms),
                    remove_at: Some(now + left),
                    restored: Some(Restored {
                        remove_at: persisted_deadline,
                    }),
                    log_level: e.log_level,
                    remote: None,
                },
            );
        }
        restored
    }

    /// The stream of `session` ended: schedule the removal after the grace period. A stale
    /// session (the node already reconnected on a newer stream) changes nothing.
    pub fn disconnect(&mut self, id: &str, session: u64, now: Instant) {
        if let Some(p) = self.proxies.get_mut(id) {
            if p.session == session {
                p.remove_at = Some(now + self.grace);
                p.restored = None;
            }
        }
    }

    /// Drops entries whose grace expired; returns whether any were dropped.
    pub fn expire(&mut self, now: Instant) -> bool {
        let expired: Vec<(String, ServiceKey)> = self
            .proxies
            .values()
            .filter(|p| p.remove_at.is_some_and(|deadline| deadline <= now))
            .map(|p| (p.node.id.clone(), p.service.clone()))
            .collect();
        for (id, service) in &expired {
            self.proxies.remove(id);
            self.unindex(id, service);
        }
        !expired.is_empty()
    }

    /// The earliest pending removal, for the sweeper's timer.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.proxies.values().filter_map(|p| p.remove_at).min()
    }

    /// A registered node by id (connected or within its grace).
    pub fn get(&self, id: &str) -> Option<&RegisteredProxy> {
        self.proxies.get(id)
    }

    /// Every registered node (connected or within its grace), sorted by id.
    pub fn proxies(&self) -> impl Iterator<Item = &RegisteredProxy> {
        self.proxies.values()
    }

    /// The registered sidecars of `service` that announce an inbound address, sorted by id.
    pub fn endpoints_of<'a>(
        &'a self,
        service: &ServiceKey,
    ) -> impl Iterator<Item = &'a RegisteredProxy> + 'a {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.proxies.get(id))
            .filter(|p| !p.node.inbound_address.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, service: &str, addr: &str) -> Node {
        Node {
            id: id.into(),
            service: service.into(),
            inbound_address: addr.into(),
            ..Node::default()
        }
    }

    fn addrs(r: &Registry, service: &str) -> Vec<String> {
        let key = ServiceKey::new(service, "default");
        r.endpoints_of(&key)
            .map(|p| p.node.inbound_address.clone())
            .collect()
    }

    #[test]
    fn register_defaults_namespace_and_lists_endpoints() {
        let mut r = Registry::new(Duration::from_secs(5));
        r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        r.register(node("b-1", "b", "127.0.0.3:15006"), SystemTime::now());
        r.register(node("a-2", "a", ""), SystemTime::now());
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"]);
        assert_eq!(r.get("a-1").unwrap().node.namespace, "default");
    }

    #[test]
    fn ids_are_bound_to_their_identity_and_the_registry_is_capped() {
        let mut r = Registry::new(Duration::from_secs(5));
        let now = SystemTime::now();
        let s = r
            .try_register(node("a-1", "a", "127.0.0.2:15006"), now, 3, 2)
            .unwrap();
        // Another identity cannot take the id over, connected or within its grace.
        let e = r
            .try_register(node("a-1", "b", "127.0.0.9:15006"), now, 3, 2)
            .unwrap_err();
        assert_eq!(e.reason(), "id_taken");
        assert!(e.to_string().contains("default/a"), "{e}");
        r.disconnect("a-1", s, Instant::now());
        assert_eq!(
            r.try_register(node("a-1", "b", "127.0.0.9:15006"), now, 3, 2)
                .unwrap_err()
                .reason(),
            "id_taken"
        );
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"]);
        // The same identity reconnects.
        r.try_register(node("a-1", "a", "127.0.0.2:15006"), now, 3, 2)
            .unwrap();
        r.try_register(node("a-2", "a", "127.0.0.3:15006"), now, 3, 2)
            .unwrap();
        let e = r
            .try_register(node("a-3", "a", "127.0.0.4:15006"), now, 3, 2)
            .unwrap_err();
        assert!(e.to_string().contains("default/a"), "{e}");
        r.try_register(node("b-1", "b", "127.0.0.5:15006"), now, 3, 2)
            .unwrap();
        assert_eq!(
            r.try_register(node("c-1", "c", "127.0.0.6:15006"), now, 3, 2)
                .unwrap_err()
                .reason(),
            "too_many"
        );
        // Re-registering an existing id never counts against the caps.
        r.try_register(node("b-1", "b", "127.0.0.5:15006"), now, 3, 2)
            .unwrap();
    }

    #[test]
    fn removal_waits_for_the_grace_period() {
        let grace = Duration::from_secs(5);
        let mut r = Registry::new(grace);
        let t0 = Instant::now();
        let s = r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        r.disconnect("a-1", s, t0);
        assert!(!r.get("a-1").unwrap().is_connected());
        assert_eq!(r.next_expiry(), Some(t0 + grace));
        assert!(!r.expire(t0 + grace - Duration::from_millis(1)));
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"], "kept during the grace");
        assert!(r.expire(t0 + grace));
        assert!(addrs(&r, "a").is_empty());
        assert_eq!(r.next_expiry(), None);
    }

    #[test]
    fn reconnect_within_grace_cancels_removal() {
        let grace = Duration::from_secs(5);
        let mut r = Registry::new(grace);
        let t0 = Instant::now();
        let old = r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        r.disconnect("a-1", old, t0);
        let new = r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        assert_ne!(old, new);
        assert!(!r.expire(t0 + grace * 2));
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"]);
    }

    #[test]
    fn stale_stream_end_does_not_remove_the_new_session() {
        let grace = Duration::from_secs(5);
        let mut r = Registry::new(grace);
        let t0 = Instant::now();
        let old = r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        let _new = r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        // The old stream notices it ended only now.
        r.disconnect("a-1", old, t0);
        assert!(r.get("a-1").unwrap().is_connected());
        assert!(!r.expire(t0 + grace * 2));
    }

    fn restored(r: &Registry, now: Instant, grace: Duration) -> (Registry, Vec<String>) {
        let mut fresh = Registry::new(Duration::from_secs(5));
        let wall = SystemTime::now();
        let ids = fresh.restore(r.persisted(now, wall), now, wall, grace);
        (fresh, ids)
    }

    #[test]
    fn persisted_entries_round_trip_as_disconnected_within_the_restart_grace() {
        let t0 = Instant::now();
        let restart_grace = Duration::from_secs(15);
        let mut r = Registry::new(Duration::from_secs(5));
        let mut a = node("a-1", "a", "127.0.0.2:15006");
        a.labels = [("version".to_owned(), "v1".to_owned())].into();
        a.outbound_address = "127.0.0.2:15001".into();
        a.build_version = "1.2.3".into();
        r.register(
            a,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        r.register(node("b-1", "b", "127.0.0.3:15006"), SystemTime::now());

        // Through JSON, as the state file holds it.
        let json = serde_json::to_string(&r.persisted(t0, SystemTime::now())).unwrap();
        let entries: Vec<PersistedProxy> = serde_json::from_str(&json).unwrap();
        let mut back = Registry::new(Duration::from_secs(5));
        let ids = back.restore(entries, t0, SystemTime::now(), restart_grace);
        assert_eq!(ids, ["a-1", "b-1"]);
        let p = back.get("a-1").unwrap();
        assert_eq!(p.node, r.get("a-1").unwrap().node, "the node as announced");
        assert_eq!(p.service, ServiceKey::new("a", "default"));
        assert_eq!(
            p.connected_since,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert!(!p.is_connected());
        assert_eq!(p.remove_at, Some(t0 + restart_grace));
        assert_eq!(addrs(&back, "a"), ["127.0.0.2:15006"]);
        assert_eq!(addrs(&back, "b"), ["127.0.0.3:15006"]);
        // Restoring never reuses a session of the old process's streams.
        assert!(back.get("b-1").unwrap().session != p.session);
    }

    #[test]
    fn restart_grace_expiry_and_reclaim() {
        let t0 = Instant::now();
        let restart_grace = Duration::from_secs(15);
        let mut r = Registry::new(Duration::from_secs(5));
        r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        r.register(node("a-2", "a", "127.0.0.3:15006"), SystemTime::now());
        let (mut back, _) = restored(&r, t0, restart_grace);
        assert_eq!(back.next_expiry(), Some(t0 + restart_grace));

        // a-1 reconnects: its entry is reclaimed, same endpoint, no removal pending.
        back.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        assert!(back.get("a-1").unwrap().is_connected());
        assert!(back.get("a-1").unwrap().restored.is_none());
        assert_eq!(addrs(&back, "a"), ["127.0.0.2:15006", "127.0.0.3:15006"]);

        assert!(!back.expire(t0 + restart_grace - Duration::from_millis(1)));
        assert!(back.expire(t0 + restart_grace), "a-2 never came back");
        assert_eq!(addrs(&back, "a"), ["127.0.0.2:15006"]);
        assert_eq!(back.next_expiry(), None);
    }

    #[test]
    fn restored_entries_are_persisted_as_they_were_loaded() {
        // A restart during the restart grace gives unreclaimed entries a full grace again.
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5));
        r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        let (back, _) = restored(&r, t0, Duration::from_secs(15));
        let again = back.persisted(t0 + Duration::from_secs(10), SystemTime::now());
        assert_eq!(again, r.persisted(t0, SystemTime::now()));
        assert_eq!(again[0].remove_at_unix_ms, None);
    }

    #[test]
    fn entries_in_their_deregistration_grace_keep_their_deadline() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut r = Registry::new(Duration::from_secs(5));
        let s = r.register(node("a-1", "a", "127.0.0.2:15006"), wall);
        r.disconnect("a-1", s, t0);
        let persisted = r.persisted(t0 + Duration::from_secs(2), wall);
        // 3 s of its deregistration grace were left at the save.
        assert_eq!(
            persisted[0].remove_at_unix_ms,
            Some(unix_ms(wall + Duration::from_secs(3)))
        );
        let mut back = Registry::new(Duration::from_secs(5));
        back.restore(persisted.clone(), t0, wall, Duration::from_secs(15));
        let left = back.next_expiry().unwrap() - t0;
        assert!(
            left > Duration::from_millis(2990) && left <= Duration::from_secs(3),
            "{left:?}"
        );
        // Restored after its deadline passed: gone.
        let mut late = Registry::new(Duration::from_secs(5));
        let ids = late.restore(
            persisted,
            t0,
            wall + Duration::from_secs(4),
            Duration::from_secs(15),
        );
        assert!(ids.is_empty());
        assert!(late.get("a-1").is_none());
    }

    fn remote(id: &str, service: &str, addr: &str, connected: bool) -> PersistedProxy {
        let mut r = Registry::new(Duration::from_secs(5));
        r.register(node(id, service, addr), SystemTime::now());
        let mut e = r.persisted(Instant::now(), SystemTime::now()).remove(0);
        e.remove_at_unix_ms = (!connected).then_some(e.connected_since_unix_ms + 5000);
        e.replica = Some("cp-2".into());
        e
    }

    #[test]
    fn remote_registrations_are_endpoints_and_not_persisted_here() {
        let mut r = Registry::new(Duration::from_secs(5));
        let key = ServiceKey::new("a", "default");
        assert!(r.upsert_remote(remote("a-1", "a", "127.0.0.2:15006", true), "cp-2".into()));
        let v = r.service_version(&key);
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"]);
        assert!(r.get("a-1").unwrap().is_connected());
        assert!(r.persisted(Instant::now(), SystemTime::now()).is_empty());
        // The same endpoint again (e.g. its log level changed): no recompilation.
        let mut again = remote("a-1", "a", "127.0.0.2:15006", false);
        again.log_level = Some("debug".into());
        assert!(!r.upsert_remote(again, "cp-2".into()));
        assert_eq!(r.service_version(&key), v);
        assert!(!r.get("a-1").unwrap().is_connected());
        assert_eq!(r.get("a-1").unwrap().log_level.as_deref(), Some("debug"));
        // The id stays bound to its identity; its proxy connecting here makes it local.
        let err = r
            .try_register(
                node("a-1", "b", "127.0.0.9:15006"),
                SystemTime::now(),
                10,
                10,
            )
            .unwrap_err();
        assert_eq!(err.reason(), "id_taken");
        r.try_register(
            node("a-1", "a", "127.0.0.2:15006"),
            SystemTime::now(),
            10,
            10,
        )
        .unwrap();
        assert!(!r.get("a-1").unwrap().is_remote());
        assert_eq!(r.get("a-1").unwrap().log_level.as_deref(), Some("debug"));
        assert_eq!(r.persisted(Instant::now(), SystemTime::now()).len(), 1);
    }

    #[test]
    fn a_gone_remote_key_gets_the_grace_if_its_proxy_was_connected() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5));
        r.upsert_remote(remote("a-1", "a", "127.0.0.2:15006", true), "cp-2".into());
        r.upsert_remote(remote("b-1", "b", "127.0.0.3:15006", false), "cp-2".into());
        // Its replica's lease expired: kept for the grace, then removed.
        assert!(!r.remote_gone("a-1", t0));
        assert!(!r.get("a-1").unwrap().is_connected());
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(5)));
        // Ended by its replica after its grace there: removed now.
        assert!(r.remote_gone("b-1", t0));
        assert!(r.get("b-1").is_none());
        // Local entries are not the store's to remove.
        r.register(node("c-1", "c", "127.0.0.4:15006"), SystemTime::now());
        assert!(!r.remote_gone("c-1", t0));
        assert!(r.get("c-1").unwrap().is_connected());
        // Back in the store within the grace: kept.
        r.upsert_remote(remote("a-1", "a", "127.0.0.2:15006", true), "cp-3".into());
        assert!(r.get("a-1").unwrap().is_connected());
        assert!(!r.expire(t0 + Duration::from_secs(6)));
        assert_eq!(addrs(&r, "a"), ["127.0.0.2:15006"]);
    }

    #[test]
    fn restore_skips_live_ids_and_incomplete_entries() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5));
        r.register(node("a-1", "a", "127.0.0.2:15006"), SystemTime::now());
        let mut entries = r.persisted(t0, SystemTime::now());
        let mut nameless = entries[0].clone();
        nameless.id = String::new();
        entries.push(nameless);
        let mut back = Registry::new(Duration::from_secs(5));
        back.register(node("a-1", "a", "127.0.0.9:15006"), SystemTime::now());
        let ids = back.restore(entries, t0, SystemTime::now(), Duration::from_secs(15));
        assert!(ids.is_empty());
        assert_eq!(addrs(&back, "a"), ["127.0.0.9:15006"]);
    }
}
