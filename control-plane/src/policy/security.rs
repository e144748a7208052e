//! The zero-trust part of the policy YAML: the mesh-wide `mesh:` block (trust domain, default
//! mTLS mode, per-namespace default authorization) and `authorization:` policies guarding a
//! service's inbound side.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::PathMatch;

/// Default trust domain of SPIFFE IDs.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Whether a service's inbound side requires mTLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mTLS from a peer whose chain verifies against the trust bundle.
    Strict,
    /// mTLS and plaintext both accepted.
    #[default]
    Permissive,
    /// Plaintext only.
    Disabled,
}

/// What happens to a request no rule allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
}

/// The mesh-wide settings; at most one file may hold a `mesh:` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    /// Absent: the trust domain of the control plane's trust bundle (default `cluster.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Default mTLS mode of every service.
    #[serde(default)]
    pub mtls: MtlsMode,
    /// Per-namespace defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, NamespaceDefaults>,
    /// How every sidecar normalizes HTTP requests before routing and authorization.
    #[serde(default)]
    pub http: HttpHygiene,
    /// What may leave the mesh (CONNECT tunnels, unknown destinations).
    #[serde(default)]
    pub egress: super::traffic::Egress,
    /// Transparent mode: the range services without a declared `vip` get theirs from
    /// (`240.240.0.0/16`); absent = only declared VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip_range: Option<String>,
    /// Transparent mode: how sidecars detect the protocol of captured connections.
    #[serde(default)]
    pub protocol_detection: super::transparent::ProtocolDetection,
}

/// `mesh.http`: request normalization, applied by every HTTP listener before routing and
/// authorization (Envoy's `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`
/// and `headers_with_underscores_action` are the models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHygiene {
    /// `%2F`, `%5C` and `\` in paths.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashesAction,
    /// Merge `//` into `/` (default true).
    #[serde(default = "default_true")]
    pub merge_slashes: bool,
    /// Header names with `_`.
    #[serde(default)]
    pub headers_with_underscores: UnderscoreAction,
}

fn default_true() -> bool {
    true
}

impl Default for HttpHygiene {
    fn default() -> Self {
        Self {
            escaped_slashes: EscapedSlashesAction::default(),
            merge_slashes: true,
            headers_with_underscores: UnderscoreAction::default(),
        }
    }
}

/// What a sidecar does with escaped slashes in a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashesAction {
    #[default]
    Reject,
    Redirect,
    Keep,
}

/// What a sidecar does with header names containing `_`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreAction {
    #[default]
    Drop,
    Reject,
    Allow,
}

/// Defaults of the services of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDefaults {
    /// The default action of services of this namespace without an explicit one.
    #[serde(default)]
    pub default_authorization: AuthzAction,
}

/// An authorization policy guarding one service's inbound listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub service: String,
    /// Absent: the namespace default (`mesh.namespaces`), else allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<AuthzAction>,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

/// A request is allowed when it matches any rule: all of a rule's given conditions hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    pub name: String,
    #[serde(default)]
    pub from: AuthzSource,
    #[serde(default)]
    pub to: AuthzTarget,
}

/// Who calls: the peer's identity must be one of `services` or `identities` (when either is
/// given), and its namespace one of `namespaces` (when given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzSource {
    /// `name` or `name.namespace` of mesh services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Raw SPIFFE IDs; a trailing `*` matches a prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// What is called (HTTP only): any of `methods`, any of `paths`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzTarget {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
}

impl AuthzTarget {
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.paths.is_empty()
    }
}

/// The SPIFFE ID of a service's workloads.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}")
}
