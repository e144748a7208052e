use std::collections::HashSet;

use weft_spiffe::{SpiffeError, SpiffeId};

fn parse(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

fn err(s: &str) -> SpiffeError {
    match SpiffeId::parse(s) {
        Ok(id) => panic!("{s:?} should be rejected, got {id:?}"),
        Err(e) => e,
    }
}

#[test]
fn valid_ids() {
    let id = parse("spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(id.trust_domain(), "cluster.local");
    assert_eq!(id.path(), "/ns/default/sa/web");
    assert_eq!(id.namespace(), Some("default"));
    assert_eq!(id.workload(), Some(("default", "web")));

    let id = parse("spiffe://example.org/a/B-c_d.e");
    assert_eq!(id.trust_domain(), "example.org");
    assert_eq!(id.path(), "/a/B-c_d.e");
    assert_eq!(id.namespace(), None);
    assert_eq!(id.workload(), None);

    let id = parse("spiffe://a/b");
    assert_eq!(id.trust_domain(), "a");
    assert_eq!(id.path(), "/b");

    let id = parse("spiffe://my_trust-domain.example-1/x");
    assert_eq!(id.trust_domain(), "my_trust-domain.example-1");

    // Dots inside a segment are fine; only whole "." / ".." segments are not.
    parse("spiffe://td/.../a..b/.x");
}

#[test]
fn limits_are_inclusive() {
    let td = "a".repeat(255);
    let id = parse(&format!("spiffe://{td}/x"));
    assert_eq!(id.trust_domain(), td);

    let prefix = "spiffe://td/";
    let max = format!("{prefix}{}", "p".repeat(2048 - prefix.len()));
    assert_eq!(max.len(), 2048);
    parse(&max);
}

#[test]
fn display_fromstr_and_traits() {
    let s = "spiffe://cluster.local/ns/default/sa/web";
    let id: SpiffeId = s.parse().unwrap();
    assert_eq!(id.to_string(), s);
    assert_eq!(id, parse(s));
    assert_eq!(SpiffeId::try_from(s.to_owned()).unwrap(), id);
    assert_eq!(id.as_ref(), s);
    assert_eq!(format!("{id:?}"), format!("SpiffeId({s:?})"));

    let mut set = HashSet::new();
    set.insert(id);
    assert!(set.contains(&parse(s)));
    assert!(!set.contains(&parse("spiffe://cluster.local/ns/default/sa/Web")));

    assert!(matches!(
        "spiffe://td".parse::<SpiffeId>(),
        Err(SpiffeError::MissingPath { .. })
    ));
}

macro_rules! rejects {
    ($($name:ident: $input:expr => $pat:pat,)*) => {$(
        #[test]
        fn $name() {
            let input: String = $input;
            let e = err(&input);
            assert!(matches!(e, $pat), "{input:?}: unexpected error {e:?}");
        }
    )*};
}

rejects! {
    uppercase_trust_domain: "spiffe://Cluster.local/ns/a/sa/b".into()
        => SpiffeError::BadTrustDomainChar { ch: 'C', .. },
    uppercase_scheme: "SPIFFE://x/y".into() => SpiffeError::WrongScheme { .. },
    other_scheme: "https://td/x".into() => SpiffeError::WrongScheme { .. },
    single_slash_scheme: "spiffe:/td/x".into() => SpiffeError::WrongScheme { .. },
    empty_string: String::new() => SpiffeError::WrongScheme { .. },
    scheme_only: "spiffe://".into() => SpiffeError::EmptyTrustDomain { .. },
    trust_domain_id: "spiffe://td".into() => SpiffeError::MissingPath { .. },
    root_path: "spiffe://td/".into() => SpiffeError::TrailingSlash { .. },
    empty_trust_domain_with_path: "spiffe:///ns/a".into() => SpiffeError::EmptyTrustDomain { .. },
    userinfo: "spiffe://u@d/x".into() => SpiffeError::BadTrustDomainChar { ch: '@', .. },
    port: "spiffe://td:8080/x".into() => SpiffeError::BadTrustDomainChar { ch: ':', .. },
    percent_in_trust_domain: "spiffe://t%64/x".into() => SpiffeError::BadTrustDomainChar { ch: '%', .. },
    empty_segment: "spiffe://td/a//b".into() => SpiffeError::EmptySegment { .. },
    dot_segment: "spiffe://td/a/./b".into() => SpiffeError::DotSegment { .. },
    dot_dot_segment: "spiffe://td/a/../b".into() => SpiffeError::DotSegment { .. },
    dot_dot_only: "spiffe://td/..".into() => SpiffeError::DotSegment { .. },
    trailing_slash: "spiffe://td/a/".into() => SpiffeError::TrailingSlash { .. },
    query: "spiffe://td/a?x=1".into() => SpiffeError::QueryOrFragment { .. },
    fragment: "spiffe://td/a#f".into() => SpiffeError::QueryOrFragment { .. },
    query_in_trust_domain: "spiffe://td?x/a".into() => SpiffeError::QueryOrFragment { .. },
    percent_encoding: "spiffe://td/a%2Fb".into() => SpiffeError::BadPathChar { ch: '%', .. },
    space: "spiffe://td/a b".into() => SpiffeError::BadPathChar { ch: ' ', .. },
    non_ascii: "spiffe://td/ü".into() => SpiffeError::BadPathChar { ch: 'ü', .. },
    id_of_2049_bytes: {
        let prefix = "spiffe://td/";
        let s = format!("{prefix}{}", "p".repeat(2049 - prefix.len()));
        assert_eq!(s.len(), 2049);
        s
    } => SpiffeError::TooLong { len: 2049, .. },
    trust_domain_of_256_bytes: format!("spiffe://{}/x", "a".repeat(256))
        => SpiffeError::TrustDomainTooLong { len: 256, .. },
}

#[test]
fn error_messages_name_input_and_rule() {
    let e = err("spiffe://Example.org/x");
    assert_eq!(
        e.to_string(),
        "\"spiffe://Example.org/x\": trust domain contains an uppercase letter or a character \
         other than a-z 0-9 . - _ (found 'E')"
    );
    assert_eq!(
        err("spiffe://td/a//b").to_string(),
        "\"spiffe://td/a//b\": path contains an empty segment (\"//\")"
    );
    // Control characters from untrusted input must come out escaped.
    let msg = err("spiffe://td/a\nb").to_string();
    assert!(msg.contains("\\n") && !msg.contains('\n'), "{msg}");
}

#[test]
fn too_long_error_keeps_only_an_excerpt() {
    let long = format!("spiffe://td/{}", "p".repeat(1_000_000));
    match err(&long) {
        SpiffeError::TooLong { input, len } => {
            assert_eq!(len, long.len());
            assert!(input.len() <= 64 && long.starts_with(&input));
        }
        e => panic!("unexpected {e:?}"),
    }
    assert!(err(&long).to_string().len() < 200);
}

#[test]
fn workload_only_for_exact_ns_sa_paths() {
    assert_eq!(parse("spiffe://td/ns/a/sa/b").workload(), Some(("a", "b")));
    assert_eq!(parse("spiffe://td/ns/a/sa/b/c").workload(), None);
    assert_eq!(parse("spiffe://td/ns/a").workload(), None);
    assert_eq!(parse("spiffe://td/x/a/sa/b").workload(), None);
    assert_eq!(parse("spiffe://td/ns/a/xa/b").workload(), None);
}

#[test]
fn namespace_needs_ns_prefix_and_a_second_segment() {
    assert_eq!(parse("spiffe://td/ns/a").namespace(), Some("a"));
    assert_eq!(parse("spiffe://td/ns/a/sa/b/c").namespace(), Some("a"));
    assert_eq!(parse("spiffe://td/ns").namespace(), None);
    assert_eq!(parse("spiffe://td/x/a").namespace(), None);
    assert_eq!(parse("spiffe://td/NS/a").namespace(), None);
}

#[test]
fn workload_id_builds_and_validates() {
    let id = SpiffeId::workload_id("cluster.local", "default", "web").unwrap();
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(id.workload(), Some(("default", "web")));

    let e = |r: Result<SpiffeId, SpiffeError>| r.unwrap_err();
    assert!(matches!(
        e(SpiffeId::workload_id("Cluster.local", "a", "b")),
        SpiffeError::BadTrustDomainChar { .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("", "a", "b")),
        SpiffeError::EmptyTrustDomain { .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td", "", "b")),
        SpiffeError::EmptySegment { .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td", "a", "")),
        SpiffeError::TrailingSlash { .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td", "..", "b")),
        SpiffeError::DotSegment { .. }
    ));
    // Each of these would otherwise assemble into a valid but different ID.
    assert!(matches!(
        e(SpiffeId::workload_id("td", "a/sa/admin/ns", "b")),
        SpiffeError::BadPathChar { ch: '/', .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td", "a", "b/c")),
        SpiffeError::BadPathChar { ch: '/', .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td/ns/x/sa/y/z", "a", "b")),
        SpiffeError::BadTrustDomainChar { ch: '/', .. }
    ));
    assert!(matches!(
        e(SpiffeId::workload_id("td", "a", &"b".repeat(2048))),
        SpiffeError::TooLong { .. }
    ));
}
