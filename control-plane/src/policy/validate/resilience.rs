//! Validation of the resilience knobs: load balancing and hashing, outlier detection, health
//! checks, retries and rate limits.

use super::{Collector, Path, Service};
use crate::policy::resilience::MAX_RETRY_BODY_BYTES;
use crate::policy::{LbPolicy, RateLimit, RetryPolicy};

pub(super) fn check_service(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, s: &Service) {
    match (&s.lb, &s.hash) {
        (LbPolicy::RingHash, None) => c.push(
            fi,
            format!("{path}.lb"),
            "ring_hash needs a hash: {header: NAME} | {cookie: NAME} | {source_ip: true}",
        ),
        (LbPolicy::RingHash, Some(h)) => {
            let set = usize::from(h.header.is_some())
                + usize::from(h.cookie.is_some())
                + usize::from(h.source_ip == Some(true));
            if set != 1 || h.source_ip == Some(false) {
                c.push(
                    fi,
                    format!("{path}.hash"),
                    format!(
                        "exactly one of header, cookie, source_ip: true is required ({set} given)"
                    ),
                );
            }
            if let Some(name) = &h.header {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    c.push(
                        fi,
                        format!("{path}.hash.header"),
                        format!("{name:?} is not a valid header name"),
                    );
                }
            }
            if h.cookie.as_ref().is_some_and(String::is_empty) {
                c.push(fi, format!("{path}.hash.cookie"), "must not be empty");
            }
        }
        (_, Some(_)) => c.push(
            fi,
            format!("{path}.hash"),
            "hash is only used by lb: ring_hash",
        ),
        (_, None) => {}
    }

    let o = &s.outlier_detection;
    let opath = path.field("outlier_detection");
    for (field, value) in [
        ("max_ejection_percent", o.max_ejection_percent),
        ("min_healthy_percent", o.min_healthy_percent),
    ] {
        check_percent(c, fi, &opath.field(field), value);
    }
    if !(o.success_rate_stdev_factor.is_finite() && o.success_rate_stdev_factor > 0.0) {
        c.push(
            fi,
            format!("{opath}.success_rate_stdev_factor"),
            format!(
                "must be greater than 0 (got {})",
                o.success_rate_stdev_factor
            ),
        );
    }
    if o.interval.is_zero() {
        c.push(fi, format!("{opath}.interval"), "must be greater than 0s");
    }
    if o.base_ejection_time.is_zero() {
        c.push(
            fi,
            format!("{opath}.base_ejection_time"),
            "must be greater than 0s",
        );
    }
    if o.max_ejection_time < o.base_ejection_time {
        c.push(
            fi,
            format!("{opath}.max_ejection_time"),
            format!(
                "must be at least base_ejection_time ({})",
                humantime::format_duration(o.base_ejection_time)
            ),
        );
    }

    if let Some(h) = &s.health_check {
        let hpath = path.field("health_check");
        let set = usize::from(h.http.is_some()) + usize::from(h.tcp == Some(true));
        if set != 1 || h.tcp == Some(false) {
            c.push(
                fi,
                hpath.to_string(),
                format!("exactly one of http, tcp: true is required ({set} given)"),
            );
        }
        if let Some(http) = &h.http {
            if !http.path.starts_with('/') {
                c.push(
                    fi,
                    format!("{hpath}.http.path"),
                    format!("{:?} must start with '/'", http.path),
                );
            }
            for (i, status) in http.expected_statuses.iter().enumerate() {
                if !(100..=599).contains(status) {
                    c.push(
                        fi,
                        format!("{hpath}.http.expected_statuses[{i}]"),
                        format!("{status} is not an HTTP status (100..=599)"),
                    );
                }
            }
        }
        for (field, value) in [("interval", h.interval), ("timeout", h.timeout)] {
            if value.is_zero() {
                c.push(fi, format!("{hpath}.{field}"), "must be greater than 0s");
            }
        }
        for (field, value) in [
            ("healthy_threshold", h.healthy_threshold),
            ("unhealthy_threshold", h.unhealthy_threshold),
        ] {
            if value < 1 {
                c.push(fi, format!("{hpath}.{field}"), "must be at least 1");
            }
        }
    }

    if let Some(retry) = &s.retry {
        check_retry(c, fi, &path.field("retry"), retry);
    }
    if let Some(limit) = &s.rate_limit {
        check_rate_limit(c, fi, &path.field("rate_limit"), limit);
    }
}

fn check_percent(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, value: u32) {
    if value > 100 {
        c.push(
            fi,
            path.to_string(),
            format!("{value} is not a percentage (0..=100)"),
        );
    }
}

pub(super) fn check_retry(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, r: &RetryPolicy) {
    for (i, on) in r.on.iter().enumerate() {
        if let Err(reason) = on.condition() {
            c.push(fi, format!("{path}.on[{i}]"), reason);
        }
    }
    if r.attempts > 0 && r.on.is_empty() {
        c.push(
            fi,
            format!("{path}.on"),
            "at least one retry condition is required (or attempts: 0)",
        );
    }
    if r.max_body_bytes > MAX_RETRY_BODY_BYTES {
        c.push(
            fi,
            format!("{path}.max_body_bytes"),
            format!(
                "{} is more than 16 MiB ({MAX_RETRY_BODY_BYTES})",
                r.max_body_bytes
            ),
        );
    }
    if r.backoff.base.is_zero() {
        c.push(
            fi,
            format!("{path}.backoff.base"),
            "must be greater than 0s",
        );
    }
    if r.backoff.max < r.backoff.base {
        c.push(
            fi,
            format!("{path}.backoff.max"),
            format!(
                "must be at least base ({})",
                humantime::format_duration(r.backoff.base)
            ),
        );
    }
    let b = &r.budget;
    if !(b.ratio.is_finite() && (0.0..=1.0).contains(&b.ratio)) {
        c.push(
            fi,
            format!("{path}.budget.ratio"),
            format!("must be within 0..=1 (got {})", b.ratio),
        );
    }
    if b.window.is_zero() {
        c.push(
            fi,
            format!("{path}.budget.window"),
            "must be greater than 0s",
        );
    }
}

pub(super) fn check_rate_limit(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, r: &RateLimit) {
    if r.requests_per_second < 1 {
        c.push(
            fi,
            format!("{path}.requests_per_second"),
            "must be at least 1",
        );
    }
    if r.burst == Some(0) {
        c.push(fi, format!("{path}.burst"), "must be at least 1");
    }
}
