//! Prometheus families of the resilience features (retries, circuit breaking, outlier
//! detection, health checks, rate limiting), registered in the proxy's registry, and the
//! per-cluster handles of a cluster's long-lived state, whose series are created on the
//! cluster's first use ([`ClusterResilienceMetrics`]).

use std::sync::{Arc, Mutex, OnceLock};

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

    /// Handles for `cluster`, whose series are created on first use (see
    /// [`ClusterResilienceMetrics`]): a sidecar that may call thousands of clusters exports
    /// (and holds) these series only for the clusters it used.
    pub fn cluster(&self, cluster: &str) -> ClusterResilienceMetrics {
        self.cluster_with(cluster, None)
    }

    /// [`ResilienceMetrics::cluster`], whose series are created under a lease from `leaser`
    /// that keeps them exported while the handles live
    /// ([`crate::metrics::Metrics::cluster_resilience`]).
    pub fn cluster_leased(
        &self,
        cluster: &str,
        leaser: crate::metrics::ResilienceLeaser,
    ) -> ClusterResilienceMetrics {
        self.cluster_with(cluster, Some(leaser))
    }

    fn cluster_with(
        &self,
        cluster: &str,
        leaser: Option<crate::metrics::ResilienceLeaser>,
    ) -> ClusterResilienceMetrics {
        ClusterResilienceMetrics {
            lazy: Arc::new(LazyCluster {
                families: self.clone(),
                cluster: cluster.into(),
                leaser,
                limits: Mutex::new([0; 4]),
                handles: OnceLock::new(),
            }),
        }
    }

    /// Creates the series of `cluster` (every one of them, so a used cluster exports the same
    /// set as before they were made lazy).
    pub(crate) fn resolve(&self, cluster: &str) -> ClusterHandles {
        let per_limit = |v: &IntGaugeVec| LIMITS.map(|l| v.with_label_values(&[cluster, l]));
        ClusterHandles {
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

/// The per-cluster series, once created.
#[derive(Debug)]
pub struct ClusterHandles {
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
}

/// What the handles of one cluster share: the families, the cluster's name, the breaker limits
/// last published (set on `weft_breaker_limit` when the series are created) and the series once
/// created.
struct LazyCluster {
    families: ResilienceMetrics,
    cluster: Box<str>,
    /// Leases the series when they are created (`None`: handles outside the proxy's registry).
    leaser: Option<crate::metrics::ResilienceLeaser>,
    /// Held while publishing limits and while the creating thread sets them, so a publish racing
    /// with the creation is never lost.
    limits: Mutex<[u32; 4]>,
    /// The handles (boxed: a cluster never used holds a pointer's worth) and the lease keeping
    /// their series exported.
    handles: OnceLock<(Box<ClusterHandles>, Option<crate::metrics::SeriesLease>)>,
}

/// Per-cluster handles (cloned into the breaker, the health checker, ...; clones share one set
/// of series). The series are created on first use: the first dereference (a request through
/// the cluster's breaker, a retry, an ejection, a failed health check, a locality spillover)
/// creates all of them at once, with `weft_breaker_limit` set to the limits published so far
/// ([`ClusterResilienceMetrics::publish_limits`]), so a used cluster exports the same series as
/// an eagerly created one would. Until then the cluster exports nothing; a sidecar whose scope
/// holds thousands of services pays for the series of those it calls only.
#[derive(Clone)]
pub struct ClusterResilienceMetrics {
    lazy: Arc<LazyCluster>,
}

impl std::fmt::Debug for ClusterResilienceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterResilienceMetrics")
            .field("cluster", &self.lazy.cluster)
            .field("created", &self.is_created())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for ClusterResilienceMetrics {
    type Target = ClusterHandles;

    /// The handles, creating the series on the first call.
    fn deref(&self) -> &ClusterHandles {
        let lazy = &*self.lazy;
        if let Some((h, _)) = lazy.handles.get() {
            return h;
        }
        let mut created = false;
        let (h, _) = lazy.handles.get_or_init(|| {
            created = true;
            match &lazy.leaser {
                Some(leaser) => {
                    let (lease, handles) = leaser.lease(&lazy.cluster);
                    (Box::new(handles), Some(lease))
                }
                None => (Box::new(lazy.families.resolve(&lazy.cluster)), None),
            }
        });
        if created {
            // After the handles are visible: a publish that took the lock before us is read
            // here, one after us sees the handles and sets the gauges itself.
            let limits = lock(&lazy.limits);
            for (g, &v) in h.breaker_limit.iter().zip(limits.iter()) {
                g.set(i64::from(v));
            }
        }
        h
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClusterResilienceMetrics {
    /// Whether the cluster's series exist (it has been used).
    pub fn is_created(&self) -> bool {
        self.lazy.handles.get().is_some()
    }

    /// Publishes a snapshot's breaker limits (`[connections, pending, requests, retries]`, 0 =
    /// unlimited) as `weft_breaker_limit`: at once if the series exist, else when they are
    /// created. Creates nothing.
    pub fn publish_limits(&self, max: &[u32; 4]) {
        let mut limits = lock(&self.lazy.limits);
        *limits = *max;
        if let Some((h, _)) = self.lazy.handles.get() {
            for (g, &v) in h.breaker_limit.iter().zip(max) {
                g.set(i64::from(v));
            }
        }
    }

    /// Removes `weft_endpoint_healthy{endpoint}` (the endpoint is no longer checked).
    pub fn remove_endpoint_healthy(&self, endpoint: &str) {
        let _ = self
            .lazy
            .families
            .endpoint_healthy
            .remove_label_values(&[&*self.lazy.cluster, endpoint]);
    }

    /// Sets `weft_endpoint_healthy{endpoint}`.
    pub fn set_endpoint_healthy(&self, endpoint: &str, healthy: bool) {
        self.lazy
            .families
            .endpoint_healthy
            .with_label_values(&[&*self.lazy.cluster, endpoint])
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

#[cfg(test)]
mod tests {
    use prometheus::Encoder;

    use super::*;

    /// The sample lines of `r` that name `cluster`.
    fn series(r: &Registry, cluster: &str) -> Vec<String> {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .unwrap();
        let label = format!("cluster=\"{cluster}\"");
        String::from_utf8(out)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_clusters_series_are_created_on_first_use_with_the_published_limits() {
        let r = Registry::new();
        let families = ResilienceMetrics::new(&r).unwrap();
        let m = families.cluster("a");
        let breaker_copy = m.clone();
        m.publish_limits(&[10, 20, 30, 0]);
        m.set_endpoint_healthy("127.0.0.1:1", true);
        m.remove_endpoint_healthy("127.0.0.1:1");
        assert!(!m.is_created());
        assert_eq!(series(&r, "a"), Vec::<String>::new(), "nothing before use");

        // First use, through a clone (the breaker's): every series of the cluster appears.
        breaker_copy.breaker_usage[1].inc();
        assert!(m.is_created());
        let lines = series(&r, "a");
        assert_eq!(lines.len(), 26, "{lines:#?}");
        for family in [
            "weft_retries_total",
            "weft_retry_budget_exhausted_total",
            "weft_breaker_usage",
            "weft_breaker_limit",
            "weft_circuit_open",
            "weft_breaker_rejections_total",
            "weft_outlier_ejections_total",
            "weft_outlier_ejected_endpoints",
            "weft_health_check_failures_total",
            "weft_locality_spillover_total",
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(&format!("{family}{{"))),
                "{family}: {lines:#?}"
            );
        }
        let limit = |l: &str| {
            lines
                .iter()
                .find(|x| {
                    x.starts_with("weft_breaker_limit{") && x.contains(&format!("limit=\"{l}\""))
                })
                .map(|x| x.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(limit("connections").as_deref(), Some("10"));
        assert_eq!(limit("requests").as_deref(), Some("30"));
        assert_eq!(limit("retries").as_deref(), Some("0"));
        assert_eq!(m.breaker_usage[1].get(), 1, "clones share the series");

        // Later limits are published at once.
        m.publish_limits(&[1, 2, 3, 4]);
        assert_eq!(m.breaker_limit[3].get(), 4);

        // Another cluster stays without series until used; removal takes every series.
        let b = families.cluster("b");
        assert_eq!(series(&r, "b"), Vec::<String>::new());
        b.retry_failure.inc();
        assert_eq!(series(&r, "b").len(), 26);
        families.remove_cluster("a");
        assert_eq!(series(&r, "a"), Vec::<String>::new());
    }

    #[test]
    fn leased_series_are_created_on_use_and_go_with_the_last_handle() {
        let m = crate::metrics::Metrics::new().unwrap();
        let text = || String::from_utf8(m.encode()).unwrap();
        let a = m.cluster_resilience("x");
        // Another long-lived state of the same cluster (a re-added service while the old one
        // is still held) shares the series once both are used.
        let b = m.cluster_resilience("x");
        assert!(!text().contains(r#"cluster="x""#), "no series before use");
        a.retry_success.inc();
        b.retry_success.inc();
        assert!(
            text().contains(r#"weft_retries_total{cluster="x",result="success"} 2"#),
            "{}",
            text()
        );
        drop(a);
        assert!(text().contains(r#"cluster="x""#), "b still holds the lease");
        drop(b);
        assert!(!text().contains(r#"cluster="x""#), "{}", text());
        // Never used: nothing to remove, nothing left behind.
        drop(m.cluster_resilience("y"));
        assert!(!text().contains(r#"cluster="y""#));
    }
}
