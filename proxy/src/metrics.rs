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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

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

/// `tls` of a hop over mesh mTLS.
pub const TLS_MTLS: &str = "mtls";
/// `tls` of a plaintext hop.
pub const TLS_NONE: &str = "none";
/// `peer` of inbound requests from callers past [`MAX_PEERS_PER_HANDLE`].
pub const PEER_OTHER: &str = "other";
/// The most distinct `peer` values (caller identities) one inbound (direction, route, cluster)
/// gets series for, for the life of the process; requests of further callers are counted with
/// `peer="other"`. Bounds the inbound request series at 66 per (route, cluster) and
/// response code: `peer=""` (plaintext), 64 identities, `other`.
pub const MAX_PEERS_PER_HANDLE: usize = 64;
/// Base handles one connection remembers its variants for (routes x config generations in use).
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

/// The five request families, cloned into every [`RequestMetrics`] so that a handle can derive
/// its per-peer variants.
#[derive(Clone)]
struct RequestFamilies {
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    response_headers_duration: HistogramVec,
    request_body_bytes_total: IntCounterVec,
    response_body_bytes_total: IntCounterVec,
}

/// Per-peer variants of the handles with given labels, shared by every snapshot's handle with
/// those labels so that [`MAX_PEERS_PER_HANDLE`] bounds series, not one snapshot's handles.
type PeerRegistry = Mutex<HashMap<[Box<str>; 5], Arc<PeerVariants>>>;

/// Every metric family of the proxy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    request: RequestFamilies,
    /// `tls` / `peer` of outbound requests per destination cluster, bound to one snapshot's
    /// clusters ([`Metrics::for_clusters`]); empty = every cluster `none`.
    cluster_peers: Arc<HashMap<Arc<str>, PeerLabels>>,
    /// Per-peer variants by base labels (process-wide).
    peer_variants: Arc<PeerRegistry>,
    tcp_connections_total: IntCounterVec,
    tcp_connections_closed_total: IntCounterVec,
    tcp_connections: IntGaugeVec,
    tcp_bytes_total: IntCounterVec,
    config_version_info: IntGaugeVec,
    config_updates_total: IntCounterVec,
    upstream_connect_errors_total: IntCounterVec,
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
        Ok(Self {
            request,
            cluster_peers: Arc::default(),
            peer_variants: Arc::default(),
            tcp_connections_total: register(
                &r,
                "weft_tcp_connections_total",
                IntCounterVec::new(
                    Opts::new("weft_tcp_connections_total", "TCP connections accepted"),
                    &["direction", "cluster"],
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
                    &["direction", "cluster"],
                ),
            )?,
            tcp_connections: register(
                &r,
                "weft_tcp_connections",
                IntGaugeVec::new(
                    Opts::new("weft_tcp_connections", "TCP connections open"),
                    &["direction", "cluster"],
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
                    &["direction", "cluster", "flow"],
                ),
            )?,
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
            http_hibernated_total: register(
                &r,
                "weft_http_connections_hibernated_total",
                IntCounter::new(
                    "weft_http_connections_hibernated_total",
                    "Idle HTTP/1.1 downstream connections that released their buffers (hibernated)",
                ),
            )?,
            resilience: crate::resilience_metrics::ResilienceMetrics::new(&r)?,
            security: crate::tls::metrics::SecurityMetrics::register(&r).map_err(|source| {
                MetricsError::Register {
                    name: "weft security metrics",
                    source,
                }
            })?,
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

    /// Handles for requests through `route` (on a listener of `direction`) to `cluster`.
    ///
    /// Outbound: `tls` / `peer` of `cluster` as given to [`Metrics::for_clusters`] (`none`, `""`
    /// for a cluster not given). Inbound: `none`, `""`: the caller is known per connection
    /// ([`RequestMetrics::for_peer`]).
    pub fn request_metrics(&self, direction: &str, route: &str, cluster: &str) -> RequestMetrics {
        let peer = match direction {
            "outbound" => self.cluster_peers.get(cluster).cloned().unwrap_or_default(),
            _ => PeerLabels::default(),
        };
        self.request_metrics_with(direction, route, cluster, &peer)
    }

    /// Handles for requests through `route` (on a listener of `direction`) to `cluster`, with the
    /// transport labels `peer`.
    pub fn request_metrics_with(
        &self,
        direction: &str,
        route: &str,
        cluster: &str,
        peer: &PeerLabels,
    ) -> RequestMetrics {
        RequestMetrics::new(
            &self.request,
            [
                direction.into(),
                route.into(),
                cluster.into(),
                peer.tls().into(),
                peer.peer.clone(),
            ],
            &Arc::downgrade(&self.peer_variants),
        )
    }

    /// Handles for TCP connections from a listener of `direction` to `cluster`.
    pub fn tcp_metrics(&self, direction: &str, cluster: &str) -> TcpMetrics {
        TcpMetrics {
            accepted: self
                .tcp_connections_total
                .with_label_values(&[direction, cluster]),
            closed: self
                .tcp_connections_closed_total
                .with_label_values(&[direction, cluster]),
            open: self
                .tcp_connections
                .with_label_values(&[direction, cluster]),
            rx: self
                .tcp_bytes_total
                .with_label_values(&[direction, cluster, "rx"]),
            tx: self
                .tcp_bytes_total
                .with_label_values(&[direction, cluster, "tx"]),
        }
    }

    /// The retry / breaker / outlier / health-check / rate-limit families.
    pub fn resilience(&self) -> &crate::resilience_metrics::ResilienceMetrics {
        &self.resilience
    }

    /// Counter of failed connects to endpoints of `cluster`.
    pub fn connect_errors(&self, cluster: &str) -> IntCounter {
        self.upstream_connect_errors_total
            .with_label_values(&[cluster])
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

/// Per (direction, route, cluster, tls, peer) request metrics, resolved when the snapshot is
/// built (inbound per-peer variants: once per connection, [`PeerHandles`]).
pub struct RequestMetrics {
    families: RequestFamilies,
    /// direction, route, cluster, tls, peer.
    labels: [Box<str>; 5],
    duration: Histogram,
    headers_duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    fast: [OnceLock<IntCounter>; FAST_SLOTS],
    /// The variants of this handle per caller, from `registry` on first use.
    peers: OnceLock<Arc<PeerVariants>>,
    /// Weak: the registry holds variants, which hold this (no cycle). Owned by [`Metrics`].
    registry: Weak<PeerRegistry>,
}

/// The per-peer variants of one base label set, at most [`MAX_PEERS_PER_HANDLE`] by identity,
/// and the shared `peer="other"` one.
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

impl RequestMetrics {
    fn new(
        families: &RequestFamilies,
        labels: [Box<str>; 5],
        registry: &Weak<PeerRegistry>,
    ) -> Self {
        let values: [&str; 5] = std::array::from_fn(|i| &*labels[i]);
        Self {
            duration: families.request_duration.with_label_values(&values),
            headers_duration: families
                .response_headers_duration
                .with_label_values(&values),
            request_bytes: families.request_body_bytes_total.with_label_values(&values),
            response_bytes: families
                .response_body_bytes_total
                .with_label_values(&values),
            families: families.clone(),
            labels,
            fast: std::array::from_fn(|_| OnceLock::new()),
            peers: OnceLock::new(),
            registry: Weak::clone(registry),
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
        let variants = self.peers.get_or_init(|| match self.registry.upgrade() {
            Some(registry) => {
                let mut registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
                Arc::clone(registry.entry(self.labels.clone()).or_default())
            }
            // The families' owner is gone (never while the proxy runs): this handle's own set.
            None => Arc::default(),
        });
        let variant = |peer: &str| {
            let [d, r, c, _, _] = &self.labels;
            let labels = [
                d.clone(),
                r.clone(),
                c.clone(),
                TLS_MTLS.into(),
                peer.into(),
            ];
            Arc::new(RequestMetrics::new(&self.families, labels, &self.registry))
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
            self.families.requests_total.with_label_values(&[
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
            Some(slot) => self.fast[slot].get_or_init(|| counter(code.as_str())).inc(),
            // Rare combinations: a read-locked lookup in the family, still no allocation.
            None => counter(code.as_str()).inc(),
        }
    }
}

/// The request handles of one downstream connection whose client is a verified mesh identity
/// (inbound mTLS): its variant of each base handle it uses is resolved once
/// ([`RequestMetrics::for_peer`]) and then reused by every request of the connection (a lookup by
/// pointer among at most a few entries, under a lock only this connection takes).
pub struct PeerHandles {
    peer: Box<str>,
    /// (base, variant), most recently resolved last.
    resolved: Mutex<Vec<(Arc<RequestMetrics>, Arc<RequestMetrics>)>>,
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
        if let Some((_, v)) = resolved.iter().find(|(b, _)| Arc::ptr_eq(b, base)) {
            return Arc::clone(v);
        }
        let variant = base.for_peer(&self.peer);
        // Bases of older snapshots (or other routes) make room, oldest first.
        if resolved.len() == CONNECTION_SLOTS {
            resolved.remove(0);
        }
        resolved.push((Arc::clone(base), Arc::clone(&variant)));
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

/// Per (direction, cluster) TCP metrics, resolved when the snapshot is built.
#[derive(Debug, Clone)]
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
        let base = Arc::new(m.request_metrics("inbound", "inbound", "inbound"));
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
        // A later snapshot's handle with the same labels shares the admitted set: the bound is
        // on series, not per snapshot.
        let rebuilt = Arc::new(m.request_metrics("inbound", "inbound", "inbound"));
        assert!(Arc::ptr_eq(&first, &rebuilt.for_peer(&id(0))));
        assert_eq!(rebuilt.for_peer(&id(1000)).peer(), PEER_OTHER);
        // Another route has its own bound.
        let other_route = Arc::new(m.request_metrics("inbound", "r2", "inbound"));
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
        let base = Arc::new(m.request_metrics("inbound", "inbound", "inbound"));
        let conn = PeerHandles::new(&id(1));
        let v = conn.resolve(&base);
        assert_eq!(v.peer(), id(1));
        assert!(Arc::ptr_eq(&v, &conn.resolve(&base)));
        // Another connection of the same caller records on the same series (same variant).
        assert!(Arc::ptr_eq(&v, &PeerHandles::new(&id(1)).resolve(&base)));
        // A new snapshot's base: resolved again, to the shared variant; old bases age out.
        let bases: Vec<_> = (0..CONNECTION_SLOTS + 2)
            .map(|_| Arc::new(m.request_metrics("inbound", "inbound", "inbound")))
            .collect();
        for b in &bases {
            assert!(Arc::ptr_eq(&v, &conn.resolve(b)));
        }
        assert_eq!(conn.resolved.lock().unwrap().len(), CONNECTION_SLOTS);
    }
}
