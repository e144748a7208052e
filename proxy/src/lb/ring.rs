//! Consistent hashing: a ring hash (Karger et al., as in Envoy's `RING_HASH`). Each endpoint
//! owns points on a 64-bit ring in proportion to its weight; a request's hash goes to the first
//! point at or after it, skipping points of unavailable endpoints. Adding or removing one
//! endpoint moves only the keys on its arcs.

use super::Avail;

/// Points per unit of weight. Fixed (not derived from the total), so that adding or removing an
/// endpoint leaves every other endpoint's points where they were.
const POINTS_PER_WEIGHT: u64 = 160;
/// Most points on the ring; heavier configurations are scaled down to fit.
const MAX_RING: u64 = 64 * 1024;

/// 64-bit FNV-1a followed by a splitmix64 finaliser: stable across processes and builds (so
/// every proxy maps a key to the same endpoint) and cheap for short keys.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The ring: sorted (point, endpoint index) pairs.
#[derive(Debug, Default)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
}

impl Ring {
    /// Builds the ring for endpoints identified by `keys` (their addresses) with `weights`.
    pub fn new<K: AsRef<[u8]>>(keys: &[K], weights: &[u32]) -> Self {
        if keys.is_empty() {
            return Self::default();
        }
        let total: u64 = (0..keys.len())
            .map(|i| u64::from(weights.get(i).copied().unwrap_or(1).max(1)))
            .sum();
        let per_weight = if total * POINTS_PER_WEIGHT > MAX_RING {
            0
        } else {
            POINTS_PER_WEIGHT
        };
        let mut points = Vec::with_capacity((total * per_weight).max(keys.len() as u64) as usize);
        let mut buf = Vec::with_capacity(64);
        for (i, key) in keys.iter().enumerate() {
            let w = u64::from(weights.get(i).copied().unwrap_or(1).max(1));
            let n = if per_weight > 0 {
                w * per_weight
            } else {
                (MAX_RING * w / total).max(1)
            };
            for replica in 0..n {
                buf.clear();
                buf.extend_from_slice(key.as_ref());
                buf.push(b'_');
                buf.extend_from_slice(replica.to_string().as_bytes());
                points.push((hash_bytes(&buf), u32::try_from(i).unwrap_or(u32::MAX)));
            }
        }
        points.sort_unstable();
        Self {
            points: points.into(),
        }
    }

    /// Points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The endpoint owning `hash`, skipping unavailable ones; `None` if none is available.
    pub fn pick(&self, hash: u64, avail: &Avail) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.points.partition_point(|(p, _)| *p < hash);
        // Bounded: at most one lap of the ring.
        (0..n)
            .map(|k| self.points[(start + k) % n].1 as usize)
            .find(|&i| avail.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn same_key_same_endpoint_and_spread() {
        let k = keys(4);
        let ring = Ring::new(&k, &[1, 1, 1, 1]);
        assert_eq!(ring.len(), 640);
        let h = hash_bytes(b"user-42");
        let first = ring.pick(h, &Avail::All).unwrap();
        for _ in 0..10 {
            assert_eq!(ring.pick(h, &Avail::All), Some(first));
        }
        let mut counts = [0usize; 4];
        for u in 0..10_000 {
            counts[ring
                .pick(hash_bytes(format!("u{u}").as_bytes()), &Avail::All)
                .unwrap()] += 1;
        }
        for c in counts {
            assert!((1_800..3_200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn weights_and_minimal_disruption() {
        let k = keys(3);
        let ring = Ring::new(&k, &[2, 1, 1]);
        let mut counts = [0usize; 3];
        for u in 0..10_000 {
            counts[ring
                .pick(hash_bytes(format!("u{u}").as_bytes()), &Avail::All)
                .unwrap()] += 1;
        }
        assert!(counts[0] > counts[1] + counts[1] / 2, "{counts:?}");
        // Removing endpoint 2 only moves keys that were on it.
        let ring2 = Ring::new(&k[..2], &[2, 1]);
        for u in 0..2_000 {
            let h = hash_bytes(format!("u{u}").as_bytes());
            let before = ring.pick(h, &Avail::All).unwrap();
            if before != 2 {
                assert_eq!(ring2.pick(h, &Avail::All), Some(before));
            }
        }
    }

    #[test]
    fn skips_unavailable() {
        let k = keys(3);
        let ring = Ring::new(&k, &[1, 1, 1]);
        let avail = Avail::from_fn(3, |i| i != 1);
        for u in 0..1_000 {
            let got = ring.pick(hash_bytes(format!("u{u}").as_bytes()), &avail);
            assert_ne!(got, Some(1));
            assert!(got.is_some());
        }
        assert_eq!(ring.pick(1, &Avail::from_fn(3, |_| false)), None);
        assert_eq!(Ring::default().pick(1, &Avail::All), None);
    }
}
