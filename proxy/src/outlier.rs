//! Passive health: outlier detection. An endpoint is ejected (taken out of load balancing) after
//! `consecutive_failures` 5xx / connect failures / resets / timeouts in a row, or when its
//! success rate over an interval falls below `mean - factor x stdev` of its peers. Ejection lasts
//! `base x times ejected` (capped at `max`), and never more than `max_ejection_percent` of the
//! endpoints are ejected at once. Below `min_healthy_percent` available endpoints the balancer
//! ignores ejections and health checks altogether (panic mode), as does a cluster with none.
//!
//! Per-endpoint state ([`EndpointHealth`], also carrying the active health-check verdict) and
//! per-cluster state ([`OutlierState`]) outlive snapshots. Ejections expire lazily (a timestamp),
//! and the success-rate sweep runs in the request path, once per interval, on whichever request
//! first sees it due: no background task, no lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use weft_proto::v1;

use crate::lb::load::now_nanos;
use crate::lb::Avail;
use crate::resilience_metrics::ClusterResilienceMetrics;

/// Outlier-detection settings of one cluster (zero proto fields take these defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// 0 = no consecutive-failure ejection.
    pub consecutive_failures: u32,
    /// Default 30s.
    pub base_ejection: Duration,
    /// Default 300s.
    pub max_ejection: Duration,
    /// Default 50.
    pub max_ejection_percent: u32,
    /// Success-rate evaluation interval; default 10s.
    pub interval: Duration,
    /// 0 = no success-rate ejection.
    pub success_rate_min_hosts: u32,
    /// Default 100.
    pub success_rate_min_requests: u32,
    /// Default 1.9.
    pub success_rate_stdev_factor: f64,
    /// Panic threshold in percent (0 = only when nothing is available).
    pub min_healthy_percent: u32,
}

impl OutlierConfig {
    /// From the proto; `None` = outlier detection off.
    pub fn from_proto(p: Option<&v1::OutlierDetection>) -> Option<Self> {
        let p = p?;
        let or = |v: u64, d: u64| Duration::from_millis(if v == 0 { d } else { v });
        let base_ejection = or(p.base_ejection_ms, 30_000);
        Some(Self {
            consecutive_failures: p.consecutive_failures,
            base_ejection,
            max_ejection: or(p.max_ejection_ms, 300_000).max(base_ejection),
            max_ejection_percent: if p.max_ejection_percent == 0 {
                50
            } else {
                p.max_ejection_percent.min(100)
            },
            interval: or(p.interval_ms, 10_000),
            success_rate_min_hosts: p.success_rate_min_hosts,
            success_rate_min_requests: if p.success_rate_min_requests == 0 {
                100
            } else {
                p.success_rate_min_requests
            },
            success_rate_stdev_factor: if p.success_rate_stdev_factor > 0.0 {
                p.success_rate_stdev_factor
            } else {
                1.9
            },
            min_healthy_percent: p.min_healthy_percent.min(100),
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Health of one endpoint, shared by every snapshot that has it.
#[derive(Debug)]
pub struct EndpointHealth {
    consecutive: AtomicU32,
    times_ejected: AtomicU32,
    /// [`now_nanos`] until which the endpoint is ejected (0 = never ejected).
    ejected_until: AtomicU64,
    successes: AtomicU64,
    requests: AtomicU64,
    /// The active health check's verdict (true until a check says otherwise).
    checked_healthy: AtomicBool,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        Self {
            consecutive: AtomicU32::new(0),
            times_ejected: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            checked_healthy: AtomicBool::new(true),
        }
    }
}

impl EndpointHealth {
    /// Whether outlier detection has the endpoint ejected at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// Whether the balancer may pick the endpoint at `now`.
    pub fn is_available(&self, now: u64) -> bool {
        !self.is_ejected(now) && self.checked_healthy.load(Ordering::Relaxed)
    }

    /// The active health check's verdict.
    pub fn is_checked_healthy(&self) -> bool {
        self.checked_healthy.load(Ordering::Relaxed)
    }

    /// Records the active health check's verdict; `true` if it changed.
    pub fn set_checked_healthy(&self, healthy: bool) -> bool {
        self.checked_healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// How many times the endpoint was ejected (decays while it behaves).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }
}

/// Outlier-detection state of one cluster.
#[derive(Debug, Default)]
pub struct OutlierState {
    /// Bumped whenever an endpoint may have become unavailable.
    unavailable_gen: AtomicU64,
    /// The generation at which every endpoint was last seen available.
    clean_gen: AtomicU64,
    next_sweep: AtomicU64,
}

impl OutlierState {
    /// Notes that some endpoint may have become unavailable (ejection, failed health check).
    pub fn note_unavailable(&self) {
        self.unavailable_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// The endpoints the balancer may pick among `healths` at `now`: [`Avail::All`] (without
    /// looking at any endpoint) unless something became unavailable since the last time all
    /// were available; all of them too below the panic threshold.
    pub fn avail<'a, H>(&self, healths: H, n: usize, min_healthy_percent: u32, now: u64) -> Avail
    where
        H: Fn(usize) -> &'a EndpointHealth,
    {
        let gen = self.unavailable_gen.load(Ordering::Acquire);
        if gen == self.clean_gen.load(Ordering::Acquire) {
            return Avail::All;
        }
        let avail = Avail::from_fn(n, |i| healths(i).is_available(now));
        let up = avail.count(n);
        if up == n {
            self.clean_gen.fetch_max(gen, Ordering::AcqRel);
            return Avail::All;
        }
        if up == 0 || (up as u64) * 100 < u64::from(min_healthy_percent) * n as u64 {
            return Avail::All;
        }
        avail
    }

    /// Records how an attempt to endpoint `i` ended (`ok` = not a 5xx/connect failure/reset/
    /// timeout) and ejects it if that makes it an outlier. Returns whether it was ejected now.
    pub fn report<'a, H>(
        &self,
        cfg: &OutlierConfig,
        healths: H,
        n: usize,
        i: usize,
        ok: bool,
        metrics: &ClusterResilienceMetrics,
    ) -> bool
    where
        H: Fn(usize) -> &'a EndpointHealth + Copy,
    {
        self.report_at(cfg, healths, n, i, ok, metrics, now_nanos())
    }

    /// [`OutlierState::report`] at `now` ([`now_nanos`] of a clock read the caller made anyway,
    /// e.g. when the response arrived).
    #[allow(clippy::too_many_arguments)]
    pub fn report_at<'a, H>(
        &self,
        cfg: &OutlierConfig,
        healths: H,
        n: usize,
        i: usize,
        ok: bool,
        metrics: &ClusterResilienceMetrics,
        now: u64,
    ) -> bool
    where
        H: Fn(usize) -> &'a EndpointHealth + Copy,
    {
        let h = healths(i);
        h.requests.fetch_add(1, Ordering::Relaxed);
        let mut ejected = false;
        if ok {
            h.successes.fetch_add(1, Ordering::Relaxed);
            if h.consecutive.load(Ordering::Relaxed) != 0 {
                h.consecutive.store(0, Ordering::Relaxed);
            }
        } else {
            let c = h.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if cfg.consecutive_failures > 0
                && c >= cfg.consecutive_failures
                && !h.is_ejected(now)
                && self.eject(cfg, healths, n, i, now, metrics)
            {
                metrics.ejections_consecutive.inc();
                ejected = true;
            }
        }
        self.maybe_sweep(cfg, healths, n, now, metrics);
        ejected
    }

    fn eject<'a, H>(
        &self,
        cfg: &OutlierConfig,
        healths: H,
        n: usize,
        i: usize,
        now: u64,
        metrics: &ClusterResilienceMetrics,
    ) -> bool
    where
        H: Fn(usize) -> &'a EndpointHealth,
    {
        let ejected = (0..n).filter(|&k| healths(k).is_ejected(now)).count() as u64;
        if (ejected + 1) * 100 > u64::from(cfg.max_ejection_percent) * n as u64 {
            return false;
        }
        let h = healths(i);
        let times = h.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let dur = cfg
            .base_ejection
            .saturating_mul(times)
            .min(cfg.max_ejection);
        h.ejected_until
            .store(now.saturating_add(nanos(dur)), Ordering::Relaxed);
        h.consecutive.store(0, Ordering::Relaxed);
        self.note_unavailable();
        metrics
            .ejected_endpoints
            .set(i64::try_from(ejected + 1).unwrap_or(i64::MAX));
        tracing::info!(
            endpoint = i,
            ?dur,
            times,
            "outlier detection ejected an endpoint"
        );
        true
    }

    /// Runs the periodic success-rate evaluation if it is due (at most once per interval).
    pub fn maybe_sweep<'a, H>(
        &self,
        cfg: &OutlierConfig,
        healths: H,
        n: usize,
        now: u64,
        metrics: &ClusterResilienceMetrics,
    ) where
        H: Fn(usize) -> &'a EndpointHealth + Copy,
    {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(nanos(cfg.interval)),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        if due == 0 {
            // First call: just start the clock.
            return;
        }
        let rates: Vec<(usize, f64)> = (0..n)
            .filter_map(|k| {
                let h = healths(k);
                let total = h.requests.swap(0, Ordering::Relaxed);
                let ok = h.successes.swap(0, Ordering::Relaxed);
                if !h.is_ejected(now) && total == 0 {
                    // Behaved (or idle) for a whole interval: forget one past ejection.
                    let _ =
                        h.times_ejected
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                                t.checked_sub(1)
                            });
                }
                (total >= u64::from(cfg.success_rate_min_requests) && !h.is_ejected(now))
                    .then(|| (k, ok as f64 / total as f64))
            })
            .collect();
        if cfg.success_rate_min_hosts > 0 && rates.len() >= cfg.success_rate_min_hosts as usize {
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / rates.len() as f64;
            let var =
                rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / rates.len() as f64;
            let threshold = mean - cfg.success_rate_stdev_factor * var.sqrt();
            for &(k, r) in &rates {
                if r < threshold && self.eject(cfg, healths, n, k, now, metrics) {
                    metrics.ejections_success_rate.inc();
                }
            }
        }
        let ejected = (0..n).filter(|&k| healths(k).is_ejected(now)).count();
        metrics
            .ejected_endpoints
            .set(i64::try_from(ejected).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig::from_proto(Some(&v1::OutlierDetection {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            min_healthy_percent: 50,
            ..Default::default()
        }))
        .unwrap()
    }

    #[test]
    fn defaults() {
        assert!(OutlierConfig::from_proto(None).is_none());
        let c = cfg();
        assert_eq!(c.max_ejection_percent, 50);
        assert_eq!(c.max_ejection, Duration::from_secs(300));
        assert_eq!(c.interval, Duration::from_secs(10));
    }

    #[test]
    fn consecutive_failures_eject_and_expire() {
        let hs: Vec<EndpointHealth> = (0..4).map(|_| EndpointHealth::default()).collect();
        let get = |i: usize| &hs[i];
        let s = OutlierState::default();
        let m = ClusterResilienceMetrics::detached("c");
        let c = cfg();
        assert_eq!(s.avail(get, 4, 50, now_nanos()), Avail::All);
        assert!(!s.report(&c, get, 4, 1, false, &m));
        // A success resets the streak.
        s.report(&c, get, 4, 1, true, &m);
        assert!(!s.report(&c, get, 4, 1, false, &m));
        assert!(!s.report(&c, get, 4, 1, false, &m));
        assert!(s.report(&c, get, 4, 1, false, &m));
        assert_eq!(m.ejections_consecutive.get(), 1);
        assert_eq!(m.ejected_endpoints.get(), 1);
        let now = now_nanos();
        let a = s.avail(get, 4, 50, now);
        assert!(!a.contains(1) && a.contains(0) && a.count(4) == 3);
        // Ejection lasts base x times: expired after 1s.
        let later = now + 1_100_000_000;
        assert_eq!(s.avail(get, 4, 50, later), Avail::All);
        // ... and the clean state is remembered (no scan next time).
        assert_eq!(
            s.clean_gen.load(Ordering::Relaxed),
            s.unavailable_gen.load(Ordering::Relaxed)
        );
        assert_eq!(hs[1].times_ejected(), 1);
    }

    #[test]
    fn max_ejection_percent_and_panic_threshold() {
        let hs: Vec<EndpointHealth> = (0..3).map(|_| EndpointHealth::default()).collect();
        let get = |i: usize| &hs[i];
        let s = OutlierState::default();
        let m = ClusterResilienceMetrics::detached("c");
        let c = cfg();
        for ep in 0..3 {
            for _ in 0..3 {
                s.report(&c, get, 3, ep, false, &m);
            }
        }
        // 50% of 3: only one may be ejected.
        assert_eq!(m.ejections_consecutive.get(), 1);
        let now = now_nanos();
        assert_eq!(s.avail(get, 3, 50, now).count(3), 2);
        // Health checks take another out: 1 of 3 left < 50% -> panic: balance over all.
        hs[2].set_checked_healthy(false);
        s.note_unavailable();
        assert_eq!(s.avail(get, 3, 50, now), Avail::All);
        assert_eq!(s.avail(get, 3, 0, now).count(3), 1);
    }

    #[test]
    fn success_rate_outlier() {
        let hs: Vec<EndpointHealth> = (0..5).map(|_| EndpointHealth::default()).collect();
        let get = |i: usize| &hs[i];
        let s = OutlierState::default();
        let m = ClusterResilienceMetrics::detached("c");
        let c = OutlierConfig::from_proto(Some(&v1::OutlierDetection {
            consecutive_failures: 0,
            success_rate_min_hosts: 3,
            success_rate_min_requests: 10,
            interval_ms: 1,
            ..Default::default()
        }))
        .unwrap();
        s.maybe_sweep(&c, get, 5, 1, &m); // starts the clock
        for (ep, h) in hs.iter().enumerate() {
            for k in 0..100 {
                // Endpoint 4 fails half its requests, the others 1%.
                let ok = if ep == 4 { k % 2 == 0 } else { k != 0 };
                h.requests.fetch_add(1, Ordering::Relaxed);
                if ok {
                    h.successes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        s.maybe_sweep(&c, get, 5, now_nanos() + 10_000_000, &m);
        assert_eq!(m.ejections_success_rate.get(), 1);
        assert!(hs[4].is_ejected(now_nanos()));
        assert!(!hs[0].is_ejected(now_nanos()));
    }
}
