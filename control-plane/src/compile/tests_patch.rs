//! Patching a compiled scope for an endpoint-only change ([`super::patch`]): whenever a patch
//! is planned, the patched scope and inputs equal a fresh compilation's, field for field; every
//! other change falls back to compiling.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::patch::EndpointPatch;
use super::*;
use crate::policy::SourceFile;

fn policy(content: &str) -> PolicySet {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .unwrap_or_else(|e| panic!("{e}\n{content}"))
}

fn node(id: &str, service: &str, ip: &str, ports: &[u32], labels: &[(&str, &str)]) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: format!("{ip}:15006"),
        instance_ip: if ports.is_empty() {
            String::new()
        } else {
            ip.into()
        },
        app_ports: ports.to_vec(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>(),
        ..Default::default()
    }
}

const BASE: &str = "\
mesh:
  vip_range: 240.240.0.0/16
services:
  - {name: web, dependencies: [api, ext, db]}
  - name: api
  - name: ext
    endpoints:
      - {address: \"127.0.9.1:80\"}
      - {address: \"127.0.9.2:80\", weight: 3}
  - name: dns
    endpoints:
      - {host: example.com, port: 443}
  - name: db
    protocol: tcp
    port: 5432
  - name: empty
routes:
  - name: api-v2
    service: api
    match: {headers: [{name: x-canary, exact: 'true'}]}
    destinations: [{service: api, subset: {version: v2}}]
  - name: ext-canary
    service: ext
    match: {path: {prefix: /canary}}
    destinations: [{service: ext}]
";

const SCOPES: [&str; 3] = ["web", "api", "admin"];

/// Compiles `scope` under `before` and the registry, lets `change` move the registry on, and
/// plans a patch to `after`: if there is one, checks the patched scope and inputs against a
/// fresh compilation (and that the patch is not a no-op when the compilation differs).
/// Returns whether a patch was planned.
fn patched(
    before: &PolicySet,
    after: &PolicySet,
    registry: &mut Registry,
    change: &dyn Fn(&mut Registry),
    scope: &str,
) -> bool {
    let trust = TrustBundle::default();
    let key = ServiceKey::new(scope, "default");
    let (old, old_inputs) = compile_scope_recorded(before, registry, &trust, &key);
    change(registry);
    let fresh = compile_scope_recorded(after, registry, &trust, &key);
    let Some(patch) = EndpointPatch::plan(before, after, registry, &old, &old_inputs) else {
        return false;
    };
    if old != fresh.0 {
        assert!(!patch.is_empty());
    }
    let (mut scope_now, mut inputs_now) = (old, old_inputs);
    patch.apply(after, registry, &trust, &mut scope_now, &mut inputs_now);
    assert_eq!(scope_now, fresh.0, "scope {scope}: patched != compiled");
    assert_eq!(inputs_now, fresh.1, "scope {scope}: inputs differ");
    true
}

fn registry() -> Registry {
    let mut r = Registry::new(Duration::from_secs(5));
    let now = SystemTime::now();
    r.register(
        node("api-1", "api", "10.0.0.3", &[8080], &[("version", "v1")]),
        now,
    );
    r.register(
        node("api-2", "api", "10.0.0.4", &[8080], &[("version", "v2")]),
        now,
    );
    r.register(node("web-1", "web", "10.0.0.2", &[8080], &[]), now);
    r
}

fn no_change(_: &mut Registry) {}

/// A change of the registry between two compilations.
type Change = Box<dyn Fn(&mut Registry)>;

#[test]
fn endpoint_only_policy_changes_patch_to_what_a_compilation_gives() {
    let base = policy(BASE);
    let cases = [
        ("moved", "127.0.9.1:80", "127.0.9.1:81"),
        (
            "added",
            "      - {address: \"127.0.9.2:80\", weight: 3}\n",
            "      - {address: \"127.0.9.2:80\", weight: 3}\n      - {address: \"127.0.9.3:80\"}\n",
        ),
        ("removed", "      - {address: \"127.0.9.1:80\"}\n", ""),
        ("weight", "weight: 3", "weight: 4"),
    ];
    for (what, from, to) in cases {
        let text = BASE.replacen(from, to, 1);
        assert_ne!(text, BASE, "{what}");
        let after = policy(&text);
        for scope in SCOPES {
            let mut r = registry();
            assert!(
                patched(&base, &after, &mut r, &no_change, scope),
                "{what}: {scope} not patched"
            );
        }
    }
}

#[test]
fn registrations_patch_plain_subset_and_per_port_clusters() {
    let base = policy(BASE);
    let now = SystemTime::now();
    let changes: [(&str, Change); 4] = [
        (
            "a v2 instance on a known port",
            Box::new(move |r: &mut Registry| {
                r.register(
                    node("api-3", "api", "10.0.0.5", &[8080], &[("version", "v2")]),
                    now,
                );
            }),
        ),
        (
            "an explicit-mode instance",
            Box::new(move |r: &mut Registry| {
                r.register(node("api-4", "api", "127.0.0.6", &[], &[]), now);
            }),
        ),
        (
            "a label changing subset",
            Box::new(move |r: &mut Registry| {
                r.register(
                    node("api-1", "api", "10.0.0.3", &[8080], &[("version", "v2")]),
                    now,
                );
            }),
        ),
        (
            "an instance gone",
            Box::new(|r: &mut Registry| {
                let session = r.get("api-1").unwrap().session;
                let now = std::time::Instant::now();
                r.disconnect("api-1", session, now);
                assert!(r.expire(now + Duration::from_secs(6)));
            }),
        ),
    ];
    for (what, change) in &changes {
        for scope in SCOPES {
            let mut r = registry();
            assert!(
                patched(&base, &base, &mut r, change.as_ref(), scope),
                "{what}: {scope} not patched"
            );
        }
    }
    // Both at once: a registration and a static endpoint.
    let after = policy(&BASE.replacen("127.0.9.1:80", "127.0.9.1:82", 1));
    let mut r = registry();
    assert!(patched(&base, &after, &mut r, changes[0].1.as_ref(), "web"));
}

#[test]
fn anything_beyond_endpoints_compiles_again() {
    let base = policy(BASE);
    let now = SystemTime::now();
    let texts = [
        // Other fields of the service too.
        BASE.replacen("127.0.9.1:80", "127.0.9.1:81", 1).replacen(
            "  - name: ext\n",
            "  - name: ext\n    connect_timeout: 3s\n",
            1,
        ),
        // The first static endpoint: the upstream protocol's default changes.
        BASE.replacen(
            "  - name: empty\n",
            "  - name: empty\n    endpoints: [{address: \"127.0.9.9:80\"}]\n",
            1,
        ),
        // A DNS endpoint (it rides in the cluster and names the service).
        BASE.replacen("host: example.com", "host: example.org", 1),
        // A route.
        BASE.replacen("prefix: /canary", "prefix: /canary2", 1),
    ];
    for text in &texts {
        assert_ne!(text, BASE);
        let after = policy(text);
        // admin calls every service: every change is in its scope.
        let mut r = registry();
        assert!(
            !patched(&base, &after, &mut r, &no_change, "admin"),
            "{text}"
        );
    }
    // A new port: a new per-port cluster and route table.
    let mut r = registry();
    let new_port = move |r: &mut Registry| {
        r.register(node("api-5", "api", "10.0.0.7", &[9090], &[]), now);
    };
    assert!(!patched(&base, &base, &mut r, &new_port, "web"));
    // The same, in a scope holding no per-port clusters of api... every scope calling api
    // holds them; a scope that calls nothing reads no registrations and is simply unchanged.
    let lonely = policy(&BASE.replacen(
        "  - name: empty\n",
        "  - name: empty\n  - {name: lonely, dependencies: []}\n",
        1,
    ));
    let mut r = registry();
    assert!(patched(&lonely, &lonely, &mut r, &new_port, "lonely"));
}

#[test]
fn the_services_order_and_a_reordered_set_compile_again() {
    // A scope reading every service (admin) where the declared order changes along with an
    // endpoint: not an endpoint-only change.
    let base = policy(BASE);
    let swapped = BASE
        .replacen("  - name: api\n", "", 1)
        .replacen("  - name: empty\n", "  - name: empty\n  - name: api\n", 1)
        .replacen("127.0.9.1:80", "127.0.9.1:81", 1);
    let after = policy(&swapped);
    let mut r = registry();
    assert!(!patched(&base, &after, &mut r, &no_change, "admin"));
}

#[test]
fn subset_selection_is_what_compilation_selects() {
    let base = policy(BASE);
    let r = registry();
    let s = compile_scope(
        &base,
        &r,
        &TrustBundle::default(),
        &ServiceKey::new("web", "default"),
    );
    let labels: BTreeMap<String, String> = [("version".to_owned(), "v2".to_owned())].into();
    assert_eq!(s.subsets.len(), 1);
    assert_eq!(s.subsets[0].labels, labels);
    assert_eq!(s.subsets[0].cluster, "api.default~version=v2");
    let held = s
        .endpoints
        .iter()
        .find(|e| e.cluster == "api.default~version=v2")
        .unwrap();
    assert_eq!(held.endpoints.len(), 1);
    assert_eq!(held.endpoints[0].proxy_id, "api-2");
}
