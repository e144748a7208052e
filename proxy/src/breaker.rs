//! Circuit breaking: per-cluster limits on upstream connections, pending requests (sent,
//! awaiting response headers), active requests (until the response body ends) and active
//! retries. A request over a limit fails fast with 503 and `x-weft-overloaded: <limit>` instead
//! of queueing behind a struggling upstream.
//!
//! Counters live in [`BreakerState`], part of the cluster's long-lived state; the limits come
//! from each snapshot ([`BreakerLimits`]). A [`Permit`] releases its slot when dropped, so every
//! exit path (error, timeout, cancelled request) gives it back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use weft_proto::v1;

use crate::resilience_metrics::ClusterResilienceMetrics;

/// Which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Upstream connections open.
    Connections = 0,
    /// Requests sent, awaiting response headers.
    Pending = 1,
    /// Requests in flight (until the response body ends).
    Requests = 2,
    /// Retries in flight.
    Retries = 3,
}

impl Limit {
    /// The `x-weft-overloaded` value and metric label.
    pub fn as_str(self) -> &'static str {
        crate::resilience_metrics::LIMITS[self as usize]
    }
}

/// A snapshot's limits; 0 = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakerLimits {
    /// Per [`Limit`].
    pub max: [u32; 4],
}

impl BreakerLimits {
    /// From the cluster proto (absent = unlimited).
    pub fn from_proto(p: Option<&v1::CircuitBreaker>) -> Self {
        let Some(p) = p else {
            return Self::default();
        };
        Self {
            max: [
                p.max_connections,
                p.max_pending_requests,
                p.max_requests,
                p.max_retries,
            ],
        }
    }

    /// The limit for `l` (0 = unlimited).
    pub fn get(&self, l: Limit) -> u32 {
        self.max[l as usize]
    }
}

/// The counters of one cluster.
#[derive(Debug)]
pub struct BreakerState {
    used: [AtomicU32; 4],
    metrics: ClusterResilienceMetrics,
}

impl BreakerState {
    /// Counters reporting to `metrics`.
    pub fn new(metrics: ClusterResilienceMetrics) -> Self {
        Self {
            used: Default::default(),
            metrics,
        }
    }

    /// Publishes a snapshot's limits as `weft_breaker_limit`.
    pub fn publish_limits(&self, limits: &BreakerLimits) {
        for (g, &v) in self.metrics.breaker_limit.iter().zip(&limits.max) {
            g.set(i64::from(v));
        }
    }

    /// Slots in use for `l`.
    pub fn used(&self, l: Limit) -> u32 {
        self.used[l as usize].load(Ordering::Relaxed)
    }

    /// Takes a slot of `l` if under `max` (0 = unlimited); `Err` = over the limit (counted in
    /// `weft_breaker_rejections_total`).
    pub fn try_acquire(self: &Arc<Self>, l: Limit, max: u32) -> Result<Permit, Limit> {
        let i = l as usize;
        let prev = self.used[i].fetch_add(1, Ordering::AcqRel);
        if max != 0 && prev >= max {
            self.used[i].fetch_sub(1, Ordering::AcqRel);
            self.metrics.breaker_rejections[i].inc();
            self.metrics.circuit_open[i].set(1);
            return Err(l);
        }
        self.metrics.breaker_usage[i].inc();
        let open = &self.metrics.circuit_open[i];
        if open.get() != 0 {
            open.set(0);
        }
        Ok(Permit {
            state: Arc::clone(self),
            limit: l,
        })
    }
}

/// One slot of one limit; released on drop.
#[derive(Debug)]
pub struct Permit {
    state: Arc<BreakerState>,
    limit: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let i = self.limit as usize;
        self.state.used[i].fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.breaker_usage[i].dec();
    }
}

/// The `max_connections` limit as the connection pools see it: the cluster's counters and the
/// current snapshot's limit (updated in place when a snapshot changes it).
#[derive(Debug)]
pub struct ConnectionGate {
    state: Arc<BreakerState>,
    max: AtomicU32,
}

impl ConnectionGate {
    /// A gate over `state`'s connection counter, unlimited until [`Self::set_max`].
    pub fn new(state: Arc<BreakerState>) -> Self {
        Self {
            state,
            max: AtomicU32::new(0),
        }
    }

    /// Sets the limit (0 = unlimited).
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A slot for one new connection, held for the connection's lifetime.
    pub fn try_open(&self) -> Result<Permit, Limit> {
        self.state
            .try_acquire(Limit::Connections, self.max.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_release() {
        let m = ClusterResilienceMetrics::detached("c");
        let s = Arc::new(BreakerState::new(m.clone()));
        let a = s.try_acquire(Limit::Requests, 2).unwrap();
        let b = s.try_acquire(Limit::Requests, 2).unwrap();
        assert_eq!(
            s.try_acquire(Limit::Requests, 2).unwrap_err(),
            Limit::Requests
        );
        assert_eq!(m.breaker_rejections[Limit::Requests as usize].get(), 1);
        assert_eq!(m.circuit_open[Limit::Requests as usize].get(), 1);
        assert_eq!(m.breaker_usage[Limit::Requests as usize].get(), 2);
        drop(a);
        let c = s.try_acquire(Limit::Requests, 2).unwrap();
        assert_eq!(m.circuit_open[Limit::Requests as usize].get(), 0);
        drop((b, c));
        assert_eq!(s.used(Limit::Requests), 0);
        assert_eq!(m.breaker_usage[Limit::Requests as usize].get(), 0);
        // Unlimited.
        let many: Vec<_> = (0..100)
            .map(|_| s.try_acquire(Limit::Retries, 0).unwrap())
            .collect();
        assert_eq!(s.used(Limit::Retries), 100);
        drop(many);
        assert_eq!(Limit::Pending.as_str(), "pending");
    }

    #[test]
    fn connection_gate() {
        let s = Arc::new(BreakerState::new(ClusterResilienceMetrics::detached("c")));
        let g = ConnectionGate::new(Arc::clone(&s));
        g.set_max(1);
        let c = g.try_open().unwrap();
        assert_eq!(g.try_open().unwrap_err(), Limit::Connections);
        drop(c);
        assert!(g.try_open().is_ok());
    }

    #[test]
    fn limits_from_proto() {
        assert_eq!(BreakerLimits::from_proto(None), BreakerLimits::default());
        let l = BreakerLimits::from_proto(Some(&v1::CircuitBreaker {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3,
            max_retries: 4,
        }));
        assert_eq!(l.get(Limit::Retries), 4);
        assert_eq!(l.get(Limit::Connections), 1);
    }
}
