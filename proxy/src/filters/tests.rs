//! The filters of a route end to end, without sockets: compile, decide, apply.

use super::*;
use crate::cluster::test_cluster;
use bytes::Bytes;
use http_body_util::Empty;

fn empty() -> Empty<Bytes> {
    Empty::new()
}

fn clusters() -> HashMap<Arc<str>, Arc<Cluster>> {
    ["a", "shadow"]
        .iter()
        .map(|n| (Arc::from(*n), test_cluster(n)))
        .collect()
}

fn build(
    f: &v1::RouteFilters,
    prefix: Option<&str>,
    dests: bool,
) -> Result<Option<RouteFilters>, FilterErrors> {
    let route: Arc<str> = "r1".into();
    let clusters = clusters();
    let metrics = Metrics::new().unwrap();
    RouteFilters::build(
        f,
        &BuildContext {
            route: &route,
            matched_prefix: prefix,
            has_destinations: dests,
            clusters: &clusters,
            metrics: &metrics,
            direction: "outbound",
        },
    )
}

fn opt(name: &str, value: &str) -> v1::HeaderValueOption {
    v1::HeaderValueOption {
        name: name.into(),
        value: value.into(),
    }
}

#[test]
fn empty_filters_compile_to_nothing() {
    assert!(build(&v1::RouteFilters::default(), None, true)
        .unwrap()
        .is_none());
}

#[test]
fn forwarded_request_is_mutated_then_rewritten_and_response_mutated() {
    let f = build(
        &v1::RouteFilters {
            request_headers: Some(v1::HeaderMutation {
                set: vec![opt("x-id", "${request_id}"), opt("x-route", "${route}")],
                add: vec![opt("x-peer", "[${peer_identity}]")],
                remove: vec!["x-secret".into()],
            }),
            response_headers: Some(v1::HeaderMutation {
                add: vec![opt("x-answered-id", "${request_id}")],
                remove: vec!["server".into()],
                ..Default::default()
            }),
            rewrite_path_prefix: "/v2".into(),
            rewrite_host: "backend.internal".into(),
            ..Default::default()
        },
        Some("/api"),
        true,
    )
    .unwrap()
    .unwrap();
    let f = Arc::new(f);
    let mut req = Request::builder()
        .uri("/api/items?q=1")
        .header("host", "api")
        .header("x-secret", "s")
        .body(empty())
        .unwrap();
    let Decision::Forward(fwd) = f.decide(&req, Some("spiffe://td/ns/default/sa/web"), "a") else {
        panic!("a route with destinations forwards");
    };
    assert!(fwd.delay().is_none());
    assert!(fwd.before_forward(&mut req).is_none());
    let h = req.headers();
    // No x-request-id came in: a new one is generated, forwarded and used by the variables.
    let id = h["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(h["x-id"], id.as_str());
    assert_eq!(h["x-route"], "r1");
    assert_eq!(h["x-peer"], "[spiffe://td/ns/default/sa/web]");
    assert!(!h.contains_key("x-secret"));
    assert_eq!(req.uri(), "/v2/items?q=1");
    assert_eq!(h["host"], "backend.internal");
    let mut resp = Response::builder()
        .header("server", "app")
        .body(())
        .unwrap();
    fwd.after_forward(&mut resp);
    assert_eq!(resp.headers()["x-answered-id"], id.as_str());
    assert!(!resp.headers().contains_key("server"));

    // A request that has an id keeps it.
    let mut req = Request::builder()
        .uri("/api")
        .header("x-request-id", "given")
        .body(empty())
        .unwrap();
    let Decision::Forward(fwd) = f.decide(&req, None, "a") else {
        panic!("forwards");
    };
    fwd.before_forward(&mut req);
    assert_eq!(req.headers()["x-request-id"], "given");
    assert_eq!(req.headers()["x-id"], "given");
    assert_eq!(req.headers()["x-peer"], "[]");
    assert_eq!(req.uri(), "/v2");
}

#[test]
fn terminal_routes_answer_with_response_headers() {
    let f = build(
        &v1::RouteFilters {
            direct_response: Some(v1::DirectResponse {
                status: 418,
                body: "teapot".into(),
                content_type: String::new(),
            }),
            response_headers: Some(v1::HeaderMutation {
                set: vec![opt("x-route", "${route}")],
                ..Default::default()
            }),
            ..Default::default()
        },
        None,
        false,
    )
    .unwrap()
    .unwrap();
    assert!(f.is_terminal());
    assert!(f.answer_metrics().is_some());
    let f = Arc::new(f);
    let req = Request::builder().uri("/").body(()).unwrap();
    let Decision::Answer(a) = f.decide(&req, None, "") else {
        panic!("a direct response answers");
    };
    assert_eq!(a.response.status(), 418);
    assert_eq!(a.response.headers()["x-route"], "r1");
}

#[test]
fn fault_abort_comes_before_the_route_answer() {
    let f = build(
        &v1::RouteFilters {
            redirect: Some(v1::Redirect {
                path: "/new".into(),
                status: 301,
                ..Default::default()
            }),
            fault: Some(v1::Fault {
                abort_http_status: 503,
                abort_ppm: PPM_ALL,
                ..Default::default()
            }),
            ..Default::default()
        },
        None,
        false,
    )
    .unwrap()
    .unwrap();
    let f = Arc::new(f);
    let req = Request::builder()
        .uri("/old")
        .header("host", "api")
        .body(())
        .unwrap();
    let Decision::Answer(a) = f.decide(&req, None, "") else {
        panic!("answers");
    };
    assert_eq!(a.response.status(), 503);
    assert_eq!(a.response.headers()["x-weft-error"], "fault-abort");
}

#[test]
fn build_errors_name_fields() {
    let errors = build(
        &v1::RouteFilters {
            redirect: Some(v1::Redirect::default()),
            direct_response: Some(v1::DirectResponse {
                status: 200,
                ..Default::default()
            }),
            mirror: Some(v1::Mirror {
                cluster: "nope".into(),
                ppm: 1,
                max_body_bytes: 0,
            }),
            ..Default::default()
        },
        None,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("redirect: at most one of redirect, direct_response"),
        "{errors}"
    );
    assert!(
        errors.contains("mirror.cluster: unknown cluster \"nope\""),
        "{errors}"
    );
}

#[test]
fn request_ids_look_like_uuids() {
    let a = new_request_id();
    let b = new_request_id();
    assert_ne!(a, b);
    let s = a.to_str().unwrap();
    let groups: Vec<usize> = s.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
    assert_eq!(&s[14..15], "4", "{s}");
}

#[test]
fn draws_are_exact_at_the_ends() {
    assert!(!draw(0));
    assert!(draw(PPM_ALL));
    assert!(draw(u32::MAX));
}
