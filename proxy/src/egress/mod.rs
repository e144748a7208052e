//! Services outside the mesh: endpoints declared by DNS name, and what counts as a declared
//! external destination.
//!
//! - [`resolver`]: the stub resolver (hickory-resolver; the bootstrap's `dns:` name servers,
//!   else `/etc/resolv.conf`) behind the [`resolver::Resolve`] seam.
//! - [`dns`]: per cluster, the names to resolve, their last good addresses and the task that
//!   re-resolves them at `min(TTL, refresh)` (at least 1 s apart).
//! - [`refresh`]: rebuilds the current snapshot when a name's addresses change, so resolved
//!   addresses become the cluster's endpoints the way registrations do.
//! - [`metrics`]: the `weft_dns_resolutions_total{cluster,result}` family.
//!
//! TLS origination to these services lives in [`crate::tls::origination`]; the cluster picks
//! it per endpoint (`crate::cluster`). Data flow of a DNS change:
//!
//! ```text
//! dns task (control runtime) -> new addresses -> EgressContext::changed
//!   -> Refresher: Snapshot::build(current resources, current) -> Cluster::build reads
//!      DnsEndpoints::endpoints() -> swap (same listeners) -> requests use the new endpoints
//! ```
//!
//! This module depends on the snapshot's data; the only arrow back is `cluster.rs` holding a
//! cluster's [`dns::DnsEndpoints`] in its long-lived state, as it holds its health checker.

pub mod dns;
pub mod metrics;
pub mod refresh;
pub mod resolver;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

use crate::snapshot::{Direction, ListenerKind, Snapshot};

use self::metrics::DnsMetrics;
use self::resolver::Resolve;

/// What the per-cluster DNS tasks share: the resolver, the metric family, and the signal that
/// some cluster's addresses changed.
pub struct EgressContext {
    resolver: Arc<dyn Resolve>,
    metrics: DnsMetrics,
    changed: Notify,
}

impl std::fmt::Debug for EgressContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressContext").finish_non_exhaustive()
    }
}

impl EgressContext {
    /// A context resolving with `resolver`, counting into `metrics`.
    pub fn new(resolver: Arc<dyn Resolve>, metrics: DnsMetrics) -> Arc<Self> {
        Arc::new(Self {
            resolver,
            metrics,
            changed: Notify::new(),
        })
    }

    /// Resolves once some cluster's resolved addresses changed since the last call returned
    /// (changes in between are coalesced into one wake-up).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// The process's context, installed at start (absent in unit tests: DNS endpoints then never
/// resolve, and clusters with only those have no endpoints).
static CONTEXT: OnceLock<Arc<EgressContext>> = OnceLock::new();

/// Makes `context` the one clusters resolve their DNS endpoints with (first call wins).
pub fn install(context: Arc<EgressContext>) {
    let _ = CONTEXT.set(context);
}

/// The installed context, if any.
pub fn context() -> Option<&'static Arc<EgressContext>> {
    CONTEXT.get()
}

/// `host` lower-cased without a trailing dot, for comparisons.
fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host:port` is an external service declared in `snapshot` — what "known" means for
/// egress policy (`mesh.egress.unknown: deny`) besides mesh services:
///
/// - a DNS endpoint of one of its clusters (`endpoints: [{host, port}]`), the host compared
///   case-insensitively and without a trailing dot; or
/// - an IP literal `host` with `port` equal to an endpoint outside the mesh (no identity) of one
///   of its clusters: a static `address` endpoint, or an address a declared DNS name currently
///   resolves to (so a client that resolved the name itself and CONNECTs to the IP is known
///   too). Clusters of inbound listeners (the local app) do not count.
///
/// Mesh services are not answered here (registered sidecars carry an identity; their names are
/// route hosts). The snapshot holds only what this proxy's service may call, so "declared" is
/// per caller. Cost: a scan of the snapshot's clusters and endpoints; meant for the
/// once-per-tunnel decision, not for every request.
pub fn is_declared(snapshot: &Snapshot, host: &str, port: u16) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        let local: Vec<&str> = snapshot
            .listeners
            .values()
            .filter(|l| l.direction == Direction::Inbound)
            .filter_map(|l| match &l.kind {
                ListenerKind::Http(h) => h.catch_all.as_ref().map(|c| &*c.cluster.name),
                ListenerKind::Tcp { cluster, .. } => Some(&*cluster.name),
            })
            .collect();
        return snapshot
            .clusters
            .values()
            .filter(|c| !local.contains(&&*c.name))
            .any(|c| {
                c.endpoints
                    .iter()
                    .any(|e| e.addr == addr && e.pool.mesh_identity().is_none())
            });
    }
    let host = normalize(host);
    snapshot
        .resources
        .clusters
        .iter()
        .flat_map(|s| &s.clusters)
        .flat_map(|c| &c.dns_endpoints)
        .any(|d| u32::from(port) == d.port && normalize(&d.host) == host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::snapshot::Resources;
    use weft_proto::v1;

    #[test]
    fn declared_names_and_addresses() {
        let mut r: Resources = crate::snapshot::tests::resources();
        r.listeners.as_mut().unwrap().listeners[1].direction = v1::Direction::Inbound.into();
        let clusters = &mut r.clusters.as_mut().unwrap().clusters;
        clusters.push(v1::Cluster {
            name: "stripe.default".into(),
            dns_endpoints: vec![v1::DnsEndpoint {
                host: "api.stripe.com".into(),
                port: 443,
                weight: 1,
                refresh_ms: 30_000,
            }],
            ..Default::default()
        });
        // The inbound listener's cluster has the app's address: not an external service.
        r.endpoints
            .as_mut()
            .unwrap()
            .clusters
            .push(v1::ClusterEndpoints {
                cluster: "inbound".into(),
                endpoints: vec![v1::Endpoint {
                    address: "127.0.0.1:8080".into(),
                    ..Default::default()
                }],
            });
        let s = Snapshot::build(r, None, &Metrics::new().unwrap()).unwrap();
        assert!(is_declared(&s, "api.stripe.com", 443));
        assert!(is_declared(&s, "API.Stripe.com.", 443));
        assert!(!is_declared(&s, "api.stripe.com", 80));
        assert!(!is_declared(&s, "evil.example.com", 443));
        // backend.default's static endpoint 127.0.0.1:9001 (no identity).
        assert!(is_declared(&s, "127.0.0.1", 9001));
        assert!(!is_declared(&s, "127.0.0.1", 9002));
        assert!(!is_declared(&s, "127.0.0.1", 8080));
        assert!(!is_declared(&s, "[::1]", 9001));
    }
}
