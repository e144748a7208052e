//! Per-proxy state of the control plane: registering a proxy's stream (admission through the
//! registry's identity binding and caps), its disconnect and grace, and the push status shown by
//! `GET /v1/proxies` and `weftctl status`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use weft_proto::v1::Node;

use super::{lock, ControlPlane};
use crate::admission::Refusal;

/// Whether a proxy's stream is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyState {
    Connected,
    /// The stream ended; the proxy's endpoint is removed when the grace expires.
    Disconnected,
}

/// The push status of one proxy (connected, or disconnected within its grace), for
/// `GET /v1/proxies` and `weftctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub inbound_address: String,
    pub build_version: String,
    /// RFC 3339, seconds precision.
    pub connected_since: String,
    pub state: ProxyState,
    /// RFC 3339; set while disconnected.
    pub disconnected_since: Option<String>,
    /// Whole seconds (rounded up) until a disconnected proxy's endpoint is removed.
    pub removing_in_seconds: Option<u64>,
    /// ACKed version by type (`listeners`, `routes`, `clusters`, `endpoints`, `policies`,
    /// `trust`).
    pub versions: BTreeMap<String, String>,
    /// The reason of the proxy's most recent NACK on this stream, if it ever NACKed.
    pub last_nack: Option<String>,
    /// RFC 3339 time of `last_nack`.
    pub last_nack_at: Option<String>,
    /// Whether the proxy's latest answer was a NACK: it runs an older config than it was sent.
    pub nacking: bool,
    /// With several replicas (etcd store): the replica the proxy is (or was) connected to. A
    /// proxy of another replica is listed from the store (its versions are that replica's to
    /// know: empty here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(skip)]
    pub(super) session: u64,
    #[serde(skip)]
    pub(super) remove_at: Option<Instant>,
}

/// Whether a status counts in `weft_control_proxies_nacking`: connected, and its latest
/// answer was a NACK.
fn counts_as_nacking(s: &ProxyStatus) -> bool {
    s.state == ProxyState::Connected && s.nacking
}

impl ControlPlane {
    /// Registers a proxy's stream (its node already admitted: see [`crate::admission`]);
    /// returns its session. Refused when the id belongs to another identity or the registry is
    /// at its caps ([`ControlPlane::with_limits`]): nothing changes then, so no caller of any
    /// service is pushed anything.
    pub fn connect(&self, node: &Node) -> Result<u64, Refusal> {
        let now = SystemTime::now();
        let limits = &self.limits;
        let (session, changed) = {
            let mut registry = lock(&self.registry);
            let session = registry.try_register(
                node.clone(),
                now,
                limits.max_registrations,
                limits.max_registrations_per_service,
            )?;
            (session, registry.take_changed())
        };
        let namespace = if node.namespace.is_empty() {
            "default".to_owned()
        } else {
            node.namespace.clone()
        };
        let mut statuses = lock(&self.statuses);
        let replaced = statuses.insert(
            node.id.clone(),
            ProxyStatus {
                id: node.id.clone(),
                service: node.service.clone(),
                namespace,
                inbound_address: node.inbound_address.clone(),
                build_version: node.build_version.clone(),
                connected_since: humantime::format_rfc3339_seconds(now).to_string(),
                state: ProxyState::Connected,
                disconnected_since: None,
                removing_in_seconds: None,
                versions: BTreeMap::new(),
                last_nack: None,
                last_nack_at: None,
                nacking: false,
                replica: self.store.replica().map(str::to_owned),
                session,
                remove_at: None,
            },
        );
        // A new stream of the same id replaces the old one's status (and its NACKing streak).
        self.nacking_changed(replaced.as_ref().is_some_and(counts_as_nacking), false);
        drop(statuses);
        self.metrics.proxies_connected.inc();
        self.registry_changed();
        self.bump_services(&changed, &[]);
        Ok(session)
    }

    /// A proxy's stream ended: its endpoint (and its status) go after the grace period.
    pub fn disconnect(&self, id: &str, session: u64) {
        let now = Instant::now();
        let remove_at = {
            let mut registry = lock(&self.registry);
            registry.disconnect(id, session, now);
            registry
                .get(id)
                .filter(|p| p.session == session)
                .and_then(|p| p.remove_at)
        };
        {
            let mut statuses = lock(&self.statuses);
            if let Some(s) = statuses.get_mut(id).filter(|s| s.session == session) {
                let before = counts_as_nacking(s);
                s.state = ProxyState::Disconnected;
                s.disconnected_since =
                    Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
                s.remove_at = Some(remove_at.unwrap_or(now));
                self.nacking_changed(before, counts_as_nacking(s));
            }
        }
        self.metrics.proxies_connected.dec();
        self.registry_changed();
    }

    /// Drops registrations (and statuses) whose grace expired, and wakes streams if any did.
    pub fn expire_registrations(&self) {
        let now = Instant::now();
        let changed = {
            let mut registry = lock(&self.registry);
            let expired = registry.expire(now);
            if expired {
                // Scopes no registered proxy has any more go too (bounded cache).
                let live: std::collections::HashSet<crate::policy::ServiceKey> =
                    registry.proxies().map(|p| p.service.clone()).collect();
                self.scopes.retain(|k| live.contains(k));
                self.wakers.prune();
            }
            registry.take_changed()
        };
        lock(&self.statuses).retain(|_, s| {
            let keep = s.remove_at.is_none_or(|at| at > now);
            if !keep {
                self.nacking_changed(counts_as_nacking(s), false);
            }
            keep
        });
        if !changed.is_empty() {
            self.registry_changed();
            self.bump_services(&changed, &[]);
        }
    }

    /// Moves `weft_control_proxies_nacking` by what one status change did to whether that
    /// status counts. Called with the statuses locked, so the gauge and the statuses agree
    /// without scanning every proxy on every ACK (an O(proxies) scan per ACK made a cold start
    /// of N proxies O(N^2)).
    fn nacking_changed(&self, before: bool, after: bool) {
        match (before, after) {
            (false, true) => self.metrics.proxies_nacking.inc(),
            (true, false) => self.metrics.proxies_nacking.dec(),
            _ => {}
        }
    }

    /// Records what a proxy holds: `last_nack` is the reason of a NACK just received; `None`
    /// means a Hello or an ACK (which ends a NACKing streak).
    pub fn update_status(
        &self,
        id: &str,
        session: u64,
        versions: &HashMap<i32, String>,
        last_nack: Option<String>,
    ) {
        let mut statuses = lock(&self.statuses);
        if let Some(s) = statuses.get_mut(id).filter(|s| s.session == session) {
            let before = counts_as_nacking(s);
            s.versions = versions
                .iter()
                .filter_map(|(t, v)| {
                    let t = weft_proto::v1::ResourceType::try_from(*t).ok()?;
                    Some((crate::compile::type_name(t).to_owned(), v.clone()))
                })
                .collect();
            s.nacking = last_nack.is_some();
            if last_nack.is_some() {
                s.last_nack = last_nack;
                s.last_nack_at =
                    Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
            }
            self.nacking_changed(before, counts_as_nacking(s));
        }
    }

    /// Every proxy's status (connected, or disconnected within its grace), sorted by id: this
    /// replica's, and those other replicas own (etcd store).
    pub fn proxy_statuses(&self) -> Vec<ProxyStatus> {
        let now = Instant::now();
        let seconds_left = |at: Instant| {
            let left = at.saturating_duration_since(now);
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        };
        let mut all: BTreeMap<String, ProxyStatus> = lock(&self.statuses)
            .values()
            .map(|s| {
                let mut s = s.clone();
                s.removing_in_seconds = s.remove_at.map(seconds_left);
                (s.id.clone(), s)
            })
            .collect();
        let registry = lock(&self.registry);
        for p in registry.proxies() {
            let Some(remote) = &p.remote else { continue };
            let connected = p.is_connected();
            all.insert(
                p.node.id.clone(),
                ProxyStatus {
                    id: p.node.id.clone(),
                    service: p.service.name.clone(),
                    namespace: p.service.namespace.clone(),
                    inbound_address: p.node.inbound_address.clone(),
                    build_version: p.node.build_version.clone(),
                    connected_since: humantime::format_rfc3339_seconds(p.connected_since)
                        .to_string(),
                    state: if connected {
                        ProxyState::Connected
                    } else {
                        ProxyState::Disconnected
                    },
                    disconnected_since: None,
                    removing_in_seconds: p.remove_at.map(seconds_left),
                    versions: BTreeMap::new(),
                    last_nack: None,
                    last_nack_at: None,
                    nacking: false,
                    replica: Some(remote.replica.clone()),
                    session: p.session,
                    remove_at: p.remove_at,
                },
            );
        }
        all.into_values().collect()
    }

    /// Sets the log filter pushed to proxy `id` ("" = its own setting) and pushes it. The
    /// level is part of the registration: for a proxy another replica owns it is written into
    /// its registration in the store, and that replica pushes it.
    pub async fn set_log_level(&self, id: &str, level: &str) -> Result<(), LogLevelError> {
        let level = if level.is_empty() {
            None
        } else {
            if level.len() > 1024 {
                return Err(LogLevelError::Invalid("longer than 1024 bytes".to_owned()));
            }
            tracing_subscriber::EnvFilter::try_new(level)
                .map_err(|e| LogLevelError::Invalid(e.to_string()))?;
            Some(level.to_owned())
        };
        let (remote, service) = {
            let mut registry = lock(&self.registry);
            match registry.get(id) {
                None => return Err(LogLevelError::NoSuchProxy(id.to_owned())),
                Some(p) if p.is_remote() => (true, p.service.clone()),
                Some(p) => {
                    let service = p.service.clone();
                    registry.set_log_level(id, level.clone());
                    (false, service)
                }
            }
        };
        if remote {
            if !self
                .store
                .set_remote_log_level(id, level.as_deref())
                .await?
            {
                return Err(LogLevelError::NoSuchProxy(id.to_owned()));
            }
            return Ok(());
        }
        self.registry_changed();
        // Only the proxy's own listeners change: its service's streams are woken.
        self.bump_services(&[], &[service]);
        Ok(())
    }
}

/// Why a log level was not set.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("no proxy {0:?} is registered")]
    NoSuchProxy(String),
    #[error("not a log filter: {0}")]
    Invalid(String),
    /// The proxy is another replica's and the store could not be written.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use weft_proto::v1::Node;

    use crate::metrics::Metrics;
    use crate::state::ControlPlane;
    use crate::testing::sidecar_node;

    fn node(id: &str) -> Node {
        sidecar_node(id, "a", &format!("127.0.0.{}:15006", id.len() + 1))
    }

    /// The NACKing gauge follows every transition of every proxy (it is moved per change, not
    /// recounted): NACK, ACK, disconnect while NACKing, a new stream replacing a NACKing one.
    #[test]
    fn the_nacking_gauge_follows_each_proxys_transitions() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::new(
            Arc::new(crate::store::FileStore::in_dir(dir.path())),
            Duration::from_secs(60),
            Metrics::new().unwrap(),
        );
        let gauge = || cp.metrics().proxies_nacking.get();
        let nack = Some("routes: bad regex".to_owned());
        let none = HashMap::new();
        let a = cp.connect(&node("a")).unwrap();
        let b = cp.connect(&node("bb")).unwrap();
        cp.update_status("a", a, &none, nack.clone());
        cp.update_status("bb", b, &none, nack.clone());
        assert_eq!(gauge(), 2);
        // A second NACK in the streak counts once; a stale session changes nothing.
        cp.update_status("a", a, &none, nack.clone());
        cp.update_status("a", a + 1000, &none, None);
        assert_eq!(gauge(), 2);
        cp.update_status("a", a, &none, None);
        assert_eq!(gauge(), 1);
        // Disconnected while NACKing: no longer counted, and expiry does not count it twice.
        cp.disconnect("bb", b);
        assert_eq!(gauge(), 0);
        cp.expire_registrations();
        assert_eq!(gauge(), 0);
        // A new stream of a NACKing proxy replaces its status: the streak ends with it.
        cp.update_status("a", a, &none, nack.clone());
        assert_eq!(gauge(), 1);
        let a2 = cp.connect(&node("a")).unwrap();
        assert_ne!(a, a2);
        assert_eq!(gauge(), 0);
        cp.update_status("a", a2, &none, nack);
        assert_eq!(gauge(), 1);
        let listed = cp.proxy_statuses();
        let nacking = listed
            .iter()
            .filter(|s| s.nacking && s.state == super::ProxyState::Connected);
        assert_eq!(nacking.count(), 1);
    }
}
