//! Skipping the validation the set in force already passed (`validate_cache`): the result of
//! every apply, errors byte for byte, is that of a validation from scratch.

use super::*;

fn files(list: &[(&str, &str)]) -> Vec<SourceFile> {
    list.iter()
        .map(|(n, c)| SourceFile {
            name: (*n).to_owned(),
            content: (*c).to_owned(),
        })
        .collect()
}

/// Builds `list` on top of `previous` and from scratch; both must give the same set or the same
/// errors. Returns the set (if valid), the errors' messages and which files were validated.
fn step(
    list: &[(&str, &str)],
    previous: &PolicySet,
) -> (Option<PolicySet>, Vec<String>, Option<Vec<bool>>) {
    let scratch = assemble::build(files(list), None);
    let reusing = assemble::build(files(list), Some(previous));
    match (scratch, reusing) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.set, b.set);
            assert_eq!(a.set.version(), b.set.version());
            // The version is the hash of every file from scratch (`version::versions` resumes).
            assert_eq!(b.set.version(), version_of(&files(list)));
            assert!(a.validated.iter().all(|v| *v), "from scratch validates all");
            (Some(b.set), Vec::new(), Some(b.validated))
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.messages(), b.messages());
            assert_eq!(a.to_string(), b.to_string());
            (None, b.messages(), None)
        }
        (a, b) => panic!(
            "from scratch {:?}, reusing {:?}",
            a.map(|_| ()).map_err(|e| e.messages()),
            b.map(|_| ()).map_err(|e| e.messages())
        ),
    }
}

const SERVICES: &str = "\
services:
  - name: web
    dependencies: [backend]
  - name: backend
    endpoints: [{address: 127.0.0.1:9001}]
  - name: db
    protocol: tcp
    port: 5432
    endpoints: [{address: 127.0.0.1:5432}]
";

const SERVICES_ENDPOINT: &str = "\
services:
  - name: web
    dependencies: [backend]
  - name: backend
    endpoints: [{address: 127.0.0.1:9002}]
  - name: db
    protocol: tcp
    port: 5432
    endpoints: [{address: 127.0.0.1:5432}]
";

const ROUTES: &str = "\
routes:
  - name: to-backend
    service: backend
    match: {path: {prefix: /api}}
    destinations: [{service: backend}]
";

const AUTHZ: &str = "\
authorization:
  - name: backend-callers
    service: backend
    rules:
      - name: web
        from: {services: [web]}
";

const CHURN: &str = "\
services:
  - name: cache
    endpoints: [{address: 127.0.0.1:7001}]
";

const CHURN_ENDPOINT: &str = "\
services:
  - name: cache
    endpoints: [{address: 127.0.0.1:7002}, {address: 127.0.0.1:7003}]
";

fn base() -> PolicySet {
    PolicySet::from_files(files(&[
        ("00-services.yaml", SERVICES),
        ("10-routes.yaml", ROUTES),
        ("20-authz.yaml", AUTHZ),
        ("30-churn.yaml", CHURN),
    ]))
    .unwrap()
}

#[test]
fn an_endpoint_change_validates_only_its_file() {
    let previous = base();
    let (set, errors, validated) = step(
        &[
            ("00-services.yaml", SERVICES),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN_ENDPOINT),
        ],
        &previous,
    );
    assert!(errors.is_empty());
    // The cache hit: the three unchanged files were not validated again.
    assert_eq!(validated.unwrap(), [false, false, false, true]);
    let set = set.unwrap();

    // And again on top of that set (the cache is the set in force, whatever built it).
    let (_, _, validated) = step(
        &[
            ("00-services.yaml", SERVICES_ENDPOINT),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN_ENDPOINT),
        ],
        &set,
    );
    assert_eq!(validated.unwrap(), [true, false, false, false]);
}

#[test]
fn a_new_or_removed_service_validates_everything() {
    let previous = base();
    let with_extra = format!("{CHURN}  - name: extra\n");
    let (_, errors, validated) = step(
        &[
            ("00-services.yaml", SERVICES),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", &with_extra),
        ],
        &previous,
    );
    assert!(errors.is_empty());
    assert_eq!(validated.unwrap(), [true, true, true, true]);

    let (_, errors, validated) = step(
        &[
            ("00-services.yaml", SERVICES),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
        ],
        &previous,
    );
    assert!(errors.is_empty());
    assert_eq!(validated.unwrap(), [true, true, true]);
}

#[test]
fn a_change_in_one_file_reports_the_errors_it_causes_in_unchanged_files() {
    let previous = base();
    // backend removed: the unchanged routes, authorization and web's dependency break.
    let without_backend = "\
services:
  - name: web
    dependencies: [backend]
  - name: db
    protocol: tcp
    port: 5432
";
    let (set, errors, _) = step(
        &[
            ("00-services.yaml", without_backend),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN),
        ],
        &previous,
    );
    assert!(set.is_none());
    assert!(
        errors.iter().any(|e| e.starts_with("10-routes.yaml:3:")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("20-authz.yaml:3:")),
        "{errors:?}"
    );

    // backend becomes tcp (same names: only the protocol changes): the unchanged route breaks.
    let backend_tcp = SERVICES.replace(
        "  - name: backend\n",
        "  - name: backend\n    protocol: tcp\n    port: 9001\n",
    );
    let (set, errors, _) = step(
        &[
            ("00-services.yaml", &backend_tcp),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN),
        ],
        &previous,
    );
    assert!(set.is_none());
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("10-routes.yaml:3:") && e.contains("is tcp")),
        "{errors:?}"
    );
}

#[test]
fn cross_file_duplicates_against_unchanged_files_are_found() {
    let previous = base();
    // A new file repeats a service, a route (name, then match) and an authorization policy
    // that unchanged files declare.
    let cases = [
        "services:\n  - name: backend\n",
        "routes:\n  - name: to-backend\n    service: web\n    destinations: [{service: web}]\n",
        "routes:\n  - name: other\n    service: backend\n    match: {path: {prefix: /api}}\n    destinations: [{service: backend}]\n",
        "authorization:\n  - name: backend-callers\n    service: web\n",
        "authorization:\n  - name: second\n    service: backend\n",
        "routes:\n  - name: to-missing\n    service: backend\n    destinations: [{service: missing}]\n",
        "services:\n  - name: cache2\n    endpoints: [{address: 'nope'}]\n",
    ];
    for extra in cases {
        let (set, errors, _) = step(
            &[
                ("00-services.yaml", SERVICES),
                ("10-routes.yaml", ROUTES),
                ("20-authz.yaml", AUTHZ),
                ("30-churn.yaml", CHURN),
                ("40-extra.yaml", extra),
            ],
            &previous,
        );
        assert!(set.is_none(), "{extra}");
        assert!(
            errors.iter().any(|e| e.starts_with("40-extra.yaml:")),
            "{extra}: {errors:?}"
        );
    }
}

/// Several sequences of applies, each step compared with a build from scratch (`step`), each
/// built on the last valid set, as the control plane does.
#[test]
fn sequences_of_changes_match_validation_from_scratch() {
    let routes_missing = ROUTES.replace("[{service: backend}]", "[{service: nowhere}]");
    let routes_second = format!(
        "{ROUTES}  - name: to-web\n    service: web\n    destinations: [{{service: web}}]\n"
    );
    let authz_bad_rule = AUTHZ.replace("[web]", "[ghost]");
    let sequences: Vec<Vec<Vec<(&str, &str)>>> = vec![
        vec![
            // endpoint changes, then a route to a missing service, then fixed.
            vec![
                ("00-services.yaml", SERVICES),
                ("30-churn.yaml", CHURN_ENDPOINT),
            ],
            vec![
                ("00-services.yaml", SERVICES_ENDPOINT),
                ("30-churn.yaml", CHURN_ENDPOINT),
            ],
            vec![
                ("00-services.yaml", SERVICES_ENDPOINT),
                ("10-routes.yaml", &routes_missing),
                ("30-churn.yaml", CHURN_ENDPOINT),
            ],
            vec![
                ("00-services.yaml", SERVICES_ENDPOINT),
                ("10-routes.yaml", ROUTES),
                ("30-churn.yaml", CHURN),
            ],
        ],
        vec![
            // a route added, an authorization policy with a bad rule, a file removed.
            vec![
                ("00-services.yaml", SERVICES),
                ("10-routes.yaml", &routes_second),
                ("20-authz.yaml", AUTHZ),
            ],
            vec![
                ("00-services.yaml", SERVICES),
                ("10-routes.yaml", &routes_second),
                ("20-authz.yaml", &authz_bad_rule),
            ],
            vec![("00-services.yaml", SERVICES), ("20-authz.yaml", AUTHZ)],
            vec![("00-services.yaml", SERVICES)],
            // backend removed, web still depends on it: invalid.
            vec![(
                "00-services.yaml",
                "services:\n  - name: web\n    dependencies: [backend]\n",
            )],
        ],
        vec![
            // the route's service missing, then declared, then endpoint changes.
            vec![("30-churn.yaml", CHURN), ("10-routes.yaml", ROUTES)],
            vec![
                ("00-services.yaml", SERVICES),
                ("30-churn.yaml", CHURN),
                ("10-routes.yaml", ROUTES),
            ],
            vec![
                ("00-services.yaml", SERVICES_ENDPOINT),
                ("30-churn.yaml", CHURN_ENDPOINT),
                ("10-routes.yaml", ROUTES),
            ],
        ],
    ];
    let mut invalid = 0;
    for sequence in &sequences {
        let mut current = base();
        for list in sequence {
            let (set, errors, _) = step(list, &current);
            match set {
                Some(set) => current = set,
                None => {
                    assert!(!errors.is_empty());
                    invalid += 1;
                }
            }
        }
    }
    // Every sequence holds an invalid step (the comparison covers errors too).
    assert!(invalid >= 4, "{invalid}");
}

#[test]
fn the_index_is_shared_only_while_what_it_is_built_from_is_unchanged() {
    let previous = base();
    let (set, _, _) = step(
        &[
            ("00-services.yaml", SERVICES_ENDPOINT),
            ("10-routes.yaml", ROUTES),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN_ENDPOINT),
        ],
        &previous,
    );
    assert!(std::sync::Arc::ptr_eq(&previous.index, &set.unwrap().index));

    // A route now attached to another service: the index is built again (and `step` checked
    // it equals the one built from scratch).
    let routes_web = ROUTES.replace("service: backend\n    match", "service: web\n    match");
    let (set, errors, _) = step(
        &[
            ("00-services.yaml", SERVICES),
            ("10-routes.yaml", &routes_web),
            ("20-authz.yaml", AUTHZ),
            ("30-churn.yaml", CHURN),
        ],
        &previous,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let set = set.unwrap();
    assert!(!std::sync::Arc::ptr_eq(&previous.index, &set.index));
    assert_eq!(set.routes_of(&ServiceKey::new("web", "default")).count(), 1);
}
