//! Parsing and validation tests: every rule, with the line each error points at.

use super::*;

fn file(name: &str, content: &str) -> SourceFile {
    SourceFile {
        name: name.to_owned(),
        content: content.to_owned(),
    }
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let files = files.iter().map(|(n, c)| file(n, c)).collect();
    match PolicySet::from_files(files) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.messages(),
    }
}

fn one_error(content: &str) -> String {
    let errs = errors(&[("p.yaml", content)]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap_or_default()
}

const EXAMPLE: &str = "\
services:
  - name: web
    dependencies: [backend, db]
  - name: backend
    request_timeout: 2s
    endpoints:
      - address: 127.0.0.1:9001
  - name: backend-v2
    protocol: grpc
    request_timeout: 0s
  - name: db
    protocol: tcp
    port: 7000
    connect_timeout: 250ms
routes:
  - name: backend-canary
    service: backend
    hosts: [API.example.com]
    match:
      path: {prefix: /api}
      headers:
        - {name: x-canary, exact: \"true\"}
      methods: [GET, POST]
    destinations:
      - {service: backend-v2, weight: 90}
      - {service: backend, weight: 10}
    timeout: 2s
";

#[test]
fn parses_the_example_with_defaults() {
    let set = PolicySet::from_files(vec![file("a.yaml", EXAMPLE)]).unwrap();
    assert_eq!(set.services().len(), 4);
    let web = &set.services()[0];
    assert_eq!(web.namespace, "default");
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.connect_timeout, Duration::from_secs(1));
    assert_eq!(web.request_timeout, Duration::from_secs(15));
    let db = &set.services()[3];
    assert_eq!(db.connect_timeout, Duration::from_millis(250));
    assert_eq!(db.port, Some(7000));
    assert_eq!(set.services()[1].endpoints[0].weight, 1);
    assert_eq!(set.routes()[0].timeout, Some(Duration::from_secs(2)));
    assert_eq!(set.version().len(), 16);
}

#[test]
fn empty_and_comment_only_files_are_empty_sets() {
    let set =
        PolicySet::from_files(vec![file("a.yaml", ""), file("b.yaml", "# nothing\n")]).unwrap();
    assert!(set.services().is_empty());
}

#[test]
fn version_is_a_stable_content_hash() {
    let a = PolicySet::from_files(vec![file("a.yaml", EXAMPLE), file("b.yaml", "")]).unwrap();
    let b = PolicySet::from_files(vec![file("b.yaml", ""), file("a.yaml", EXAMPLE)]).unwrap();
    assert_eq!(a.version(), b.version(), "file order does not matter");
    let c = PolicySet::from_files(vec![file("a.yaml", EXAMPLE), file("c.yaml", "")]).unwrap();
    assert_ne!(a.version(), c.version(), "file names matter");
    // Pinned: versions must not change between releases/restarts for the same input.
    assert_eq!(PolicySet::empty().version(), "cbf29ce484222325");
}

#[test]
fn files_are_read_in_name_order() {
    let set = PolicySet::from_files(vec![
        file("b.yaml", "services: [{name: b}]"),
        file("a.yaml", "services: [{name: a}]"),
    ])
    .unwrap();
    let names: Vec<&str> = set.services().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn unknown_field_names_the_field_and_line() {
    let e = one_error("services:\n  - name: a\n    protcol: http\n");
    assert!(
        e.starts_with("p.yaml:3: services[0]: unknown field `protcol`"),
        "{e}"
    );
    let e = one_error("servics: []\n");
    assert!(
        e.starts_with("p.yaml:1: (file): unknown field `servics`"),
        "{e}"
    );
}

#[test]
fn syntax_and_type_errors_have_lines() {
    let e = one_error("services:\n  - name: a\n    port: [\n");
    assert!(e.starts_with("p.yaml:"), "{e}");
    let e = one_error("services:\n  - name: a\n    connect_timeout: soon\n");
    assert!(
        e.starts_with("p.yaml:3: services[0].connect_timeout: "),
        "{e}"
    );
    let e = one_error("services:\n  - name: a\n    protocol: udp\n");
    assert!(
        e.starts_with("p.yaml:3: services[0].protocol: unknown variant `udp`"),
        "{e}"
    );
}

#[test]
fn names_must_be_dns_labels() {
    let e = one_error("services:\n  - name: a\n  - name: Bad_Name\n");
    assert!(
        e.starts_with("p.yaml:3: services[1].name: \"Bad_Name\" must be a DNS label"),
        "{e}"
    );
    let e = one_error("services:\n  - name: a\n    namespace: -x\n");
    assert!(e.starts_with("p.yaml:3: services[0].namespace:"), "{e}");
    let e = one_error(
        "services: [{name: a}]\nroutes:\n  - name: R\n    service: a\n    destinations: [{service: a}]\n",
    );
    assert!(e.starts_with("p.yaml:3: routes[0].name:"), "{e}");
}

#[test]
fn duplicates_across_files() {
    let errs = errors(&[
        ("a.yaml", "services:\n  - name: a\n"),
        (
            "b.yaml",
            "# x\nservices:\n  - name: a\n    namespace: default\n",
        ),
    ]);
    assert_eq!(
        errs,
        ["b.yaml:3: services[0].name: duplicate service \"a.default\" (first defined at a.yaml:2)"]
    );
    // Same name in another namespace is a different service.
    PolicySet::from_files(vec![file(
        "a.yaml",
        "services:\n  - name: a\n  - name: a\n    namespace: other\n",
    )])
    .unwrap();
    let errs = errors(&[(
        "r.yaml",
        "services: [{name: a}]\nroutes:\n  - name: r\n    service: a\n    destinations: [{service: a}]\n  - name: r\n    service: a\n    destinations: [{service: a}]\n",
    )]);
    assert_eq!(
        errs,
        ["r.yaml:6: routes[1].name: duplicate route \"r\" (first defined at r.yaml:3)"]
    );
}

#[test]
fn dangling_references() {
    let e = one_error("services:\n  - name: web\n    dependencies:\n      - db\n");
    assert_eq!(
        e,
        "p.yaml:4: services[0].dependencies[0]: unknown service \"db\""
    );
    let errs = errors(&[(
        "routes.yaml",
        "services:\n  - name: payments\nroutes:\n  - name: r\n    service: paymnt\n    destinations:\n      - service: payments\n        weight: 50\n      - service: paymnts\n        weight: 50\n",
    )]);
    assert_eq!(
        errs,
        [
            "routes.yaml:5: routes[0].service: unknown service \"paymnt\"",
            "routes.yaml:9: routes[0].destinations[1].service: unknown service \"paymnts\"",
        ]
    );
}

#[test]
fn references_resolve_across_namespaces() {
    let set = PolicySet::from_files(vec![file(
        "a.yaml",
        "services:\n  - {name: a, namespace: x}\n  - {name: a, namespace: y}\n  - {name: b, namespace: x, dependencies: [a, a.y]}\n",
    )])
    .unwrap();
    assert_eq!(set.resolve("a", Some("x")), Some(ServiceKey::new("a", "x")));
    assert_eq!(set.resolve("a.y", None), Some(ServiceKey::new("a", "y")));
    assert_eq!(set.resolve("a", None), None, "ambiguous");
    let e = one_error(
        "services:\n  - {name: a, namespace: x}\n  - {name: a, namespace: y}\nroutes:\n  - name: r\n    service: a\n    destinations: [{service: a.x}]\n",
    );
    assert!(
        e.starts_with(
            "p.yaml:6: routes[0].service: service \"a\" exists in several namespaces (x, y)"
        ),
        "{e}"
    );
}

#[test]
fn tcp_services_need_a_port_and_no_routes() {
    let e = one_error("services:\n  - name: db\n    protocol: tcp\n");
    assert_eq!(
        e,
        "p.yaml:2: services[0].port: tcp services need a port (1..=65535)"
    );
    let e = one_error("services:\n  - name: db\n    protocol: tcp\n    port: 70000\n");
    assert_eq!(
        e,
        "p.yaml:4: services[0].port: port 70000 is out of range 1..=65535"
    );
    let e = one_error("services:\n  - name: db\n    protocol: tcp\n    port: 0\n");
    assert!(e.starts_with("p.yaml:4: services[0].port: port 0"), "{e}");
    let e = one_error("services:\n  - name: web\n    port: 80\n");
    assert_eq!(
        e,
        "p.yaml:3: services[0].port: port is only valid for tcp services"
    );
    let errs = errors(&[(
        "p.yaml",
        "services:\n  - {name: db, protocol: tcp, port: 5432}\nroutes:\n  - name: r\n    service: db\n    destinations:\n      - service: db\n",
    )]);
    assert_eq!(
        errs,
        [
            "p.yaml:5: routes[0].service: service \"db.default\" is tcp: tcp services can't have routes",
            "p.yaml:7: routes[0].destinations[0].service: service \"db.default\" is tcp and can't be a route destination",
        ]
    );
}

const TWO: &str = "services:\n  - name: a\n  - name: b\nroutes:\n  - name: r\n    service: a\n";

#[test]
fn weights_sum_to_100_with_several_destinations() {
    let e = one_error(&format!(
        "{TWO}    destinations:\n      - {{service: a, weight: 50}}\n      - {{service: b, weight: 40}}\n"
    ));
    assert_eq!(
        e,
        "p.yaml:7: routes[0].destinations: weights must sum to 100 (they sum to 90)"
    );
    let e = one_error(&format!(
        "{TWO}    destinations:\n      - {{service: a, weight: 50}}\n      - {{service: b}}\n"
    ));
    assert_eq!(
        e,
        "p.yaml:9: routes[0].destinations[1].weight: a weight is required when a route has several destinations"
    );
    // A single destination may omit its weight.
    PolicySet::from_files(vec![file(
        "p.yaml",
        &format!("{TWO}    destinations: [{{service: b}}]\n"),
    )])
    .unwrap();
    let e = one_error(&format!(
        "{TWO}    destinations: [{{service: b, weight: 30}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:7: routes[0].destinations[0].weight:"),
        "{e}"
    );
    let e = one_error(&format!("{TWO}    destinations: []\n"));
    assert_eq!(
        e,
        "p.yaml:7: routes[0].destinations: at least one destination is required (or a redirect / direct_response filter)"
    );
}

#[test]
fn path_matcher_needs_exactly_one_kind_and_valid_regex() {
    let e = one_error(&format!(
        "{TWO}    match:\n      path:\n        prefix: /a\n        exact: /b\n    destinations: [{{service: b}}]\n"
    ));
    assert_eq!(
        e,
        "p.yaml:8: routes[0].match.path: exactly one of exact, prefix, regex is required (2 given)"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      path: {{}}\n    destinations: [{{service: b}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:8: routes[0].match.path: exactly one"),
        "{e}"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      path:\n        regex: \"/a(\"\n    destinations: [{{service: b}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:9: routes[0].match.path.regex: invalid regex"),
        "{e}"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      path: {{prefix: api}}\n    destinations: [{{service: b}}]\n"
    ));
    assert_eq!(
        e,
        "p.yaml:8: routes[0].match.path.prefix: \"api\" must start with '/'"
    );
}

#[test]
fn header_matcher_needs_exactly_one_condition() {
    let e = one_error(&format!(
        "{TWO}    match:\n      headers:\n        - name: x-a\n          exact: b\n          present: true\n    destinations: [{{service: b}}]\n"
    ));
    assert_eq!(
        e,
        "p.yaml:9: routes[0].match.headers[0]: exactly one of exact, regex, present is required (2 given)"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      headers:\n        - {{name: x-a}}\n    destinations: [{{service: b}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:9: routes[0].match.headers[0]: exactly one"),
        "{e}"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      headers:\n        - name: x-a\n          regex: \"[\"\n    destinations: [{{service: b}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:10: routes[0].match.headers[0].regex: invalid regex"),
        "{e}"
    );
    let e = one_error(&format!(
        "{TWO}    match:\n      headers:\n        - {{name: \"bad header\", present: true}}\n    destinations: [{{service: b}}]\n"
    ));
    assert!(e.starts_with("p.yaml:9: routes[0].match.headers[0]"), "{e}");
    let e = one_error(&format!(
        "{TWO}    match:\n      methods: [GET, \"BAD METHOD\"]\n    destinations: [{{service: b}}]\n"
    ));
    assert!(
        e.starts_with("p.yaml:8: routes[0].match.methods[1]: \"BAD METHOD\""),
        "{e}"
    );
}

#[test]
fn endpoint_addresses_must_be_ip_port() {
    let e = one_error(
        "services:\n  - name: a\n    endpoints:\n      - address: 127.0.0.1:80\n      - address: localhost:80\n",
    );
    assert_eq!(
        e,
        "p.yaml:5: services[0].endpoints[1].address: \"localhost:80\" is not an ip:port address"
    );
    let e = one_error("services:\n  - name: a\n    endpoints:\n      - address: 127.0.0.1:0\n");
    assert_eq!(
        e,
        "p.yaml:4: services[0].endpoints[0].address: \"127.0.0.1:0\": port 0 is out of range 1..=65535"
    );
    let e = one_error("services:\n  - name: a\n    endpoints:\n      - address: \"[::1]:65536\"\n");
    assert_eq!(
        e,
        "p.yaml:4: services[0].endpoints[0].address: \"[::1]:65536\": port 65536 is out of range 1..=65535"
    );
}

const DUP: &str = "services:\n  - name: a\n  - name: b\nroutes:\n  - name: first\n    service: a\n    match:\n      path: {prefix: /api}\n      methods: [get, POST]\n    destinations: [{service: b}]\n";

#[test]
fn duplicate_route_matches_name_both_routes() {
    // Same service, same path, same methods (order and case differ), different hosts: the
    // second route can never win (hosts are service aliases shared by all its routes).
    let errs = errors(&[
        ("a.yaml", DUP),
        (
            "b.yaml",
            "routes:\n  - name: second\n    service: a.default\n    hosts: [x.example.com]\n    match:\n      methods: [POST, GET]\n      path:\n        prefix: /api\n    destinations: [{service: a}]\n",
        ),
    ]);
    assert_eq!(
        errs,
        ["b.yaml:5: routes[0].match: duplicate route: matches exactly the requests of route \"first\" (defined at a.yaml:5) for the same service, so it could never be selected"]
    );
    // Two match-less routes of one service: the error points at the second route.
    let e = one_error(
        "services: [{name: a}]\nroutes:\n  - name: r1\n    service: a\n    destinations: [{service: a}]\n  - name: r2\n    service: a\n    destinations: [{service: a}]\n",
    );
    assert!(
        e.starts_with("p.yaml:6: routes[1]: duplicate route: matches exactly the requests of route \"r1\" (defined at p.yaml:3)"),
        "{e}"
    );
}

#[test]
fn similar_routes_are_not_duplicates() {
    for second in [
        // Another service.
        "  - name: second\n    service: b\n    match:\n      path: {prefix: /api}\n      methods: [GET, POST]\n    destinations: [{service: b}]\n",
        // Another path kind.
        "  - name: second\n    service: a\n    match:\n      path: {exact: /api}\n      methods: [GET, POST]\n    destinations: [{service: b}]\n",
        // Another method set.
        "  - name: second\n    service: a\n    match:\n      path: {prefix: /api}\n      methods: [GET]\n    destinations: [{service: b}]\n",
        // An extra header condition.
        "  - name: second\n    service: a\n    match:\n      path: {prefix: /api}\n      methods: [GET, POST]\n      headers: [{name: x-canary, present: true}]\n    destinations: [{service: b}]\n",
    ] {
        PolicySet::from_files(vec![file("p.yaml", &format!("{DUP}{second}"))])
            .unwrap_or_else(|e| panic!("{second}: {e}"));
    }
}

#[test]
fn all_errors_are_reported_at_once() {
    let errs = errors(&[(
        "p.yaml",
        "services:\n  - name: A\n  - name: b\n    protocol: tcp\n",
    )]);
    assert_eq!(errs.len(), 2, "{errs:#?}");
}

#[test]
fn splits_serde_messages() {
    assert_eq!(
        split_serde_message("services[0]: invalid type: string \"x\" at line 3 column 5"),
        (
            "services[0]".to_owned(),
            "invalid type: string \"x\"".to_owned()
        )
    );
    assert_eq!(
        split_serde_message("missing field `name` at line 2 column 3"),
        ("(file)".to_owned(), "missing field `name`".to_owned())
    );
}
