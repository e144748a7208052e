//! Prometheus metrics of the proxy: one private [`Registry`] holding the metric families named in
//! ARCHITECTURE.md, and the pre-resolved per-route / per-cluster / per-listener handles the data
//! path uses so that recording a request never builds a label `String`.
//!
//! Label resolution (`with_label_values`) happens when a snapshot is built; the hot path only
//! touches atomics. `weft_requests_total` has three dynamic labels (`code`, `code_class` — a
//! function of `code` — and `grpc_status`); the common combinations are cached lazily per
//! destination in [`RequestMetrics`].

use std::sync::OnceLock;

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

/// Every metric family of the proxy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    response_headers_duration: HistogramVec,
    request_body_bytes_total: IntCounterVec,
    response_body_bytes_total: IntCounterVec,
    tcp_connections_total: IntCounterVec,
    tcp_connections_closed_total: IntCounterVec,
    tcp_connections: IntGaugeVec,
    tcp_bytes_total: IntCounterVec,
    config_version_info: IntGaugeVec,
    config_updates_total: IntCounterVec,
    upstream_connect_errors_total: IntCounterVec,
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
        Ok(Self {
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
                    &["direction", "route", "cluster"],
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
                    &["direction", "route", "cluster"],
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
                    &["direction", "route", "cluster"],
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
                    &["direction", "route", "cluster"],
                ),
            )?,
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
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed family, which
        // the registry already rejected at registration.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// Handles for requests through `route` (on a listener of `direction`) to `cluster`.
    pub fn request_metrics(&self, direction: &str, route: &str, cluster: &str) -> RequestMetrics {
        RequestMetrics {
            vec: self.requests_total.clone(),
            labels: [direction.into(), route.into(), cluster.into()],
            duration: self
                .request_duration
                .with_label_values(&[direction, route, cluster]),
            headers_duration: self
                .response_headers_duration
                .with_label_values(&[direction, route, cluster]),
            request_bytes: self
                .request_body_bytes_total
                .with_label_values(&[direction, route, cluster]),
            response_bytes: self
                .response_body_bytes_total
                .with_label_values(&[direction, route, cluster]),
            fast: std::array::from_fn(|_| OnceLock::new()),
        }
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

/// Per (direction, route, cluster) request metrics, resolved when the snapshot is built.
pub struct RequestMetrics {
    vec: IntCounterVec,
    labels: [Box<str>; 3],
    duration: Histogram,
    headers_duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    fast: [OnceLock<IntCounter>; FAST_SLOTS],
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// The `route` label (access logs and spans name the route with it).
    pub fn route(&self) -> &str {
        &self.labels[1]
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
            let [d, r, c] = &self.labels;
            self.vec
                .with_label_values(&[&**d, &**r, &**c, code, class, grpc_status])
        };
        match fast_slot(code.as_u16(), grpc_status) {
            Some(slot) => self.fast[slot].get_or_init(|| counter(code.as_str())).inc(),
            // Rare combinations: a read-locked lookup in the family, still no allocation.
            None => counter(code.as_str()).inc(),
        }
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
        assert!(text.contains(r#"weft_requests_total{cluster="backend.default",code="200",code_class="2xx",direction="outbound",grpc_status="",route="default-backend.default"} 1"#), "{text}");
        assert!(text.contains(r#"code="418",code_class="4xx""#));
        assert!(text.contains(r#"code="418""#));
        assert!(text.contains(r#"grpc_status="14""#));
        assert!(text.contains("weft_request_duration_seconds_bucket"));
        assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="backend.default",direction="outbound",route="default-backend.default"} 3"#), "{text}");
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
                r#"weft_request_body_bytes_total{cluster="c",direction="inbound",route="r"} 5"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"weft_response_body_bytes_total{cluster="c",direction="inbound",route="r"} 7"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="c",direction="inbound",route="r"} 1"#), "{text}");
        assert!(text.contains(r#"weft_request_duration_seconds_count{cluster="c",direction="inbound",route="r"} 1"#), "{text}");
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
}
