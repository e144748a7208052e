//! The L7 traffic-management part of the policy YAML: route filters (header and path
//! rewriting, redirects, direct responses, fault injection, mirroring — the Gateway API
//! `HTTPRoute` filter set is the model), query-parameter matches, the upstream HTTP version and
//! TLS origination of a service, endpoints by DNS name, locality-aware balancing and the mesh's
//! egress policy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a route does to a request besides choosing its destination, applied in this order:
/// fault (delay, abort), redirect or direct response (both end the request), request header
/// and path/host rewrites, mirroring; response headers on the way back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFilters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderMutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderMutation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

impl RouteFilters {
    /// Whether the route answers by itself (a redirect or a direct response): it needs no
    /// destination.
    pub fn terminal(&self) -> bool {
        self.redirect.is_some() || self.direct_response.is_some()
    }
}

/// Header changes. Values may use `${peer_identity}` (the caller's verified SPIFFE ID, or ""),
/// `${route}` (the route's name) and `${request_id}` (the request's `x-request-id`, generated
/// when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMutation {
    /// Appended; existing values are kept.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Replace any existing values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Rewrites of the forwarded request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replace the route's matched `path.prefix` with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Replace the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Forward with this `Host` / `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Answer with a redirect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replace the matched prefix only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// Answer with a fixed response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Fault injection, before the upstream is called.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

impl Eq for Fault {}

/// Delay `percent` of the requests by `fixed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(with = "humantime_serde")]
    pub fixed: Duration,
    /// 0..=100, fractions allowed (0.1 = one in a thousand). Default 100.
    #[serde(default = "hundred")]
    pub percent: f64,
}

/// Abort `percent` of the requests with `http_status` (or `grpc_status` for gRPC requests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    #[serde(default = "hundred")]
    pub percent: f64,
}

fn hundred() -> f64 {
    100.0
}

/// Copy a share of the route's requests to another service, fire-and-forget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub service: String,
    #[serde(default = "hundred")]
    pub percent: f64,
    /// Bodies up to this size are copied; larger requests are mirrored headers-only.
    #[serde(default = "default_mirror_body")]
    pub max_body_bytes: u32,
}

impl Eq for Mirror {}

fn default_mirror_body() -> u32 {
    64 * 1024
}

/// A query-parameter condition: exactly one of `exact`, `regex`, `present`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// The HTTP version a sidecar speaks to a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// The downstream request's version.
    Preserve,
}

/// TLS originated by the sidecar to a service's static endpoints (services outside the mesh):
/// the app speaks plaintext to its sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent and verified; default: the endpoint's host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// PEM roots that verify the server; absent: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roots_pem: Option<String>,
    /// A client certificate chain and its key, files on the sidecar's host (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// Prefer endpoints in the caller's zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    /// The node/endpoint label holding the zone.
    #[serde(default = "default_zone_label")]
    pub zone_label: String,
    /// Stay in the caller's zone while at least this share (percent) of its endpoints there is
    /// healthy; below it, spill over to every zone.
    #[serde(default = "default_locality_healthy")]
    pub min_healthy_percent: u32,
}

fn default_zone_label() -> String {
    "topology.kubernetes.io/zone".to_owned()
}

fn default_locality_healthy() -> u32 {
    70
}

/// What leaves the mesh: CONNECT tunnels and destinations that are no mesh service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Egress {
    /// `allow` (default) or `deny` destinations that are neither a mesh service nor a declared
    /// external service.
    #[serde(default)]
    pub unknown: EgressDefault,
    /// Host patterns allowed even when `unknown: deny` (`api.example.com`, `*.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
}

/// The egress default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}
