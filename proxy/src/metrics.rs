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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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

/// Latency buckets from 100µs to 10s: proxies add sub-millisecond latency, upstreams may take
/// seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Label names of the request families besides `weft_requests_total`'s response labels.
const REQUEST_LABELS: [&str; 5] = ["direction", "route", "cluster", "tls", "peer"];

/// Label names of the TCP families (`weft_tcp_bytes_total` adds `flow`).
const TCP_LABELS: [&str; 4] = ["direction", "cluster", "tls", "peer"];

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
/// Base handles one connection remembers its variants for (routes in use).
const CONNECTION_SLOTS: usize = 4;

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

/// The five request families.
struct RequestFamilies {
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    response_headers_duration: HistogramVec,
    request_body_bytes_total: IntCounterVec,
    response_body_bytes_total: IntCounterVec,
}

/// The request families and the live request handles by label set (direction, route, cluster,
/// tls, peer): at most one live handle per labels, whose last `Arc` removes the labels' series.
struct RequestSeries {
    families: RequestFamilies,
    live: Mutex<LiveRequests>,
}

/// Handles by labels; an entry whose handle is dead is about to be removed by its `Drop` (or
/// replaced by a new handle for the same labels first).
type LiveRequests = HashMap<[Box<str>; 5], LiveRequest>;

struct LiveRequest {
    handle: Weak<RequestMetrics>,
    /// Shared with the next handle of the same labels if it is created before this entry's
    /// handle finished dropping (see `Drop for RequestMetrics`).
    recorded: Arc<Recorded>,
}

const _: () = assert!(
    FAST_SLOTS <= u32::BITS as usize,
    "Recorded::fast is one bit per slot"
);

/// The `(code, grpc_status)` combinations of `weft_requests_total` recorded on one label set:
/// what removing its series must remove.
#[derive(Default)]
struct Recorded {
    /// Bit `i`: fast slot `i` was resolved by a handle of these labels (set once per handle and
    /// slot, in the slot's `get_or_init`: nothing on the per-request path).
    fast: AtomicU32,
    /// The rare combinations (the slow path): `grpc_status` -> codes.
    rare: Mutex<HashMap<Box<str>, HashSet<u16>>>,
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
    /// Creates and registers every family in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        let request = RequestFamilies {
            requests_total: register(
                &r,
                "weft_requests_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_requests_total",
                        "HTTP requests proxied, by response code",
                    ),
                    &[
                        "direction",
                        "route",
                        "cluster",
                        "tls",
                        "peer",
                        "code",
                        "code_class",
                        "grpc_status",
                    ],
                ),
            )?,
            request_duration: register(
                &r,
                "weft_request_duration_seconds",
                HistogramVec::new(
                    HistogramOpts::new(
                        "weft_request_duration_seconds",
                        "Time from request received to response body finished",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &REQUEST_LABELS,
                ),
            )?,
            response_headers_duration: register(
                &r,
                "weft_response_headers_duration_seconds",
                HistogramVec::new(
                    HistogramOpts::new(
                        "weft_response_headers_duration_seconds",
                        "Time from request received to response headers ready to send downstream",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &REQUEST_LABELS,
                ),
            )?,
            request_body_bytes_total: register(
                &r,
                "weft_request_body_bytes_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_request_body_bytes_total",
                        "Request body bytes read from the downstream",
                    ),
                    &REQUEST_LABELS,
                ),
            )?,
            response_body_bytes_total: register(
                &r,
                "weft_response_body_bytes_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_response_body_bytes_total",
                        "Response body bytes streamed from the upstream to the downstream",
                    ),
                    &REQUEST_LABELS,
                ),
            )?,
        };
        let resilience = crate::resilience_metrics::ResilienceMetrics::new(&r)?;
        let security = crate::tls::metrics::SecurityMetrics::register(&r).map_err(|source| {
            MetricsError::Register {
                name: "weft security metrics",
                source,
            }
        })?;
        let leased = LeasedSeries {
            tcp_connections_total: register(
                &r,
                "weft_tcp_connections_total",
                IntCounterVec::new(
                    Opts::new("weft_tcp_connections_total", "TCP connections accepted"),
                    &TCP_LABELS,
                ),
            )?,
            tcp_connections_closed_total: register(
                &r,
                "weft_tcp_connections_closed_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_tcp_connections_closed_total",
                        "TCP connections closed",
                    ),
                    &TCP_LABELS,
                ),
            )?,
            tcp_connections: register(
                &r,
                "weft_tcp_connections",
                IntGaugeVec::new(
                    Opts::new("weft_tcp_connections", "TCP connections open"),
                    &TCP_LABELS,
                ),
            )?,
            tcp_bytes_total: register(
                &r,
                "weft_tcp_bytes_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_tcp_bytes_total",
                        "TCP bytes proxied; rx = read from the downstream, tx = written to it",
                    ),
                    &["direction", "cluster", "tls", "peer", "flow"],
                ),
            )?,
            upstream_connect_errors_total: register(
                &r,
                "weft_upstream_connect_errors_total",
                IntCounterVec::new(
                    Opts::new(
                        "weft_upstream_connect_errors_total",
                        "Failed connection attempts to upstream endpoints",
                    ),
                    &["cluster"],
                ),
            )?,
            resilience: resilience.clone(),
            security: security.clone(),
            registry: r.clone(),
            features: Mutex::default(),
            live: Mutex::default(),
        };
        Ok(Self {
            request: Arc::new(RequestSeries {
                families: request,
                live: Mutex::default(),
            }),
            cluster_peers: Arc::default(),
            leased: Arc::new(leased),
            config_version_info: register(
                &r,
                "weft_config_version_info",
                IntGaugeVec::new(
                    Opts::new(
                        "weft_config_version_info",
                        "Config version held, per type (1)",
                    ),
                    &["type", "version"],
                ),
            )?,
            config_updates_total: register(
                &r,
                "weft_config_updates_total",
                IntCounterVec::new(
                    Opts::new("weft_config_updates_total", "Config updates ACKed / NACKed"),
                    &["type", "result"],
                ),
            )?,
            http_hibernated_total: register(
                &r,
                "weft_http_connections_hibernated_total",
                IntCounter::new(
                    "weft_http_connections_hibernated_total",
                    "Idle HTTP/1.1 downstream connections that released their buffers (hibernated)",
                ),
            )?,
            resilience,
            security,
            registry: r,
        })
    }

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

    /// Retry / breaker / outlier / health handles of `cluster` (for its long-lived state), whose
    /// series are exported while these handles (or others for the same cluster) live.
    pub fn cluster_resilience(
        &self,
        cluster: &str,
    ) -> crate::resilience_metrics::ClusterResilienceMetrics {
        let f = &self.leased;
        let (lease, handles) = f.lease(
            LeaseKey::Resilience {
                cluster: cluster.into(),
            },
            || f.resilience.cluster(cluster),
        );
        handles.leased(lease)
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

/// Number of lazily resolved `(code, grpc_status)` slots per destination; see [`fast_slot`].
const FAST_SLOTS: usize = 32;

/// Maps the common `(code, grpc_status)` pairs to a slot so that recording them touches no lock.
fn fast_slot(code: u16, grpc_status: &str) -> Option<usize> {
    if grpc_status.is_empty() {
        let slot = match code {
            200 => 0,
            201 => 1,
            204 => 2,
            301 => 3,
            302 => 4,
            304 => 5,
            400 => 6,
            401 => 7,
            403 => 8,
            404 => 9,
            429 => 10,
            500 => 11,
            502 => 12,
            503 => 13,
            504 => 14,
            _ => return None,
        };
        return Some(slot);
    }
    if code != 200 {
        return None;
    }
    // gRPC status codes 0..=16 ride on HTTP 200.
    match grpc_status.as_bytes() {
        [d] if d.is_ascii_digit() => Some(15 + usize::from(d - b'0')),
        [b'1', d] if (b'0'..=b'6').contains(d) => Some(25 + usize::from(d - b'0')),
        _ => None,
    }
}

/// The HTTP codes of fast slots `0..15` (without `grpc_status`), in slot order.
const FAST_CODES: [u16; 15] = [
    200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
];
/// The gRPC statuses of fast slots `15..32` (on HTTP 200), in slot order.
const FAST_GRPC: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The `(code, grpc_status)` of fast slot `slot`: the inverse of [`fast_slot`].
fn fast_slot_labels(slot: usize) -> (u16, &'static str) {
    match slot.checked_sub(FAST_CODES.len()) {
        None => (FAST_CODES[slot], ""),
        Some(g) => (200, FAST_GRPC[g]),
    }
}

/// The label values of a request handle.
fn request_labels(direction: &str, route: &str, cluster: &str, peer: &PeerLabels) -> [Box<str>; 5] {
    [
        direction.into(),
        route.into(),
        cluster.into(),
        peer.tls().into(),
        peer.peer.clone(),
    ]
}

impl RequestSeries {
    fn lock_live(&self) -> MutexGuard<'_, LiveRequests> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live handle with `labels`, or a new one.
    fn handle(self: &Arc<Self>, labels: [Box<str>; 5]) -> Arc<RequestMetrics> {
        let mut live = self.lock_live();
        self.handle_in(&mut live, labels)
    }

    /// [`RequestSeries::handle`] with the live-handle lock held (`live`).
    ///
    /// Why one lock for creating handles and removing series: a handle's series are removed by
    /// its `Drop`, which runs after its last `Arc` is gone, so a new handle for the same labels
    /// can be created in between (the old entry no longer upgrades). That new handle resolves
    /// the families' existing children (the series are still there). If the old handle's `Drop`
    /// then removed the series, the new handle would count into children no longer exported:
    /// live series gone from `/metrics`. So `Drop` removes them only if, under this lock, the
    /// entry for its labels is still itself; a handle created in between replaced the entry (and
    /// took over its [`Recorded`], so the codes the old one recorded are removed with the new
    /// one). Creation either happens before the `Drop` takes the lock (replaces the entry: the
    /// series stay, owned by the new handle) or after it (the series are gone: new children).
    fn handle_in(
        self: &Arc<Self>,
        live: &mut LiveRequests,
        labels: [Box<str>; 5],
    ) -> Arc<RequestMetrics> {
        let recorded = match live.get(&labels) {
            Some(entry) => match entry.handle.upgrade() {
                Some(handle) => return handle,
                // Dying, its `Drop` waiting for the lock: continue its series.
                None => Arc::clone(&entry.recorded),
            },
            None => Arc::default(),
        };
        let handle = Arc::new(RequestMetrics::new(
            Arc::clone(self),
            labels.clone(),
            Arc::clone(&recorded),
        ));
        live.insert(
            labels,
            LiveRequest {
                handle: Arc::downgrade(&handle),
                recorded,
            },
        );
        handle
    }

    /// Removes every series of `labels` (with the live-handle lock held: see
    /// [`RequestSeries::handle_in`]).
    fn remove_series(&self, labels: &[Box<str>; 5], recorded: &Recorded) {
        let values: [&str; 5] = std::array::from_fn(|i| &*labels[i]);
        let f = &self.families;
        // An error means the series is not there (already removed): nothing to do.
        let _ = f.request_duration.remove_label_values(&values);
        let _ = f.response_headers_duration.remove_label_values(&values);
        let _ = f.request_body_bytes_total.remove_label_values(&values);
        let _ = f.response_body_bytes_total.remove_label_values(&values);
        let remove_code = |code: u16, grpc: &str| {
            let code_str = code.to_string();
            let [d, r, c, t, p] = values;
            let _ = f.requests_total.remove_label_values(&[
                d,
                r,
                c,
                t,
                p,
                &code_str,
                code_class(code),
                grpc,
            ]);
        };
        let fast = recorded.fast.load(Ordering::Acquire);
        for slot in (0..FAST_SLOTS).filter(|s| fast & (1 << s) != 0) {
            let (code, grpc) = fast_slot_labels(slot);
            remove_code(code, grpc);
        }
        let rare = recorded.rare.lock().unwrap_or_else(PoisonError::into_inner);
        for (grpc, codes) in rare.iter() {
            for &code in codes {
                remove_code(code, grpc);
            }
        }
    }
}

/// Per (direction, route, cluster, tls, peer) request metrics, resolved when the snapshot is
/// built (inbound per-peer variants: once per connection, [`PeerHandles`]). One live handle per
/// label set ([`Metrics::request_metrics`]); dropping the last `Arc` removes its series.
pub struct RequestMetrics {
    series: Arc<RequestSeries>,
    /// direction, route, cluster, tls, peer.
    labels: [Box<str>; 5],
    duration: Histogram,
    headers_duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    fast: [OnceLock<IntCounter>; FAST_SLOTS],
    /// The codes recorded on these labels, shared with a handle that replaced this one early.
    recorded: Arc<Recorded>,
    /// The variants of this handle per caller, created on first use; they live as long as
    /// this handle (and the connections holding one).
    peers: OnceLock<PeerVariants>,
}

/// The per-peer variants of one base handle, at most [`MAX_PEERS_PER_HANDLE`] by identity, and
/// the shared `peer="other"` one. The base is shared by every snapshot that keeps its route, so
/// the admitted callers are not reset by config pushes.
#[derive(Default)]
struct PeerVariants {
    by_peer: Mutex<HashMap<Box<str>, Arc<RequestMetrics>>>,
    other: OnceLock<Arc<RequestMetrics>>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Drop for RequestMetrics {
    /// Removes this handle's series, unless a newer handle of the same labels took them over
    /// (see [`RequestSeries::handle_in`]). The variants (`peers`) drop after this, each with
    /// its own `Drop` (the lock is released by then).
    fn drop(&mut self) {
        let this: *const Self = self;
        let mut live = self.series.lock_live();
        let ours = live
            .get(&self.labels)
            .is_some_and(|e| std::ptr::eq(e.handle.as_ptr(), this));
        if ours {
            live.remove(&self.labels);
            self.series.remove_series(&self.labels, &self.recorded);
        }
    }
}

impl RequestMetrics {
    fn new(series: Arc<RequestSeries>, labels: [Box<str>; 5], recorded: Arc<Recorded>) -> Self {
        let values: [&str; 5] = std::array::from_fn(|i| &*labels[i]);
        let families = &series.families;
        Self {
            duration: families.request_duration.with_label_values(&values),
            headers_duration: families
                .response_headers_duration
                .with_label_values(&values),
            request_bytes: families.request_body_bytes_total.with_label_values(&values),
            response_bytes: families
                .response_body_bytes_total
                .with_label_values(&values),
            series,
            labels,
            fast: std::array::from_fn(|_| OnceLock::new()),
            recorded,
            peers: OnceLock::new(),
        }
    }

    /// The `route` label (access logs and spans name the route with it).
    pub fn route(&self) -> &str {
        &self.labels[1]
    }

    /// The `tls` label (`mtls` or `none`).
    pub fn tls(&self) -> &str {
        &self.labels[3]
    }

    /// The `peer` label (a SPIFFE ID, `""` or `other`).
    pub fn peer(&self) -> &str {
        &self.labels[4]
    }

    /// The variant of these handles for requests from the verified mesh identity `peer` (an
    /// inbound mTLS connection): `tls="mtls"`, `peer=<peer>`, or `peer="other"` once
    /// [`MAX_PEERS_PER_HANDLE`] other identities have their own. Takes locks and may resolve
    /// labels: call it once per connection ([`PeerHandles`]), never per request.
    pub fn for_peer(&self, peer: &str) -> Arc<RequestMetrics> {
        let variants = self.peers.get_or_init(PeerVariants::default);
        let variant = |peer: &str| {
            let [d, r, c, _, _] = &self.labels;
            self.series.handle([
                d.clone(),
                r.clone(),
                c.clone(),
                TLS_MTLS.into(),
                peer.into(),
            ])
        };
        {
            let mut by_peer = variants
                .by_peer
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(m) = by_peer.get(peer) {
                return Arc::clone(m);
            }
            if by_peer.len() < MAX_PEERS_PER_HANDLE {
                let m = variant(peer);
                by_peer.insert(peer.into(), Arc::clone(&m));
                return m;
            }
        }
        Arc::clone(variants.other.get_or_init(|| variant(PEER_OTHER)))
    }

    /// Records one request answered by the proxy itself (an error response): its headers and
    /// its (small, local) body are ready at the same time, so both histograms get `seconds`.
    pub fn record(&self, code: http::StatusCode, grpc_status: &str, seconds: f64) {
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.headers_duration.observe(seconds);
        self.record_finished(code, grpc_status, seconds);
    }

    /// Records that the upstream's response headers are ready, `seconds` after the request
    /// arrived (`weft_response_headers_duration_seconds`).
    pub fn record_response_headers(&self, seconds: f64) {
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.headers_duration.observe(seconds);
    }

    /// Counts request body bytes read from the downstream.
    #[inline]
    pub fn add_request_bytes(&self, n: usize) {
        if n > 0 && crate::observe::request_metrics_enabled() {
            self.request_bytes.inc_by(n as u64);
        }
    }

    /// Counts response body bytes streamed downstream.
    #[inline]
    pub fn add_response_bytes(&self, n: usize) {
        if n > 0 && crate::observe::request_metrics_enabled() {
            self.response_bytes.inc_by(n as u64);
        }
    }

    /// Records one finished request (its response body ended), `seconds` after it arrived.
    pub fn record_finished(&self, code: http::StatusCode, grpc_status: &str, seconds: f64) {
        // `observability.metrics.requests: false` (the on/off benchmark).
        if !crate::observe::request_metrics_enabled() {
            return;
        }
        self.duration.observe(seconds);
        let class = code_class(code.as_u16());
        let counter = |code: &str| {
            let [d, r, c, t, p] = &self.labels;
            self.series.families.requests_total.with_label_values(&[
                &**d,
                &**r,
                &**c,
                &**t,
                &**p,
                code,
                class,
                grpc_status,
            ])
        };
        match fast_slot(code.as_u16(), grpc_status) {
            Some(slot) => self.fast[slot]
                .get_or_init(|| {
                    // Once per handle and slot: the series to remove with these labels.
                    self.recorded.fast.fetch_or(1 << slot, Ordering::Release);
                    counter(code.as_str())
                })
                .inc(),
            // Rare combinations: a read-locked lookup in the family, and one in the set of
            // combinations to remove with the handle (allocates only the first time).
            None => {
                counter(code.as_str()).inc();
                self.note_rare(code.as_u16(), grpc_status);
            }
        }
    }

    /// Remembers that `(code, grpc_status)` (not a fast slot) was recorded on these labels.
    fn note_rare(&self, code: u16, grpc_status: &str) {
        let mut rare = self
            .recorded
            .rare
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match rare.get_mut(grpc_status) {
            Some(codes) => {
                codes.insert(code);
            }
            None => {
                rare.insert(grpc_status.into(), HashSet::from([code]));
            }
        }
    }
}

/// The request handles of one downstream connection whose client is a verified mesh identity
/// (inbound mTLS): its variant of each base handle it uses is resolved once
/// ([`RequestMetrics::for_peer`]) and then reused by every request of the connection (a lookup by
/// pointer among at most a few entries, under a lock only this connection takes).
///
/// The bases are held weakly (only to be found by pointer: a `Weak` keeps the allocation, so the
/// address is not reused while it is here): a connection does not keep the series of a route
/// that went away, only the variant it resolved, until the slot is reused or the connection ends.
pub struct PeerHandles {
    peer: Box<str>,
    /// (base, variant), most recently resolved last.
    resolved: Mutex<Vec<(Weak<RequestMetrics>, Arc<RequestMetrics>)>>,
}

impl std::fmt::Debug for PeerHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHandles")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl PeerHandles {
    /// The handles of a connection from `peer` (its SPIFFE ID).
    pub fn new(peer: &str) -> Self {
        Self {
            peer: peer.into(),
            resolved: Mutex::new(Vec::with_capacity(1)),
        }
    }

    /// This connection's variant of `base`.
    pub fn resolve(&self, base: &Arc<RequestMetrics>) -> Arc<RequestMetrics> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, v)) = resolved
            .iter()
            .find(|(b, _)| std::ptr::eq(b.as_ptr(), Arc::as_ptr(base)))
        {
            return Arc::clone(v);
        }
        let variant = base.for_peer(&self.peer);
        // Variants of bases gone (routes removed) go first, then the oldest.
        resolved.retain(|(b, _)| b.strong_count() > 0);
        if resolved.len() == CONNECTION_SLOTS {
            resolved.remove(0);
        }
        resolved.push((Arc::downgrade(base), Arc::clone(&variant)));
        variant
    }
}

/// The `code_class` label of an HTTP status: `1xx`..`5xx`, else `other` (static strings, no allocation).
fn code_class(code: u16) -> &'static str {
    match code / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        // 600..=999: valid for the `http` crate, never standard; kept to one series.
        _ => "other",
    }
}

/// Per (direction, cluster) TCP metrics, resolved when the snapshot is built. The series are
/// exported while a `TcpMetrics` for (direction, cluster) lives: the listener holding it is held
/// by its snapshots and by every connection accepted on it, so a draining connection keeps
/// counting into exported series. A counter cloned out of it and kept past the last
/// `TcpMetrics` would count into a removed child: lost counts, never a new series (only
/// `with_label_values`, under the lease lock, creates series).
#[derive(Clone)]
pub struct TcpMetrics {
    /// `weft_tcp_connections_total`.
    pub accepted: IntCounter,
    /// `weft_tcp_connections_closed_total`.
    pub closed: IntCounter,
    /// `weft_tcp_connections` (open now).
    pub open: IntGauge,
    /// Bytes read from the downstream.
    pub rx: IntCounter,
    /// Bytes written to the downstream.
    pub tx: IntCounter,
    _lease: SeriesLease,
    /// (direction, cluster) of these handles.
    labels: [Box<str>; 2],
    families: Arc<LeasedSeries>,
    /// Base handles (not a variant): the per-caller variants, at most
    /// [`MAX_PEERS_PER_HANDLE`] by identity plus `other`, owned here so that a caller's series
    /// live as long as the listener (not just its current connections).
    variants: Option<Arc<TcpVariants>>,
}

/// The per-caller variants of base TCP handles, by `peer` label.
type TcpVariants = Mutex<HashMap<Box<str>, Arc<TcpMetrics>>>;

impl std::fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMetrics")
            .field("labels", &self.labels)
            .field("lease", &self._lease)
            .finish_non_exhaustive()
    }
}

/// The TCP handles of (direction, cluster, tls, peer), leased.
fn tcp_handles(
    f: &Arc<LeasedSeries>,
    direction: &str,
    cluster: &str,
    tls: &str,
    peer: &str,
) -> TcpMetrics {
    let key = LeaseKey::Tcp {
        direction: direction.into(),
        cluster: cluster.into(),
        tls: tls.into(),
        peer: peer.into(),
    };
    let labels = [direction, cluster, tls, peer];
    let (lease, (accepted, closed, open, rx, tx)) = f.lease(key, || {
        (
            f.tcp_connections_total.with_label_values(&labels),
            f.tcp_connections_closed_total.with_label_values(&labels),
            f.tcp_connections.with_label_values(&labels),
            f.tcp_bytes_total
                .with_label_values(&[direction, cluster, tls, peer, "rx"]),
            f.tcp_bytes_total
                .with_label_values(&[direction, cluster, tls, peer, "tx"]),
        )
    });
    TcpMetrics {
        accepted,
        closed,
        open,
        rx,
        tx,
        _lease: lease,
        labels: [direction.into(), cluster.into()],
        families: Arc::clone(f),
        variants: None,
    }
}

impl TcpMetrics {
    /// The handles of a connection whose client proved the mesh identity `peer` (inbound mTLS):
    /// `tls="mtls"`, `peer=<peer>`, or `peer="other"` past [`MAX_PEERS_PER_HANDLE`] callers of
    /// this listener. Once per connection (a lock and, the first time, label resolution).
    pub fn for_peer(&self, peer: &str) -> Arc<TcpMetrics> {
        let Some(variants) = &self.variants else {
            // Already a variant.
            return Arc::new(self.clone());
        };
        let mut variants = variants.lock().unwrap_or_else(PoisonError::into_inner);
        let label = if variants.contains_key(peer) || variants.len() < MAX_PEERS_PER_HANDLE {
            peer
        } else {
            PEER_OTHER
        };
        if let Some(v) = variants.get(label) {
            return Arc::clone(v);
        }
        let [d, c] = &self.labels;
        let v = Arc::new(tcp_handles(&self.families, d, c, TLS_MTLS, label));
        variants.insert(label.into(), Arc::clone(&v));
        v
    }
}

/// A counter whose series is exported while any holder of it (or of another handle for the
/// same labels) lives.
#[derive(Debug, Clone)]
pub struct LeasedCounter {
    counter: IntCounter,
    _lease: SeriesLease,
}

impl LeasedCounter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.counter.inc();
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.counter.get()
    }
}

/// A counter family defined by a feature module ([`Metrics::leased_counter`]).
#[derive(Debug)]
pub struct CounterFamily {
    /// Metric name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Label names.
    pub labels: &'static [&'static str],
}

/// The families whose series are held by [`SeriesLease`]s, and the live leases.
struct LeasedSeries {
    tcp_connections_total: IntCounterVec,
    tcp_connections_closed_total: IntCounterVec,
    tcp_connections: IntGaugeVec,
    tcp_bytes_total: IntCounterVec,
    upstream_connect_errors_total: IntCounterVec,
    /// The per-cluster retry / breaker / outlier / health families, and rate-limit refusals.
    resilience: crate::resilience_metrics::ResilienceMetrics,
    /// `weft_authz_denied_total`.
    security: crate::tls::metrics::SecurityMetrics,
    /// Where feature families are registered, and those registered so far by name.
    registry: Registry,
    features: Mutex<HashMap<&'static str, IntCounterVec>>,
    live: Mutex<HashMap<LeaseKey, Weak<Lease>>>,
}

/// The series one lease keeps exported.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LeaseKey {
    /// The four `weft_tcp_*` series (five with both flows) of (direction, cluster).
    Tcp {
        direction: Box<str>,
        cluster: Box<str>,
        tls: Box<str>,
        peer: Box<str>,
    },
    /// `weft_upstream_connect_errors_total{cluster}`.
    ConnectErrors { cluster: Box<str> },
    /// Every per-cluster resilience series of `cluster` (retries, breaker, outlier, health).
    Resilience { cluster: Box<str> },
    /// `weft_rate_limited_total{scope,name}`.
    RateLimited { scope: Box<str>, name: Box<str> },
    /// `weft_authz_denied_total{direction,policy,protocol}`.
    AuthzDenied {
        direction: Box<str>,
        policy: Box<str>,
        protocol: Box<str>,
    },
    /// One series of a feature family ([`Metrics::leased_counter`]).
    Feature {
        family: &'static str,
        labels: Box<[Box<str>]>,
    },
}

/// Keeps some series exported while held (cloned with what records into them); the last one
/// for the same series removes them. Shared by label set like [`RequestMetrics`], with the same
/// one-lock rule (see [`RequestSeries::handle_in`]).
#[derive(Clone)]
pub struct SeriesLease(Arc<Lease>);

struct Lease {
    key: LeaseKey,
    families: Arc<LeasedSeries>,
}

impl std::fmt::Debug for SeriesLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeriesLease").field(&self.0.key).finish()
    }
}

impl LeasedSeries {
    fn lock_live(&self) -> MutexGuard<'_, HashMap<LeaseKey, Weak<Lease>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_features(&self) -> MutexGuard<'_, HashMap<&'static str, IntCounterVec>> {
        self.features.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `family`'s vector, registered on first use.
    fn feature(&self, family: &'static CounterFamily) -> Result<IntCounterVec, MetricsError> {
        let mut features = self.lock_features();
        if let Some(v) = features.get(family.name) {
            return Ok(v.clone());
        }
        let v = register(
            &self.registry,
            family.name,
            IntCounterVec::new(Opts::new(family.name, family.help), family.labels),
        )?;
        features.insert(family.name, v.clone());
        Ok(v)
    }

    /// The live lease on `key` or a new one, and `resolve()`'s handles, resolved under the lock
    /// (so a dying lease cannot remove the series between the two).
    fn lease<T>(self: &Arc<Self>, key: LeaseKey, resolve: impl FnOnce() -> T) -> (SeriesLease, T) {
        let mut live = self.lock_live();
        let lease = match live.get(&key).and_then(Weak::upgrade) {
            Some(lease) => lease,
            None => {
                let lease = Arc::new(Lease {
                    key: key.clone(),
                    families: Arc::clone(self),
                });
                live.insert(key, Arc::downgrade(&lease));
                lease
            }
        };
        (SeriesLease(lease), resolve())
    }

    fn remove_series(&self, key: &LeaseKey) {
        // Errors: the series is already gone (nothing to remove).
        match key {
            LeaseKey::Tcp {
                direction,
                cluster,
                tls,
                peer,
            } => {
                let labels = [&**direction, &**cluster, &**tls, &**peer];
                let _ = self.tcp_connections_total.remove_label_values(&labels);
                let _ = self
                    .tcp_connections_closed_total
                    .remove_label_values(&labels);
                let _ = self.tcp_connections.remove_label_values(&labels);
                for flow in ["rx", "tx"] {
                    let _ = self
                        .tcp_bytes_total
                        .remove_label_values(&[direction, cluster, tls, peer, flow]);
                }
            }
            LeaseKey::ConnectErrors { cluster } => {
                let _ = self
                    .upstream_connect_errors_total
                    .remove_label_values(&[cluster]);
            }
            LeaseKey::Resilience { cluster } => self.resilience.remove_cluster(cluster),
            LeaseKey::RateLimited { scope, name } => {
                self.resilience.remove_rate_limited(scope, name);
            }
            LeaseKey::AuthzDenied {
                direction,
                policy,
                protocol,
            } => self
                .security
                .remove_authz_denied(direction, policy, protocol),
            LeaseKey::Feature { family, labels } => {
                if let Some(v) = self.lock_features().get(family) {
                    let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
                    let _ = v.remove_label_values(&labels);
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let this: *const Self = self;
        let mut live = self.families.lock_live();
        if live
            .get(&self.key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), this))
        {
            live.remove(&self.key);
            self.families.remove_series(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_slots_are_distinct_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for code in [
            200u16, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
        ] {
            let s = fast_slot(code, "").unwrap();
            assert!(s < FAST_SLOTS && seen.insert(s));
        }
        for g in 0..=16 {
            let s = fast_slot(200, &g.to_string()).unwrap();
            assert!(s < FAST_SLOTS && seen.insert(s), "grpc {g}");
        }
        assert_eq!(fast_slot(418, ""), None);
        assert_eq!(fast_slot(200, "17"), None);
    }

    #[test]
    fn records_requests_with_labels() {
        let m = Metrics::new().unwrap();
        let r = m.request_metrics("outbound", "default-backend.default", "backend.default");
        r.record(http::StatusCode::OK, "", 0.001);
        r.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
        r.record(http::StatusCode::OK, "14", 0.001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(r#"weft_requests_total{cluster="backend.default",code="200",code_class="2xx",direction="outbound",grpc_status="",peer="",route="default-backend.default",tls="none"} 1"#), "{text}");
        assert!(text.contains(r#"code="418",code_class="4xx""#));
        assert!(text.contains(r#"code="418""#));
        assert!(text.contains(r#"grpc_status="14""#));
        assert!(text.contains("weft_request_duration_seconds_bucket"));
        assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="backend.default",direction="outbound",peer="",route="default-backend.default",tls="none"} 3"#), "{text}");
    }

    #[test]
    fn streamed_requests_split_headers_and_total_and_count_bytes() {
        let m = Metrics::new().unwrap();
        let r = m.request_metrics("inbound", "r", "c");
        r.record_response_headers(0.001);
        r.add_request_bytes(5);
        r.add_response_bytes(7);
        r.add_response_bytes(0);
        r.record_finished(http::StatusCode::SERVICE_UNAVAILABLE, "", 0.5);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(
                r#"weft_request_body_bytes_total{cluster="c",direction="inbound",peer="",route="r",tls="none"} 5"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"weft_response_body_bytes_total{cluster="c",direction="inbound",peer="",route="r",tls="none"} 7"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="c",direction="inbound",peer="",route="r",tls="none"} 1"#), "{text}");
        assert!(text.contains(r#"weft_request_duration_seconds_count{cluster="c",direction="inbound",peer="",route="r",tls="none"} 1"#), "{text}");
        assert!(text.contains(r#"code="503",code_class="5xx""#), "{text}");
    }

    #[test]
    fn code_classes() {
        assert_eq!(code_class(101), "1xx");
        assert_eq!(code_class(204), "2xx");
        assert_eq!(code_class(308), "3xx");
        assert_eq!(code_class(499), "4xx");
        assert_eq!(code_class(599), "5xx");
        assert_eq!(code_class(600), "other");
    }

    fn id(n: usize) -> String {
        format!("spiffe://cluster.local/ns/default/sa/caller-{n}")
    }

    #[test]
    fn outbound_labels_follow_the_endpoints_and_own_identity() {
        let backend = "spiffe://cluster.local/ns/default/sa/backend";
        let mtls = PeerLabels {
            mtls: true,
            peer: backend.into(),
        };
        assert_eq!(
            PeerLabels::outbound([Some(backend), Some(backend)], true),
            mtls
        );
        // Without its own identity the proxy dials mesh endpoints in plaintext.
        assert_eq!(
            PeerLabels::outbound([Some(backend)], false),
            PeerLabels::default()
        );
        // A plaintext (static) endpoint, or no endpoint at all: not mTLS.
        assert_eq!(
            PeerLabels::outbound([Some(backend), None], true),
            PeerLabels::default()
        );
        assert_eq!(PeerLabels::outbound([], true), PeerLabels::default());
        // mTLS to endpoints expecting different identities: no single peer.
        let other = "spiffe://cluster.local/ns/default/sa/other";
        assert_eq!(
            PeerLabels::outbound([Some(backend), Some(other)], true),
            PeerLabels {
                mtls: true,
                peer: "".into()
            }
        );

        let m = Metrics::new()
            .unwrap()
            .for_clusters([("backend.default".into(), mtls)]);
        let out = m.request_metrics("outbound", "default-backend.default", "backend.default");
        assert_eq!((out.tls(), out.peer()), ("mtls", backend));
        let plain = m.request_metrics("outbound", "db", "db.default");
        assert_eq!((plain.tls(), plain.peer()), ("none", ""));
        // Inbound handles describe the caller, known per connection: the base is `none`.
        let inbound = m.request_metrics("inbound", "inbound", "backend.default");
        assert_eq!((inbound.tls(), inbound.peer()), ("none", ""));
        out.record(http::StatusCode::OK, "", 0.001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(&format!(r#"weft_requests_total{{cluster="backend.default",code="200",code_class="2xx",direction="outbound",grpc_status="",peer="{backend}",route="default-backend.default",tls="mtls"}} 1"#)), "{text}");
    }

    #[test]
    fn peers_past_the_bound_are_other_and_variants_are_shared() {
        let m = Metrics::new().unwrap();
        let base = m.request_metrics("inbound", "inbound", "inbound");
        let first = base.for_peer(&id(0));
        assert_eq!((first.tls(), first.peer()), ("mtls", id(0).as_str()));
        assert!(Arc::ptr_eq(&first, &base.for_peer(&id(0))));
        for n in 1..MAX_PEERS_PER_HANDLE {
            assert_eq!(base.for_peer(&id(n)).peer(), id(n));
        }
        let over = base.for_peer(&id(MAX_PEERS_PER_HANDLE));
        assert_eq!((over.tls(), over.peer()), ("mtls", PEER_OTHER));
        assert!(Arc::ptr_eq(
            &over,
            &base.for_peer(&id(MAX_PEERS_PER_HANDLE + 1))
        ));
        // Admitted identities keep their series.
        assert_eq!(base.for_peer(&id(3)).peer(), id(3));
        // A later snapshot's handle with the same labels is the same handle, with the same
        // admitted set: the bound is on series, not per snapshot.
        let rebuilt = m.request_metrics("inbound", "inbound", "inbound");
        assert!(Arc::ptr_eq(&base, &rebuilt));
        assert!(Arc::ptr_eq(&first, &rebuilt.for_peer(&id(0))));
        assert_eq!(rebuilt.for_peer(&id(1000)).peer(), PEER_OTHER);
        // Another route has its own bound.
        let other_route = m.request_metrics("inbound", "r2", "inbound");
        assert_eq!(other_route.for_peer(&id(1000)).peer(), id(1000));

        over.record(http::StatusCode::OK, "", 0.001);
        base.for_peer(&id(MAX_PEERS_PER_HANDLE + 7))
            .record(http::StatusCode::OK, "", 0.001);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(r#"weft_requests_total{cluster="inbound",code="200",code_class="2xx",direction="inbound",grpc_status="",peer="other",route="inbound",tls="mtls"} 2"#), "{text}");
        let peers: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("weft_request_duration_seconds_count{")
                    && l.contains(r#"route="inbound""#)
            })
            .filter_map(|l| l.split("peer=\"").nth(1)?.split('"').next())
            .collect();
        assert!(peers.len() <= MAX_PEERS_PER_HANDLE + 2, "{peers:?}");
    }

    #[test]
    fn a_connection_resolves_its_variant_once_per_base() {
        let m = Metrics::new().unwrap();
        let base = m.request_metrics("inbound", "inbound", "inbound");
        let conn = PeerHandles::new(&id(1));
        let v = conn.resolve(&base);
        assert_eq!(v.peer(), id(1));
        assert!(Arc::ptr_eq(&v, &conn.resolve(&base)));
        // Another connection of the same caller records on the same series (same variant).
        assert!(Arc::ptr_eq(&v, &PeerHandles::new(&id(1)).resolve(&base)));
        // A new snapshot's handle for the same labels is the same base: found again.
        let rebuilt = m.request_metrics("inbound", "inbound", "inbound");
        assert!(Arc::ptr_eq(&v, &conn.resolve(&rebuilt)));
        assert_eq!(conn.resolved.lock().unwrap().len(), 1);
        // Other routes' bases: at most CONNECTION_SLOTS remembered, oldest out first.
        let bases: Vec<_> = (0..CONNECTION_SLOTS + 2)
            .map(|n| m.request_metrics("inbound", &format!("r{n}"), "inbound"))
            .collect();
        for b in &bases {
            assert_eq!(conn.resolve(b).route(), b.route());
        }
        assert_eq!(conn.resolved.lock().unwrap().len(), CONNECTION_SLOTS);
        // A base that went away (its route was removed) makes room first, and the connection
        // does not keep it alive.
        let weak = Arc::downgrade(&bases[CONNECTION_SLOTS]);
        drop(bases);
        assert_eq!(weak.strong_count(), 0);
        conn.resolve(&base);
        let resolved = conn.resolved.lock().unwrap();
        assert_eq!(resolved.len(), 1, "only the live base is left");
        assert!(std::ptr::eq(resolved[0].0.as_ptr(), Arc::as_ptr(&base)));
    }

    /// The lines of `m`'s scrape that are samples of route `route`.
    fn series_of(m: &Metrics, route: &str) -> Vec<String> {
        let text = String::from_utf8(m.encode()).unwrap();
        let label = format!(r#"route="{route}""#);
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_owned)
            .collect()
    }

    fn sample(lines: &[String], prefix: &str, contains: &[&str]) -> Option<f64> {
        lines
            .iter()
            .find(|l| l.starts_with(prefix) && contains.iter().all(|c| l.contains(c)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn fast_slot_labels_invert_fast_slot() {
        for slot in 0..FAST_SLOTS {
            let (code, grpc) = fast_slot_labels(slot);
            assert_eq!(fast_slot(code, grpc), Some(slot), "{code} {grpc:?}");
        }
    }

    #[test]
    fn handles_are_shared_by_labels() {
        let m = Metrics::new().unwrap();
        let a = m.request_metrics("outbound", "r", "c");
        // A later snapshot (its own `for_clusters` view) gets the same handle.
        let b = m
            .for_clusters([("other".into(), PeerLabels::default())])
            .request_metrics("outbound", "r", "c");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(
            &a,
            &m.live_request_metrics("outbound", "r", "c").unwrap()
        ));
        // Other labels, other handles.
        assert!(!Arc::ptr_eq(&a, &m.request_metrics("inbound", "r", "c")));
        assert!(!Arc::ptr_eq(&a, &m.request_metrics("outbound", "r2", "c")));
        let mtls = PeerLabels {
            mtls: true,
            peer: "spiffe://x/y".into(),
        };
        assert!(!Arc::ptr_eq(
            &a,
            &m.request_metrics_with("outbound", "r", "c", &mtls)
        ));
        // `live_request_metrics` never creates one.
        assert!(m.live_request_metrics("outbound", "unused", "c").is_none());
        assert!(series_of(&m, "unused").is_empty());
        // Gone with the last Arc: a new one starts from zero.
        a.record(http::StatusCode::OK, "", 0.001);
        drop((a, b));
        assert!(m.live_request_metrics("outbound", "r", "c").is_none());
        let fresh = m.request_metrics("outbound", "r", "c");
        fresh.record(http::StatusCode::OK, "", 0.001);
        let lines = series_of(&m, "r");
        assert_eq!(
            sample(&lines, "weft_requests_total{", &[r#"code="200""#]),
            Some(1.0),
            "{lines:#?}"
        );
    }

    #[test]
    fn dropping_the_last_handle_removes_every_series_of_its_labels() {
        let m = Metrics::new().unwrap();
        let keep = m.request_metrics("outbound", "kept", "c");
        keep.record(http::StatusCode::OK, "", 0.001);
        let h = m.request_metrics("outbound", "gone", "c");
        let snapshot_two = Arc::clone(&h);
        // Fast slots (200, 503, gRPC 14) and rare combinations (418, gRPC "other", 599).
        h.record(http::StatusCode::OK, "", 0.001);
        h.record(http::StatusCode::SERVICE_UNAVAILABLE, "", 0.001);
        h.record(http::StatusCode::OK, "14", 0.001);
        h.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
        h.record(http::StatusCode::OK, "other", 0.001);
        h.record(http::StatusCode::from_u16(599).unwrap(), "", 0.001);
        h.record(http::StatusCode::from_u16(599).unwrap(), "", 0.001);
        h.add_request_bytes(3);
        h.add_response_bytes(4);
        let lines = series_of(&m, "gone");
        let codes = lines
            .iter()
            .filter(|l| l.starts_with("weft_requests_total{"))
            .count();
        assert_eq!(codes, 6, "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l.starts_with("weft_request_body_bytes_total{")));
        drop(h);
        assert_eq!(series_of(&m, "gone"), lines, "another holder keeps them");
        drop(snapshot_two);
        assert_eq!(series_of(&m, "gone"), Vec::<String>::new());
        // Other labels are untouched.
        let kept = series_of(&m, "kept");
        assert_eq!(
            sample(&kept, "weft_requests_total{", &[r#"code="200""#]),
            Some(1.0),
            "{kept:#?}"
        );
        assert!(m.request.lock_live().len() == 1, "only `kept` is live");
    }

    /// The interleaving one lock guards against: an old handle's last `Arc` goes, a new handle
    /// for the same labels is created before the old one's `Drop` ran, then that `Drop` runs.
    #[test]
    fn a_late_drop_of_an_old_handle_keeps_the_new_handles_series() {
        let m = Metrics::new().unwrap();
        let old = m.request_metrics("outbound", "r", "c");
        old.record(http::StatusCode::OK, "", 0.001);
        // Recorded by the old handle only (rare and fast): removed with the new one later.
        old.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
        old.record(http::StatusCode::NOT_FOUND, "", 0.001);
        let weak = Arc::downgrade(&old);
        let series = Arc::clone(&m.request);
        let mut live = series.lock_live();
        // The old handle's last Arc goes on another thread: its `Drop` waits for the lock.
        let dropper = std::thread::spawn(move || drop(old));
        while weak.strong_count() > 0 {
            std::thread::yield_now();
        }
        // Meanwhile a new snapshot creates the handle for the same labels.
        let labels = request_labels("outbound", "r", "c", &PeerLabels::default());
        let new = series.handle_in(&mut live, labels);
        assert!(!std::ptr::eq(Arc::as_ptr(&new), weak.as_ptr()));
        drop(live);
        dropper.join().unwrap();
        // The late drop left the series to the new handle: exported, and the counts go on.
        new.record(http::StatusCode::OK, "", 0.001);
        let lines = series_of(&m, "r");
        let total = |code: &str| {
            sample(
                &lines,
                "weft_requests_total{",
                &[&format!(r#"code="{code}""#)],
            )
        };
        assert_eq!(total("200"), Some(2.0), "{lines:#?}");
        assert_eq!(total("418"), Some(1.0), "{lines:#?}");
        assert_eq!(total("404"), Some(1.0), "{lines:#?}");
        assert_eq!(
            sample(&lines, "weft_request_duration_seconds_count{", &[]),
            Some(4.0),
            "{lines:#?}"
        );
        assert!(Arc::ptr_eq(
            &new,
            &m.live_request_metrics("outbound", "r", "c").unwrap()
        ));
        // The new handle's drop removes every series of the labels, the old one's codes too.
        drop(new);
        assert_eq!(series_of(&m, "r"), Vec::<String>::new());
        assert!(series.lock_live().is_empty());
    }

    #[test]
    fn peer_variants_go_with_their_base() {
        let m = Metrics::new().unwrap();
        let base = m.request_metrics("inbound", "inbound", "inbound");
        for n in 0..MAX_PEERS_PER_HANDLE + 3 {
            base.for_peer(&id(n))
                .record(http::StatusCode::OK, "", 0.001);
        }
        base.record(http::StatusCode::OK, "", 0.001);
        let peers = |m: &Metrics| {
            series_of(m, "inbound")
                .iter()
                .filter(|l| l.starts_with("weft_requests_total{"))
                .filter_map(|l| Some(l.split("peer=\"").nth(1)?.split('"').next()?.to_owned()))
                .collect::<HashSet<_>>()
        };
        assert_eq!(
            peers(&m).len(),
            MAX_PEERS_PER_HANDLE + 2,
            "64 ids, other, \"\""
        );
        // A connection still holds its variant: that series alone stays after the base goes.
        let conn = PeerHandles::new(&id(5));
        let held = conn.resolve(&base);
        drop(base);
        assert_eq!(peers(&m), HashSet::from([id(5)]));
        drop(held);
        assert_eq!(peers(&m), HashSet::from([id(5)]), "the connection holds it");
        drop(conn);
        assert!(series_of(&m, "inbound").is_empty());
        assert!(m.request.lock_live().is_empty());
    }

    #[test]
    fn tcp_and_connect_error_series_live_with_their_holders() {
        let m = Metrics::new().unwrap();
        let text = || String::from_utf8(m.encode()).unwrap();
        let first = m.tcp_metrics("outbound", "db.default");
        first.accepted.inc();
        first.rx.inc_by(10);
        // The next snapshot's listener: the same series (counts go on).
        let second = m.tcp_metrics("outbound", "db.default");
        second.accepted.inc();
        let (errors, lease) = m.connect_errors("db.default");
        errors.inc();
        let (errors_next, lease_next) = m.connect_errors("db.default");
        errors_next.inc();
        let t = text();
        assert!(
            t.contains(
                r#"weft_tcp_connections_total{cluster="db.default",direction="outbound",peer="",tls="none"} 2"#
            ),
            "{t}"
        );
        assert!(
            t.contains(
                r#"weft_tcp_bytes_total{cluster="db.default",direction="outbound",flow="rx",peer="",tls="none"} 10"#
            ),
            "{t}"
        );
        assert!(
            t.contains(r#"weft_upstream_connect_errors_total{cluster="db.default"} 2"#),
            "{t}"
        );
        drop(first);
        drop(lease);
        let t = text();
        assert!(
            t.contains(r#"weft_tcp_connections{cluster="db.default",direction="outbound",peer="",tls="none"} 0"#),
            "{t}"
        );
        assert!(
            t.contains(r#"weft_upstream_connect_errors_total{cluster="db.default"} 2"#),
            "{t}"
        );
        drop(second);
        drop(lease_next);
        let t = text();
        assert!(!t.contains("db.default"), "{t}");
        assert!(m.leased.lock_live().is_empty());
    }

    #[test]
    fn authz_denied_series_lives_while_a_listener_holds_it() {
        let m = Metrics::new().unwrap();
        let text = |m: &Metrics| String::from_utf8(m.encode()).unwrap();
        let a = m.authz_denied("inbound", "callers", "http");
        a.inc();
        // The next snapshot resolves it again while the old one still holds it: same series.
        let b = m.authz_denied("inbound", "callers", "http");
        drop(a);
        b.inc();
        assert_eq!(b.get(), 2);
        assert!(text(&m).contains(
            r#"weft_authz_denied_total{direction="inbound",policy="callers",protocol="http"} 2"#
        ));
        drop(b);
        assert!(!text(&m).contains(r#"policy="callers""#), "{}", text(&m));
    }

    #[test]
    fn tcp_callers_get_their_series_bounded_per_listener() {
        let m = Metrics::new().unwrap();
        let text = || String::from_utf8(m.encode()).unwrap();
        let base = m.tcp_metrics("inbound", "inbound");
        let web = base.for_peer("spiffe://td/ns/a/sa/web");
        web.accepted.inc();
        // A second connection from the same caller: the same handles.
        assert!(Arc::ptr_eq(&web, &base.for_peer("spiffe://td/ns/a/sa/web")));
        assert!(text().contains(
            r#"weft_tcp_connections_total{cluster="inbound",direction="inbound",peer="spiffe://td/ns/a/sa/web",tls="mtls"} 1"#
        ));
        for i in 0..MAX_PEERS_PER_HANDLE + 5 {
            base.for_peer(&format!("spiffe://td/ns/a/sa/s{i}"))
                .accepted
                .inc();
        }
        let t = text();
        let callers = t
            .lines()
            .filter(|l| l.starts_with("weft_tcp_connections_total{") && l.contains(r#"tls="mtls""#))
            .count();
        assert_eq!(callers, MAX_PEERS_PER_HANDLE + 1, "{t}");
        assert!(t.contains(
            r#"weft_tcp_connections_total{cluster="inbound",direction="inbound",peer="other",tls="mtls"} 6"#
        ), "{t}");
        // The listener (base) goes: so do its callers' series.
        drop(web);
        drop(base);
        assert!(
            !text().contains("weft_tcp_connections_total{"),
            "{}",
            text()
        );
    }
}
