//! Per-endpoint load: requests outstanding and a peak-EWMA round-trip-time estimate (the
//! algorithm of tower's `load::PeakEwma` and Finagle's, on atomics so that every worker thread
//! shares one estimate per endpoint without a lock).
//!
//! The estimate jumps to any RTT above it (peak sensitivity: a slow endpoint is penalised at
//! once) and decays towards lower RTTs, and towards zero while nothing is observed, with time
//! constant [`DECAY`], so an endpoint that was slow is tried again after a while.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Decay time constant of the RTT estimate (linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// RTT assumed for an endpoint nothing was observed from yet: low, so that a new endpoint is
/// probed soon rather than starved (its outstanding count still limits a burst).
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// The process-wide epoch of [`now_nanos`].
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since a process-wide epoch: a cheap monotonic clock storable in an atomic.
pub fn now_nanos() -> u64 {
    nanos_at(Instant::now())
}

/// The time from `since` to `now`, two [`now_nanos`] readings (zero if `now` is the earlier).
pub fn between(since: u64, now: u64) -> std::time::Duration {
    std::time::Duration::from_nanos(now.saturating_sub(since))
}

/// [`now_nanos`] of a clock reading `at` the caller made anyway (no second clock read). At
/// least 1 (0 means "never" to some users).
pub fn nanos_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Load of one endpoint, shared by every snapshot that has the endpoint.
#[derive(Debug)]
pub struct EndpointLoad {
    outstanding: AtomicU32,
    /// f64 nanoseconds, as bits.
    rtt_ns: AtomicU64,
    /// [`now_nanos`] of the last observation.
    stamp: AtomicU64,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self {
            outstanding: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            // 0 = nothing observed yet: the default RTT does not decay.
            stamp: AtomicU64::new(0),
        }
    }
}

fn decay_factor(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp()
}

impl EndpointLoad {
    /// Requests in flight to the endpoint.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// The RTT estimate at `now` (nanoseconds), decayed towards zero since the last observation.
    pub fn rtt_estimate(&self, now: u64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        match self.stamp.load(Ordering::Relaxed) {
            0 => rtt,
            stamp => rtt * decay_factor(now.saturating_sub(stamp)),
        }
    }

    /// Peak-EWMA cost: RTT estimate x (outstanding + 1).
    pub fn peak_ewma_cost(&self, now: u64) -> f64 {
        self.rtt_estimate(now) * f64::from(self.outstanding() + 1)
    }

    /// Marks a request started; the guard ends it (and may record its RTT).
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        self.start_at(now_nanos())
    }

    /// [`EndpointLoad::start`] at `now` ([`now_nanos`] / [`nanos_at`] of a clock read the
    /// caller made anyway, e.g. for the pick).
    pub fn start_at(self: &Arc<Self>, now: u64) -> LoadGuard {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            load: Arc::clone(self),
            started: now,
        }
    }

    /// Folds one observed RTT (nanoseconds) observed at `now` into the estimate.
    pub fn observe(&self, rtt: u64, now: u64) {
        let rtt = rtt as f64;
        let mut cur_bits = self.rtt_ns.load(Ordering::Relaxed);
        // Bounded CAS loop: each failure means another thread made progress.
        for _ in 0..8 {
            let cur = f64::from_bits(cur_bits);
            let stamp = self.stamp.load(Ordering::Relaxed);
            let next = if rtt > cur {
                rtt
            } else if stamp == 0 {
                // First sample replaces the default guess.
                rtt
            } else {
                let d = decay_factor(now.saturating_sub(stamp));
                cur * d + rtt * (1.0 - d)
            };
            match self.rtt_ns.compare_exchange_weak(
                cur_bits,
                next.to_bits(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur_bits = actual,
            }
        }
        self.stamp.fetch_max(now.max(1), Ordering::Relaxed);
    }
}

/// One request in flight to an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct LoadGuard {
    load: Arc<EndpointLoad>,
    started: u64,
}

impl LoadGuard {
    /// Records the time since the start as an RTT sample (call when response headers arrive).
    pub fn observe(&self) {
        self.observe_at(now_nanos());
    }

    /// [`LoadGuard::observe`] with the caller's clock reading ([`now_nanos`] / [`nanos_at`]).
    pub fn observe_at(&self, now: u64) {
        self.load.observe(now.saturating_sub(self.started), now);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn peak_then_decay() {
        let l = EndpointLoad::default();
        let t0 = now_nanos();
        l.observe(500 * MS, t0);
        // Peak: jumps straight to the slow sample.
        assert!((l.rtt_estimate(t0) - (500 * MS) as f64).abs() < 1.0);
        // A fast sample 1s later moves the estimate down only a little (tau = 10s).
        l.observe(MS, t0 + 1000 * MS);
        let e = l.rtt_estimate(t0 + 1000 * MS);
        assert!(e > 400.0 * MS as f64 && e < 500.0 * MS as f64, "{e}");
        // Long silence decays towards zero.
        assert!(l.rtt_estimate(t0 + 100_000 * MS) < MS as f64);
    }

    #[test]
    fn outstanding_counts_and_cost_grows() {
        let l = Arc::new(EndpointLoad::default());
        let now = now_nanos();
        let c0 = l.peak_ewma_cost(now);
        let g1 = l.start();
        let g2 = l.start();
        assert_eq!(l.outstanding(), 2);
        assert!(l.peak_ewma_cost(now) > 2.9 * c0);
        g1.observe();
        drop(g1);
        drop(g2);
        assert_eq!(l.outstanding(), 0);
    }
}
