//! Compilation of the zero-trust resources: workload identities, the authorization policy
//! guarding the proxy's own service, and the trust set.

use weft_proto::v1::{
    path_match, AuthorizationPolicy, AuthzAction, AuthzRule, EscapedSlashes, MtlsMode, PathMatch,
    RequestHygiene, UnderscoreHeaders,
};

use super::{Inputs, TrustBundle};
use crate::policy::{self, spiffe_id, ServiceKey};

/// The trust domain of SPIFFE IDs: `mesh.trust_domain` if set, else the bundle's.
pub(super) fn trust_domain<'a>(inputs: &Inputs<'a>, trust: &'a TrustBundle) -> &'a str {
    inputs.mesh_trust_domain().unwrap_or(&trust.trust_domain)
}

pub(super) fn mtls(mode: policy::MtlsMode) -> MtlsMode {
    match mode {
        policy::MtlsMode::Strict => MtlsMode::Strict,
        policy::MtlsMode::Permissive => MtlsMode::Permissive,
        policy::MtlsMode::Disabled => MtlsMode::Disabled,
    }
}

/// `mesh.http` for every HTTP listener; `None` when it is all defaults (the proxy's defaults are
/// the same secure ones, and the listener's encoding stays unchanged).
pub(super) fn hygiene(inputs: &Inputs<'_>) -> Option<RequestHygiene> {
    let h = inputs.mesh_http();
    if h == policy::HttpHygiene::default() {
        return None;
    }
    Some(RequestHygiene {
        escaped_slashes: match h.escaped_slashes {
            policy::EscapedSlashesAction::Reject => EscapedSlashes::Reject,
            policy::EscapedSlashesAction::Redirect => EscapedSlashes::Redirect,
            policy::EscapedSlashesAction::Keep => EscapedSlashes::Keep,
        } as i32,
        keep_duplicate_slashes: !h.merge_slashes,
        underscore_headers: match h.headers_with_underscores {
            policy::UnderscoreAction::Drop => UnderscoreHeaders::Drop,
            policy::UnderscoreAction::Reject => UnderscoreHeaders::Reject,
            policy::UnderscoreAction::Allow => UnderscoreHeaders::Allow,
        } as i32,
    })
}

fn action(a: policy::AuthzAction) -> AuthzAction {
    match a {
        policy::AuthzAction::Allow => AuthzAction::Allow,
        policy::AuthzAction::Deny => AuthzAction::Deny,
    }
}

/// The authorization policy guarding the local service `key`: its declared policy with the default resolved and services expanded to SPIFFE IDs;
/// else, when the namespace default is deny, a synthetic `default-<ns>` denying everything;
/// else none (allow all).
pub(super) fn policy_for(
    inputs: &Inputs<'_>,
    key: &ServiceKey,
    trust_domain: &str,
) -> Option<AuthorizationPolicy> {
    let namespace_default = inputs.namespace_default(&key.namespace);
    let Some(declared) = inputs.authorization_of(key) else {
        return (namespace_default == policy::AuthzAction::Deny).then(|| AuthorizationPolicy {
            name: format!("default-{}", key.namespace),
            default_action: AuthzAction::Deny as i32,
            rules: Vec::new(),
        });
    };
    let rules = declared
        .rules
        .iter()
        .map(|r| {
            let mut identities: Vec<String> = r
                .from
                .services
                .iter()
                .filter_map(|s| inputs.resolve(s, Some(&key.namespace)))
                .map(|k| spiffe_id(trust_domain, &k.namespace, &k.name))
                .collect();
            identities.extend(r.from.identities.iter().cloned());
            let mut seen = std::collections::HashSet::new();
            identities.retain(|i| seen.insert(i.clone()));
            AuthzRule {
                name: r.name.clone(),
                identities,
                namespaces: r.from.namespaces.clone(),
                methods: r
                    .to
                    .methods
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect(),
                paths: r.to.paths.iter().map(path).collect(),
            }
        })
        .collect();
    Some(AuthorizationPolicy {
        name: declared.name.clone(),
        default_action: action(declared.default.unwrap_or(namespace_default)) as i32,
        rules,
    })
}

/// A policy path match as proto (validation guarantees exactly one kind).
pub(super) fn path(p: &policy::PathMatch) -> PathMatch {
    PathMatch {
        kind: if let Some(e) = &p.exact {
            Some(path_match::Kind::Exact(e.clone()))
        } else if let Some(pre) = &p.prefix {
            Some(path_match::Kind::Prefix(pre.clone()))
        } else {
            p.regex.clone().map(path_match::Kind::Regex)
        },
    }
}
