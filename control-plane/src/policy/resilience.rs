//! The resilience knobs of the policy YAML: load balancing, circuit breaking, outlier detection,
//! active health checks, retries (with budgets) and local rate limits.
//!
//! Every knob has a serde default equal to the documented default (README "Policy YAML
//! reference"), so a parsed policy already holds the explicit values the compiler sends.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Load-balancing policy of a service's cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency x outstanding requests.
    #[default]
    P2cPeakEwma,
    RoundRobin,
    LeastRequest,
    /// Consistent hashing on `hash` (required).
    RingHash,
}

/// What a ring-hash balancer hashes: exactly one of `header`, `cookie`, `source_ip: true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// Concurrency limits of a cluster; 0 = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Passive health: ejection of failing endpoints. On by default; `disabled: true` turns it off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    /// 0 disables consecutive-failure ejection.
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub base_ejection_time: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// 0 disables success-rate ejection.
    pub success_rate_min_hosts: u32,
    pub success_rate_min_requests: u32,
    pub success_rate_stdev_factor: f64,
    /// Panic threshold.
    pub min_healthy_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            disabled: false,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            interval: Duration::from_secs(10),
            success_rate_min_hosts: 5,
            success_rate_min_requests: 100,
            success_rate_stdev_factor: 1.9,
            min_healthy_percent: 50,
        }
    }
}

/// Active health checking (off unless configured): exactly one of `http`, `tcp: true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    #[serde(default = "default_hc_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_healthy_threshold() -> u32 {
    2
}

fn default_unhealthy_threshold() -> u32 {
    3
}

/// An HTTP health check: `GET path` with `Host: host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHealthCheck {
    pub path: String,
    /// Empty = any of 200..=399.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u32>,
    /// Default: the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A retry condition as written: `connect-failure`, `reset`, an HTTP status `500..=599`, or a
/// gRPC status name (`unavailable`). YAML integers (`502`) are accepted as well as strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RetryOn(pub String);

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Number(n) => Self(n.to_string()),
            Raw::Text(s) => Self(s),
        })
    }
}

impl From<&str> for RetryOn {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// gRPC status codes by their lower-kebab names.
pub const GRPC_STATUS_NAMES: [(&str, u32); 16] = [
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid-argument", 3),
    ("deadline-exceeded", 4),
    ("not-found", 5),
    ("already-exists", 6),
    ("permission-denied", 7),
    ("resource-exhausted", 8),
    ("failed-precondition", 9),
    ("aborted", 10),
    ("out-of-range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data-loss", 15),
    ("unauthenticated", 16),
];

/// What a retry condition means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCondition {
    ConnectFailure,
    Reset,
    HttpStatus(u32),
    GrpcStatus(u32),
}

impl RetryOn {
    /// The condition, or why it is unknown.
    pub fn condition(&self) -> Result<RetryCondition, String> {
        let s = self.0.as_str();
        match s {
            "connect-failure" => return Ok(RetryCondition::ConnectFailure),
            "reset" => return Ok(RetryCondition::Reset),
            _ => {}
        }
        if let Ok(n) = s.parse::<u32>() {
            return if (500..=599).contains(&n) {
                Ok(RetryCondition::HttpStatus(n))
            } else {
                Err(format!("HTTP status {n} can't be retried (only 500..=599)"))
            };
        }
        GRPC_STATUS_NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, code)| RetryCondition::GrpcStatus(code))
            .ok_or_else(|| {
                format!(
                    "unknown retry condition {s:?} (expected connect-failure, reset, an HTTP status 500..=599 or a gRPC status name such as unavailable, deadline-exceeded, resource-exhausted)"
                )
            })
    }
}

/// Exponential backoff with full jitter between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Retries allowed on top of live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Largest `max_body_bytes` accepted (16 MiB).
pub const MAX_RETRY_BODY_BYTES: u32 = 16 << 20;

/// A retry policy; every field defaults to the mesh default (`RetryPolicy::default()`), which
/// applies to routes and services that declare none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retries.
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    pub non_idempotent: bool,
    /// 0s = no per-try timeout.
    #[serde(with = "humantime_serde")]
    pub per_try_timeout: Duration,
    pub backoff: Backoff,
    pub max_body_bytes: u32,
    pub budget: RetryBudget,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            on: ["connect-failure", "502", "503", "504", "unavailable"]
                .into_iter()
                .map(RetryOn::from)
                .collect(),
            non_idempotent: false,
            per_try_timeout: Duration::ZERO,
            backoff: Backoff::default(),
            max_body_bytes: 64 << 10,
            budget: RetryBudget::default(),
        }
    }
}

/// A local token-bucket rate limit. `burst` defaults to `requests_per_second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl RateLimit {
    /// The bucket size.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }
}
