//! The metric families of route filters. Each series is a [`LeasedCounter`] held by the compiled
//! filters of its route (and by mirror tasks still running), so it is exported exactly while a
//! snapshot has the route (ARCHITECTURE.md "Series lifetime"): config churn grows nothing.

use crate::metrics::{CounterFamily, LeasedCounter, Metrics, MetricsError};

/// `weft_faults_injected_total{route,kind=delay|abort}`.
pub static FAULTS_INJECTED: CounterFamily = CounterFamily {
    name: "weft_faults_injected_total",
    help: "Requests delayed or aborted by a route's fault injection",
    labels: &["route", "kind"],
};

/// `weft_mirror_requests_total{route,result=sent|failed|dropped}`.
pub static MIRROR_REQUESTS: CounterFamily = CounterFamily {
    name: "weft_mirror_requests_total",
    help: "Mirrored request copies: sent (the mirror answered), failed (no answer: connect \
           error, reset, timeout, no endpoint, or the primary body never ended), dropped (too \
           many mirrors in flight)",
    labels: &["route", "result"],
};

/// One fault counter of `route`.
pub fn fault(metrics: &Metrics, route: &str, kind: &str) -> Result<LeasedCounter, MetricsError> {
    metrics.leased_counter(&FAULTS_INJECTED, &[route, kind])
}

/// The mirror counters of a route.
#[derive(Debug, Clone)]
pub struct MirrorCounters {
    /// The mirror target answered (any status).
    pub sent: LeasedCounter,
    /// No answer from the mirror target, or the copy could not be completed.
    pub failed: LeasedCounter,
    /// Not mirrored: too many mirrors in flight.
    pub dropped: LeasedCounter,
}

impl MirrorCounters {
    /// The counters of `route`.
    pub fn new(metrics: &Metrics, route: &str) -> Result<Self, MetricsError> {
        let c = |result| metrics.leased_counter(&MIRROR_REQUESTS, &[route, result]);
        Ok(Self {
            sent: c("sent")?,
            failed: c("failed")?,
            dropped: c("dropped")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exported(m: &Metrics, needle: &str) -> bool {
        String::from_utf8_lossy(&m.encode()).contains(needle)
    }

    #[test]
    fn series_live_while_a_route_holds_them() {
        let m = Metrics::new().unwrap();
        let abort = fault(&m, "r1", "abort").unwrap();
        abort.inc();
        let mirror = MirrorCounters::new(&m, "r1").unwrap();
        mirror.sent.inc();
        // The next snapshot's route shares the series (and its count).
        let again = fault(&m, "r1", "abort").unwrap();
        assert_eq!(again.get(), 1);
        let line = r#"weft_faults_injected_total{kind="abort",route="r1"} 1"#;
        assert!(
            exported(&m, line),
            "{}",
            String::from_utf8_lossy(&m.encode())
        );
        assert!(exported(
            &m,
            r#"weft_mirror_requests_total{result="dropped",route="r1"} 0"#
        ));
        drop(abort);
        assert!(exported(&m, line), "still held by the other handle");
        drop(again);
        drop(mirror);
        assert!(!exported(&m, "weft_faults_injected_total{"));
        assert!(!exported(&m, "weft_mirror_requests_total{"));
        // A family registered once per registry: leasing again works.
        assert_eq!(fault(&m, "r1", "abort").unwrap().get(), 0);
    }
}
