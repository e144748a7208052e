//! The retry budget (Finagle's / linkerd's idea): over a sliding window, retries may add at most
//! `ratio` x the requests of the window, plus `min_per_second` x the window's seconds whatever
//! the traffic. A failing upstream therefore sees at most `(1 + ratio)` x the offered load, never
//! `(1 + max_retries)` x.
//!
//! Lock-free: the window is [`SLOTS`] time slots of atomic counters tagged with their epoch; a
//! slot found holding an older epoch is reset by whoever first moves it on. The reset races with
//! concurrent increments only at slot boundaries, which can lose a handful of counts: harmless
//! for a budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use weft_proto::v1;

use crate::lb::load::now_nanos;

/// Slots per window.
pub const SLOTS: usize = 10;

/// Budget parameters (from the route's `RetryPolicy.budget`; absent = the defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetParams {
    /// Retries per request allowed on top of the requests (0.2 = +20%).
    pub ratio: f64,
    /// Retries per second always allowed.
    pub min_per_second: u32,
    /// Counting window.
    pub window: Duration,
}

impl Default for BudgetParams {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetParams {
    /// From the proto; absent = defaults, a zero window = 10s. `Err` names the field.
    pub fn from_proto(p: Option<&v1::RetryBudget>) -> Result<Self, (&'static str, String)> {
        let Some(p) = p else {
            return Ok(Self::default());
        };
        if !(p.ratio.is_finite() && p.ratio >= 0.0) {
            return Err(("budget.ratio", format!("{} is not a ratio >= 0", p.ratio)));
        }
        Ok(Self {
            ratio: p.ratio,
            min_per_second: p.min_per_second,
            window: if p.window_ms == 0 {
                Self::default().window
            } else {
                Duration::from_millis(p.window_ms.max(SLOTS as u64))
            },
        })
    }
}

#[derive(Debug, Default)]
struct Slot {
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A cluster's retry budget (state outliving snapshots).
#[derive(Debug, Default)]
pub struct RetryBudget {
    slots: [Slot; SLOTS],
}

impl RetryBudget {
    fn slot_nanos(window: Duration) -> u64 {
        (u64::try_from(window.as_nanos()).unwrap_or(u64::MAX) / SLOTS as u64).max(1)
    }

    fn current(&self, epoch: u64) -> &Slot {
        // Epochs start at 1 so that a fresh (0) slot is never taken for a current one.
        let slot = &self.slots[(epoch % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Ordering::Acquire);
        if seen != epoch
            && slot
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    fn epoch(window: Duration, now: u64) -> u64 {
        now / Self::slot_nanos(window) + 1
    }

    /// Counts one request (first attempts only).
    pub fn deposit(&self, params: &BudgetParams) {
        self.deposit_at(params, now_nanos());
    }

    /// [`RetryBudget::deposit`] at `now` ([`now_nanos`] / [`crate::lb::load::nanos_at`] of a
    /// clock read the caller made anyway, e.g. the request's arrival).
    pub fn deposit_at(&self, params: &BudgetParams, now: u64) {
        let e = Self::epoch(params.window, now);
        self.current(e).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; `false` = exhausted (do not retry).
    pub fn try_withdraw(&self, params: &BudgetParams) -> bool {
        self.try_withdraw_at(params, now_nanos())
    }

    fn try_withdraw_at(&self, params: &BudgetParams, now: u64) -> bool {
        let e = Self::epoch(params.window, now);
        let (mut requests, mut retries) = (0u64, 0u64);
        let oldest = e.saturating_sub(SLOTS as u64 - 1);
        for s in &self.slots {
            let se = s.epoch.load(Ordering::Acquire);
            if (oldest..=e).contains(&se) {
                requests += s.requests.load(Ordering::Relaxed);
                retries += s.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = params.ratio * requests as f64
            + f64::from(params.min_per_second) * params.window.as_secs_f64();
        if (retries as f64) < allowed {
            self.current(e).retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn floor_then_ratio() {
        let b = RetryBudget::default();
        let p = BudgetParams {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let t = 100 * S;
        // No traffic: the floor (1/s x 10s) only.
        let floor = (0..100).filter(|_| b.try_withdraw_at(&p, t)).count();
        assert_eq!(floor, 10);
        // 100 requests add 20 retries.
        for _ in 0..100 {
            b.deposit_at(&p, t);
        }
        let more = (0..100).filter(|_| b.try_withdraw_at(&p, t)).count();
        assert_eq!(more, 20);
    }

    #[test]
    fn window_slides() {
        let b = RetryBudget::default();
        let p = BudgetParams {
            ratio: 0.5,
            min_per_second: 0,
            window: Duration::from_secs(10),
        };
        let t = 1_000 * S;
        for _ in 0..10 {
            b.deposit_at(&p, t);
        }
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(&p, t)).count(), 5);
        // 11s later the old requests (and retries) left the window.
        let later = t + 11 * S;
        assert!(!b.try_withdraw_at(&p, later));
        for _ in 0..4 {
            b.deposit_at(&p, later);
        }
        assert_eq!((0..10).filter(|_| b.try_withdraw_at(&p, later)).count(), 2);
    }

    #[test]
    fn failing_upstream_never_multiplies_load() {
        // Every attempt fails and would be retried twice: the budget keeps total attempts
        // within (1 + ratio) x requests + floor.
        let b = RetryBudget::default();
        let p = BudgetParams::default();
        let t = 50 * S;
        let (mut attempts, requests) = (0u64, 1_000u64);
        for _ in 0..requests {
            b.deposit_at(&p, t);
            attempts += 1;
            for _ in 0..2 {
                if b.try_withdraw_at(&p, t) {
                    attempts += 1;
                }
            }
        }
        let max = requests as f64 * 1.2 + 100.0;
        assert!((attempts as f64) <= max, "{attempts} attempts");
    }

    #[test]
    fn params_from_proto() {
        assert_eq!(
            BudgetParams::from_proto(None).unwrap(),
            BudgetParams::default()
        );
        let p = BudgetParams::from_proto(Some(&v1::RetryBudget {
            ratio: 0.5,
            min_per_second: 3,
            window_ms: 2_000,
        }))
        .unwrap();
        assert_eq!(p.window, Duration::from_secs(2));
        assert!(BudgetParams::from_proto(Some(&v1::RetryBudget {
            ratio: f64::NAN,
            ..Default::default()
        }))
        .is_err());
    }
}
