//! Compilation of the resilience knobs (policy YAML -> proto), with every default explicit.

use weft_proto::v1::{
    hash_policy, health_check, CircuitBreaker, HashPolicy, HealthCheck, HttpHealthCheck, LbPolicy,
    OutlierDetection, RateLimit, RetryBudget, RetryPolicy,
};

use super::millis;
use crate::policy::{self, RetryCondition, Service};

pub(super) fn lb(p: policy::LbPolicy) -> LbPolicy {
    match p {
        policy::LbPolicy::P2cPeakEwma => LbPolicy::P2cPeakEwma,
        policy::LbPolicy::RoundRobin => LbPolicy::RoundRobin,
        policy::LbPolicy::LeastRequest => LbPolicy::LeastRequest,
        policy::LbPolicy::RingHash => LbPolicy::RingHash,
    }
}

/// The hash of a ring-hash cluster (`None` for other policies; validation guarantees one).
pub(super) fn hash(s: &Service) -> Option<HashPolicy> {
    if s.lb != policy::LbPolicy::RingHash {
        return None;
    }
    let h = s.hash.as_ref()?;
    let kind = if let Some(header) = &h.header {
        hash_policy::Kind::Header(header.to_ascii_lowercase())
    } else if let Some(cookie) = &h.cookie {
        hash_policy::Kind::Cookie(cookie.clone())
    } else {
        hash_policy::Kind::SourceIp(true)
    };
    Some(HashPolicy { kind: Some(kind) })
}

pub(super) fn breaker(b: &policy::CircuitBreaker) -> CircuitBreaker {
    CircuitBreaker {
        max_connections: b.max_connections,
        max_pending_requests: b.max_pending_requests,
        max_requests: b.max_requests,
        max_retries: b.max_retries,
    }
}

/// `None` when disabled.
pub(super) fn outlier(o: &policy::OutlierDetection) -> Option<OutlierDetection> {
    (!o.disabled).then(|| OutlierDetection {
        consecutive_failures: o.consecutive_failures,
        base_ejection_ms: millis(o.base_ejection_time),
        max_ejection_ms: millis(o.max_ejection_time),
        max_ejection_percent: o.max_ejection_percent,
        interval_ms: millis(o.interval),
        success_rate_min_hosts: o.success_rate_min_hosts,
        success_rate_min_requests: o.success_rate_min_requests,
        success_rate_stdev_factor: o.success_rate_stdev_factor,
        min_healthy_percent: o.min_healthy_percent,
    })
}

pub(super) fn health_check(s: &Service) -> Option<HealthCheck> {
    let h = s.health_check.as_ref()?;
    let kind = match &h.http {
        Some(http) => health_check::Kind::Http(HttpHealthCheck {
            path: http.path.clone(),
            expected_statuses: http.expected_statuses.clone(),
            host: http.host.clone().unwrap_or_else(|| s.name.clone()),
        }),
        None => health_check::Kind::Tcp(true),
    };
    Some(HealthCheck {
        kind: Some(kind),
        interval_ms: millis(h.interval),
        timeout_ms: millis(h.timeout),
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    })
}

pub(super) fn retry(r: &policy::RetryPolicy) -> RetryPolicy {
    let mut out = RetryPolicy {
        max_retries: r.attempts,
        non_idempotent: r.non_idempotent,
        per_try_timeout_ms: millis(r.per_try_timeout),
        backoff_base_ms: millis(r.backoff.base),
        backoff_max_ms: millis(r.backoff.max),
        max_body_bytes: r.max_body_bytes,
        budget: Some(RetryBudget {
            ratio: r.budget.ratio,
            min_per_second: r.budget.min_per_second,
            window_ms: millis(r.budget.window),
        }),
        ..Default::default()
    };
    // Unknown conditions were rejected by validation.
    for condition in r.on.iter().filter_map(|on| on.condition().ok()) {
        match condition {
            RetryCondition::ConnectFailure => out.on_connect_failure = true,
            RetryCondition::Reset => out.on_reset = true,
            RetryCondition::HttpStatus(s) => push_sorted(&mut out.on_status, s),
            RetryCondition::GrpcStatus(s) => push_sorted(&mut out.on_grpc_status, s),
        }
    }
    out
}

fn push_sorted(v: &mut Vec<u32>, x: u32) {
    if let Err(i) = v.binary_search(&x) {
        v.insert(i, x);
    }
}

pub(super) fn rate_limit(r: &policy::RateLimit) -> RateLimit {
    RateLimit {
        requests_per_second: r.requests_per_second,
        burst: r.burst(),
    }
}
