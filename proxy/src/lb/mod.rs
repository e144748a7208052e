//! Endpoint load balancing: which endpoint of a cluster gets a request.
//!
//! Policies (`Cluster.lb`): power of two choices over peak-EWMA latency x outstanding requests
//! (the default), weighted round robin, least request (power of two choices over outstanding
//! requests) and ring hash on a header, cookie or the source IP for session affinity. Weights
//! are honoured by every policy (P2C divides an endpoint's cost by its weight).
//!
//! P2C over peak EWMA treats latency differences below [`LATENCY_NOISE`] (absolute) or 25%
//! (relative) as noise and then prefers the endpoint with fewer outstanding requests (a coin
//! flip if equal): one latency spike of a fast endpoint must not send all sequential traffic to
//! its peer for the decay time, while a clearly slow endpoint is still avoided.
//!
//! A [`Balancer`] is immutable and built with the snapshot. The mutable state it reads, each
//! endpoint's [`EndpointLoad`] and the round-robin position, outlives snapshots. Which endpoints
//! may be picked (not ejected, not failing health checks) is an [`Avail`] the cluster computes;
//! picking never allocates.

pub mod load;
pub mod ring;

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, COOKIE};
use rand::Rng;

use crate::balance::RoundRobin;
pub use load::{EndpointLoad, LoadGuard};
pub use ring::{hash_bytes, Ring};

/// Peak-EWMA cost differences below this are noise (see the module docs).
pub const LATENCY_NOISE: Duration = Duration::from_millis(5);

/// The load-balancing policy of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over peak-EWMA RTT x (outstanding + 1), divided by weight.
    P2cPeakEwma,
    /// Power of two choices over (outstanding + 1), divided by weight.
    LeastRequest,
    /// Consistent hashing (ring hash) over the cluster's hash policy.
    RingHash,
}

impl Policy {
    /// The name used in `/config_dump` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::P2cPeakEwma => "p2c_peak_ewma",
            Self::LeastRequest => "least_request",
            Self::RingHash => "ring_hash",
        }
    }
}

/// What a ring-hash cluster hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(Box<str>),
    /// The downstream peer's IP address.
    SourceIp,
}

/// The endpoints a pick may choose from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Avail {
    /// Every endpoint (the common case: nothing ejected or unhealthy).
    All,
    /// Endpoints whose bit is set (clusters of at most 64 endpoints).
    Mask(u64),
    /// Endpoints whose bit is set (larger clusters).
    Bits(Box<[u64]>),
}

impl Avail {
    /// The set of `i < len` with `f(i)`.
    pub fn from_fn(len: usize, f: impl Fn(usize) -> bool) -> Self {
        if len <= 64 {
            let mut m = 0u64;
            for i in (0..len).filter(|&i| f(i)) {
                m |= 1 << i;
            }
            Self::Mask(m)
        } else {
            let mut bits = vec![0u64; len.div_ceil(64)];
            for i in (0..len).filter(|&i| f(i)) {
                bits[i / 64] |= 1 << (i % 64);
            }
            Self::Bits(bits.into())
        }
    }

    /// Whether endpoint `i` may be picked.
    pub fn contains(&self, i: usize) -> bool {
        match self {
            Self::All => true,
            Self::Mask(m) => i < 64 && m & (1 << i) != 0,
            Self::Bits(b) => b.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0),
        }
    }

    /// How many of `len` endpoints may be picked.
    pub fn count(&self, len: usize) -> usize {
        match self {
            Self::All => len,
            Self::Mask(m) => m.count_ones() as usize,
            Self::Bits(b) => b.iter().map(|w| w.count_ones() as usize).sum(),
        }
    }

    /// The index of the `k`-th available endpoint (0-based).
    pub fn nth(&self, k: usize) -> Option<usize> {
        match self {
            Self::All => Some(k),
            Self::Mask(m) => nth_bit(*m, k),
            Self::Bits(b) => {
                let mut k = k;
                for (wi, w) in b.iter().enumerate() {
                    let ones = w.count_ones() as usize;
                    if k < ones {
                        return nth_bit(*w, k).map(|i| wi * 64 + i);
                    }
                    k -= ones;
                }
                None
            }
        }
    }
}

fn nth_bit(mut m: u64, k: usize) -> Option<usize> {
    for _ in 0..k {
        if m == 0 {
            return None;
        }
        m &= m - 1;
    }
    (m != 0).then(|| m.trailing_zeros() as usize)
}

/// Picks endpoints of one cluster, as configured in one snapshot.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    hash_on: Option<HashOn>,
    weights: Box<[u32]>,
    loads: Box<[Arc<EndpointLoad>]>,
    rr: RoundRobin,
    ring: Ring,
}

impl Balancer {
    /// A balancer over endpoints with `keys` (addresses, for the ring), `weights` and shared
    /// `loads` (all three in endpoint order).
    pub fn new<K: AsRef<[u8]>>(
        policy: Policy,
        hash_on: Option<HashOn>,
        keys: &[K],
        weights: &[u32],
        loads: Vec<Arc<EndpointLoad>>,
    ) -> Self {
        Self {
            policy,
            hash_on,
            weights: weights.iter().map(|&w| w.max(1)).collect(),
            loads: loads.into(),
            rr: if policy == Policy::RoundRobin {
                RoundRobin::new(weights)
            } else {
                RoundRobin::default()
            },
            ring: if policy == Policy::RingHash {
                Ring::new(keys, weights)
            } else {
                Ring::default()
            },
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether picks need a request hash ([`Self::request_hash`]).
    pub fn wants_hash(&self) -> bool {
        self.policy == Policy::RingHash && self.hash_on.is_some()
    }

    /// The request's hash for a ring-hash cluster; `None` when the policy is not ring hash or
    /// the request lacks the header/cookie (it is then balanced as least request).
    pub fn request_hash(&self, headers: &HeaderMap, source: Option<IpAddr>) -> Option<u64> {
        if self.policy != Policy::RingHash {
            return None;
        }
        match self.hash_on.as_ref()? {
            HashOn::Header(name) => headers.get(name).map(|v| hash_bytes(v.as_bytes())),
            HashOn::Cookie(name) => headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    (k == &**name).then(|| hash_bytes(v.as_bytes()))
                }),
            HashOn::SourceIp => source.map(|ip| match ip {
                IpAddr::V4(v4) => hash_bytes(&v4.octets()),
                IpAddr::V6(v6) => hash_bytes(&v6.octets()),
            }),
        }
    }

    /// The endpoint for a request: an index into the cluster's endpoints, or `None` when no
    /// endpoint is available. `position` is the cluster's long-lived round-robin position.
    pub fn pick(&self, hash: Option<u64>, avail: &Avail, position: &AtomicUsize) -> Option<usize> {
        self.pick_at(hash, avail, position, load::now_nanos())
    }

    /// [`Balancer::pick`] at `now` ([`load::now_nanos`] of a clock read the caller made anyway:
    /// the peak-EWMA costs decay to it).
    pub fn pick_at(
        &self,
        hash: Option<u64>,
        avail: &Avail,
        position: &AtomicUsize,
        now: u64,
    ) -> Option<usize> {
        let len = self.weights.len();
        match self.policy {
            Policy::RoundRobin => {
                // Skip unavailable endpoints; at most one lap of the schedule.
                (0..self.rr.len().max(1))
                    .filter_map(|_| self.rr.pick(position))
                    .find(|&i| avail.contains(i))
            }
            Policy::RingHash => match hash {
                Some(h) => self.ring.pick(h, avail),
                None => self.p2c(avail, len, false, now),
            },
            Policy::P2cPeakEwma => self.p2c(avail, len, true, now),
            Policy::LeastRequest => self.p2c(avail, len, false, now),
        }
    }

    fn p2c(&self, avail: &Avail, len: usize, ewma: bool, now: u64) -> Option<usize> {
        let n = avail.count(len);
        match n {
            0 => None,
            1 => avail.nth(0),
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                // `a` and `b` are uniformly random and distinct, so on a tie `i` is a coin flip.
                let (i, j) = (avail.nth(a)?, avail.nth(b)?);
                let weight = |k: usize| f64::from(self.weights[k]);
                if ewma {
                    let cost = |k: usize| self.loads[k].peak_ewma_cost(now) / weight(k);
                    let (ci, cj) = (cost(i), cost(j));
                    let diff = (ci - cj).abs();
                    if diff > LATENCY_NOISE.as_nanos() as f64 && diff > 0.25 * ci.max(cj) {
                        return Some(if cj < ci { j } else { i });
                    }
                }
                let pending = |k: usize| f64::from(self.loads[k].outstanding() + 1) / weight(k);
                Some(if pending(j) < pending(i) { j } else { i })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn balancer(policy: Policy, n: usize, weights: &[u32]) -> (Balancer, Vec<Arc<EndpointLoad>>) {
        let loads: Vec<_> = (0..n).map(|_| Arc::new(EndpointLoad::default())).collect();
        let keys: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
        (
            Balancer::new(policy, None, &keys, weights, loads.clone()),
            loads,
        )
    }

    #[test]
    fn avail_sets() {
        let m = Avail::from_fn(10, |i| i % 3 == 0);
        assert_eq!(m.count(10), 4);
        assert_eq!(
            (0..4).map(|k| m.nth(k).unwrap()).collect::<Vec<_>>(),
            [0, 3, 6, 9]
        );
        assert_eq!(m.nth(4), None);
        let b = Avail::from_fn(200, |i| i == 5 || i == 150);
        assert!(matches!(b, Avail::Bits(_)));
        assert_eq!(b.count(200), 2);
        assert_eq!(b.nth(1), Some(150));
        assert!(b.contains(150) && !b.contains(151));
        assert_eq!(Avail::All.nth(7), Some(7));
    }

    #[test]
    fn p2c_never_picks_unavailable_and_covers_all() {
        let (b, _) = balancer(Policy::P2cPeakEwma, 5, &[1; 5]);
        let pos = AtomicUsize::new(0);
        let avail = Avail::from_fn(5, |i| i != 2);
        let mut seen = [0; 5];
        for _ in 0..2_000 {
            seen[b.pick(None, &avail, &pos).unwrap()] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(
            seen.iter().enumerate().all(|(i, &c)| i == 2 || c > 200),
            "{seen:?}"
        );
        assert_eq!(b.pick(None, &Avail::from_fn(5, |_| false), &pos), None);
        assert_eq!(b.pick(None, &Avail::from_fn(5, |i| i == 4), &pos), Some(4));
    }

    #[test]
    fn least_request_avoids_busy_endpoint() {
        let (b, loads) = balancer(Policy::LeastRequest, 3, &[1; 3]);
        let _busy: Vec<_> = (0..10).map(|_| loads[0].start()).collect();
        let pos = AtomicUsize::new(0);
        let zero = (0..3_000)
            .filter(|_| b.pick(None, &Avail::All, &pos) == Some(0))
            .count();
        assert_eq!(zero, 0, "the busy endpoint loses every comparison");
    }

    /// Simulated traffic: endpoint 0 answers in 200ms, the others in 5ms. Under P2C over
    /// peak EWMA the slow endpoint gets far less than the 1/3 round robin gives it.
    #[test]
    fn slow_endpoint_gets_less_traffic_under_p2c_than_round_robin() {
        let share_of_slow = |policy: Policy| {
            let (b, loads) = balancer(policy, 3, &[1; 3]);
            let pos = AtomicUsize::new(0);
            let mut now = load::now_nanos();
            let mut slow = 0;
            let n = 3_000;
            for _ in 0..n {
                let i = b.pick(None, &Avail::All, &pos).unwrap();
                let rtt = if i == 0 { 200_000_000 } else { 5_000_000 };
                now += 1_000_000;
                loads[i].observe(rtt, now);
                slow += usize::from(i == 0);
            }
            slow as f64 / f64::from(n)
        };
        let rr = share_of_slow(Policy::RoundRobin);
        let p2c = share_of_slow(Policy::P2cPeakEwma);
        assert!((0.33..0.34).contains(&rr), "round robin share {rr}");
        assert!(p2c < 0.1, "p2c share of the slow endpoint {p2c}");
    }

    #[test]
    fn p2c_honours_weights() {
        let (b, _) = balancer(Policy::LeastRequest, 2, &[3, 1]);
        let pos = AtomicUsize::new(0);
        let heavy = (0..1_000)
            .filter(|_| b.pick(None, &Avail::All, &pos) == Some(0))
            .count();
        // With equal load the heavier endpoint wins every comparison it is in.
        assert!(heavy > 900, "{heavy}");
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let (b, _) = balancer(Policy::RoundRobin, 3, &[1; 3]);
        let pos = AtomicUsize::new(0);
        let avail = Avail::from_fn(3, |i| i != 1);
        let got: Vec<_> = (0..4)
            .map(|_| b.pick(None, &avail, &pos).unwrap())
            .collect();
        assert_eq!(got, [0, 2, 0, 2]);
        assert_eq!(b.pick(None, &Avail::from_fn(3, |_| false), &pos), None);
    }

    #[test]
    fn request_hash_from_header_cookie_ip() {
        let loads: Vec<_> = (0..3).map(|_| Arc::new(EndpointLoad::default())).collect();
        let keys = ["a", "b", "c"];
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.append(COOKIE, HeaderValue::from_static("theme=dark; session=s1"));
        let by_header = Balancer::new(
            Policy::RingHash,
            Some(HashOn::Header(HeaderName::from_static("x-user"))),
            &keys,
            &[1; 3],
            loads.clone(),
        );
        assert_eq!(by_header.request_hash(&h, None), Some(hash_bytes(b"alice")));
        let by_cookie = Balancer::new(
            Policy::RingHash,
            Some(HashOn::Cookie("session".into())),
            &keys,
            &[1; 3],
            loads.clone(),
        );
        assert_eq!(by_cookie.request_hash(&h, None), Some(hash_bytes(b"s1")));
        let by_ip = Balancer::new(
            Policy::RingHash,
            Some(HashOn::SourceIp),
            &keys,
            &[1; 3],
            loads,
        );
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            by_ip.request_hash(&h, Some(ip)),
            Some(hash_bytes(&[10, 1, 2, 3]))
        );
        assert_eq!(by_ip.request_hash(&h, None), None);
        // Same key, same endpoint.
        let pos = AtomicUsize::new(0);
        let k = by_header.request_hash(&h, None);
        let first = by_header.pick(k, &Avail::All, &pos);
        assert!((0..20).all(|_| by_header.pick(k, &Avail::All, &pos) == first));
        // No key: still picks something.
        assert!(by_header.pick(None, &Avail::All, &pos).is_some());
    }
}
