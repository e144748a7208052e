//! Validation of the zero-trust settings: the single `mesh:` block and `authorization:`
//! policies (one per service, references that resolve, well-formed SPIFFE IDs).

use std::cell::LazyCell;
use std::collections::HashMap;

use super::{
    check_method, check_path_match, is_dns_label, Collector, FileView, Path, Protocol, Service,
    DNS_LABEL_RULE,
};
use crate::policy::lookup::ServiceLookup;
use crate::policy::validate_cache::Reuse;
use crate::policy::{AuthorizationPolicy, ServiceKey};

pub(super) fn check<'s>(
    c: &mut Collector<'_>,
    parsed: &[FileView<'_>],
    all: &LazyCell<ServiceLookup<'s>, impl FnOnce() -> ServiceLookup<'s>>,
    reuse: &Reuse,
) {
    let mut first_mesh: Option<usize> = None;
    for (fi, file) in parsed.iter().enumerate() {
        let Some(mesh) = &file.mesh else { continue };
        if let Some(first) = first_mesh {
            let at = c.location(first, "mesh");
            c.push(
                fi,
                "mesh".to_owned(),
                format!("only one file may define mesh (first defined at {at})"),
            );
            continue;
        }
        first_mesh = Some(fi);
        if let Some(td) = &mesh.trust_domain {
            if !is_trust_domain(td) {
                c.push(
                    fi,
                    "mesh.trust_domain".to_owned(),
                    format!("{td:?} is not a trust domain: lower-case letters, digits, '.', '-' and '_'"),
                );
            }
        }
        for ns in mesh.namespaces.keys() {
            if !is_dns_label(ns) {
                c.push(
                    fi,
                    format!("mesh.namespaces.{ns}"),
                    format!("namespace {ns:?} {DNS_LABEL_RULE}"),
                );
            }
        }
    }

    // Where each was first defined: (file, index in its list).
    let mut names: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut guarded: HashMap<ServiceKey, (usize, usize)> = HashMap::new();
    let first_path = |pi: usize| Path::item("authorization", pi).to_string();
    // Unchanged policies are neither checked again nor compared with each other (they were,
    // in the set in force): see `validate_cache`.
    let check_across =
        !reuse.all_declaring_unchanged(parsed.iter().map(|f| !f.authorization.is_empty()));
    for (fi, file) in parsed.iter().enumerate() {
        if !check_across && reuse.unchanged[fi] {
            continue;
        }
        for (pi, policy) in file.authorization.iter().enumerate() {
            let path = Path::item("authorization", pi);
            if !is_dns_label(&policy.name) {
                c.push(
                    fi,
                    format!("{path}.name"),
                    format!("{:?} {DNS_LABEL_RULE}", policy.name),
                );
            }
            if let Some((first_file, first)) = names.get(policy.name.as_str()) {
                let at = c.location(*first_file, &first_path(*first));
                c.push(
                    fi,
                    format!("{path}.name"),
                    format!(
                        "duplicate authorization policy \"{}\" (first defined at {at})",
                        policy.name
                    ),
                );
            } else {
                names.insert(&policy.name, (fi, pi));
            }
            let service = match all.resolve(&policy.service, None) {
                Ok(key) => {
                    if let Some((first_file, first)) = guarded.get(&key) {
                        let at = c.location(*first_file, &first_path(*first));
                        c.push(
                            fi,
                            format!("{path}.service"),
                            format!("service \"{key}\" already has an authorization policy (at {at}); one policy per service"),
                        );
                    } else {
                        guarded.insert(key.clone(), (fi, pi));
                    }
                    all.get(&key.name, &key.namespace)
                }
                Err(e) => {
                    c.push(fi, format!("{path}.service"), e.to_string());
                    None
                }
            };
            if !reuse.unchanged[fi] {
                check_rules(c, fi, &path, policy, service, all);
            }
        }
    }
}

fn check_rules(
    c: &mut Collector<'_>,
    fi: usize,
    path: &Path<'_>,
    policy: &AuthorizationPolicy,
    service: Option<&Service>,
    all: &ServiceLookup<'_>,
) {
    let mut rule_names: HashMap<&str, usize> = HashMap::new();
    let context = service.map(|s| s.namespace.as_str());
    for (ri, rule) in policy.rules.iter().enumerate() {
        let rpath = path.at("rules", ri);
        if !is_dns_label(&rule.name) {
            c.push(
                fi,
                format!("{rpath}.name"),
                format!("{:?} {DNS_LABEL_RULE}", rule.name),
            );
        } else if let Some(first) = rule_names.insert(&rule.name, ri) {
            c.push(
                fi,
                format!("{rpath}.name"),
                format!("duplicate rule \"{}\" (also rules[{first}])", rule.name),
            );
        }
        for (i, reference) in rule.from.services.iter().enumerate() {
            if let Err(e) = all.resolve(reference, context) {
                c.push(fi, format!("{rpath}.from.services[{i}]"), e.to_string());
            }
        }
        for (i, id) in rule.from.identities.iter().enumerate() {
            if let Err(reason) = check_spiffe_pattern(id) {
                c.push(fi, format!("{rpath}.from.identities[{i}]"), reason);
            }
        }
        for (i, ns) in rule.from.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                c.push(
                    fi,
                    format!("{rpath}.from.namespaces[{i}]"),
                    format!("{ns:?} {DNS_LABEL_RULE}"),
                );
            }
        }
        if service.is_some_and(|s| s.protocol == Protocol::Tcp) && !rule.to.is_empty() {
            c.push(
                fi,
                format!("{rpath}.to"),
                "methods and paths apply to HTTP only: the service is tcp",
            );
        }
        for (i, method) in rule.to.methods.iter().enumerate() {
            check_method(c, fi, &rpath.at("to.methods", i), method);
        }
        for (i, p) in rule.to.paths.iter().enumerate() {
            check_path_match(c, fi, &rpath.at("to.paths", i), p);
        }
    }
}

/// `spiffe://<trust domain>/<path>`; a `*` may only end the pattern.
fn check_spiffe_pattern(id: &str) -> Result<(), String> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err(format!(
            "{id:?} is not a SPIFFE ID: must start with spiffe://"
        ));
    };
    if let Some(star) = id.find('*') {
        if star != id.len() - 1 {
            return Err(format!(
                "{id:?}: '*' is only allowed at the end (prefix match)"
            ));
        }
    }
    let domain = rest.split('/').next().unwrap_or_default();
    if domain.is_empty() || (domain != "*" && !is_trust_domain(domain.trim_end_matches('*'))) {
        return Err(format!(
            "{id:?}: missing or invalid trust domain after spiffe://"
        ));
    }
    Ok(())
}

/// Lower-case letters, digits, '.', '-', '_' (the SPIFFE trust-domain charset), non-empty.
fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}
