//! `diff::policy_changes` compares only the files two sets do not share
//! (`PolicySet::declared_apart_from`): its answer is that of comparing every declaration.

use std::collections::BTreeMap;

use super::*;
use crate::diff::policy_changes;

fn set(list: &[(&str, &str)]) -> PolicySet {
    PolicySet::from_files(
        list.iter()
            .map(|(n, c)| SourceFile {
                name: (*n).to_owned(),
                content: (*c).to_owned(),
            })
            .collect(),
    )
    .unwrap()
}

/// The comparison of every declaration of both sets (what `policy_changes` did before).
fn every_declaration(old: &PolicySet, new: &PolicySet) -> Vec<String> {
    fn diff<V: PartialEq>(
        old: &BTreeMap<String, &V>,
        new: &BTreeMap<String, &V>,
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
        for k in old.keys().filter(|k| !new.contains_key(*k)) {
            out.push(format!("{kind}/{k} deleted"));
        }
    }
    fn services(s: &PolicySet) -> BTreeMap<String, &Service> {
        s.services()
            .iter()
            .map(|x| (format!("{}.{}", x.name, x.namespace), x))
            .collect()
    }
    fn routes(s: &PolicySet) -> BTreeMap<String, &Route> {
        s.routes().iter().map(|x| (x.name.clone(), x)).collect()
    }
    fn authorization(s: &PolicySet) -> BTreeMap<String, &AuthorizationPolicy> {
        s.authorization()
            .iter()
            .map(|x| (x.name.clone(), x))
            .collect()
    }
    let mut out = Vec::new();
    if old.mesh() != new.mesh() {
        out.push("mesh configured".to_owned());
    }
    diff(&services(old), &services(new), "service", &mut out);
    diff(&routes(old), &routes(new), "route", &mut out);
    diff(
        &authorization(old),
        &authorization(new),
        "authorization",
        &mut out,
    );
    out
}

const SERVICES: &str = "\
services:
  - name: web
  - name: backend
    endpoints: [{address: 127.0.0.1:9001}]
";
const SERVICES_ENDPOINT: &str = "\
services:
  - name: web
  - name: backend
    endpoints: [{address: 127.0.0.1:9002}]
";
const ROUTES: &str = "\
routes:
  - name: to-backend
    service: backend
    destinations: [{service: backend}]
";
const ROUTES_TIMEOUT: &str = "\
routes:
  - name: to-backend
    service: backend
    timeout: 3s
    destinations: [{service: backend}]
";
const AUTHZ: &str = "\
authorization:
  - name: backend-callers
    service: backend
    rules: [{name: web, from: {services: [web]}}]
";
const CACHE: &str = "\
services:
  - name: cache
    endpoints: [{address: 127.0.0.1:7001}]
";
const CACHE_MOVED: &str = "\
services:
  - name: cache
    endpoints: [{address: 127.0.0.1:7002}]
  - name: backend
    endpoints: [{address: 127.0.0.1:9001}]
";
const SERVICES_WITHOUT_BACKEND: &str = "\
services:
  - name: web
";
const MESH: &str = "mesh: {trust_domain: example.org}\n";

#[test]
fn changes_of_files_not_shared_are_those_of_every_declaration() {
    let sets = [
        set(&[("a.yaml", SERVICES), ("b.yaml", ROUTES), ("c.yaml", CACHE)]),
        set(&[
            ("a.yaml", SERVICES_ENDPOINT),
            ("b.yaml", ROUTES),
            ("c.yaml", CACHE),
        ]),
        set(&[
            ("a.yaml", SERVICES),
            ("b.yaml", ROUTES_TIMEOUT),
            ("c.yaml", CACHE),
        ]),
        set(&[("a.yaml", SERVICES), ("b.yaml", ROUTES), ("d.yaml", AUTHZ)]),
        // backend moves from a.yaml to c.yaml, unchanged: no change for it.
        set(&[
            ("a.yaml", SERVICES_WITHOUT_BACKEND),
            ("b.yaml", ROUTES),
            ("c.yaml", CACHE_MOVED),
        ]),
        // a file renamed with the same content: nothing changes.
        set(&[("a2.yaml", SERVICES), ("b.yaml", ROUTES), ("c.yaml", CACHE)]),
        set(&[("a.yaml", SERVICES), ("m.yaml", MESH)]),
        set(&[("a.yaml", SERVICES)]),
        set(&[]),
    ];
    let mut nonempty = 0;
    for old in &sets {
        for new in &sets {
            let expected = every_declaration(old, new);
            assert_eq!(policy_changes(old, new), expected);
            nonempty += usize::from(!expected.is_empty());
        }
    }
    assert!(nonempty > 40, "{nonempty}");
    // The move and the rename are no change; an endpoint change is one.
    assert_eq!(
        policy_changes(&sets[0], &sets[4]),
        ["service/cache.default configured"]
    );
    assert!(policy_changes(&sets[0], &sets[5]).is_empty());
    assert_eq!(
        policy_changes(&sets[0], &sets[1]),
        ["service/backend.default configured"]
    );
}
