//! Tests of the metric families and their series lifetimes.

use std::collections::HashSet;
use std::sync::Arc;

use super::peer::CONNECTION_SLOTS;
use super::request::{code_class, fast_slot, fast_slot_labels, request_labels, FAST_SLOTS};
use super::*;

#[test]
fn fast_slots_are_distinct_and_in_range() {
    let mut seen = std::collections::HashSet::new();
    for code in [
        200u16, 201, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
    ] {
        let s = fast_slot(code, "").unwrap();
        assert!(s < FAST_SLOTS && seen.insert(s));
    }
    for g in 0..=16 {
        let s = fast_slot(200, &g.to_string()).unwrap();
        assert!(s < FAST_SLOTS && seen.insert(s), "grpc {g}");
    }
    assert_eq!(fast_slot(418, ""), None);
    assert_eq!(fast_slot(200, "17"), None);
}

#[test]
fn records_requests_with_labels() {
    let m = Metrics::new().unwrap();
    let r = m.request_metrics("outbound", "default-backend.default", "backend.default");
    r.record(http::StatusCode::OK, "", 0.001);
    r.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
    r.record(http::StatusCode::OK, "14", 0.001);
    let text = String::from_utf8(m.encode()).unwrap();
    assert!(text.contains(r#"weft_requests_total{cluster="backend.default",code="200",code_class="2xx",direction="outbound",grpc_status="",peer="",route="default-backend.default",tls="none"} 1"#), "{text}");
    assert!(text.contains(r#"code="418",code_class="4xx""#));
    assert!(text.contains(r#"code="418""#));
    assert!(text.contains(r#"grpc_status="14""#));
    assert!(text.contains("weft_request_duration_seconds_bucket"));
    assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="backend.default",direction="outbound",peer="",route="default-backend.default",tls="none"} 3"#), "{text}");
}

#[test]
fn streamed_requests_split_headers_and_total_and_count_bytes() {
    let m = Metrics::new().unwrap();
    let r = m.request_metrics("inbound", "r", "c");
    r.record_response_headers(0.001);
    r.add_request_bytes(5);
    r.add_response_bytes(7);
    r.add_response_bytes(0);
    r.record_finished(http::StatusCode::SERVICE_UNAVAILABLE, "", 0.5);
    let text = String::from_utf8(m.encode()).unwrap();
    assert!(
        text.contains(
            r#"weft_request_body_bytes_total{cluster="c",direction="inbound",peer="",route="r",tls="none"} 5"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"weft_response_body_bytes_total{cluster="c",direction="inbound",peer="",route="r",tls="none"} 7"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"weft_response_headers_duration_seconds_count{cluster="c",direction="inbound",peer="",route="r",tls="none"} 1"#), "{text}");
    assert!(text.contains(r#"weft_request_duration_seconds_count{cluster="c",direction="inbound",peer="",route="r",tls="none"} 1"#), "{text}");
    assert!(text.contains(r#"code="503",code_class="5xx""#), "{text}");
}

#[test]
fn code_classes() {
    assert_eq!(code_class(101), "1xx");
    assert_eq!(code_class(204), "2xx");
    assert_eq!(code_class(308), "3xx");
    assert_eq!(code_class(499), "4xx");
    assert_eq!(code_class(599), "5xx");
    assert_eq!(code_class(600), "other");
}

fn id(n: usize) -> String {
    format!("spiffe://cluster.local/ns/default/sa/caller-{n}")
}

#[test]
fn outbound_labels_follow_the_endpoints_and_own_identity() {
    let backend = "spiffe://cluster.local/ns/default/sa/backend";
    let mtls = PeerLabels {
        mtls: true,
        peer: backend.into(),
    };
    assert_eq!(
        PeerLabels::outbound([Some(backend), Some(backend)], true),
        mtls
    );
    // Without its own identity the proxy dials mesh endpoints in plaintext.
    assert_eq!(
        PeerLabels::outbound([Some(backend)], false),
        PeerLabels::default()
    );
    // A plaintext (static) endpoint, or no endpoint at all: not mTLS.
    assert_eq!(
        PeerLabels::outbound([Some(backend), None], true),
        PeerLabels::default()
    );
    assert_eq!(PeerLabels::outbound([], true), PeerLabels::default());
    // mTLS to endpoints expecting different identities: no single peer.
    let other = "spiffe://cluster.local/ns/default/sa/other";
    assert_eq!(
        PeerLabels::outbound([Some(backend), Some(other)], true),
        PeerLabels {
            mtls: true,
            peer: "".into()
        }
    );

    let m = Metrics::new()
        .unwrap()
        .for_clusters([("backend.default".into(), mtls)]);
    let out = m.request_metrics("outbound", "default-backend.default", "backend.default");
    assert_eq!((out.tls(), out.peer()), ("mtls", backend));
    let plain = m.request_metrics("outbound", "db", "db.default");
    assert_eq!((plain.tls(), plain.peer()), ("none", ""));
    // Inbound handles describe the caller, known per connection: the base is `none`.
    let inbound = m.request_metrics("inbound", "inbound", "backend.default");
    assert_eq!((inbound.tls(), inbound.peer()), ("none", ""));
    out.record(http::StatusCode::OK, "", 0.001);
    let text = String::from_utf8(m.encode()).unwrap();
    assert!(text.contains(&format!(r#"weft_requests_total{{cluster="backend.default",code="200",code_class="2xx",direction="outbound",grpc_status="",peer="{backend}",route="default-backend.default",tls="mtls"}} 1"#)), "{text}");
}

#[test]
fn peers_past_the_bound_are_other_and_variants_are_shared() {
    let m = Metrics::new().unwrap();
    let base = m.request_metrics("inbound", "inbound", "inbound");
    let first = base.for_peer(&id(0));
    assert_eq!((first.tls(), first.peer()), ("mtls", id(0).as_str()));
    assert!(Arc::ptr_eq(&first, &base.for_peer(&id(0))));
    for n in 1..MAX_PEERS_PER_HANDLE {
        assert_eq!(base.for_peer(&id(n)).peer(), id(n));
    }
    let over = base.for_peer(&id(MAX_PEERS_PER_HANDLE));
    assert_eq!((over.tls(), over.peer()), ("mtls", PEER_OTHER));
    assert!(Arc::ptr_eq(
        &over,
        &base.for_peer(&id(MAX_PEERS_PER_HANDLE + 1))
    ));
    // Admitted identities keep their series.
    assert_eq!(base.for_peer(&id(3)).peer(), id(3));
    // A later snapshot's handle with the same labels is the same handle, with the same
    // admitted set: the bound is on series, not per snapshot.
    let rebuilt = m.request_metrics("inbound", "inbound", "inbound");
    assert!(Arc::ptr_eq(&base, &rebuilt));
    assert!(Arc::ptr_eq(&first, &rebuilt.for_peer(&id(0))));
    assert_eq!(rebuilt.for_peer(&id(1000)).peer(), PEER_OTHER);
    // Another route has its own bound.
    let other_route = m.request_metrics("inbound", "r2", "inbound");
    assert_eq!(other_route.for_peer(&id(1000)).peer(), id(1000));

    over.record(http::StatusCode::OK, "", 0.001);
    base.for_peer(&id(MAX_PEERS_PER_HANDLE + 7))
        .record(http::StatusCode::OK, "", 0.001);
    let text = String::from_utf8(m.encode()).unwrap();
    assert!(text.contains(r#"weft_requests_total{cluster="inbound",code="200",code_class="2xx",direction="inbound",grpc_status="",peer="other",route="inbound",tls="mtls"} 2"#), "{text}");
    let peers: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("weft_request_duration_seconds_count{")
                && l.contains(r#"route="inbound""#)
        })
        .filter_map(|l| l.split("peer=\"").nth(1)?.split('"').next())
        .collect();
    assert!(peers.len() <= MAX_PEERS_PER_HANDLE + 2, "{peers:?}");
}

#[test]
fn a_connection_resolves_its_variant_once_per_base() {
    let m = Metrics::new().unwrap();
    let base = m.request_metrics("inbound", "inbound", "inbound");
    let conn = PeerHandles::new(&id(1));
    let v = conn.resolve(&base);
    assert_eq!(v.peer(), id(1));
    assert!(Arc::ptr_eq(&v, &conn.resolve(&base)));
    // Another connection of the same caller records on the same series (same variant).
    assert!(Arc::ptr_eq(&v, &PeerHandles::new(&id(1)).resolve(&base)));
    // A new snapshot's handle for the same labels is the same base: found again.
    let rebuilt = m.request_metrics("inbound", "inbound", "inbound");
    assert!(Arc::ptr_eq(&v, &conn.resolve(&rebuilt)));
    assert_eq!(conn.resolved.lock().unwrap().len(), 1);
    // Other routes' bases: at most CONNECTION_SLOTS remembered, oldest out first.
    let bases: Vec<_> = (0..CONNECTION_SLOTS + 2)
        .map(|n| m.request_metrics("inbound", &format!("r{n}"), "inbound"))
        .collect();
    for b in &bases {
        assert_eq!(conn.resolve(b).route(), b.route());
    }
    assert_eq!(conn.resolved.lock().unwrap().len(), CONNECTION_SLOTS);
    // A base that went away (its route was removed) makes room first, and the connection
    // does not keep it alive.
    let weak = Arc::downgrade(&bases[CONNECTION_SLOTS]);
    drop(bases);
    assert_eq!(weak.strong_count(), 0);
    conn.resolve(&base);
    let resolved = conn.resolved.lock().unwrap();
    assert_eq!(resolved.len(), 1, "only the live base is left");
    assert!(std::ptr::eq(resolved[0].0.as_ptr(), Arc::as_ptr(&base)));
}

/// The lines of `m`'s scrape that are samples of route `route`.
fn series_of(m: &Metrics, route: &str) -> Vec<String> {
    let text = String::from_utf8(m.encode()).unwrap();
    let label = format!(r#"route="{route}""#);
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .map(str::to_owned)
        .collect()
}

fn sample(lines: &[String], prefix: &str, contains: &[&str]) -> Option<f64> {
    lines
        .iter()
        .find(|l| l.starts_with(prefix) && contains.iter().all(|c| l.contains(c)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn fast_slot_labels_invert_fast_slot() {
    for slot in 0..FAST_SLOTS {
        let (code, grpc) = fast_slot_labels(slot);
        assert_eq!(fast_slot(code, grpc), Some(slot), "{code} {grpc:?}");
    }
}

#[test]
fn handles_are_shared_by_labels() {
    let m = Metrics::new().unwrap();
    let a = m.request_metrics("outbound", "r", "c");
    // A later snapshot (its own `for_clusters` view) gets the same handle.
    let b = m
        .for_clusters([("other".into(), PeerLabels::default())])
        .request_metrics("outbound", "r", "c");
    assert!(Arc::ptr_eq(&a, &b));
    assert!(Arc::ptr_eq(
        &a,
        &m.live_request_metrics("outbound", "r", "c").unwrap()
    ));
    // Other labels, other handles.
    assert!(!Arc::ptr_eq(&a, &m.request_metrics("inbound", "r", "c")));
    assert!(!Arc::ptr_eq(&a, &m.request_metrics("outbound", "r2", "c")));
    let mtls = PeerLabels {
        mtls: true,
        peer: "spiffe://x/y".into(),
    };
    assert!(!Arc::ptr_eq(
        &a,
        &m.request_metrics_with("outbound", "r", "c", &mtls)
    ));
    // `live_request_metrics` never creates one.
    assert!(m.live_request_metrics("outbound", "unused", "c").is_none());
    assert!(series_of(&m, "unused").is_empty());
    // Gone with the last Arc: a new one starts from zero.
    a.record(http::StatusCode::OK, "", 0.001);
    drop((a, b));
    assert!(m.live_request_metrics("outbound", "r", "c").is_none());
    let fresh = m.request_metrics("outbound", "r", "c");
    fresh.record(http::StatusCode::OK, "", 0.001);
    let lines = series_of(&m, "r");
    assert_eq!(
        sample(&lines, "weft_requests_total{", &[r#"code="200""#]),
        Some(1.0),
        "{lines:#?}"
    );
}

#[test]
fn dropping_the_last_handle_removes_every_series_of_its_labels() {
    let m = Metrics::new().unwrap();
    let keep = m.request_metrics("outbound", "kept", "c");
    keep.record(http::StatusCode::OK, "", 0.001);
    let h = m.request_metrics("outbound", "gone", "c");
    let snapshot_two = Arc::clone(&h);
    // Fast slots (200, 503, gRPC 14) and rare combinations (418, gRPC "other", 599).
    h.record(http::StatusCode::OK, "", 0.001);
    h.record(http::StatusCode::SERVICE_UNAVAILABLE, "", 0.001);
    h.record(http::StatusCode::OK, "14", 0.001);
    h.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
    h.record(http::StatusCode::OK, "other", 0.001);
    h.record(http::StatusCode::from_u16(599).unwrap(), "", 0.001);
    h.record(http::StatusCode::from_u16(599).unwrap(), "", 0.001);
    h.add_request_bytes(3);
    h.add_response_bytes(4);
    let lines = series_of(&m, "gone");
    let codes = lines
        .iter()
        .filter(|l| l.starts_with("weft_requests_total{"))
        .count();
    assert_eq!(codes, 6, "{lines:#?}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("weft_request_body_bytes_total{")));
    drop(h);
    assert_eq!(series_of(&m, "gone"), lines, "another holder keeps them");
    drop(snapshot_two);
    assert_eq!(series_of(&m, "gone"), Vec::<String>::new());
    // Other labels are untouched.
    let kept = series_of(&m, "kept");
    assert_eq!(
        sample(&kept, "weft_requests_total{", &[r#"code="200""#]),
        Some(1.0),
        "{kept:#?}"
    );
    assert!(m.request.lock_live().len() == 1, "only `kept` is live");
}

/// The interleaving one lock guards against: an old handle's last `Arc` goes, a new handle
/// for the same labels is created before the old one's `Drop` ran, then that `Drop` runs.
#[test]
fn a_late_drop_of_an_old_handle_keeps_the_new_handles_series() {
    let m = Metrics::new().unwrap();
    let old = m.request_metrics("outbound", "r", "c");
    old.record(http::StatusCode::OK, "", 0.001);
    // Recorded by the old handle only (rare and fast): removed with the new one later.
    old.record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
    old.record(http::StatusCode::NOT_FOUND, "", 0.001);
    let weak = Arc::downgrade(&old);
    let series = Arc::clone(&m.request);
    let mut live = series.lock_live();
    // The old handle's last Arc goes on another thread: its `Drop` waits for the lock.
    let dropper = std::thread::spawn(move || drop(old));
    while weak.strong_count() > 0 {
        std::thread::yield_now();
    }
    // Meanwhile a new snapshot creates the handle for the same labels.
    let labels = request_labels("outbound", "r", "c", &PeerLabels::default());
    let new = series.handle_in(&mut live, labels);
    assert!(!std::ptr::eq(Arc::as_ptr(&new), weak.as_ptr()));
    drop(live);
    dropper.join().unwrap();
    // The late drop left the series to the new handle: exported, and the counts go on.
    new.record(http::StatusCode::OK, "", 0.001);
    let lines = series_of(&m, "r");
    let total = |code: &str| {
        sample(
            &lines,
            "weft_requests_total{",
            &[&format!(r#"code="{code}""#)],
        )
    };
    assert_eq!(total("200"), Some(2.0), "{lines:#?}");
    assert_eq!(total("418"), Some(1.0), "{lines:#?}");
    assert_eq!(total("404"), Some(1.0), "{lines:#?}");
    assert_eq!(
        sample(&lines, "weft_request_duration_seconds_count{", &[]),
        Some(4.0),
        "{lines:#?}"
    );
    assert!(Arc::ptr_eq(
        &new,
        &m.live_request_metrics("outbound", "r", "c").unwrap()
    ));
    // The new handle's drop removes every series of the labels, the old one's codes too.
    drop(new);
    assert_eq!(series_of(&m, "r"), Vec::<String>::new());
    assert!(series.lock_live().is_empty());
}

#[test]
fn peer_variants_go_with_their_base() {
    let m = Metrics::new().unwrap();
    let base = m.request_metrics("inbound", "inbound", "inbound");
    for n in 0..MAX_PEERS_PER_HANDLE + 3 {
        base.for_peer(&id(n))
            .record(http::StatusCode::OK, "", 0.001);
    }
    base.record(http::StatusCode::OK, "", 0.001);
    let peers = |m: &Metrics| {
        series_of(m, "inbound")
            .iter()
            .filter(|l| l.starts_with("weft_requests_total{"))
            .filter_map(|l| Some(l.split("peer=\"").nth(1)?.split('"').next()?.to_owned()))
            .collect::<HashSet<_>>()
    };
    assert_eq!(
        peers(&m).len(),
        MAX_PEERS_PER_HANDLE + 2,
        "64 ids, other, \"\""
    );
    // A connection still holds its variant: that series alone stays after the base goes.
    let conn = PeerHandles::new(&id(5));
    let held = conn.resolve(&base);
    drop(base);
    assert_eq!(peers(&m), HashSet::from([id(5)]));
    drop(held);
    assert_eq!(peers(&m), HashSet::from([id(5)]), "the connection holds it");
    drop(conn);
    assert!(series_of(&m, "inbound").is_empty());
    assert!(m.request.lock_live().is_empty());
}

#[test]
fn tcp_and_connect_error_series_live_with_their_holders() {
    let m = Metrics::new().unwrap();
    let text = || String::from_utf8(m.encode()).unwrap();
    let first = m.tcp_metrics("outbound", "db.default");
    first.accepted.inc();
    first.rx.inc_by(10);
    // The next snapshot's listener: the same series (counts go on).
    let second = m.tcp_metrics("outbound", "db.default");
    second.accepted.inc();
    let (errors, lease) = m.connect_errors("db.default");
    errors.inc();
    let (errors_next, lease_next) = m.connect_errors("db.default");
    errors_next.inc();
    let t = text();
    assert!(
        t.contains(
            r#"weft_tcp_connections_total{cluster="db.default",direction="outbound",peer="",tls="none"} 2"#
        ),
        "{t}"
    );
    assert!(
        t.contains(
            r#"weft_tcp_bytes_total{cluster="db.default",direction="outbound",flow="rx",peer="",tls="none"} 10"#
        ),
        "{t}"
    );
    assert!(
        t.contains(r#"weft_upstream_connect_errors_total{cluster="db.default"} 2"#),
        "{t}"
    );
    drop(first);
    drop(lease);
    let t = text();
    assert!(
        t.contains(r#"weft_tcp_connections{cluster="db.default",direction="outbound",peer="",tls="none"} 0"#),
        "{t}"
    );
    assert!(
        t.contains(r#"weft_upstream_connect_errors_total{cluster="db.default"} 2"#),
        "{t}"
    );
    drop(second);
    drop(lease_next);
    let t = text();
    assert!(!t.contains("db.default"), "{t}");
    assert!(m.leased.lock_live().is_empty());
}

#[test]
fn authz_denied_series_lives_while_a_listener_holds_it() {
    let m = Metrics::new().unwrap();
    let text = |m: &Metrics| String::from_utf8(m.encode()).unwrap();
    let a = m.authz_denied("inbound", "callers", "http");
    a.inc();
    // The next snapshot resolves it again while the old one still holds it: same series.
    let b = m.authz_denied("inbound", "callers", "http");
    drop(a);
    b.inc();
    assert_eq!(b.get(), 2);
    assert!(text(&m).contains(
        r#"weft_authz_denied_total{direction="inbound",policy="callers",protocol="http"} 2"#
    ));
    drop(b);
    assert!(!text(&m).contains(r#"policy="callers""#), "{}", text(&m));
}

#[test]
fn tcp_callers_get_their_series_bounded_per_listener() {
    let m = Metrics::new().unwrap();
    let text = || String::from_utf8(m.encode()).unwrap();
    let base = m.tcp_metrics("inbound", "inbound");
    let web = base.for_peer("spiffe://td/ns/a/sa/web");
    web.accepted.inc();
    // A second connection from the same caller: the same handles.
    assert!(Arc::ptr_eq(&web, &base.for_peer("spiffe://td/ns/a/sa/web")));
    assert!(text().contains(
        r#"weft_tcp_connections_total{cluster="inbound",direction="inbound",peer="spiffe://td/ns/a/sa/web",tls="mtls"} 1"#
    ));
    for i in 0..MAX_PEERS_PER_HANDLE + 5 {
        base.for_peer(&format!("spiffe://td/ns/a/sa/s{i}"))
            .accepted
            .inc();
    }
    let t = text();
    let callers = t
        .lines()
        .filter(|l| l.starts_with("weft_tcp_connections_total{") && l.contains(r#"tls="mtls""#))
        .count();
    assert_eq!(callers, MAX_PEERS_PER_HANDLE + 1, "{t}");
    assert!(t.contains(
        r#"weft_tcp_connections_total{cluster="inbound",direction="inbound",peer="other",tls="mtls"} 6"#
    ), "{t}");
    // The listener (base) goes: so do its callers' series.
    drop(web);
    drop(base);
    assert!(
        !text().contains("weft_tcp_connections_total{"),
        "{}",
        text()
    );
}
