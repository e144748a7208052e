//! Reusing the parse of unchanged files (`PolicySet::from_files_reusing`), and what the
//! `Value` parse before the typed one rejects.

use std::sync::Arc;

use super::*;

fn file(name: &str, content: &str) -> SourceFile {
    SourceFile {
        name: name.to_owned(),
        content: content.to_owned(),
    }
}

const A: &str = "\
services:
  - name: web
    dependencies: [backend]
routes:
  - name: to-backend
    service: backend
    destinations: [{service: backend}]
";

const B: &str = "\
services:
  - name: backend
    endpoints: [{address: 127.0.0.1:9001}]
";

const B_CHANGED: &str = "\
services:
  - name: backend
    endpoints: [{address: 127.0.0.1:9002}, {address: 127.0.0.1:9003}]
  - name: cache
";

const C: &str = "\
mesh:
  trust_domain: example.org
";

fn set(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files.iter().map(|(n, c)| file(n, c)).collect()
}

/// `build` with a previous set, checked against a plain `from_files` of the same files.
fn rebuild(files: &[(&str, &str)], previous: &PolicySet) -> (PolicySet, Vec<bool>) {
    let built = assemble::build(set(files), Some(previous)).unwrap();
    assert_eq!(built.set, PolicySet::from_files(set(files)).unwrap());
    (built.set, built.parsed)
}

fn messages(r: Result<PolicySet, PolicyErrors>) -> Vec<String> {
    r.map(|_| ()).unwrap_err().messages()
}

#[test]
fn only_new_or_changed_files_are_parsed() {
    let first = assemble::build(set(&[("a.yaml", A), ("b.yaml", B), ("c.yaml", C)]), None).unwrap();
    assert_eq!(first.parsed, [true, true, true]);
    let previous = first.set;

    // Unchanged: nothing parsed, the same set.
    let (same, parsed) = rebuild(&[("c.yaml", C), ("a.yaml", A), ("b.yaml", B)], &previous);
    assert_eq!(parsed, [false, false, false]);
    assert_eq!(same, previous);

    // b changed: only b parsed; a's and c's declarations (the mesh too) come from `previous`.
    let (next, parsed) = rebuild(
        &[("a.yaml", A), ("b.yaml", B_CHANGED), ("c.yaml", C)],
        &previous,
    );
    assert_eq!(parsed, [false, true, false]);
    assert_ne!(next.version(), previous.version());
    let names: Vec<&str> = next.services().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "backend", "cache"]);
    assert_eq!(next.services()[1].endpoints.len(), 2);
    assert_eq!(next.routes().len(), 1);
    assert_eq!(next.mesh().trust_domain.as_deref(), Some("example.org"));

    // A renamed file is a new file, parsed even though its content is known.
    let (_, parsed) = rebuild(&[("a.yaml", A), ("b2.yaml", B), ("c.yaml", C)], &previous);
    assert_eq!(parsed, [false, true, false]);
}

#[test]
fn a_removed_file_drops_its_parse() {
    let previous =
        PolicySet::from_files(set(&[("a.yaml", A), ("b.yaml", B), ("c.yaml", C)])).unwrap();
    let (without_mesh, parsed) = rebuild(&[("a.yaml", A), ("b.yaml", B)], &previous);
    assert_eq!(parsed, [false, false]);
    assert_eq!(without_mesh.files().len(), 2);
    assert_eq!(without_mesh.parts.len(), 2);
    assert_eq!(without_mesh.mesh(), &Mesh::default());
    assert_eq!(without_mesh.services().len(), 2);

    // Gone from the set means gone from the reuse: adding it back parses it again.
    let (again, parsed) = rebuild(
        &[("a.yaml", A), ("b.yaml", B), ("c.yaml", C)],
        &without_mesh,
    );
    assert_eq!(parsed, [false, false, true]);
    assert_eq!(again, previous);

    // Removing the file a's references need is an error of a, as without reuse.
    let files = [("a.yaml", A), ("c.yaml", C)];
    let reused = messages(PolicySet::from_files_reusing(set(&files), &previous));
    assert_eq!(reused, messages(PolicySet::from_files(set(&files))));
    assert_eq!(
        reused,
        [
            "a.yaml:3: services[0].dependencies[0]: unknown service \"backend\"",
            "a.yaml:6: routes[0].service: unknown service \"backend\"",
            "a.yaml:7: routes[0].destinations[0].service: unknown service \"backend\"",
        ]
    );
}

#[test]
fn errors_of_a_changed_file_are_those_of_a_full_parse() {
    let previous =
        PolicySet::from_files(set(&[("a.yaml", A), ("b.yaml", B), ("c.yaml", C)])).unwrap();
    let cases: [(&str, &str); 4] = [
        // Schema error: file, line, field.
        (
            "services:\n  - name: backend\n    protcol: http\n",
            "b.yaml:3: services[0]: unknown field `protcol`",
        ),
        // A duplicate key in a map-typed field (caught by the `Value` parse).
        (
            "services:\n  - name: backend\nroutes:\n  - name: r\n    service: backend\n    destinations:\n      - service: backend\n        subset: {v: a, v: b}\n",
            "b.yaml:8: routes[0].destinations[0].subset: duplicate entry with key \"v\"",
        ),
        // A cross-file rule: a second mesh.
        (
            "services:\n  - name: backend\nmesh:\n  trust_domain: other.org\n",
            "c.yaml:1: mesh: only one file may define mesh (first defined at b.yaml:3)",
        ),
        // A duplicate across files.
        (
            "services:\n  - name: backend\n  - name: web\n",
            "b.yaml:3: services[1].name: duplicate service \"web.default\" (first defined at a.yaml:2)",
        ),
    ];
    for (content, expected) in cases {
        let files = [("a.yaml", A), ("b.yaml", content), ("c.yaml", C)];
        let reused = messages(PolicySet::from_files_reusing(set(&files), &previous));
        assert_eq!(
            reused,
            messages(PolicySet::from_files(set(&files))),
            "{content}"
        );
        assert!(
            reused.iter().any(|m| m.starts_with(expected)),
            "{expected:?} not in {reused:#?}"
        );
    }
    // The set in force is untouched by a rejected change.
    assert_eq!(previous.services().len(), 2);
}

#[tokio::test]
async fn the_blocking_variant_reuses_the_set_in_force() {
    let previous = Arc::new(
        PolicySet::from_files_blocking(set(&[("a.yaml", A), ("b.yaml", B)]))
            .await
            .unwrap(),
    );
    let files = set(&[("a.yaml", A), ("b.yaml", B_CHANGED), ("c.yaml", C)]);
    let next = PolicySet::from_files_reusing_blocking(files.clone(), previous.clone())
        .await
        .unwrap();
    assert_eq!(next, PolicySet::from_files(files).unwrap());
    let broken = set(&[("a.yaml", A)]);
    let e = PolicySet::from_files_reusing_blocking(broken, previous)
        .await
        .unwrap_err();
    assert_eq!(e.0.len(), 3, "{e}");
}

/// The `Value` parse before the typed one is what rejects these: the typed parse alone would
/// keep the last of two equal keys of a map-typed field and take `!!int abc` as a string.
#[test]
fn duplicate_map_keys_and_ill_tagged_scalars_are_rejected() {
    let route = |extra: &str| {
        format!("services:\n  - name: a\nroutes:\n  - name: r\n    service: a\n    destinations: [{{service: a}}]\n{extra}")
    };
    for dup in [
        route("    filters:\n      request_headers:\n        add: {x-a: '1', x-a: '2'}\n"),
        route("    filters:\n      response_headers:\n        set: {x-a: '1', x-a: '2'}\n"),
        "mesh:\n  namespaces:\n    shop: {default_authorization: deny}\n    shop: {default_authorization: allow}\n".to_owned(),
        "services:\n  - name: a\nroutes:\n  - name: r\n    service: a\n    destinations:\n      - {service: a, subset: {v: x, v: y}}\n".to_owned(),
    ] {
        let e = parse_file(&file("p.yaml", &dup)).unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:") && e.contains("duplicate entry with key"), "{e}");
    }
    let tagged = parse_file(&file("p.yaml", "services:\n  - name: !!int abc\n"));
    assert!(tagged.is_err(), "{tagged:?}");
    for empty in ["", "# only a comment\n", "---\n", "~\n"] {
        assert_eq!(
            parse_file(&file("p.yaml", empty)),
            Ok(PolicyFile::default()),
            "{empty:?}"
        );
    }
}
