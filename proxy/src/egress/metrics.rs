//! `weft_dns_resolutions_total{cluster,result=ok|no_records|error}`: resolutions of a
//! cluster's endpoints declared by DNS name, one count per name resolved.
//!
//! Series lifetime as ARCHITECTURE.md "Series lifetime" asks of per-cluster series: a cluster's
//! series are exported exactly while its resolver state lives (the per-cluster handle below,
//! held by that state). Handles are shared by cluster name through `Weak`s under one lock, and
//! the last handle of a name removes the series only if it is still the registered one, so a
//! late drop of an old cluster's state (an old snapshot held by a slow request) never removes
//! the series a re-added cluster of the same name records into.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::metrics::MetricsError;

/// The `result` label values.
const RESULTS: [&str; 3] = ["ok", "no_records", "error"];

/// The family and the live per-cluster handles.
#[derive(Clone)]
pub struct DnsMetrics {
    inner: Arc<Families>,
}

struct Families {
    resolutions: IntCounterVec,
    live: Mutex<HashMap<Box<str>, Weak<ClusterSeries>>>,
}

impl std::fmt::Debug for DnsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsMetrics").finish_non_exhaustive()
    }
}

/// One cluster's resolution counters; the series go when the last clone does.
#[derive(Debug, Clone)]
pub struct ClusterDnsMetrics(Arc<ClusterSeries>);

struct ClusterSeries {
    cluster: Box<str>,
    /// In [`RESULTS`] order.
    counters: [IntCounter; 3],
    families: Arc<Families>,
}

impl std::fmt::Debug for ClusterSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClusterSeries").field(&self.cluster).finish()
    }
}

impl Families {
    fn lock_live(&self) -> MutexGuard<'_, HashMap<Box<str>, Weak<ClusterSeries>>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DnsMetrics {
    /// Creates the family and registers it in `r`.
    pub fn register(r: &Registry) -> Result<Self, MetricsError> {
        let name = "weft_dns_resolutions_total";
        let resolutions = IntCounterVec::new(
            Opts::new(
                name,
                "Resolutions of endpoints declared by DNS name, per name resolved; \
                 result=ok | no_records (NXDOMAIN or no address) | error (timeout, SERVFAIL, ...): \
                 on a failure the last good addresses stay in use",
            ),
            &["cluster", "result"],
        )
        .map_err(|source| MetricsError::Register { name, source })?;
        r.register(Box::new(resolutions.clone()))
            .map_err(|source| MetricsError::Register { name, source })?;
        Ok(Self::with_family(resolutions))
    }

    /// A family registered nowhere (tests).
    pub fn unregistered() -> Self {
        let family = IntCounterVec::new(
            Opts::new("weft_dns_resolutions_total", "test"),
            &["cluster", "result"],
        );
        // Infallible: a valid name, help and label set.
        Self::with_family(family.expect("valid metric options"))
    }

    fn with_family(resolutions: IntCounterVec) -> Self {
        Self {
            inner: Arc::new(Families {
                resolutions,
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The handle of `cluster`: the live one, or a new one (creating its series).
    pub fn cluster(&self, cluster: &str) -> ClusterDnsMetrics {
        let f = &self.inner;
        let mut live = f.lock_live();
        if let Some(s) = live.get(cluster).and_then(Weak::upgrade) {
            return ClusterDnsMetrics(s);
        }
        let series = Arc::new(ClusterSeries {
            cluster: cluster.into(),
            counters: RESULTS.map(|r| f.resolutions.with_label_values(&[cluster, r])),
            families: Arc::clone(f),
        });
        live.insert(cluster.into(), Arc::downgrade(&series));
        ClusterDnsMetrics(series)
    }
}

impl ClusterDnsMetrics {
    /// Counts one resolution with `result` (`ok`, `no_records`, `error`).
    pub fn record(&self, result: &str) {
        if let Some(i) = RESULTS.iter().position(|r| *r == result) {
            self.0.counters[i].inc();
        }
    }

    /// How many resolutions ended with `result` (tests, logs).
    pub fn count(&self, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.0.counters[i].get())
    }
}

impl Drop for ClusterSeries {
    fn drop(&mut self) {
        let this: *const Self = self;
        let mut live = self.families.lock_live();
        if live
            .get(&self.cluster)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), this))
        {
            live.remove(&self.cluster);
            for r in RESULTS {
                // Err: already gone.
                let _ = self
                    .families
                    .resolutions
                    .remove_label_values(&[&self.cluster, r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(r: &Registry) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn series_live_while_a_handle_does_and_a_late_drop_keeps_the_new_ones() {
        let r = Registry::new();
        let m = DnsMetrics::register(&r).unwrap();
        let a = m.cluster("stripe.default");
        let a2 = m.cluster("stripe.default");
        a.record("ok");
        a2.record("error");
        let text = exported(&r);
        assert!(
            text.contains(r#"weft_dns_resolutions_total{cluster="stripe.default",result="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"result="error"} 1"#), "{text}");
        drop(a);
        assert!(exported(&r).contains("stripe.default"));
        drop(a2);
        assert!(!exported(&r).contains("stripe.default"));

        // An old handle dropped after a new one for the same cluster replaced it in the map
        // (simulated: the old one is forgotten by the map first) leaves the new series alone.
        let old = m.cluster("x");
        m.inner.lock_live().remove("x");
        let new = m.cluster("x");
        new.record("ok");
        drop(old);
        assert!(exported(&r).contains(r#"cluster="x",result="ok"} 1"#));
        drop(new);
        assert!(!exported(&r).contains(r#"cluster="x""#));
    }
}
