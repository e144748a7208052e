//! What a change would do, before it is made: the policy-level summary of two policy sets
//! (`service/backend.default created`) and, per proxy, the resource-level difference between
//! the snapshot it gets now and the one it would get (`weftctl diff`, `POST /v1/diff`).
//!
//! Resources are compared by name within each type: listeners by listener name, routes by
//! `<table>/<route>`, clusters by cluster name, endpoints by cluster name, policies by
//! authorization policy name, trust by trust domain. A type's version is the
//! hash of its content, so `version_changes` says whether a push of that type would happen.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::compile::{type_name, Resources};
use crate::policy::{AuthorizationPolicy, Declarations, PolicySet, Route, Service};
use weft_proto::v1::ResourceType;

/// Human-readable differences between two policy sets: `mesh`, services, routes, then
/// authorization policies, e.g. `route/canary configured`.
///
/// Only the declarations of files the two sets do not share (same name and content) are
/// compared: the others are equal in both ([`PolicySet::declared_apart_from`]), so an apply
/// that changes one file costs that file, not the mesh.
pub fn policy_changes(old: &PolicySet, new: &PolicySet) -> Vec<String> {
    // Borrowed keys and values: this runs on every apply.
    fn services<'a>(d: &Declarations<'a>) -> BTreeMap<ServiceName<'a>, &'a Service> {
        d.services
            .iter()
            .map(|s| (ServiceName(&s.name, &s.namespace), *s))
            .collect()
    }
    fn routes<'a>(d: &Declarations<'a>) -> BTreeMap<&'a str, &'a Route> {
        d.routes.iter().map(|r| (r.name.as_str(), *r)).collect()
    }
    fn authorization<'a>(d: &Declarations<'a>) -> BTreeMap<&'a str, &'a AuthorizationPolicy> {
        d.authorization
            .iter()
            .map(|p| (p.name.as_str(), *p))
            .collect()
    }
    let mut out = Vec::new();
    if old.mesh() != new.mesh() {
        out.push("mesh configured".to_owned());
    }
    let (old_only, new_only) = (old.declared_apart_from(new), new.declared_apart_from(old));
    diff_maps(
        &services(&old_only),
        &services(&new_only),
        "service",
        &mut out,
    );
    diff_maps(&routes(&old_only), &routes(&new_only), "route", &mut out);
    diff_maps(
        &authorization(&old_only),
        &authorization(&new_only),
        "authorization",
        &mut out,
    );
    out
}

/// A service's name and namespace, borrowed: ordered and shown like
/// [`crate::policy::ServiceKey`].
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct ServiceName<'a>(&'a str, &'a str);

impl std::fmt::Display for ServiceName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

fn diff_maps<K: Ord + std::fmt::Display, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    kind: &str,
    out: &mut Vec<String>,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{kind}/{k} created")),
            Some(o) if o != v => out.push(format!("{kind}/{k} configured")),
            Some(_) => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        out.push(format!("{kind}/{k} deleted"));
    }
}

/// How one resource type of one proxy would change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeDiff {
    /// The version the proxy's snapshot has now (compiled from the serving set).
    pub version: String,
    /// The version it would have.
    pub proposed_version: String,
    /// Whether the version changes, i.e. whether this type would be pushed.
    pub version_changes: bool,
    /// Names of resources that would appear, disappear, or change content.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// How one proxy's snapshot would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyDiff {
    pub id: String,
    pub service: String,
    pub namespace: String,
    /// Whether any type would be pushed to this proxy.
    pub changes: bool,
    /// By type name: `listeners`, `routes`, `clusters`, `endpoints`, `policies`, `trust`.
    pub types: BTreeMap<&'static str, TypeDiff>,
}

/// The answer of `POST /v1/diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// Version of the serving policy set.
    pub current_version: String,
    /// Version the set would have with the files applied.
    pub version: String,
    /// Policy-level changes (see [`policy_changes`]).
    pub changed: Vec<String>,
    /// Every connected proxy, sorted by id.
    pub proxies: Vec<ProxyDiff>,
}

/// Compares two named lists: (added, removed, changed), each sorted by name.
fn diff_named<T: PartialEq>(
    old: &BTreeMap<String, &T>,
    new: &BTreeMap<String, &T>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for (name, item) in new {
        match old.get(name) {
            None => added.push(name.clone()),
            Some(o) if o != item => changed.push(name.clone()),
            Some(_) => {}
        }
    }
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (added, removed, changed)
}

fn type_diff<T: PartialEq>(
    version: &str,
    proposed_version: &str,
    old: &BTreeMap<String, &T>,
    new: &BTreeMap<String, &T>,
) -> TypeDiff {
    let (added, removed, changed) = diff_named(old, new);
    TypeDiff {
        version: version.to_owned(),
        proposed_version: proposed_version.to_owned(),
        version_changes: version != proposed_version,
        added,
        removed,
        changed,
    }
}

/// The per-type difference between a proxy's current and proposed resources.
pub fn resource_diff(
    current: &Resources,
    proposed: &Resources,
) -> BTreeMap<&'static str, TypeDiff> {
    fn listeners(r: &Resources) -> BTreeMap<String, &weft_proto::v1::Listener> {
        r.listeners
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l))
            .collect()
    }
    fn routes(r: &Resources) -> BTreeMap<String, &weft_proto::v1::Route> {
        r.routes
            .tables
            .iter()
            .flat_map(|t| {
                t.routes
                    .iter()
                    .map(move |r| (format!("{}/{}", t.name, r.name), r))
            })
            .collect()
    }
    fn clusters(r: &Resources) -> BTreeMap<String, &weft_proto::v1::Cluster> {
        r.clusters
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c))
            .collect()
    }
    fn endpoints(r: &Resources) -> BTreeMap<String, &weft_proto::v1::ClusterEndpoints> {
        r.endpoints
            .clusters
            .iter()
            .map(|c| (c.cluster.clone(), c))
            .collect()
    }
    fn policies(r: &Resources) -> BTreeMap<String, &weft_proto::v1::AuthorizationPolicy> {
        r.policies
            .policies
            .iter()
            .map(|p| (p.name.clone(), p))
            .collect()
    }
    fn trust(r: &Resources) -> BTreeMap<String, &weft_proto::v1::TrustSet> {
        std::iter::once((r.trust.trust_domain.clone(), &r.trust)).collect()
    }
    let mut out = BTreeMap::new();
    out.insert(
        type_name(ResourceType::Policies),
        type_diff(
            &current.policies.version,
            &proposed.policies.version,
            &policies(current),
            &policies(proposed),
        ),
    );
    out.insert(
        type_name(ResourceType::Trust),
        type_diff(
            &current.trust.version,
            &proposed.trust.version,
            &trust(current),
            &trust(proposed),
        ),
    );
    out.insert(
        type_name(ResourceType::Listeners),
        type_diff(
            &current.listeners.version,
            &proposed.listeners.version,
            &listeners(current),
            &listeners(proposed),
        ),
    );
    let mut route_diff = type_diff(
        &current.routes.version,
        &proposed.routes.version,
        &routes(current),
        &routes(proposed),
    );
    if route_diff.version_changes
        && route_diff.added.is_empty()
        && route_diff.removed.is_empty()
        && route_diff.changed.is_empty()
    {
        // Same routes, new order: first match wins, so the table itself changed.
        route_diff.changed = proposed
            .routes
            .tables
            .iter()
            .map(|t| format!("{} (route order)", t.name))
            .collect();
    }
    out.insert(type_name(ResourceType::Routes), route_diff);
    out.insert(
        type_name(ResourceType::Clusters),
        type_diff(
            &current.clusters.version,
            &proposed.clusters.version,
            &clusters(current),
            &clusters(proposed),
        ),
    );
    out.insert(
        type_name(ResourceType::Endpoints),
        type_diff(
            &current.endpoints.version,
            &proposed.endpoints.version,
            &endpoints(current),
            &endpoints(proposed),
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, TrustBundle};
    use crate::policy::SourceFile;
    use crate::registry::Registry;
    use std::time::Duration;
    use weft_proto::v1::Node;

    fn set(content: &str) -> PolicySet {
        PolicySet::from_files(vec![SourceFile {
            name: "p.yaml".into(),
            content: content.into(),
        }])
        .unwrap()
    }

    fn node() -> Node {
        Node {
            id: "web-1".into(),
            service: "web".into(),
            namespace: "default".into(),
            inbound_address: "127.0.0.2:15006".into(),
            outbound_address: "127.0.0.2:15001".into(),
            app_address: "127.0.0.1:8080".into(),
            ..Node::default()
        }
    }

    const BASE: &str = "services:\n  - {name: web, dependencies: [api, db]}\n  - name: api\n  - {name: db, protocol: tcp, port: 5432}\n  - name: other\n";

    #[test]
    fn policy_changes_name_services_and_routes() {
        let old = set(BASE);
        let new =
            set(&format!(
            "{}routes:\n  - name: r\n    service: api\n    destinations: [{{service: other}}]\n",
            BASE.replace("  - name: other\n", "  - {name: other, request_timeout: 3s}\n")
        ));
        assert_eq!(
            policy_changes(&old, &new),
            ["service/other.default configured", "route/r created"]
        );
        assert_eq!(
            policy_changes(&new, &old),
            ["service/other.default configured", "route/r deleted"]
        );
    }

    #[test]
    fn names_what_changes_per_type() {
        let registry = Registry::new(Duration::from_secs(1));
        let old = compile(&set(BASE), &registry, &TrustBundle::default(), &node());
        // A route of api sending to `other`: a new route and a new cluster (+ its endpoints);
        // dropping db removes its tcp listener, cluster and endpoints.
        let new_set = set(&format!(
            "{}routes:\n  - name: r\n    service: api\n    match: {{path: {{prefix: /x}}}}\n    destinations: [{{service: other}}]\n",
            BASE.replace("dependencies: [api, db]", "dependencies: [api]")
        ));
        let new = compile(&new_set, &registry, &TrustBundle::default(), &node());
        let d = resource_diff(&old, &new);
        let l = &d["listeners"];
        assert!(l.version_changes);
        assert_eq!(l.removed, ["outbound-tcp-db.default"]);
        assert!(l.added.is_empty() && l.changed.is_empty());
        let r = &d["routes"];
        assert_eq!(r.added, ["outbound/r"]);
        assert!(r.removed.is_empty());
        let c = &d["clusters"];
        assert_eq!(c.added, ["other.default"]);
        assert_eq!(c.removed, ["db.default"]);
        let e = &d["endpoints"];
        assert_eq!(e.added, ["other.default"]);
        assert_eq!(e.removed, ["db.default"]);

        // Nothing changes: no version moves, nothing listed.
        let same = resource_diff(&old, &old);
        assert!(same.values().all(|t| *t
            == TypeDiff {
                version: t.version.clone(),
                proposed_version: t.version.clone(),
                ..TypeDiff::default()
            }));
    }

    #[test]
    fn mesh_authorization_and_trust_changes_are_named() {
        let with_policy =
            format!("{BASE}authorization:\n  - {{name: web-callers, service: web}}\n");
        let denying = format!(
            "{with_policy}mesh:\n  namespaces: {{default: {{default_authorization: deny}}}}\n"
        );
        assert_eq!(
            policy_changes(&set(BASE), &set(&denying)),
            ["mesh configured", "authorization/web-callers created"]
        );
        let registry = Registry::new(Duration::from_secs(1));
        let trust = TrustBundle::default();
        let old = compile(&set(BASE), &registry, &trust, &node());
        let new = compile(&set(&denying), &registry, &trust, &node());
        let d = resource_diff(&old, &new);
        assert_eq!(d["policies"].added, ["web-callers"]);
        assert!(
            d["listeners"].changed == ["inbound"],
            "{:?}",
            d["listeners"]
        );
        assert!(!d["trust"].version_changes);
        let rotated = TrustBundle {
            roots_pem: vec!["NEW".into()],
            ..TrustBundle::default()
        };
        let d = resource_diff(&old, &compile(&set(BASE), &registry, &rotated, &node()));
        assert_eq!(d["trust"].changed, ["cluster.local"]);
        for t in ["listeners", "routes", "clusters", "endpoints", "policies"] {
            assert!(!d[t].version_changes, "{t}");
        }
    }

    #[test]
    fn a_changed_timeout_changes_only_that_cluster() {
        let registry = Registry::new(Duration::from_secs(1));
        let old = compile(&set(BASE), &registry, &TrustBundle::default(), &node());
        let new = compile(
            &set(&BASE.replace("  - name: api\n", "  - {name: api, connect_timeout: 3s}\n")),
            &registry,
            &TrustBundle::default(),
            &node(),
        );
        let d = resource_diff(&old, &new);
        assert_eq!(d["clusters"].changed, ["api.default"]);
        for t in ["listeners", "routes", "endpoints"] {
            assert!(!d[t].version_changes, "{t}: {:?}", d[t]);
        }
    }
}
