//! Compilation of the zero-trust resources: mTLS modes, endpoint identities, the scoped
//! authorization policy (explicit, namespace default, synthetic deny) and the trust set.

use std::time::{Duration, SystemTime};

use weft_proto::v1::{path_match, AuthorizationPolicy, AuthzAction, AuthzRule, PathMatch};

use super::*;
use crate::policy::SourceFile;

const MESH: &str = "\
mesh:
  mtls: permissive
  namespaces:
    demo: {default_authorization: deny}
services:
  - name: web
  - {name: api, mtls: strict}
  - {name: plain, mtls: disabled, endpoints: [{address: \"10.0.0.9:80\"}]}
  - {name: job, namespace: batch}
  - {name: shop, namespace: demo}
  - {name: cart, namespace: demo}
authorization:
  - name: api-callers
    service: api
    default: deny
    rules:
      - name: web-may-read
        from:
          services: [web, job.batch]
          identities: [\"spiffe://cluster.local/ns/batch/sa/*\"]
          namespaces: [default, batch]
        to:
          methods: [get]
          paths: [{prefix: /}]
      - name: anyone-healthz
        to: {paths: [{exact: /healthz}]}
  - name: cart-open
    service: cart.demo
";

fn policy(content: &str) -> PolicySet {
    PolicySet::from_files(vec![SourceFile {
        name: "p.yaml".into(),
        content: content.into(),
    }])
    .unwrap()
}

fn node(service: &str, namespace: &str) -> Node {
    Node {
        id: format!("{service}-1"),
        service: service.into(),
        namespace: namespace.into(),
        inbound_address: "127.0.0.2:15006".into(),
        outbound_address: "127.0.0.2:15001".into(),
        app_address: "127.0.0.2:8080".into(),
        ..Node::default()
    }
}

fn build(service: &str, namespace: &str) -> Resources {
    compile(
        &policy(MESH),
        &Registry::new(Duration::from_secs(5)),
        &TrustBundle::default(),
        &node(service, namespace),
    )
}

fn inbound(r: &Resources) -> &Listener {
    r.listeners
        .listeners
        .iter()
        .find(|l| l.name == INBOUND)
        .unwrap()
}

#[test]
fn mtls_modes_follow_service_then_mesh() {
    let r = build("web", "default");
    let mode = |name: &str| {
        r.clusters
            .clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .mtls
    };
    assert_eq!(mode("api.default"), MtlsMode::Strict as i32);
    assert_eq!(mode("plain.default"), MtlsMode::Disabled as i32);
    assert_eq!(mode("web.default"), MtlsMode::Permissive as i32);
    assert_eq!(inbound(&r).mtls, MtlsMode::Permissive as i32);
    assert_eq!(
        inbound(&build("api", "default")).mtls,
        MtlsMode::Strict as i32
    );
}

#[test]
fn sidecar_endpoints_carry_their_spiffe_id_static_ones_none() {
    let p = policy(MESH);
    let mut reg = Registry::new(Duration::from_secs(5));
    let mut n = node("plain", "default");
    n.inbound_address = "127.0.0.5:15006".into();
    reg.register(n, SystemTime::now());
    let mut n = node("job", "batch");
    n.inbound_address = "127.0.0.6:15006".into();
    reg.register(n, SystemTime::now());
    let r = compile(&p, &reg, &TrustBundle::default(), &node("web", "default"));
    let of = |cluster: &str| {
        r.endpoints
            .clusters
            .iter()
            .find(|c| c.cluster == cluster)
            .unwrap()
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.identity.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of("plain.default"),
        [
            ("10.0.0.9:80".to_owned(), String::new()),
            (
                "127.0.0.5:15006".to_owned(),
                "spiffe://cluster.local/ns/default/sa/plain".to_owned()
            ),
        ]
    );
    assert_eq!(
        of("job.batch")[0].1,
        "spiffe://cluster.local/ns/batch/sa/job"
    );
    assert_eq!(of("inbound")[0].1, "", "the local app is plaintext");
}

#[test]
fn a_proxy_receives_only_its_own_services_policy() {
    let r = build("api", "default");
    assert_eq!(inbound(&r).authorization, "api-callers");
    assert_eq!(
        r.policies.policies,
        [AuthorizationPolicy {
            name: "api-callers".into(),
            default_action: AuthzAction::Deny as i32,
            rules: vec![
                AuthzRule {
                    name: "web-may-read".into(),
                    identities: vec![
                        "spiffe://cluster.local/ns/default/sa/web".into(),
                        "spiffe://cluster.local/ns/batch/sa/job".into(),
                        "spiffe://cluster.local/ns/batch/sa/*".into(),
                    ],
                    namespaces: vec!["default".into(), "batch".into()],
                    methods: vec!["GET".into()],
                    paths: vec![PathMatch {
                        kind: Some(path_match::Kind::Prefix("/".into()))
                    }],
                },
                AuthzRule {
                    name: "anyone-healthz".into(),
                    paths: vec![PathMatch {
                        kind: Some(path_match::Kind::Exact("/healthz".into()))
                    }],
                    ..Default::default()
                },
            ],
        }]
    );
    // web has no policy and its namespace allows by default: nothing at all.
    let web = build("web", "default");
    assert!(web.policies.policies.is_empty());
    assert_eq!(inbound(&web).authorization, "");
}

#[test]
fn namespace_default_deny_resolves_and_synthesizes() {
    // cart.demo has a policy without `default`: the namespace default (deny) applies.
    let cart = build("cart", "demo");
    assert_eq!(cart.policies.policies.len(), 1);
    assert_eq!(cart.policies.policies[0].name, "cart-open");
    assert_eq!(
        cart.policies.policies[0].default_action,
        AuthzAction::Deny as i32
    );
    // shop.demo has none: a synthetic deny-all policy, referenced by its inbound listener.
    let shop = build("shop", "demo");
    assert_eq!(
        shop.policies.policies,
        [AuthorizationPolicy {
            name: "default-demo".into(),
            default_action: AuthzAction::Deny as i32,
            rules: vec![],
        }]
    );
    assert_eq!(inbound(&shop).authorization, "default-demo");
    // Without a namespace default, a policy's absent `default` is allow.
    let p = policy("services: [{name: a}]\nauthorization: [{name: p, service: a}]\n");
    let r = compile(
        &p,
        &Registry::new(Duration::from_secs(5)),
        &TrustBundle::default(),
        &node("a", "default"),
    );
    assert_eq!(
        r.policies.policies[0].default_action,
        AuthzAction::Allow as i32
    );
}

#[test]
fn trust_set_and_trust_domain() {
    let bundle = TrustBundle {
        trust_domain: "corp.example".into(),
        roots_pem: vec!["ROOT-A".into(), "ROOT-B".into()],
    };
    let mut reg = Registry::new(Duration::from_secs(5));
    let mut n = node("api", "default");
    n.inbound_address = "127.0.0.7:15006".into();
    reg.register(n, SystemTime::now());
    let r = compile(&policy(MESH), &reg, &bundle, &node("web", "default"));
    assert_eq!(r.trust.trust_domain, "corp.example");
    assert_eq!(r.trust.roots_pem, ["ROOT-A", "ROOT-B"]);
    let api = r
        .endpoints
        .clusters
        .iter()
        .find(|c| c.cluster == "api.default")
        .unwrap();
    assert_eq!(
        api.endpoints[0].identity,
        "spiffe://corp.example/ns/default/sa/api"
    );
    // mesh.trust_domain wins over the bundle's.
    let with_td = policy(&MESH.replace("  mtls: permissive\n", "  trust_domain: mesh.td\n"));
    let r2 = compile(&with_td, &reg, &bundle, &node("api", "default"));
    assert_eq!(r2.trust.trust_domain, "mesh.td");
    assert_eq!(
        r2.policies.policies[0].rules[0].identities[0],
        "spiffe://mesh.td/ns/default/sa/web"
    );
    // A root rotation changes only the trust version.
    let rotated = TrustBundle {
        roots_pem: vec!["ROOT-B".into()],
        ..bundle
    };
    let r3 = compile(&policy(MESH), &reg, &rotated, &node("web", "default"));
    assert_ne!(r.trust.version, r3.trust.version);
    for (t, v) in r.versions().into_iter().take(5) {
        assert!(r3.versions().contains(&(t, v)), "{t:?} changed");
    }
}

#[test]
fn policy_change_moves_only_the_guarded_proxys_policies_version() {
    let before_api = build("api", "default");
    let before_web = build("web", "default");
    let changed = policy(&MESH.replace("methods: [get]", "methods: [get, head]"));
    let reg = Registry::new(Duration::from_secs(5));
    let after_api = compile(
        &changed,
        &reg,
        &TrustBundle::default(),
        &node("api", "default"),
    );
    let after_web = compile(
        &changed,
        &reg,
        &TrustBundle::default(),
        &node("web", "default"),
    );
    assert_ne!(before_api.policies.version, after_api.policies.version);
    assert_eq!(before_api.listeners.version, after_api.listeners.version);
    assert_eq!(before_web.versions(), after_web.versions());
}
