//! Load-balancing primitives: a weighted random pick among a route's destinations, and a
//! weighted round-robin schedule over a cluster's endpoints.
//!
//! Both are immutable and built with the snapshot; the only mutable state, the round-robin
//! position, is an atomic counter owned by the cluster's long-lived state so it survives swaps.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

/// Picks one of several items at random, proportionally to their weights.
#[derive(Debug)]
pub struct WeightedPick<T> {
    /// Items with the running sum of weights up to and including each one.
    items: Box<[(T, u64)]>,
    total: u64,
}

impl<T> WeightedPick<T> {
    /// Builds a picker. Weights are relative; if every weight is 0 the items are equally likely.
    pub fn new(items: Vec<(T, u32)>) -> Self {
        let all_zero = items.iter().all(|(_, w)| *w == 0);
        let mut total = 0u64;
        let items = items
            .into_iter()
            .map(|(item, w)| {
                total += if all_zero { 1 } else { u64::from(w) };
                (item, total)
            })
            .collect();
        Self { items, total }
    }

    /// Every item, in declaration order.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.items.iter().map(|(t, _)| t)
    }

    /// Picks an item; `None` only when there are no items.
    pub fn pick(&self) -> Option<&T> {
        match &*self.items {
            [] => None,
            // The common case (one destination) needs no random number.
            [(only, _)] => Some(only),
            items => {
                let r = rand::rng().random_range(0..self.total);
                Some(self.pick_at(items, r))
            }
        }
    }

    fn pick_at<'a>(&self, items: &'a [(T, u64)], r: u64) -> &'a T {
        // First item whose running sum exceeds r; zero-weight items never win.
        let i = items.partition_point(|(_, cum)| *cum <= r);
        &items[i.min(items.len() - 1)].0
    }
}

/// Longest schedule we expand weights into; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 1024;

/// A weighted round-robin order over endpoint indices, computed once with the smooth weighted
/// round-robin algorithm (nginx's), so heavy endpoints are interleaved rather than bunched.
#[derive(Debug, Default)]
pub struct RoundRobin {
    schedule: Box<[u32]>,
}

impl RoundRobin {
    /// Builds the schedule for endpoints with `weights` (0 counts as 1).
    pub fn new(weights: &[u32]) -> Self {
        if weights.is_empty() {
            return Self::default();
        }
        let mut w: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
        let g = w.iter().copied().fold(0, gcd);
        w.iter_mut().for_each(|x| *x /= g);
        let sum: u64 = w.iter().sum();
        if sum > MAX_SCHEDULE {
            // Keep proportions approximately; every endpoint keeps at least one slot.
            w.iter_mut()
                .for_each(|x| *x = (*x * MAX_SCHEDULE / sum).max(1));
        }
        let len: u64 = w.iter().sum();
        let total = i64::try_from(len).unwrap_or(i64::MAX);
        let w: Vec<i64> = w
            .iter()
            .map(|&x| i64::try_from(x).unwrap_or(i64::MAX))
            .collect();
        let mut current = vec![0i64; w.len()];
        let mut schedule = Vec::with_capacity(w.len());
        for _ in 0..len {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(u32::try_from(best).unwrap_or(u32::MAX));
        }
        Self {
            schedule: schedule.into(),
        }
    }

    /// The next endpoint index, advancing the shared `position`.
    pub fn pick(&self, position: &AtomicUsize) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = position.fetch_add(1, Ordering::Relaxed);
        Some(self.schedule[n % self.schedule.len()] as usize)
    }

    /// Schedule length (for tests and introspection).
    pub fn len(&self) -> usize {
        self.schedule.len()
    }

    /// Whether there is nothing to pick.
    pub fn is_empty(&self) -> bool {
        self.schedule.is_empty()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_destination_always_wins() {
        let p = WeightedPick::new(vec![("a", 0)]);
        assert_eq!(p.pick(), Some(&"a"));
        assert!(WeightedPick::<&str>::new(vec![]).pick().is_none());
    }

    #[test]
    fn pick_at_respects_boundaries() {
        let p = WeightedPick::new(vec![("a", 90), ("b", 0), ("c", 10)]);
        assert_eq!(*p.pick_at(&p.items, 0), "a");
        assert_eq!(*p.pick_at(&p.items, 89), "a");
        assert_eq!(*p.pick_at(&p.items, 90), "c");
        assert_eq!(*p.pick_at(&p.items, 99), "c");
    }

    #[test]
    fn weighted_pick_distribution() {
        let p = WeightedPick::new(vec![("a", 90), ("b", 10), ("z", 0)]);
        let mut a = 0;
        let n = 100_000;
        for _ in 0..n {
            match *p.pick().unwrap() {
                "a" => a += 1,
                "b" => {}
                other => panic!("zero-weight {other} picked"),
            }
        }
        let share = f64::from(a) / f64::from(n);
        assert!((0.88..0.92).contains(&share), "a share {share}");
    }

    #[test]
    fn all_zero_weights_are_equal() {
        let p = WeightedPick::new(vec![("a", 0), ("b", 0)]);
        let a = (0..10_000).filter(|_| *p.pick().unwrap() == "a").count();
        assert!((4_000..6_000).contains(&a), "{a}");
    }

    #[test]
    fn round_robin_cycles_equal_weights() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let pos = AtomicUsize::new(0);
        let got: Vec<_> = (0..6).map(|_| rr.pick(&pos).unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_respects_weights_smoothly() {
        let rr = RoundRobin::new(&[5, 1, 1]);
        assert_eq!(rr.len(), 7);
        let pos = AtomicUsize::new(0);
        let got: Vec<_> = (0..7).map(|_| rr.pick(&pos).unwrap()).collect();
        // nginx's smooth WRR for {5,1,1}: a a b a c a a
        assert_eq!(got, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_reduces_and_caps() {
        assert_eq!(RoundRobin::new(&[100, 200]).len(), 3);
        let rr = RoundRobin::new(&[1_000_000, 1]);
        assert!(rr.len() <= 1100, "{}", rr.len());
        let pos = AtomicUsize::new(0);
        let ones = (0..rr.len()).filter(|_| rr.pick(&pos) == Some(1)).count();
        assert_eq!(ones, 1);
        assert!(RoundRobin::new(&[]).pick(&pos).is_none());
        assert_eq!(RoundRobin::new(&[0, 0]).len(), 2);
    }
}
