//! Creating and registering the proxy's metric families ([`Metrics::new`]).

use std::sync::{Arc, Mutex};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::lease::LeasedSeries;
use super::request::{RequestFamilies, RequestSeries};
use super::{register, Metrics, MetricsError};

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
}
