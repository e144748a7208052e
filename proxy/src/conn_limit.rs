//! Connection caps: how many connections one listener (or the admin server) keeps open at
//! once. Past the cap a new connection is closed as soon as it is accepted, counted in
//! `weft_listener_connections_refused_total{direction}`, and logged at most every 10 s per
//! listener: a flood of connections costs the proxy a counter increment each, never memory or a
//! task, and the connections already open keep being served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default `limits.max_connections_per_listener`.
pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 16_384;

/// The admin server's cap (scrapes, probes, `/config_dump`: a handful at a time).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The refusal counters, registered once per process.
#[derive(Debug, Clone)]
pub struct RefusalMetrics {
    refused: IntCounterVec,
}

impl RefusalMetrics {
    /// Registers `weft_listener_connections_refused_total{direction}` in `r`.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let refused = IntCounterVec::new(
            Opts::new(
                "weft_listener_connections_refused_total",
                "Connections closed at accept because the listener's connection cap was reached; direction=inbound|outbound|admin|status",
            ),
            &["direction"],
        )?;
        r.register(Box::new(refused.clone()))?;
        for d in ["inbound", "outbound", "admin"] {
            refused.with_label_values(&[d]);
        }
        Ok(Self { refused })
    }

    /// Metrics in a throwaway registry (tests).
    pub fn unregistered() -> Self {
        // A fresh registry holds no families, so registration cannot collide.
        #[allow(clippy::expect_used)]
        Self::register(&Registry::new()).expect("fresh registry")
    }

    /// A cap of `max` open connections for one listener of `direction`.
    pub fn limit(&self, direction: &str, max: usize) -> ConnectionLimit {
        ConnectionLimit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            refused: self.refused.with_label_values(&[direction]),
            last_warning: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// One listener's cap.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    refused: IntCounter,
    /// Unix seconds of the last warning logged.
    last_warning: Arc<AtomicU64>,
}

impl ConnectionLimit {
    /// A slot for a new connection (hold it as long as the connection lives), or `None` when
    /// the cap is reached: the caller drops the connection.
    pub fn try_acquire(&self, listener: &str) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(permit);
        }
        self.refused.inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %listener,
                max = self.max,
                "connection cap reached: closing new connections (weft_listener_connections_refused_total)"
            );
        }
        None
    }

    /// Connections open now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_cap_and_frees_slots_on_drop() {
        let m = RefusalMetrics::unregistered();
        let limit = m.limit("inbound", 2);
        let a = limit.try_acquire("inbound").unwrap();
        let _b = limit.try_acquire("inbound").unwrap();
        assert!(limit.try_acquire("inbound").is_none());
        assert!(limit.try_acquire("inbound").is_none());
        assert_eq!(m.refused.with_label_values(&["inbound"]).get(), 2);
        assert_eq!(limit.in_use(), 2);
        drop(a);
        assert!(limit.try_acquire("inbound").is_some());
    }
}
