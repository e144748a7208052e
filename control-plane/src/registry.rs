//! The registry of proxies: which sidecars are (or were, within the grace period) connected,
//! and so which inbound addresses are endpoints of which service.
//!
//! Pure state with an explicit clock (`now` arguments) so the grace logic is unit-testable; the
//! discovery server drives it and the sweeper calls [`Registry::expire`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

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
}

impl RegisteredProxy {
    pub fn is_connected(&self) -> bool {
        self.remove_at.is_none()
    }
}

/// Registered proxies by node id.
#[derive(Debug)]
pub struct Registry {
    grace: Duration,
    proxies: BTreeMap<String, RegisteredProxy>,
    next_session: u64,
}

impl Registry {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            proxies: BTreeMap::new(),
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
        self.proxies.insert(
            node.id.clone(),
            RegisteredProxy {
                node,
                service,
                session,
                connected_since,
                remove_at: None,
            },
        );
        session
    }

    /// The stream of `session` ended: schedule the removal after the grace period. A stale
    /// session (the node already reconnected on a newer stream) changes nothing.
    pub fn disconnect(&mut self, id: &str, session: u64, now: Instant) {
        if let Some(p) = self.proxies.get_mut(id) {
            if p.session == session {
                p.remove_at = Some(now + self.grace);
            }
        }
    }

    /// Drops entries whose grace expired; returns whether any were dropped.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.proxies.len();
        self.proxies
            .retain(|_, p| p.remove_at.is_none_or(|deadline| deadline > now));
        self.proxies.len() != before
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
        service: &'a ServiceKey,
    ) -> impl Iterator<Item = &'a RegisteredProxy> + 'a {
        self.proxies
            .values()
            .filter(move |p| &p.service == service && !p.node.inbound_address.is_empty())
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
}
