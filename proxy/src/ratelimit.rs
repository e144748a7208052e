//! Local rate limiting: a token bucket per route or listener (`RateLimit{requests_per_second,
//! burst}`), implemented as GCRA (the generic cell rate algorithm) on one atomic: the bucket is
//! the "theoretical arrival time" of the next request, so a check is one load and one CAS, no
//! lock. A request over the limit is answered 429 with `Retry-After` (whole seconds, at least 1).
//!
//! The bucket state (that one atomic) outlives snapshots like other per-route/per-listener
//! state: [`BucketRegistry`] hands every snapshot's limiter of the same scope and name (route or
//! listener name) the same atomic, so a config push does not refill the buckets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weft_proto::v1;

use crate::lb::load::now_nanos;

/// A token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    /// Nanoseconds per token.
    interval: u64,
    /// Bucket size x interval: how far ahead of now the arrival time may run.
    tolerance: u64,
    /// Theoretical arrival time (ns); shared by every snapshot's limiter of one route/listener.
    tat: Arc<AtomicU64>,
    /// Configured values (for `/config_dump` and tests).
    pub requests_per_second: u32,
    /// Bucket size.
    pub burst: u32,
}

impl RateLimiter {
    /// From the proto; `None` when absent. `Err` names the bad field.
    pub fn from_proto(p: Option<&v1::RateLimit>) -> Result<Option<Self>, (&'static str, String)> {
        let Some(p) = p else {
            return Ok(None);
        };
        if p.requests_per_second == 0 {
            return Err(("rate_limit.requests_per_second", "must be > 0".into()));
        }
        Ok(Some(Self::new(p.requests_per_second, p.burst)))
    }

    /// `rps` tokens per second, bucket of `burst` (0 = one second's worth).
    pub fn new(rps: u32, burst: u32) -> Self {
        let burst = if burst == 0 { rps.max(1) } else { burst };
        let interval = 1_000_000_000 / u64::from(rps.max(1));
        Self {
            interval,
            tolerance: interval * u64::from(burst),
            tat: Arc::default(),
            requests_per_second: rps,
            burst,
        }
    }

    /// This limiter, keeping its bucket in `tat` (see [`BucketRegistry`]).
    #[must_use]
    pub fn with_bucket(mut self, tat: Arc<AtomicU64>) -> Self {
        self.tat = tat;
        self
    }

    /// Takes a token; `Err(retry_after)` when the bucket is empty.
    pub fn check(&self) -> Result<(), Duration> {
        self.check_at(now_nanos())
    }

    fn check_at(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        // Each failed CAS means another request took a token: bounded by contention, and we give
        // up (allow) after a few rounds rather than spin.
        for _ in 0..16 {
            let next = tat.max(now) + self.interval;
            if next - now > self.tolerance {
                return Err(Duration::from_nanos(next - now - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
        Ok(())
    }
}

/// (scope, name) of a rate limit.
type BucketKey = (Box<str>, Box<str>);

/// Bucket state by (scope, name), shared across snapshots. Entries of removed routes/listeners
/// stay (one atomic each) so that a route that comes back does not get a fresh burst either.
#[derive(Debug, Default)]
pub struct BucketRegistry {
    /// Weak: a bucket lives while a snapshot's limiter holds it (a push builds the new snapshot
    /// while the old one still holds it, so a kept limit keeps its bucket; a removed one goes).
    buckets: Mutex<HashMap<BucketKey, std::sync::Weak<AtomicU64>>>,
}

impl BucketRegistry {
    /// The bucket of `scope` (`route`/`listener`) `name`.
    pub fn bucket(&self, scope: &str, name: &str) -> Arc<AtomicU64> {
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key: BucketKey = (scope.into(), name.into());
        if let Some(b) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return b;
        }
        // A new bucket: forget those no limiter holds any more (bounded by what is configured).
        map.retain(|_, b| b.strong_count() > 0);
        let b = Arc::new(AtomicU64::default());
        map.insert(key, Arc::downgrade(&b));
        b
    }

    /// Buckets some limiter still holds (tests).
    pub fn live(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|b| b.strong_count() > 0)
            .count()
    }
}

/// `Retry-After` seconds for a wait of `d`: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let l = RateLimiter::new(10, 5);
        let t = 100 * S;
        assert_eq!((0..20).filter(|_| l.check_at(t).is_ok()).count(), 5);
        let wait = l.check_at(t).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // 1s later: 10 more tokens, but the bucket holds 5.
        assert_eq!((0..20).filter(|_| l.check_at(t + S).is_ok()).count(), 5);
        // Steady rate: one every 100ms.
        let mut ok = 0;
        for k in 0..100 {
            ok += usize::from(l.check_at(t + 2 * S + k * 10_000_000).is_ok());
        }
        assert!((10..=16).contains(&ok), "{ok}");
    }

    #[test]
    fn bucket_survives_a_rebuild() {
        let reg = BucketRegistry::default();
        let t = 100 * S;
        let a = RateLimiter::new(10, 3).with_bucket(reg.bucket("route", "r"));
        assert_eq!((0..10).filter(|_| a.check_at(t).is_ok()).count(), 3);
        // A new snapshot's limiter of the same route: still empty.
        let b = RateLimiter::new(10, 3).with_bucket(reg.bucket("route", "r"));
        assert!(b.check_at(t).is_err());
        // Another route (or a listener of the same name) has its own bucket.
        let c = RateLimiter::new(10, 3).with_bucket(reg.bucket("listener", "r"));
        assert!(c.check_at(t).is_ok());
    }

    #[test]
    fn proto_and_retry_after() {
        assert!(RateLimiter::from_proto(None).unwrap().is_none());
        assert!(RateLimiter::from_proto(Some(&v1::RateLimit {
            requests_per_second: 0,
            burst: 1
        }))
        .is_err());
        let l = RateLimiter::from_proto(Some(&v1::RateLimit {
            requests_per_second: 7,
            burst: 0,
        }))
        .unwrap()
        .unwrap();
        assert_eq!(l.burst, 7);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2_500)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    }
}
