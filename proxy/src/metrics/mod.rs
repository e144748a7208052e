//! Prometheus metrics of the proxy: one private [`Registry`] holding the metric families named in
//! ARCHITECTURE.md, and the pre-resolved per-route / per-cluster / per-listener handles the data
//! path uses so that recording a request never builds a label `String`.
//!
//! Label resolution (`with_label_values`) happens when a snapshot is built; the hot path only
//! touches atomics. `weft_requests_total` has three dynamic labels (`code`, `code_class` — a
//! function of `code` — and `grpc_status`); the common combinations are cached lazily per
//! destination in [`RequestMetrics`].
//!
//! The request families also carry the transport of the hop, `tls` (`mtls` | `none`) and `peer`
//! (the other side's SPIFFE ID, `""` when unknown, [`PEER_OTHER`] past the bound):
//! - outbound, the destination cluster's expected identity, known when the snapshot is built
//!   ([`Metrics::for_clusters`], [`PeerLabels::outbound`]): no cost per request;
//! - inbound, the verified client of the connection: a base handle (`tls="none"`, `peer=""`, what
//!   plaintext connections use) derives one variant per peer ([`RequestMetrics::for_peer`]), and
//!   each mTLS connection resolves its variant once per base handle ([`PeerHandles`]). At most
//!   [`MAX_PEERS_PER_HANDLE`] peers get their own series per (direction, route, cluster); later
//!   ones share `peer="other"`.
//!
//! Series lifetime: a series with route or cluster labels is exported exactly while something can
//! still record into it, so that config churn (routes and services added and removed over a
//! sidecar's life) does not grow memory or the scrape:
//! - request handles are shared by label set ([`RequestSeries`]: one live `Arc<RequestMetrics>`
//!   per labels, so consecutive snapshots, in-flight requests and connections share it); when the
//!   last `Arc` of a label set goes, its `Drop` removes its series from the five families,
//!   `weft_requests_total` for every `(code, grpc_status)` recorded on those labels included;
//! - an inbound base handle owns its per-peer variants, so they go with it (unless a connection
//!   still holds one: then with that connection);
//! - TCP and connect-error series are held by a [`SeriesLease`] in the [`TcpMetrics`] of a TCP
//!   listener and in the `Cluster`, shared the same way and removed when the last one goes.
//!
//! Creating a handle (or lease) and removing its series happen under one lock per kind, see
//! [`RequestSeries::handle_in`] and `Drop for RequestMetrics`.

mod cluster_peers;
mod families;
mod lease;
mod peer;
mod request;
mod tcp;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGaugeVec, Registry, TextEncoder};

pub use lease::{CounterFamily, LeasedCounter, ResilienceLeaser, SeriesLease};
pub use peer::PeerHandles;
pub use request::RequestMetrics;
pub use tcp::TcpMetrics;

use lease::{LeaseKey, LeasedSeries};
use request::{request_labels, RequestSeries};
use tcp::tcp_handles;

/// Errors creating or registering the metric families (only at start-up).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A family could not be created or registered (duplicate name, bad label).
    #[error("registering metric {name}: {source}")]
    Register {
        /// Metric family name.
        name: &'static str,
        /// Underlying prometheus error.
        source: prometheus::Error,
    },
}

/// `tls` of a hop over mesh mTLS.
pub const TLS_MTLS: &str = "mtls";
/// `tls` of a plaintext hop.
pub const TLS_NONE: &str = "none";
/// `peer` of inbound requests from callers past [`MAX_PEERS_PER_HANDLE`].
pub const PEER_OTHER: &str = "other";
/// The most distinct `peer` values (caller identities) one inbound (direction, route, cluster)
/// gets series for, for as long as its base handle lives (while the route stays configured:
/// config pushes that keep it share the handle); requests of further callers are counted with
/// `peer="other"`. Bounds the inbound request series at 66 per (route, cluster) and
/// response code: `peer=""` (plaintext), 64 identities, `other`.
pub const MAX_PEERS_PER_HANDLE: usize = 64;

/// The transport labels of a request handle: `tls` and `peer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerLabels {
    /// `tls="mtls"` when set, else `tls="none"`.
    pub mtls: bool,
    /// `peer`: the SPIFFE ID of the other side, `""` when unknown.
    pub peer: Box<str>,
}

impl PeerLabels {
    /// The labels of requests to a cluster whose endpoints expect `identities` (per endpoint,
    /// `None` = plaintext), from a proxy that has (`has_identity`) or lacks a mesh identity.
    ///
    /// The same rule as the upstream connect (`tls::originate`): a connection is mTLS when the
    /// endpoint expects an identity and this proxy has one. `tls="mtls"` needs every endpoint to
    /// be mTLS (a cluster with no endpoints, or with a plaintext one, is `none`); `peer` is the
    /// identity they all expect, or `""` if they expect different ones.
    pub fn outbound<'a>(
        identities: impl IntoIterator<Item = Option<&'a str>>,
        has_identity: bool,
    ) -> Self {
        if !has_identity {
            return Self::default();
        }
        let mut common: Option<Option<&str>> = None;
        for id in identities {
            let Some(id) = id else {
                return Self::default();
            };
            common = match common {
                None => Some(Some(id)),
                Some(Some(c)) if c == id => Some(Some(c)),
                Some(_) => Some(None),
            };
        }
        match common {
            None => Self::default(),
            Some(peer) => Self {
                mtls: true,
                peer: peer.unwrap_or("").into(),
            },
        }
    }

    fn tls(&self) -> &'static str {
        if self.mtls {
            TLS_MTLS
        } else {
            TLS_NONE
        }
    }
}

/// Every metric family of the proxy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    request: Arc<RequestSeries>,
    /// `tls` / `peer` of outbound requests per destination cluster, bound to one snapshot's
    /// clusters ([`Metrics::for_clusters`]); empty = every cluster `none`.
    cluster_peers: Arc<HashMap<Arc<str>, PeerLabels>>,
    /// The TCP and connect-error families and their live leases.
    leased: Arc<LeasedSeries>,
    config_version_info: IntGaugeVec,
    config_updates_total: IntCounterVec,
    /// Mirrors `crate::http::hibernate`'s count, refreshed at each scrape.
    http_hibernated_total: IntCounter,
    resilience: crate::resilience_metrics::ResilienceMetrics,
    /// Security families (mTLS, certificates, authorization): `crate::tls::metrics`.
    pub security: crate::tls::metrics::SecurityMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &'static str,
    made: Result<C, prometheus::Error>,
) -> Result<C, MetricsError> {
    let collector = made.map_err(|source| MetricsError::Register { name, source })?;
    registry
        .register(Box::new(collector.clone()))
        .map_err(|source| MetricsError::Register { name, source })?;
    Ok(collector)
}

impl Metrics {
    /// The registry, for modules that register their own families (`observe`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let hibernated = crate::http::hibernate::hibernated_total();
        self.http_hibernated_total
            .inc_by(hibernated.saturating_sub(self.http_hibernated_total.get()));
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed family, which
        // the registry already rejected at registration.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// These families, with the outbound `tls` / `peer` labels of `clusters` (name, labels):
    /// what a snapshot builds its handles with, so that outbound handles carry their destination's
    /// transport without any work per request.
    #[must_use]
    pub fn for_clusters(&self, clusters: impl IntoIterator<Item = (Arc<str>, PeerLabels)>) -> Self {
        Self {
            cluster_peers: Arc::new(clusters.into_iter().collect()),
            ..self.clone()
        }
    }

    /// Whether these handles come from [`Metrics::for_clusters`] of `base`'s families with
    /// exactly `clusters`: a snapshot whose clusters' transports did not change keeps its
    /// predecessor's (and so can keep its routes).
    pub fn has_cluster_peers(
        &self,
        base: &Metrics,
        clusters: &HashMap<Arc<str>, PeerLabels>,
    ) -> bool {
        Arc::ptr_eq(&self.leased, &base.leased) && *self.cluster_peers == *clusters
    }

    /// The transport labels of requests through a listener of `direction` to `cluster`.
    fn peer_labels(&self, direction: &str, cluster: &str) -> PeerLabels {
        match direction {
            "outbound" => self.cluster_peers.get(cluster).cloned().unwrap_or_default(),
            _ => PeerLabels::default(),
        }
    }

    /// Handles for requests through `route` (on a listener of `direction`) to `cluster`: the
    /// live handle with these labels if there is one (consecutive snapshots share it), else a new
    /// one. Its series are exported until the last `Arc` of it is dropped.
    ///
    /// Outbound: `tls` / `peer` of `cluster` as given to [`Metrics::for_clusters`] (`none`, `""`
    /// for a cluster not given). Inbound: `none`, `""`: the caller is known per connection
    /// ([`RequestMetrics::for_peer`]).
    pub fn request_metrics(
        &self,
        direction: &str,
        route: &str,
        cluster: &str,
    ) -> Arc<RequestMetrics> {
        let peer = self.peer_labels(direction, cluster);
        self.request_metrics_with(direction, route, cluster, &peer)
    }

    /// The live handle [`Metrics::request_metrics`] would return, without creating one: what a
    /// new snapshot pre-resolves its lazily resolved handles with, so that a route that stays
    /// keeps its series (and counts) across config pushes while an unused one still gets no
    /// series. (A route's very first request, resolving the handle in the old snapshot after the
    /// new one looked here, leaves the new snapshot unresolved: that first count goes with the
    /// old snapshot and the series restarts at its next request, a counter reset.)
    pub fn live_request_metrics(
        &self,
        direction: &str,
        route: &str,
        cluster: &str,
    ) -> Option<Arc<RequestMetrics>> {
        let peer = self.peer_labels(direction, cluster);
        let labels = request_labels(direction, route, cluster, &peer);
        let live = self.request.lock_live();
        live.get(&labels).and_then(|e| e.handle.upgrade())
    }

    /// Handles for requests through `route` (on a listener of `direction`) to `cluster`, with the
    /// transport labels `peer` (shared like [`Metrics::request_metrics`]'s).
    pub fn request_metrics_with(
        &self,
        direction: &str,
        route: &str,
        cluster: &str,
        peer: &PeerLabels,
    ) -> Arc<RequestMetrics> {
        self.request
            .handle(request_labels(direction, route, cluster, peer))
    }

    /// Handles for TCP connections from a listener of `direction` to `cluster`; the series are
    /// exported while any `TcpMetrics` for those labels lives. Outbound: `tls` / `peer` of
    /// `cluster` as given to [`Metrics::for_clusters`]; inbound: `none`, `""` (an mTLS
    /// connection's caller gets its variant, [`TcpMetrics::for_peer`]).
    pub fn tcp_metrics(&self, direction: &str, cluster: &str) -> TcpMetrics {
        let peer = match direction {
            "outbound" => self.cluster_peers.get(cluster).cloned().unwrap_or_default(),
            _ => PeerLabels::default(),
        };
        let mut m = tcp_handles(&self.leased, direction, cluster, peer.tls(), &peer.peer);
        m.variants = Some(Arc::default());
        m
    }

    /// Retry / breaker / outlier / health handles of `cluster` (for its long-lived state). Its
    /// series are created on first use, under a lease that keeps them exported while these
    /// handles (or others for the same cluster) live.
    pub fn cluster_resilience(
        &self,
        cluster: &str,
    ) -> crate::resilience_metrics::ClusterResilienceMetrics {
        self.leased
            .resilience
            .cluster_leased(cluster, ResilienceLeaser(Arc::clone(&self.leased)))
    }

    /// The rate limit of `scope` (`route`/`listener`) `name` from its proto (`None` when
    /// absent): its bucket (shared with earlier snapshots that have it) and its refusal counter,
    /// exported while a snapshot has the limit. `Err` names the bad field.
    pub fn rate_limiter(
        &self,
        scope: &str,
        name: &str,
        proto: Option<&weft_proto::v1::RateLimit>,
    ) -> Result<Option<(crate::ratelimit::RateLimiter, LeasedCounter)>, (&'static str, String)>
    {
        let Some(limit) = self.resilience.rate_limiter(scope, name, proto)? else {
            return Ok(None);
        };
        let f = &self.leased;
        let (lease, counter) = f.lease(
            LeaseKey::RateLimited {
                scope: scope.into(),
                name: name.into(),
            },
            || f.resilience.rate_limited(scope, name),
        );
        Ok(Some((
            limit,
            LeasedCounter {
                counter,
                _lease: lease,
            },
        )))
    }

    /// `weft_authz_denied_total{direction,policy,protocol}` of a listener's policy, exported
    /// while a snapshot has the listener with that policy.
    pub fn authz_denied(&self, direction: &str, policy: &str, protocol: &str) -> LeasedCounter {
        let f = &self.leased;
        let (lease, counter) = f.lease(
            LeaseKey::AuthzDenied {
                direction: direction.into(),
                policy: policy.into(),
                protocol: protocol.into(),
            },
            || f.security.authz_denied(direction, policy, protocol),
        );
        LeasedCounter {
            counter,
            _lease: lease,
        }
    }

    /// The series `labels` of `family`, a counter family a feature module defines (registered
    /// here on first use), exported while a holder of the returned counter lives: how feature
    /// modules (`crate::filters`) lease per-route series without this file growing per family.
    pub fn leased_counter(
        &self,
        family: &'static CounterFamily,
        labels: &[&str],
    ) -> Result<LeasedCounter, MetricsError> {
        let f = &self.leased;
        let vec = f.feature(family)?;
        let counter =
            vec.get_metric_with_label_values(labels)
                .map_err(|source| MetricsError::Register {
                    name: family.name,
                    source,
                })?;
        let key = LeaseKey::Feature {
            family: family.name,
            labels: labels.iter().map(|l| Box::from(*l)).collect(),
        };
        let (lease, counter) = f.lease(key, || counter);
        Ok(LeasedCounter {
            counter,
            _lease: lease,
        })
    }

    /// The retry / breaker / outlier / health-check / rate-limit families.
    pub fn resilience(&self) -> &crate::resilience_metrics::ResilienceMetrics {
        &self.resilience
    }

    /// Counter of failed connects to endpoints of `cluster`, exported while the returned lease
    /// (or another for the same cluster) lives: keep it next to the counter.
    pub fn connect_errors(&self, cluster: &str) -> (IntCounter, SeriesLease) {
        let f = &self.leased;
        let (lease, counter) = f.lease(
            LeaseKey::ConnectErrors {
                cluster: cluster.into(),
            },
            || {
                f.upstream_connect_errors_total
                    .with_label_values(&[cluster])
            },
        );
        (counter, lease)
    }

    /// Records an ACK or NACK of a config update carrying `type_name`.
    pub fn config_update(&self, type_name: &str, acked: bool) {
        let result = if acked { "ack" } else { "nack" };
        self.config_updates_total
            .with_label_values(&[type_name, result])
            .inc();
    }

    /// Moves `weft_config_version_info{type}` from `old` to `new`.
    pub fn config_version(&self, type_name: &str, old: Option<&str>, new: &str) {
        if let Some(old) = old {
            if old != new {
                // The series may be absent (first version): nothing to remove then.
                let _ = self
                    .config_version_info
                    .remove_label_values(&[type_name, old]);
            }
        }
        self.config_version_info
            .with_label_values(&[type_name, new])
            .set(1);
    }
}
