//! Jittered exponential backoff between attempts to reach the control plane (discovery streams,
//! certificate requests): never a hot loop, never longer than its cap.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": attempt `n` waits a uniform time in
/// `[c/2, c]` where `c = min(cap, base * 2^n)`. The lower half keeps attempts apart (no hot
/// loop, even when many proxies lost the same replica at once); the random upper half spreads
/// them out (no thundering herd on the next replica).
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff starting at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap)
    }

    /// The next delay: uniform in `[ceiling/2, ceiling]`; the ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    /// Back to the first step (after a healthy stream or a successful request).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_never_below_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut seen_below_ceiling = false;
        for attempt in 0..40u32 {
            let ceiling = Duration::from_millis((100u64 << attempt.min(16)).min(5000));
            assert_eq!(b.ceiling(), ceiling, "attempt {attempt}");
            let d = b.next_delay();
            assert!(
                d <= ceiling && d >= ceiling / 2,
                "attempt {attempt}: {d:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            seen_below_ceiling |= d < ceiling;
        }
        assert!(seen_below_ceiling, "40 delays and none jittered");
        // Bounded: after many failures the delay stays at the cap.
        assert_eq!(b.ceiling(), Duration::from_secs(5));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        let d = b.next_delay();
        assert!(
            d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
            "{d:?}"
        );
    }

    #[test]
    fn delays_spread_between_attempts() {
        // Many proxies losing one replica at once do not all come back at the same instant.
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| Backoff::new(Duration::from_millis(1000), Duration::from_secs(5)).next_delay())
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
