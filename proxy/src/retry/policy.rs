//! A route's retry policy, compiled from `RetryPolicy` in the route proto, and the retry
//! decisions: is this outcome retriable, may this method be retried, how long to back off.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use rand::Rng;
use weft_proto::v1;

use super::budget::BudgetParams;

/// Backoff base when the proto leaves it at 0.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Backoff cap when the proto leaves it at 0.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Largest request body buffered for replay when the proto leaves it at 0.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest `Retry-After` honoured; a longer one ends the retries (the response is returned).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// How one attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived with this status (and gRPC status, if any, in the headers).
    Response {
        /// HTTP status.
        status: StatusCode,
        /// `grpc-status` of a trailers-only response.
        grpc_status: Option<u32>,
    },
    /// Connecting failed or timed out: the request never reached the endpoint.
    ConnectFailure,
    /// The connection was reset/closed before response headers.
    Reset,
    /// The per-try timeout fired.
    PerTryTimeout,
}

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    on_connect_failure: bool,
    on_reset: bool,
    on_status: Box<[u16]>,
    /// Bit `c` set = gRPC status `c` (0..=31) is retried.
    on_grpc_status: u32,
    non_idempotent: bool,
    /// Per-attempt timeout; `None` = only the route timeout.
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    /// Request bodies up to this size are buffered for replay.
    pub max_body_bytes: usize,
    /// The cluster's retry budget parameters.
    pub budget: BudgetParams,
}

impl RetryPolicy {
    /// Compiles the proto; zero fields take the documented defaults. `Err` names the field.
    pub fn from_proto(p: &v1::RetryPolicy) -> Result<Self, (&'static str, String)> {
        let mut on_grpc_status = 0u32;
        for &c in &p.on_grpc_status {
            if c > 16 {
                return Err(("on_grpc_status", format!("{c} is not a gRPC status code")));
            }
            on_grpc_status |= 1 << c;
        }
        let mut on_status = Vec::with_capacity(p.on_status.len());
        for &s in &p.on_status {
            match u16::try_from(s) {
                Ok(s) if (100..=599).contains(&s) => on_status.push(s),
                _ => return Err(("on_status", format!("{s} is not an HTTP status"))),
            }
        }
        let ms = Duration::from_millis;
        let backoff_base = if p.backoff_base_ms == 0 {
            DEFAULT_BACKOFF_BASE
        } else {
            ms(p.backoff_base_ms)
        };
        let backoff_max = if p.backoff_max_ms == 0 {
            DEFAULT_BACKOFF_MAX.max(backoff_base)
        } else {
            ms(p.backoff_max_ms)
        };
        if backoff_max < backoff_base {
            return Err((
                "backoff_max_ms",
                format!("{backoff_max:?} is below backoff_base_ms {backoff_base:?}"),
            ));
        }
        let budget = BudgetParams::from_proto(p.budget.as_ref())?;
        Ok(Self {
            max_retries: p.max_retries,
            on_connect_failure: p.on_connect_failure,
            on_reset: p.on_reset,
            on_status: on_status.into(),
            on_grpc_status,
            non_idempotent: p.non_idempotent,
            per_try_timeout: (p.per_try_timeout_ms > 0).then(|| ms(p.per_try_timeout_ms)),
            backoff_base,
            backoff_max,
            max_body_bytes: if p.max_body_bytes == 0 {
                DEFAULT_MAX_BODY_BYTES
            } else {
                p.max_body_bytes as usize
            },
            budget,
        })
    }

    /// Whether requests with `method` may be retried: idempotent methods (RFC 9110 9.2.2) always,
    /// others only when the route says so.
    pub fn allows_method(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    /// Whether an attempt that ended with `outcome` should be retried (budget permitting).
    pub fn is_retriable(&self, outcome: Outcome) -> bool {
        match outcome {
            Outcome::ConnectFailure => self.on_connect_failure,
            Outcome::Reset => self.on_reset,
            // A per-try timeout is a gateway timeout from the caller's point of view.
            Outcome::PerTryTimeout => self.on_status.contains(&504) || self.on_reset,
            Outcome::Response {
                status,
                grpc_status,
            } => {
                self.on_status.contains(&status.as_u16())
                    || grpc_status.is_some_and(|c| c < 32 && self.on_grpc_status & (1 << c) != 0)
            }
        }
    }

    /// The pause before retry number `retry` (1-based): full jitter over
    /// `min(max, base * 2^(retry-1))`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let cap = exp.min(self.backoff_max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The gRPC status of a trailers-only response (`grpc-status` in the headers).
pub fn grpc_status_of(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// `Retry-After` as a delay: delta-seconds only (an HTTP date is ignored, the usual backoff
/// applies).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::from_proto(&v1::RetryPolicy {
            max_retries: 2,
            on_connect_failure: true,
            on_status: vec![502, 503, 504],
            on_grpc_status: vec![14],
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn retriable_outcomes() {
        let p = policy();
        assert!(p.is_retriable(Outcome::ConnectFailure));
        assert!(!p.is_retriable(Outcome::Reset));
        assert!(p.is_retriable(Outcome::PerTryTimeout));
        let resp = |s: u16, g: Option<u32>| Outcome::Response {
            status: StatusCode::from_u16(s).unwrap(),
            grpc_status: g,
        };
        assert!(p.is_retriable(resp(503, None)));
        assert!(!p.is_retriable(resp(500, None)));
        assert!(!p.is_retriable(resp(200, None)));
        assert!(p.is_retriable(resp(200, Some(14))));
        assert!(!p.is_retriable(resp(200, Some(2))));
    }

    #[test]
    fn methods() {
        let p = policy();
        assert!(p.allows_method(&Method::GET));
        assert!(p.allows_method(&Method::PUT));
        assert!(!p.allows_method(&Method::POST));
        assert!(!p.allows_method(&Method::PATCH));
        let mut q = p;
        q.non_idempotent = true;
        assert!(q.allows_method(&Method::POST));
    }

    #[test]
    fn defaults_and_validation() {
        let p = policy();
        assert_eq!(p.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(p.per_try_timeout, None);
        assert_eq!(p.budget, BudgetParams::default());
        let bad = |r: v1::RetryPolicy| RetryPolicy::from_proto(&r).unwrap_err().0;
        assert_eq!(
            bad(v1::RetryPolicy {
                on_grpc_status: vec![17],
                ..Default::default()
            }),
            "on_grpc_status"
        );
        assert_eq!(
            bad(v1::RetryPolicy {
                on_status: vec![42],
                ..Default::default()
            }),
            "on_status"
        );
        assert_eq!(
            bad(v1::RetryPolicy {
                backoff_base_ms: 100,
                backoff_max_ms: 10,
                ..Default::default()
            }),
            "backoff_max_ms"
        );
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = policy();
        for retry in 1..6 {
            let cap = (DEFAULT_BACKOFF_BASE * (1 << (retry - 1))).min(DEFAULT_BACKOFF_MAX);
            let samples: Vec<_> = (0..200).map(|_| p.backoff(retry)).collect();
            assert!(samples.iter().all(|d| *d <= cap), "retry {retry}");
            // Jitter: not all the same.
            assert!(samples.iter().any(|d| *d != samples[0]));
        }
        assert!(p.backoff(40) <= DEFAULT_BACKOFF_MAX);
    }

    #[test]
    fn header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        assert_eq!(grpc_status_of(&h), Some(14));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
