//! Policies: the YAML schema, parsing and validation into an immutable, versioned [`PolicySet`].
//!
//! A policy set is built from a whole directory of files at once; it is either entirely valid or
//! rejected with every error found, each naming `file:line: field: reason`.

mod assemble;
pub mod bounds;
mod changed;
mod index;
mod locate;
mod lookup;
pub mod resilience;
pub mod security;
pub mod store;
pub mod traffic;
pub mod transparent;
mod validate;
mod validate_cache;
mod version;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hash::StableHasher;

pub use bounds::{MAX_FILES, MAX_FILE_BYTES, MAX_REQUEST_BYTES};
pub use changed::Declarations;
pub use locate::line_of;
pub use resilience::{
    Backoff, CircuitBreaker, HashPolicy, HealthCheck, HttpHealthCheck, LbPolicy, OutlierDetection,
    RateLimit, RetryBudget, RetryCondition, RetryOn, RetryPolicy,
};
pub use security::{
    spiffe_id, AuthorizationPolicy, AuthzAction, AuthzRule, AuthzSource, AuthzTarget,
    EscapedSlashesAction, HttpHygiene, Mesh, MtlsMode, NamespaceDefaults, UnderscoreAction,
    DEFAULT_TRUST_DOMAIN,
};
pub use store::{PolicyStore, StoreError};
pub use traffic::{
    DirectResponse, Egress, EgressDefault, Fault, FaultAbort, FaultDelay, HeaderMutation, Locality,
    Mirror, QueryMatch, Redirect, Rewrite, RouteFilters, UpstreamProtocol, UpstreamTls,
};

/// One policy file: its name (no directory) and its YAML text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub content: String,
}

/// The top level of a policy file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Mesh-wide settings; at most one file of a set may define them.
    #[serde(default)]
    pub mesh: Option<Mesh>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub authorization: Vec<AuthorizationPolicy>,
}

/// How a service speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
    Tcp,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_weight() -> u32 {
    1
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

/// A mesh service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// tcp only: the outbound port on each caller's `tcp_bind_ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// `0s` = no timeout.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Services this one calls; `None` = every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<String>>,
    #[serde(default)]
    pub endpoints: Vec<StaticEndpoint>,
    /// ring_hash only (required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashPolicy>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Absent: no active health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Default retry policy of the routes to this service (absent: the mesh default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Inbound rate limit of this service's sidecars (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Inbound mTLS mode (absent: `mesh.mtls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// HTTP version to the endpoints (absent: http2 for grpc, http1 for a service with static
    /// endpoints, else preserve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<UpstreamProtocol>,
    /// TLS originated by the sidecar to the static endpoints (absent: plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,
    /// Prefer endpoints in the caller's zone (absent: no preference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    /// Transparent mode: the service's virtual IP (absent: one from `mesh.vip_range`, if set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
}

/// An endpoint declared in YAML (outside the mesh).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEndpoint {
    /// `ip:port`; or `host` and `port` for an endpoint resolved by DNS.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// A DNS name, resolved by each sidecar (re-resolved with the answer's TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A route for requests addressed to `service`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<RouteMatch>,
    /// Absent or empty only for a route that answers itself (redirect, direct response).
    #[serde(default)]
    pub destinations: Vec<Destination>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Absent: the service's `retry`, else the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Rewrites, redirects, direct responses, faults, mirroring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<RouteFilters>,
}

/// What a request must look like for a route to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<QueryMatch>,
}

/// Exactly one of `exact`, `prefix`, `regex`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header condition: exactly one of `exact`, `regex`, `present`; `invert` negates it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// A weighted destination service of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub service: String,
    /// Percentage; may be omitted when it is the only destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Only the service's endpoints carrying these labels (a subset, e.g. `{version: v2}`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub subset: std::collections::BTreeMap<String, String>,
}

/// A service's identity: name and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    pub name: String,
    pub namespace: String,
}

impl ServiceKey {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    /// The cluster name: `<service>.<namespace>`.
    pub fn cluster_name(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// One problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The YAML is malformed or does not fit the schema (includes unknown fields).
    #[error("{file}:{line}: {field}: {reason}")]
    Parse {
        file: String,
        line: usize,
        field: String,
        reason: String,
    },
    /// The YAML parses but breaks a rule (bad name, dangling reference, ...).
    #[error("{file}:{line}: {field}: {reason}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        reason: String,
    },
}

/// Every error that made a policy set invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} policy error(s): {}", .0.len(), join_errors(.0))]
pub struct PolicyErrors(pub Vec<PolicyError>);

fn join_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicyErrors {
    /// The errors as display strings, for the admin API.
    pub fn messages(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

/// A validated, immutable set of policies with a content-hash version.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySet {
    version: String,
    files: Vec<SourceFile>,
    /// Where each file's declarations sit in the lists below (`files[i]`'s at `parts[i]`).
    parts: Vec<assemble::FileParts>,
    mesh: Mesh,
    services: Vec<Service>,
    routes: Vec<Route>,
    authorization: Vec<AuthorizationPolicy>,
    /// Shared with the next set when what it is built from did not change
    /// (`index::PolicyIndex::reuse`).
    index: Arc<index::PolicyIndex>,
    /// Every service's virtual IP (declared, or allocated from `mesh.vip_range`).
    vips: std::collections::BTreeMap<ServiceKey, std::net::IpAddr>,
    /// The version's hash state after each file (`version`: the next set resumes from them).
    version_states: Vec<StableHasher>,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::empty()
    }
}

impl PolicySet {
    /// The empty set (no files).
    pub fn empty() -> Self {
        Self {
            version: version_of(&[]),
            files: Vec::new(),
            parts: Vec::new(),
            mesh: Mesh::default(),
            services: Vec::new(),
            routes: Vec::new(),
            authorization: Vec::new(),
            index: Arc::default(),
            vips: std::collections::BTreeMap::new(),
            version_states: Vec::new(),
        }
    }

    /// [`PolicySet::from_files`] on a blocking thread: parsing is CPU work on untrusted
    /// input and must never stall the async runtime (discovery streams, the admin API).
    pub async fn from_files_blocking(files: Vec<SourceFile>) -> Result<Self, PolicyErrors> {
        Self::on_blocking_thread(move || Self::from_files(files)).await
    }

    /// [`PolicySet::from_files_reusing`] on a blocking thread.
    pub async fn from_files_reusing_blocking(
        files: Vec<SourceFile>,
        previous: Arc<PolicySet>,
    ) -> Result<Self, PolicyErrors> {
        Self::on_blocking_thread(move || Self::from_files_reusing(files, &previous)).await
    }

    async fn on_blocking_thread(
        build: impl FnOnce() -> Result<Self, PolicyErrors> + Send + 'static,
    ) -> Result<Self, PolicyErrors> {
        tokio::task::spawn_blocking(build)
            .await
            .unwrap_or_else(|e| {
                Err(PolicyErrors(vec![PolicyError::Parse {
                    file: "(set)".to_owned(),
                    line: 1,
                    field: "(file)".to_owned(),
                    reason: format!("policy parsing panicked: {e}"),
                }]))
            })
    }

    /// Parses and validates `files` as one set (sorted by name first).
    pub fn from_files(files: Vec<SourceFile>) -> Result<Self, PolicyErrors> {
        assemble::build(files, None).map(|built| built.set)
    }

    /// [`PolicySet::from_files`], parsing only the files that `previous` does not hold with the
    /// same name and content (the others' parses are taken from `previous`). The result, errors
    /// included, is exactly that of [`PolicySet::from_files`]: validation skips only the checks
    /// `previous` passed with the same inputs (`validate_cache`).
    pub fn from_files_reusing(
        files: Vec<SourceFile>,
        previous: &PolicySet,
    ) -> Result<Self, PolicyErrors> {
        let built = assemble::build(files, Some(previous))?;
        tracing::debug!(
            files = built.parsed.len(),
            parsed = built.parsed.iter().filter(|p| **p).count(),
            validated = built.validated.iter().filter(|v| **v).count(),
            "policy set built, unchanged files not parsed (nor validated) again"
        );
        Ok(built.set)
    }

    /// Content hash of the sorted file names and contents (16 hex digits).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The source files, sorted by name.
    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// Every service, in file-name then declared order.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Every route, in file-name then declared order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The mesh-wide settings (defaults when no file defines `mesh:`).
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    /// Every authorization policy, in file-name then declared order.
    pub fn authorization(&self) -> &[AuthorizationPolicy] {
        &self.authorization
    }

    /// The authorization policy guarding `key`'s inbound side, if one is declared.
    pub fn authorization_of(&self, key: &ServiceKey) -> Option<&AuthorizationPolicy> {
        self.index
            .authorization_of(key)
            .map(|i| &self.authorization[i])
    }

    /// The routes attached to service `key`, in declared order.
    pub fn routes_of(&self, key: &ServiceKey) -> impl Iterator<Item = &Route> + '_ {
        self.index.routes_of(key).iter().map(|&i| &self.routes[i])
    }

    /// The effective inbound mTLS mode of a service: its own, else `mesh.mtls`.
    pub fn mtls_of(&self, service: Option<&Service>) -> MtlsMode {
        service.and_then(|s| s.mtls).unwrap_or(self.mesh.mtls)
    }

    /// The default authorization action of a namespace (`mesh.namespaces`, else allow).
    pub fn namespace_default(&self, namespace: &str) -> AuthzAction {
        self.mesh
            .namespaces
            .get(namespace)
            .map_or(AuthzAction::Allow, |n| n.default_authorization)
    }

    /// The virtual IP of a service (transparent mode), if it has one.
    pub fn vip_of(&self, key: &ServiceKey) -> Option<std::net::IpAddr> {
        self.vips.get(key).copied()
    }

    /// The service with this identity.
    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.index.service(key).map(|i| &self.services[i])
    }

    /// Resolves a service reference; see [`resolve_reference`].
    pub fn resolve(&self, reference: &str, context_namespace: Option<&str>) -> Option<ServiceKey> {
        self.index
            .resolve(&self.services, reference, context_namespace)
            .ok()
    }
}

/// Why a service reference does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("unknown service {0:?}")]
    Unknown(String),
    #[error("service {0:?} exists in several namespaces ({1}); write <name>.<namespace>")]
    Ambiguous(String, String),
}

/// Resolves a reference to a service: `name.namespace` names one exactly; a bare `name` means
/// the service of that name in `context_namespace` if there is one, else the only service of
/// that name in any namespace.
pub fn resolve_reference(
    services: &[Service],
    reference: &str,
    context_namespace: Option<&str>,
) -> Result<ServiceKey, ReferenceError> {
    if let Some((name, ns)) = reference.split_once('.') {
        return services
            .iter()
            .find(|s| s.name == name && s.namespace == ns)
            .map(|s| ServiceKey::new(&s.name, &s.namespace))
            .ok_or_else(|| ReferenceError::Unknown(reference.to_owned()));
    }
    resolve_among(
        reference,
        context_namespace,
        services.iter().filter(|s| s.name == reference),
    )
}

/// How a bare `reference` resolves among `candidates`, every service of that name in declared
/// order: the one in `context_namespace` if there is one, else the only one; several are an
/// ambiguity listing their namespaces (sorted, each once). Shared by [`resolve_reference`] and
/// the indexes that avoid its scan (`index::PolicyIndex`, `lookup::ServiceLookup`).
fn resolve_among<'s>(
    reference: &str,
    context_namespace: Option<&str>,
    candidates: impl Iterator<Item = &'s Service> + Clone,
) -> Result<ServiceKey, ReferenceError> {
    let key = |s: &Service| ServiceKey::new(&s.name, &s.namespace);
    if let Some(ns) = context_namespace {
        if let Some(s) = candidates.clone().find(|s| s.namespace == ns) {
            return Ok(key(s));
        }
    }
    let mut first_two = candidates.clone();
    match (first_two.next(), first_two.next()) {
        (None, _) => Err(ReferenceError::Unknown(reference.to_owned())),
        (Some(s), None) => Ok(key(s)),
        (Some(_), Some(_)) => {
            let mut namespaces: Vec<&str> = candidates.map(|s| s.namespace.as_str()).collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            Err(ReferenceError::Ambiguous(
                reference.to_owned(),
                namespaces.join(", "),
            ))
        }
    }
}

/// FNV-1a 64 over the sorted file names and contents.
fn version_of(files: &[SourceFile]) -> String {
    let mut sorted: Vec<&SourceFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = StableHasher::new();
    for f in sorted {
        version::hash_file(&mut h, f);
    }
    h.finish_hex()
}

/// Parses one file; an empty (or comments-only) file is an empty policy file. Two parses: into
/// a `serde_yaml::Value` first (it rejects duplicate mapping keys, which a map-typed field of
/// the typed parse would silently collapse, and ill-formed core-tagged scalars such as
/// `!!int x`, and tells an empty document), then into a [`PolicyFile`]. Applies parse only the
/// files that changed ([`PolicySet::from_files_reusing`]), so this stays off the scale path.
fn parse_file(file: &SourceFile) -> Result<PolicyFile, PolicyError> {
    let to_error = |e: serde_yaml::Error| {
        let line = e.location().map_or(1, |l| l.line());
        let (field, reason) = split_serde_message(&e.to_string());
        PolicyError::Parse {
            file: file.name.clone(),
            line,
            field,
            reason,
        }
    };
    bounds::check(&file.content).map_err(|reason| PolicyError::Parse {
        file: file.name.clone(),
        line: 1,
        field: "(file)".to_owned(),
        reason,
    })?;
    let value: serde_yaml::Value = serde_yaml::from_str(&file.content).map_err(to_error)?;
    if value.is_null() {
        return Ok(PolicyFile::default());
    }
    serde_yaml::from_str(&file.content).map_err(to_error)
}

/// Splits serde_yaml's `"path: message at line L column C"` into (path, message).
fn split_serde_message(message: &str) -> (String, String) {
    let mut msg = message;
    if let Some(i) = msg.rfind(" at line ") {
        let tail = &msg[i + " at line ".len()..];
        if tail
            .split(' ')
            .next()
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
            && tail.contains(" column ")
        {
            msg = &msg[..i];
        }
    }
    if let Some((path, rest)) = msg.split_once(": ") {
        let looks_like_path = !path.is_empty()
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c));
        if looks_like_path {
            return (path.to_owned(), rest.to_owned());
        }
    }
    ("(file)".to_owned(), msg.to_owned())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_changed;
#[cfg(test)]
mod tests_resilience;
#[cfg(test)]
mod tests_reuse;
#[cfg(test)]
mod tests_security;
#[cfg(test)]
mod tests_validate_cache;
