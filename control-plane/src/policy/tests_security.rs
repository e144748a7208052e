//! Parsing and validation of `mesh:` and `authorization:`: each rule with the line it names.

use super::*;

fn files(files: &[(&str, &str)]) -> Result<PolicySet, Vec<String>> {
    PolicySet::from_files(
        files
            .iter()
            .map(|(n, c)| SourceFile {
                name: (*n).into(),
                content: (*c).into(),
            })
            .collect(),
    )
    .map_err(|e| e.messages())
}

fn one_error(content: &str) -> String {
    let errs = files(&[("p.yaml", content)]).expect_err("expected errors");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap_or_default()
}

const SERVICES: &str = "services:\n  - name: api\n  - name: web\n  - {name: job, namespace: batch}\n  - {name: db, protocol: tcp, port: 5432}\n";

fn with_authz(authz: &str) -> String {
    format!("{SERVICES}authorization:\n{authz}")
}

#[test]
fn parses_mesh_and_authorization() {
    let s = files(&[
        (
            "a.yaml",
            "mesh:\n  trust_domain: example.org\n  mtls: strict\n  namespaces:\n    demo: {default_authorization: deny}\n",
        ),
        (
            "b.yaml",
            &with_authz(
                "  - name: api-callers
    service: api
    default: deny
    rules:
      - name: web-may-read
        from:
          services: [web, job.batch]
          identities: [\"spiffe://cluster.local/ns/batch/sa/*\"]
          namespaces: [batch]
        to:
          methods: [GET]
          paths: [{prefix: /}]
",
            ),
        ),
    ])
    .unwrap();
    let mesh = s.mesh();
    assert_eq!(mesh.trust_domain.as_deref(), Some("example.org"));
    assert_eq!(mesh.mtls, MtlsMode::Strict);
    assert_eq!(s.namespace_default("demo"), AuthzAction::Deny);
    assert_eq!(s.namespace_default("other"), AuthzAction::Allow);
    let p = &s.authorization()[0];
    assert_eq!(p.default, Some(AuthzAction::Deny));
    assert_eq!(p.rules[0].from.services, ["web", "job.batch"]);
    assert!(s
        .authorization_of(&ServiceKey::new("api", "default"))
        .is_some());
    assert!(s
        .authorization_of(&ServiceKey::new("web", "default"))
        .is_none());
    assert_eq!(s.mtls_of(s.services().first()), MtlsMode::Strict);
}

#[test]
fn mesh_defaults() {
    let s = files(&[("a.yaml", "mesh: {}\n")]).unwrap();
    assert_eq!(s.mesh().trust_domain, None);
    assert_eq!(s.mesh().mtls, MtlsMode::Permissive);
    assert_eq!(PolicySet::empty().mtls_of(None), MtlsMode::Permissive);
}

#[test]
fn only_one_mesh_block() {
    let errs = files(&[
        ("a.yaml", "mesh: {mtls: strict}\n"),
        ("b.yaml", "# b\nmesh: {}\n"),
    ])
    .unwrap_err();
    assert_eq!(
        errs,
        ["b.yaml:2: mesh: only one file may define mesh (first defined at a.yaml:1)"]
    );
}

#[test]
fn mesh_values_are_checked() {
    let e = one_error("mesh:\n  mtls: on\n");
    assert!(e.starts_with("p.yaml:2: mesh.mtls: unknown variant"), "{e}");
    let e = one_error("mesh:\n  trust_domain: Bad/Domain\n");
    assert!(
        e.starts_with("p.yaml:2: mesh.trust_domain: \"Bad/Domain\" is not a trust domain"),
        "{e}"
    );
    let e = one_error("mesh:\n  namespaces:\n    demo: {default_authorization: maybe}\n");
    assert!(e.contains("unknown variant `maybe`"), "{e}");
    let e = one_error("mesh:\n  namespaces:\n    Demo: {default_authorization: deny}\n");
    assert!(
        e.starts_with("p.yaml:3: mesh.namespaces.Demo: namespace \"Demo\" must be a DNS label"),
        "{e}"
    );
}

#[test]
fn authorization_service_must_exist() {
    let e = one_error(&with_authz("  - name: p\n    service: apj\n"));
    assert_eq!(
        e,
        "p.yaml:8: authorization[0].service: unknown service \"apj\""
    );
}

#[test]
fn one_policy_per_service() {
    let errs = files(&[
        ("a.yaml", &with_authz("  - name: p\n    service: api\n")),
        (
            "b.yaml",
            "authorization:\n  - name: q\n    service: api.default\n",
        ),
    ])
    .unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("b.yaml:3: authorization[0].service: service \"api.default\" already has an authorization policy (at a.yaml:7)"),
        "{errs:?}"
    );
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n  - name: p\n    service: web\n",
    ));
    assert!(
        e.starts_with("p.yaml:9: authorization[1].name: duplicate authorization policy \"p\""),
        "{e}"
    );
}

#[test]
fn rule_references_must_exist() {
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n    rules:\n      - name: r\n        from:\n          services: [web, wbe]\n",
    ));
    assert_eq!(
        e,
        "p.yaml:12: authorization[0].rules[0].from.services[1]: unknown service \"wbe\""
    );
}

#[test]
fn identities_must_be_spiffe_ids() {
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n    rules:\n      - name: r\n        from:\n          identities:\n            - \"cluster.local/ns/x/sa/y\"\n",
    ));
    assert_eq!(
        e,
        "p.yaml:13: authorization[0].rules[0].from.identities[0]: \"cluster.local/ns/x/sa/y\" is not a SPIFFE ID: must start with spiffe://"
    );
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n    rules:\n      - name: r\n        from: {identities: [\"spiffe://td/*/sa/x\"]}\n",
    ));
    assert!(e.contains("'*' is only allowed at the end"), "{e}");
}

#[test]
fn rule_targets_are_checked() {
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n    rules:\n      - name: r\n        to:\n          paths: [{prefix: api}]\n",
    ));
    assert!(
        e.starts_with(
            "p.yaml:12: authorization[0].rules[0].to.paths[0].prefix: \"api\" must start with '/'"
        ),
        "{e}"
    );
    let e = one_error(&with_authz(
        "  - name: p\n    service: db\n    rules:\n      - name: r\n        to: {methods: [GET]}\n",
    ));
    assert!(
        e.contains("rules[0].to: methods and paths apply to HTTP only"),
        "{e}"
    );
    let e = one_error(&with_authz(
        "  - name: p\n    service: api\n    default: block\n",
    ));
    assert!(e.contains("unknown variant `block`"), "{e}");
}

#[test]
fn request_hygiene_defaults_and_overrides() {
    let set = files(&[("p.yaml", SERVICES)]).unwrap();
    assert_eq!(set.mesh().http, HttpHygiene::default());
    assert!(set.mesh().http.merge_slashes);
    let set = files(&[(
        "p.yaml",
        &format!(
            "mesh:\n  http: {{escaped_slashes: redirect, merge_slashes: false, headers_with_underscores: allow}}\n{SERVICES}"
        ),
    )])
    .unwrap();
    let h = set.mesh().http;
    assert_eq!(h.escaped_slashes, EscapedSlashesAction::Redirect);
    assert!(!h.merge_slashes);
    assert_eq!(h.headers_with_underscores, UnderscoreAction::Allow);
    let e = one_error(&format!(
        "mesh:\n  http: {{escaped_slashes: decode}}\n{SERVICES}"
    ));
    assert!(e.contains("escaped_slashes"), "{e}");
}

#[test]
fn path_matches_that_can_never_match_are_refused() {
    for (path, why) in [
        ("/public/../admin", "'..'"),
        ("/a/./b", "'.'"),
        ("/a//b", "'//'"),
        ("/a?x=1", "'?'"),
    ] {
        let e = one_error(&with_authz(&format!(
            "  - name: p\n    service: api\n    rules:\n      - name: r\n        to: {{paths: [{{prefix: \"{path}\"}}]}}\n"
        )));
        assert!(e.contains("prefix") && e.contains(why), "{path}: {e}");
    }
    // A trailing slash is a normal path.
    files(&[(
        "p.yaml",
        &with_authz("  - name: p\n    service: api\n    rules:\n      - name: r\n        to: {paths: [{prefix: /public/}]}\n"),
    )])
    .unwrap();
}
