//! Response flags (Envoy's short codes) for access logs and spans: why a request did not get a
//! plain upstream answer. Derived from the errors the pipeline answers with (the `x-weft-error`
//! code of [`crate::http::error::ProxyError`] and the resilience layer's responses) and from how
//! the response body ended, and from what the request path noted (a fault delay).
//!
//! The codes follow Envoy's: `FI` is a fault abort and `DI` a fault delay, so an authorization
//! denial is `RBAC` (Envoy's `RBAC` / `rbac_access_denied`), not `DI`.

use std::fmt;

/// A set of response flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseFlags(u16);

/// One flag: its bit and its code.
const FLAGS: [(u16, &str); 13] = [
    (1 << 0, "NR"),
    (1 << 1, "UH"),
    (1 << 2, "UF"),
    (1 << 3, "UT"),
    (1 << 4, "UO"),
    (1 << 5, "RL"),
    (1 << 6, "UR"),
    (1 << 7, "UC"),
    (1 << 8, "DC"),
    (1 << 9, "RBAC"),
    (1 << 10, "FI"),
    (1 << 11, "DI"),
    (1 << 12, "ED"),
];

impl ResponseFlags {
    /// NR: no route matched.
    pub const NO_ROUTE: Self = Self(1 << 0);
    /// UH: the cluster had no (healthy) endpoint.
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1 << 1);
    /// UF: connecting to the upstream failed.
    pub const UPSTREAM_CONNECT_FAILURE: Self = Self(1 << 2);
    /// UT: the request timeout fired.
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 3);
    /// UO: a circuit-breaker limit was hit (overflow).
    pub const UPSTREAM_OVERFLOW: Self = Self(1 << 4);
    /// RL: rate limited locally.
    pub const RATE_LIMITED: Self = Self(1 << 5);
    /// UR: the upstream reset/closed the request before responding.
    pub const UPSTREAM_RESET: Self = Self(1 << 6);
    /// UC: the upstream connection ended while the response body was streaming.
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 7);
    /// DC: the downstream went away before the response finished.
    pub const DOWNSTREAM_DISCONNECT: Self = Self(1 << 8);
    /// RBAC: denied by the authorization policy.
    pub const DENIED: Self = Self(1 << 9);
    /// FI: aborted by fault injection.
    pub const FAULT_INJECTED: Self = Self(1 << 10);
    /// DI: delayed by fault injection.
    pub const DELAY_INJECTED: Self = Self(1 << 11);
    /// ED: a captured connection to a destination outside the mesh refused by the egress
    /// policy (transparent mode; Weft's own code, Envoy has none for it).
    pub const EGRESS_DENIED: Self = Self(1 << 12);

    /// No flag.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Adds `other`'s flags.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flag of a proxy-generated response with `x-weft-error: code` and `status`.
    ///
    /// The codes are [`crate::http::error::ProxyError::code`]'s plus the resilience layer's
    /// (breaker `overloaded`, `rate-limited`), authorization's and fault injection's
    /// (`fault-abort`); an unknown code on a 429 is a
    /// rate limit, any other unknown code no flag.
    pub fn from_error_code(code: &str, status: u16) -> Self {
        match code {
            "no-route" => Self::NO_ROUTE,
            "no-endpoints" | "no-healthy-endpoints" => Self::NO_HEALTHY_UPSTREAM,
            "connect-failed" | "connect-timeout" => Self::UPSTREAM_CONNECT_FAILURE,
            "request-timeout" | "timeout" | "per-try-timeout" => Self::UPSTREAM_TIMEOUT,
            "upstream-reset" => Self::UPSTREAM_RESET,
            "overloaded" | "overflow" | "circuit-open" | "breaker-open" => Self::UPSTREAM_OVERFLOW,
            "rate-limited" | "rate-limit" => Self::RATE_LIMITED,
            "forbidden" | "denied" | "unauthorized" | "authz-denied" => Self::DENIED,
            "fault-abort" => Self::FAULT_INJECTED,
            _ if status == 429 => Self::RATE_LIMITED,
            _ => Self::default(),
        }
    }

    /// The flag of a request the pipeline failed with `e`.
    pub fn from_error(e: &crate::http::error::ProxyError) -> Self {
        e.code()
            .map(|c| Self::from_error_code(c, e.status().as_u16()))
            .unwrap_or_default()
    }

    /// The flags of a response the proxy generated itself, from its headers: `x-weft-error`,
    /// and `x-weft-overloaded` (a breaker limit) which the resilience layer may send alone.
    pub fn from_local_response(status: http::StatusCode, headers: &http::HeaderMap) -> Self {
        let mut flags = headers
            .get("x-weft-error")
            .and_then(|v| v.to_str().ok())
            .map(|c| Self::from_error_code(c, status.as_u16()))
            .unwrap_or_default();
        if headers.contains_key("x-weft-overloaded") {
            flags.insert(Self::UPSTREAM_OVERFLOW);
        }
        if flags.is_empty() && status == http::StatusCode::TOO_MANY_REQUESTS {
            flags.insert(Self::RATE_LIMITED);
        }
        flags
    }

    /// The codes, comma-separated, or `-` when empty (Envoy's format).
    pub fn write_to(self, out: &mut String) {
        if self.is_empty() {
            out.push('-');
            return;
        }
        let mut first = true;
        for (bit, code) in FLAGS {
            if self.0 & bit != 0 {
                if !first {
                    out.push(',');
                }
                out.push_str(code);
                first = false;
            }
        }
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.write_to(&mut s);
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ProxyError;

    #[test]
    fn every_proxy_error_maps_to_a_flag() {
        use crate::breaker::Limit;
        use std::time::Duration;
        let cases = [
            (
                ProxyError::NoRoute {
                    host: "h".into(),
                    path: "/".into(),
                },
                "NR",
            ),
            (
                ProxyError::NoEndpoints {
                    cluster: "c".into(),
                },
                "UH",
            ),
            (ProxyError::RequestTimeout(Duration::from_secs(1)), "UT"),
            (ProxyError::PerTryTimeout(Duration::from_secs(1)), "UT"),
            (
                ProxyError::ConnectTimeout(crate::upstream::UpstreamError::ConnectTimeout {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    after: Duration::from_secs(1),
                }),
                "UF",
            ),
            (ProxyError::Overloaded(Limit::Pending), "UO"),
            (ProxyError::RateLimited(1), "RL"),
            (ProxyError::Forbidden("deny-all".into()), "RBAC"),
        ];
        for (e, want) in cases {
            assert_eq!(ResponseFlags::from_error(&e).to_string(), want, "{e}");
            // The response carries the same facts.
            let resp = e.to_response();
            let flags = ResponseFlags::from_local_response(resp.status(), resp.headers());
            assert_eq!(flags.to_string(), want, "{e}");
        }
        assert_eq!(
            ResponseFlags::from_error_code("connect-failed", 503).to_string(),
            "UF"
        );
        assert_eq!(
            ResponseFlags::from_error_code("upstream-reset", 502).to_string(),
            "UR"
        );
    }

    #[test]
    fn resilience_responses() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-weft-overloaded",
            http::HeaderValue::from_static("pending"),
        );
        let f = ResponseFlags::from_local_response(http::StatusCode::SERVICE_UNAVAILABLE, &h);
        assert_eq!(f.to_string(), "UO");
        let f = ResponseFlags::from_local_response(
            http::StatusCode::TOO_MANY_REQUESTS,
            &Default::default(),
        );
        assert_eq!(f.to_string(), "RL");
        assert_eq!(
            ResponseFlags::from_error_code("rate-limited", 429),
            ResponseFlags::RATE_LIMITED
        );
        assert!(ResponseFlags::from_error_code("whatever", 500).is_empty());
    }

    #[test]
    fn fault_flags_are_envoys() {
        assert_eq!(
            ResponseFlags::from_error_code("fault-abort", 503).to_string(),
            "FI"
        );
        // A gRPC abort is an HTTP 200.
        assert_eq!(
            ResponseFlags::from_error_code("fault-abort", 200).to_string(),
            "FI"
        );
        let mut f = ResponseFlags::DELAY_INJECTED;
        assert_eq!(f.to_string(), "DI");
        f.insert(ResponseFlags::FAULT_INJECTED);
        assert_eq!(f.to_string(), "FI,DI");
        assert_eq!(ResponseFlags::DENIED.to_string(), "RBAC");
    }

    #[test]
    fn formats_sets() {
        assert_eq!(ResponseFlags::default().to_string(), "-");
        let mut f = ResponseFlags::UPSTREAM_CONNECT_FAILURE;
        f.insert(ResponseFlags::DOWNSTREAM_DISCONNECT);
        assert_eq!(f.to_string(), "UF,DC");
        assert!(f.contains(ResponseFlags::DOWNSTREAM_DISCONNECT));
        assert!(!f.contains(ResponseFlags::NO_ROUTE));
    }
}
