//! Authorization policies (`PolicySet` from the control plane) evaluated on the inbound side.
//!
//! A policy is a list of rules and a default action. A request is allowed if any rule matches it;
//! otherwise the default action decides. A rule matches when every non-empty field matches:
//!
//! - `identities`: the peer's SPIFFE ID equals one entry, or starts with an entry ending in `*`;
//! - `namespaces`: the peer's namespace (from its SPIFFE ID) is listed;
//! - `methods`, `paths`: HTTP only; a TCP connection never matches a rule that sets them.
//!
//! A peer without an identity (plaintext on a permissive listener) matches only rules with no
//! `identities` and no `namespaces`.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use weft_proto::v1;

use crate::snapshot::Rejection;
use crate::tls::spiffe::SpiffeId;

/// What a request looks like to the policy.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The verified peer identity, if the connection was mTLS.
    pub peer: Option<&'a SpiffeId>,
    /// HTTP method; `None` for a TCP connection.
    pub method: Option<&'a str>,
    /// HTTP path; `None` for a TCP connection.
    pub path: Option<&'a str>,
}

/// The outcome of evaluating a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by the named rule.
    AllowedBy(Arc<str>),
    /// No rule matched and the default action is allow.
    DefaultAllow,
    /// No rule matched and the default action is deny.
    Denied,
}

impl Decision {
    /// Whether the request may proceed.
    pub fn allowed(&self) -> bool {
        !matches!(self, Self::Denied)
    }
}

#[derive(Debug)]
enum IdentityMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    identities: Vec<IdentityMatch>,
    namespaces: Vec<String>,
    methods: Vec<String>,
    paths: Vec<PathMatch>,
}

/// A compiled authorization policy.
#[derive(Debug)]
pub struct AuthzPolicy {
    /// The policy name (`Listener.authorization` refers to it; a metric label).
    pub name: Arc<str>,
    default_allow: bool,
    rules: Vec<Rule>,
}

impl Rule {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        if !self.identities.is_empty() {
            let Some(peer) = req.peer else { return false };
            let id = peer.as_str();
            let hit = self.identities.iter().any(|m| match m {
                IdentityMatch::Exact(e) => e == id,
                IdentityMatch::Prefix(p) => id.starts_with(p.as_str()),
            });
            if !hit {
                return false;
            }
        }
        if !self.namespaces.is_empty() {
            let Some(ns) = req.peer.and_then(SpiffeId::namespace) else {
                return false;
            };
            if !self.namespaces.iter().any(|n| n == ns) {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let Some(m) = req.method else { return false };
            if !self.methods.iter().any(|x| x.eq_ignore_ascii_case(m)) {
                return false;
            }
        }
        if !self.paths.is_empty() {
            let Some(path) = req.path else { return false };
            let hit = self.paths.iter().any(|p| match p {
                PathMatch::Exact(e) => e == path,
                PathMatch::Prefix(pre) => crate::http::normalize::prefix_matches(pre, path),
                PathMatch::Regex(re) => re.is_match(path),
            });
            if !hit {
                return false;
            }
        }
        true
    }
}

impl AuthzPolicy {
    /// Compiles a policy; every problem is a rejection naming the field.
    pub fn build(p: &v1::AuthorizationPolicy) -> Result<Self, Vec<Rejection>> {
        let resource = format!("policy {:?}", p.name);
        let mut errors = Vec::new();
        if p.name.is_empty() {
            errors.push(Rejection::new(&resource, "name", "must not be empty"));
        }
        let default_allow = match v1::AuthzAction::try_from(p.default_action) {
            Ok(v1::AuthzAction::Allow) => true,
            // Unspecified is deny: a policy exists to restrict, so failing closed is the safe reading.
            Ok(v1::AuthzAction::Deny | v1::AuthzAction::Unspecified) => false,
            Err(_) => {
                errors.push(Rejection::new(
                    &resource,
                    "default_action",
                    format!("unknown action {}", p.default_action),
                ));
                false
            }
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.iter().enumerate() {
            let mut identities = Vec::new();
            for (j, id) in r.identities.iter().enumerate() {
                if let Some(prefix) = id.strip_suffix('*') {
                    identities.push(IdentityMatch::Prefix(prefix.to_owned()));
                } else if SpiffeId::parse(id).is_ok() {
                    identities.push(IdentityMatch::Exact(id.clone()));
                } else {
                    errors.push(Rejection::new(
                        &resource,
                        format!("rules[{i}].identities[{j}]"),
                        format!("{id:?} is not a spiffe:// ID (or a prefix ending in *)"),
                    ));
                }
            }
            let mut paths = Vec::new();
            for (j, pm) in r.paths.iter().enumerate() {
                use v1::path_match::Kind;
                match &pm.kind {
                    Some(Kind::Exact(e)) => paths.push(PathMatch::Exact(e.clone())),
                    Some(Kind::Prefix(pre)) => paths.push(PathMatch::Prefix(pre.clone())),
                    Some(Kind::Regex(re)) => match Regex::new(&format!("^(?:{re})$")) {
                        Ok(re) => paths.push(PathMatch::Regex(re)),
                        Err(e) => errors.push(Rejection::new(
                            &resource,
                            format!("rules[{i}].paths[{j}].regex"),
                            format!("invalid regex {re:?}: {e}"),
                        )),
                    },
                    None => errors.push(Rejection::new(
                        &resource,
                        format!("rules[{i}].paths[{j}]"),
                        "one of exact, prefix, regex is required",
                    )),
                }
            }
            let name: Arc<str> = if r.name.is_empty() {
                format!("rules[{i}]").into()
            } else {
                r.name.as_str().into()
            };
            rules.push(Rule {
                name,
                identities,
                namespaces: r.namespaces.clone(),
                methods: r.methods.clone(),
                paths,
            });
        }
        if errors.is_empty() {
            Ok(Self {
                name: p.name.as_str().into(),
                default_allow,
                rules,
            })
        } else {
            Err(errors)
        }
    }

    /// Evaluates `req`.
    pub fn evaluate(&self, req: &AuthzRequest<'_>) -> Decision {
        match self.rules.iter().find(|r| r.matches(req)) {
            Some(r) => Decision::AllowedBy(Arc::clone(&r.name)),
            None if self.default_allow => Decision::DefaultAllow,
            None => Decision::Denied,
        }
    }
}

/// The header carrying the verified peer identity to the local app.
pub const X_WEFT_PEER_IDENTITY: HeaderName = HeaderName::from_static("x-weft-peer-identity");

/// Replaces any client-sent `x-weft-peer-identity` with the verified `peer` (or removes it when
/// the connection has no verified identity): the app may trust the header.
pub fn set_peer_identity(headers: &mut HeaderMap, peer: Option<&SpiffeId>, underscores: bool) {
    headers.remove(X_WEFT_PEER_IDENTITY);
    if underscores {
        // Header names with '_' are forwarded on this listener: the underscore spelling must
        // not reach the app either (many frameworks read both as the same header).
        headers.remove("x_weft_peer_identity");
    }
    if let Some(v) = peer.and_then(|p| HeaderValue::from_str(p.as_str()).ok()) {
        headers.insert(X_WEFT_PEER_IDENTITY, v);
    }
}

/// Checks `req` against `policy` (`None` = allow all); `Err` names the denying policy.
pub fn check(policy: Option<&AuthzPolicy>, req: &AuthzRequest<'_>) -> Result<(), Arc<str>> {
    match policy {
        Some(p) if !p.evaluate(req).allowed() => Err(Arc::clone(&p.name)),
        _ => Ok(()),
    }
}

/// Every policy of a `PolicySet`, by name.
pub type Policies = HashMap<Arc<str>, Arc<AuthzPolicy>>;

/// Compiles a whole set; duplicate names and bad policies are rejections.
pub fn build_policies(set: Option<&v1::PolicySet>) -> Result<Policies, Vec<Rejection>> {
    let mut out = Policies::new();
    let mut errors = Vec::new();
    for p in set.map(|s| s.policies.as_slice()).unwrap_or_default() {
        match AuthzPolicy::build(p) {
            Ok(policy) => {
                if out
                    .insert(Arc::clone(&policy.name), Arc::new(policy))
                    .is_some()
                {
                    errors.push(Rejection::new(
                        format!("policy {:?}", p.name),
                        "name",
                        "duplicate policy name",
                    ));
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, ids: &[&str], nss: &[&str], methods: &[&str]) -> v1::AuthzRule {
        v1::AuthzRule {
            name: name.into(),
            identities: ids.iter().map(|s| (*s).into()).collect(),
            namespaces: nss.iter().map(|s| (*s).into()).collect(),
            methods: methods.iter().map(|s| (*s).into()).collect(),
            paths: Vec::new(),
        }
    }

    fn policy(default: v1::AuthzAction, rules: Vec<v1::AuthzRule>) -> AuthzPolicy {
        AuthzPolicy::build(&v1::AuthorizationPolicy {
            name: "backend".into(),
            default_action: default.into(),
            rules,
        })
        .unwrap()
    }

    fn http<'a>(peer: Option<&'a SpiffeId>, method: &'a str, path: &'a str) -> AuthzRequest<'a> {
        AuthzRequest {
            peer,
            method: Some(method),
            path: Some(path),
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn allow_list_with_default_deny() {
        let p = policy(
            v1::AuthzAction::Deny,
            vec![rule(
                "web",
                &["spiffe://cluster.local/ns/default/sa/web"],
                &[],
                &[],
            )],
        );
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        let other = id("spiffe://cluster.local/ns/default/sa/other");
        assert_eq!(
            p.evaluate(&http(Some(&web), "GET", "/")),
            Decision::AllowedBy("web".into())
        );
        assert_eq!(
            p.evaluate(&http(Some(&other), "GET", "/")),
            Decision::Denied
        );
        assert_eq!(p.evaluate(&http(None, "GET", "/")), Decision::Denied);
    }

    #[test]
    fn namespaces_prefixes_methods_and_paths() {
        let mut r = rule(
            "ops",
            &["spiffe://cluster.local/ns/ops/*"],
            &["ops"],
            &["get"],
        );
        r.paths = vec![
            v1::PathMatch {
                kind: Some(v1::path_match::Kind::Prefix("/admin".into())),
            },
            v1::PathMatch {
                kind: Some(v1::path_match::Kind::Regex("/v[0-9]+/health".into())),
            },
        ];
        let p = policy(
            v1::AuthzAction::Deny,
            vec![r, rule("shop", &[], &["shop"], &[])],
        );
        let ops = id("spiffe://cluster.local/ns/ops/sa/cron");
        let shop = id("spiffe://cluster.local/ns/shop/sa/cart");
        assert!(p.evaluate(&http(Some(&ops), "GET", "/admin/x")).allowed());
        assert!(p.evaluate(&http(Some(&ops), "GET", "/v2/health")).allowed());
        assert!(!p
            .evaluate(&http(Some(&ops), "GET", "/v2/health/x"))
            .allowed());
        assert!(!p.evaluate(&http(Some(&ops), "POST", "/admin")).allowed());
        assert!(!p.evaluate(&http(Some(&ops), "GET", "/other")).allowed());
        assert!(p.evaluate(&http(Some(&shop), "DELETE", "/x")).allowed());
        // TCP: rules with methods/paths cannot match; namespace-only rules can.
        let tcp = |peer| AuthzRequest {
            peer,
            method: None,
            path: None,
        };
        assert!(!p.evaluate(&tcp(Some(&ops))).allowed());
        assert!(p.evaluate(&tcp(Some(&shop))).allowed());
    }

    #[test]
    fn default_allow_and_identityless_rules() {
        let p = policy(v1::AuthzAction::Allow, vec![]);
        assert_eq!(p.evaluate(&http(None, "GET", "/")), Decision::DefaultAllow);
        let p = policy(v1::AuthzAction::Deny, vec![rule("any", &[], &[], &["GET"])]);
        assert!(p.evaluate(&http(None, "GET", "/")).allowed());
        assert!(!p.evaluate(&http(None, "PUT", "/")).allowed());
    }

    #[test]
    fn peer_header_is_replaced_or_stripped() {
        let mut h = HeaderMap::new();
        h.append(X_WEFT_PEER_IDENTITY, HeaderValue::from_static("spoofed"));
        h.append(X_WEFT_PEER_IDENTITY, HeaderValue::from_static("spoofed2"));
        let web = id("spiffe://cluster.local/ns/default/sa/web");
        h.append("x_weft_peer_identity", HeaderValue::from_static("spoofed3"));
        set_peer_identity(&mut h, Some(&web), true);
        assert_eq!(h.get_all(X_WEFT_PEER_IDENTITY).iter().count(), 1);
        assert_eq!(h[X_WEFT_PEER_IDENTITY], web.as_str());
        assert!(h.get("x_weft_peer_identity").is_none());
        set_peer_identity(&mut h, None, false);
        assert!(h.get(X_WEFT_PEER_IDENTITY).is_none());
    }

    #[test]
    fn check_names_the_denying_policy() {
        let p = policy(v1::AuthzAction::Deny, vec![]);
        let req = http(None, "GET", "/");
        assert_eq!(check(Some(&p), &req), Err("backend".into()));
        assert_eq!(check(None, &req), Ok(()));
    }

    #[test]
    fn bad_policies_are_rejected_with_the_field() {
        let mut r = rule("r", &["not-spiffe"], &[], &[]);
        r.paths = vec![v1::PathMatch {
            kind: Some(v1::path_match::Kind::Regex("(".into())),
        }];
        let set = v1::PolicySet {
            version: "1".into(),
            policies: vec![
                v1::AuthorizationPolicy {
                    name: "p".into(),
                    default_action: 1,
                    rules: vec![r],
                },
                v1::AuthorizationPolicy {
                    name: "q".into(),
                    default_action: 1,
                    rules: vec![],
                },
                v1::AuthorizationPolicy {
                    name: "q".into(),
                    default_action: 1,
                    rules: vec![],
                },
            ],
        };
        let errs: Vec<String> = build_policies(Some(&set))
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(errs[0].contains("rules[0].identities[0]"), "{errs:?}");
        assert!(errs[1].contains("rules[0].paths[0].regex"), "{errs:?}");
        assert!(errs[2].contains("duplicate"), "{errs:?}");
        assert!(build_policies(None).unwrap().is_empty());
    }
}
