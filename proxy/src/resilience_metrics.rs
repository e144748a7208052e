//! Prometheus families of the resilience features (retries, circuit breaking, outlier
//! detection, health checks, rate limiting), registered in the proxy's registry, and the
//! per-cluster handles resolved once when a cluster's long-lived state is created.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use weft_proto::v1;

use crate::metrics::MetricsError;
use crate::ratelimit::{BucketRegistry, RateLimiter};

/// Every resilience family.
#[derive(Clone)]
pub struct ResilienceMetrics {
    retries_total: IntCounterVec,
    retry_budget_exhausted_total: IntCounterVec,
    breaker_usage: IntGaugeVec,
    breaker_limit: IntGaugeVec,
    circuit_open: IntGaugeVec,
    breaker_rejections_total: IntCounterVec,
    outlier_ejections_total: IntCounterVec,
    outlier_ejected_endpoints: IntGaugeVec,
    health_check_failures_total: IntCounterVec,
    locality_spillover_total: IntCounterVec,
    endpoint_healthy: IntGaugeVec,
    rate_limited_total: IntCounterVec,
    /// Rate-limit buckets by (scope, name): they outlive snapshots.
    buckets: Arc<BucketRegistry>,
}

impl std::fmt::Debug for ResilienceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilienceMetrics").finish_non_exhaustive()
    }
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    name: &'static str,
    made: Result<C, prometheus::Error>,
) -> Result<C, MetricsError> {
    let c = made.map_err(|source| MetricsError::Register { name, source })?;
    r.register(Box::new(c.clone()))
        .map_err(|source| MetricsError::Register { name, source })?;
    Ok(c)
}

fn counter(
    r: &Registry,
    name: &'static str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    reg(r, name, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(
    r: &Registry,
    name: &'static str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    reg(r, name, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// Breaker limit names, in [`crate::breaker::Limit`] order.
pub const LIMITS: [&str; 4] = ["connections", "pending", "requests", "retries"];

impl ResilienceMetrics {
    /// Creates and registers the families in `r`.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            retries_total: counter(
                r,
                "weft_retries_total",
                "Retry attempts by how they ended (success, failure) or why none was made \
                 (budget_exhausted, overloaded)",
                &["cluster", "result"],
            )?,
            retry_budget_exhausted_total: counter(
                r,
                "weft_retry_budget_exhausted_total",
                "Retries not made because the cluster's retry budget was spent",
                &["cluster"],
            )?,
            breaker_usage: gauge(
                r,
                "weft_breaker_usage",
                "Current connections / pending requests / active requests / active retries",
                &["cluster", "limit"],
            )?,
            breaker_limit: gauge(
                r,
                "weft_breaker_limit",
                "Configured circuit-breaker limit (0 = unlimited)",
                &["cluster", "limit"],
            )?,
            circuit_open: gauge(
                r,
                "weft_circuit_open",
                "1 while the limit is reached (the last attempt over it was rejected)",
                &["cluster", "limit"],
            )?,
            breaker_rejections_total: counter(
                r,
                "weft_breaker_rejections_total",
                "Requests failed fast with 503 x-weft-overloaded",
                &["cluster", "limit"],
            )?,
            outlier_ejections_total: counter(
                r,
                "weft_outlier_ejections_total",
                "Endpoint ejections by outlier detection",
                &["cluster", "reason"],
            )?,
            outlier_ejected_endpoints: gauge(
                r,
                "weft_outlier_ejected_endpoints",
                "Endpoints currently ejected",
                &["cluster"],
            )?,
            health_check_failures_total: counter(
                r,
                "weft_health_check_failures_total",
                "Failed active health checks",
                &["cluster"],
            )?,
            locality_spillover_total: counter(
                r,
                "weft_locality_spillover_total",
                "Picks that left the caller's zone because too few of its endpoints were available there",
                &["cluster"],
            )?,
            endpoint_healthy: gauge(
                r,
                "weft_endpoint_healthy",
                "Active health check verdict per endpoint (1 healthy, 0 unhealthy)",
                &["cluster", "endpoint"],
            )?,
            rate_limited_total: counter(
                r,
                "weft_rate_limited_total",
                "Requests/connections refused by a local rate limit",
                &["scope", "name"],
            )?,
            buckets: Arc::default(),
        })
    }

    /// Handles for `cluster`.
    pub fn cluster(&self, cluster: &str) -> ClusterResilienceMetrics {
        let per_limit = |v: &IntGaugeVec| LIMITS.map(|l| v.with_label_values(&[cluster, l]));
        ClusterResilienceMetrics {
            retry_success: self.retries_total.with_label_values(&[cluster, "success"]),
            retry_failure: self.retries_total.with_label_values(&[cluster, "failure"]),
            retry_budget_exhausted: self
                .retries_total
                .with_label_values(&[cluster, "budget_exhausted"]),
            retry_overloaded: self
                .retries_total
                .with_label_values(&[cluster, "overloaded"]),
            budget_exhausted: self
                .retry_budget_exhausted_total
                .with_label_values(&[cluster]),
            breaker_usage: per_limit(&self.breaker_usage),
            breaker_limit: per_limit(&self.breaker_limit),
            circuit_open: per_limit(&self.circuit_open),
            breaker_rejections: LIMITS.map(|l| {
                self.breaker_rejections_total
                    .with_label_values(&[cluster, l])
            }),
            ejections_consecutive: self
                .outlier_ejections_total
                .with_label_values(&[cluster, "consecutive_failures"]),
            ejections_success_rate: self
                .outlier_ejections_total
                .with_label_values(&[cluster, "success_rate"]),
            ejected_endpoints: self.outlier_ejected_endpoints.with_label_values(&[cluster]),
            health_check_failures: self
                .health_check_failures_total
                .with_label_values(&[cluster]),
            locality_spillover: self.locality_spillover_total.with_label_values(&[cluster]),
            endpoint_healthy: self.endpoint_healthy.clone(),
            cluster: cluster.into(),
            _lease: None,
        }
    }

    /// Removes every series of `cluster` from the per-cluster families (its state is gone).
    /// `weft_endpoint_healthy` series go with their health checker (`crate::health`).
    pub fn remove_cluster(&self, cluster: &str) {
        // Errors: the series does not exist (never resolved): nothing to remove.
        for result in ["success", "failure", "budget_exhausted", "overloaded"] {
            let _ = self.retries_total.remove_label_values(&[cluster, result]);
        }
        let _ = self
            .retry_budget_exhausted_total
            .remove_label_values(&[cluster]);
        for l in LIMITS {
            let _ = self.breaker_usage.remove_label_values(&[cluster, l]);
            let _ = self.breaker_limit.remove_label_values(&[cluster, l]);
            let _ = self.circuit_open.remove_label_values(&[cluster, l]);
            let _ = self
                .breaker_rejections_total
                .remove_label_values(&[cluster, l]);
        }
        for reason in ["consecutive_failures", "success_rate"] {
            let _ = self
                .outlier_ejections_total
                .remove_label_values(&[cluster, reason]);
        }
        let _ = self
            .outlier_ejected_endpoints
            .remove_label_values(&[cluster]);
        let _ = self
            .health_check_failures_total
            .remove_label_values(&[cluster]);
        let _ = self
            .locality_spillover_total
            .remove_label_values(&[cluster]);
    }

    /// Counter of requests refused by the rate limit of `scope` (`route`/`listener`) `name`
    /// (through [`crate::metrics::Metrics::rate_limiter`], which keeps the series while used).
    pub fn rate_limited(&self, scope: &str, name: &str) -> IntCounter {
        self.rate_limited_total.with_label_values(&[scope, name])
    }

    /// Rate-limit buckets some snapshot still holds (tests).
    pub fn live_buckets(&self) -> usize {
        self.buckets.live()
    }

    /// Removes `weft_rate_limited_total{scope,name}` (no snapshot has that limit any more).
    pub fn remove_rate_limited(&self, scope: &str, name: &str) {
        let _ = self.rate_limited_total.remove_label_values(&[scope, name]);
    }

    /// The rate limit of `scope` (`route`/`listener`) `name` from its proto (`None` when
    /// absent), with its bucket carried over from earlier snapshots that have it. `Err` names
    /// the bad field.
    pub fn rate_limiter(
        &self,
        scope: &str,
        name: &str,
        proto: Option<&v1::RateLimit>,
    ) -> Result<Option<RateLimiter>, (&'static str, String)> {
        Ok(
            RateLimiter::from_proto(proto)?
                .map(|l| l.with_bucket(self.buckets.bucket(scope, name))),
        )
    }
}

/// Per-cluster handles.
#[derive(Debug, Clone)]
pub struct ClusterResilienceMetrics {
    /// `weft_retries_total{result="success"}`.
    pub retry_success: IntCounter,
    /// `weft_retries_total{result="failure"}`.
    pub retry_failure: IntCounter,
    /// `weft_retries_total{result="budget_exhausted"}`.
    pub retry_budget_exhausted: IntCounter,
    /// `weft_retries_total{result="overloaded"}` (breaker `max_retries` reached).
    pub retry_overloaded: IntCounter,
    /// `weft_retry_budget_exhausted_total`.
    pub budget_exhausted: IntCounter,
    /// `weft_breaker_usage` per limit.
    pub breaker_usage: [IntGauge; 4],
    /// `weft_breaker_limit` per limit.
    pub breaker_limit: [IntGauge; 4],
    /// `weft_circuit_open` per limit.
    pub circuit_open: [IntGauge; 4],
    /// `weft_breaker_rejections_total` per limit.
    pub breaker_rejections: [IntCounter; 4],
    /// `weft_outlier_ejections_total{reason="consecutive_failures"}`.
    pub ejections_consecutive: IntCounter,
    /// `weft_outlier_ejections_total{reason="success_rate"}`.
    pub ejections_success_rate: IntCounter,
    /// `weft_outlier_ejected_endpoints`.
    pub ejected_endpoints: IntGauge,
    /// `weft_health_check_failures_total`.
    pub health_check_failures: IntCounter,
    /// `weft_locality_spillover_total`.
    pub locality_spillover: IntCounter,
    endpoint_healthy: IntGaugeVec,
    cluster: Box<str>,
    /// Keeps this cluster's series exported ([`crate::metrics::Metrics::cluster_resilience`]).
    _lease: Option<crate::metrics::SeriesLease>,
}

impl ClusterResilienceMetrics {
    /// These handles, keeping their series exported through `lease`.
    #[must_use]
    pub fn leased(mut self, lease: crate::metrics::SeriesLease) -> Self {
        self._lease = Some(lease);
        self
    }

    /// Removes `weft_endpoint_healthy{endpoint}` (the endpoint is no longer checked).
    pub fn remove_endpoint_healthy(&self, endpoint: &str) {
        let _ = self
            .endpoint_healthy
            .remove_label_values(&[&*self.cluster, endpoint]);
    }

    /// Sets `weft_endpoint_healthy{endpoint}`.
    pub fn set_endpoint_healthy(&self, endpoint: &str, healthy: bool) {
        self.endpoint_healthy
            .with_label_values(&[&*self.cluster, endpoint])
            .set(i64::from(healthy));
    }

    /// For tests: handles registered in a throwaway registry.
    pub fn detached(cluster: &str) -> Self {
        // A fresh registry cannot hold duplicates: registration cannot fail here.
        #[allow(clippy::expect_used)]
        ResilienceMetrics::new(&Registry::new())
            .expect("fresh registry")
            .cluster(cluster)
    }
}
