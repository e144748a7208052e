//! Metric series live exactly as long as something can record into them, through the public
//! surface: snapshots built from hand-made resources as config pushes would build them (each
//! from the previous one, which is dropped once replaced). A route, cluster or TCP listener that
//! stays keeps its series and counts; one that is removed loses them once nothing holds it.

use std::sync::Arc;

use weft_proto::v1;
use weft_proxy::metrics::{Metrics, RequestMetrics, MAX_PEERS_PER_HANDLE, PEER_OTHER};
use weft_proxy::pipeline::HttpProxy;
use weft_proxy::route::RequestInfo;
use weft_proxy::snapshot::{ListenerKind, Resources, Snapshot, SnapshotStore};
use weft_proxy::tls::spiffe::SpiffeId;

const OUTBOUND: &str = "127.0.0.1:15001";
const INBOUND: &str = "127.0.0.1:15006";
const TCP: &str = "127.0.0.1:7000";

/// An outbound HTTP listener whose table has one route per `(route, cluster)`, matching the
/// cluster's name as host; an inbound listener to the local app; with `tcp`, a TCP listener to
/// `db.default`. Every cluster in `clusters` (plus `inbound`, and `db.default` with `tcp`) has one
/// endpoint.
fn resources(routes: &[(&str, &str)], clusters: &[&str], tcp: bool) -> Resources {
    let listener =
        |name: &str, addr: &str, direction: v1::Direction, table: &str, cluster: &str| {
            v1::Listener {
                name: name.into(),
                address: addr.into(),
                direction: direction.into(),
                protocol: v1::ListenerProtocol::Http.into(),
                route_table: table.into(),
                cluster: cluster.into(),
                ..Default::default()
            }
        };
    let mut listeners = vec![
        listener(
            "outbound",
            OUTBOUND,
            v1::Direction::Outbound,
            "outbound",
            "",
        ),
        listener("inbound", INBOUND, v1::Direction::Inbound, "", "inbound"),
    ];
    if tcp {
        listeners.push(v1::Listener {
            protocol: v1::ListenerProtocol::Tcp.into(),
            ..listener("db", TCP, v1::Direction::Outbound, "", "db.default")
        });
    }
    let mut all: Vec<&str> = clusters.iter().copied().chain(["inbound"]).collect();
    if tcp {
        all.push("db.default");
    }
    Resources {
        listeners: Some(v1::ListenerSet {
            version: "l".into(),
            listeners,
            ..Default::default()
        }),
        routes: Some(v1::RouteSet {
            version: "r".into(),
            tables: vec![v1::RouteTable {
                name: "outbound".into(),
                routes: routes
                    .iter()
                    .map(|(name, cluster)| v1::Route {
                        name: (*name).into(),
                        r#match: Some(v1::RouteMatch {
                            hosts: vec![(*cluster).into()],
                            ..Default::default()
                        }),
                        destinations: vec![v1::WeightedCluster {
                            cluster: (*cluster).into(),
                            weight: 100,
                        }],
                        ..Default::default()
                    })
                    .collect(),
            }],
        }),
        clusters: Some(v1::ClusterSet {
            version: "c".into(),
            clusters: all
                .iter()
                .map(|n| v1::Cluster {
                    name: (*n).into(),
                    mtls: v1::MtlsMode::Disabled.into(),
                    ..Default::default()
                })
                .collect(),
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e".into(),
            clusters: all
                .iter()
                .enumerate()
                .map(|(i, n)| v1::ClusterEndpoints {
                    cluster: (*n).into(),
                    endpoints: vec![v1::Endpoint {
                        address: format!("127.0.0.1:{}", 9000 + i),
                        weight: 1,
                        ..Default::default()
                    }],
                })
                .collect(),
        }),
        policies: None,
        trust: None,
    }
}

/// The route a `GET /` to `host` through the outbound listener of `s` takes.
fn outbound_route<'s>(s: &'s Snapshot, host: &str) -> &'s weft_proxy::route::Route {
    let ListenerKind::Http(h) = &s.listeners[&OUTBOUND.parse().unwrap()].kind else {
        panic!("an HTTP listener")
    };
    let headers = http::HeaderMap::new();
    let info = RequestInfo {
        host,
        path: "/",
        query: None,
        method: &http::Method::GET,
        headers: &headers,
    };
    h.routes.as_ref().and_then(|t| t.find(&info)).unwrap()
}

/// The handles a request to `host` through the outbound listener of `s` is counted with.
fn outbound_metrics(s: &Snapshot, host: &str) -> Arc<RequestMetrics> {
    Arc::clone(
        outbound_route(s, host)
            .destinations
            .pick()
            .unwrap()
            .metrics(),
    )
}

/// The sample lines of `name` (exactly, before the labels) in a scrape of `m` mentioning every
/// one of `labels` (`key="value"` strings).
fn samples(m: &Metrics, name: &str, labels: &[&str]) -> Vec<String> {
    let text = String::from_utf8(m.encode()).unwrap();
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|k| l.contains(k)))
        .map(str::to_owned)
        .collect()
}

/// The per-route / per-cluster families (request, TCP, connect errors, and the retry / breaker /
/// outlier / health-check families) with a series mentioning `label`.
fn series_families(m: &Metrics, label: &str) -> Vec<String> {
    let text = String::from_utf8(m.encode()).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(label))
        .filter(|l| {
            [
                "weft_request",
                "weft_response_",
                "weft_tcp_",
                "weft_upstream_connect_errors_total",
                "weft_retries_total",
                "weft_retry_budget_exhausted_total",
                "weft_breaker_",
                "weft_circuit_open",
                "weft_outlier_",
                "weft_health_check_failures_total",
                "weft_endpoint_healthy",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_owned)
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_kept_route_keeps_its_series_and_a_removed_one_loses_them() {
    let m = Metrics::new().unwrap();
    let both = [("to-a", "a.default"), ("to-b", "b.default")];
    let s1 = Snapshot::build(
        resources(&both, &["a.default", "b.default"], true),
        None,
        &m,
    )
    .unwrap();
    for _ in 0..3 {
        outbound_metrics(&s1, "a.default").record(http::StatusCode::OK, "", 0.001);
    }
    outbound_metrics(&s1, "b.default").record(http::StatusCode::IM_A_TEAPOT, "", 0.001);
    assert_eq!(
        samples(&m, "weft_requests_total", &[r#"route="to-a""#]).len(),
        1
    );
    // A cluster's connect-error series appears when the data path first reaches its counter
    // (every connect to the cluster does), not for every cluster of a snapshot.
    let connect_errors = |cluster: &str| {
        samples(
            &m,
            "weft_upstream_connect_errors_total",
            &[&format!(r#"cluster="{cluster}""#)],
        )
    };
    assert_eq!(connect_errors("a.default"), Vec::<String>::new());
    assert!(!s1.clusters["a.default"].connect_errors.created());
    s1.clusters["a.default"].connect_errors.inc();
    s1.clusters["db.default"].connect_errors.inc();
    assert_eq!(
        connect_errors("a.default"),
        [r#"weft_upstream_connect_errors_total{cluster="a.default"} 1"#]
    );

    // A push that changes nothing the handles depend on: the same handles, no new series.
    let s2 = Snapshot::build(s1.resources.to_resources().unwrap(), Some(&s1), &m).unwrap();
    assert!(Arc::ptr_eq(
        &outbound_metrics(&s1, "a.default"),
        &outbound_metrics(&s2, "a.default")
    ));
    drop(s1);
    // A push removing route `to-a` (its cluster stays): applied, then the old snapshot goes.
    let only_b = [("to-b", "b.default")];
    let s3 = Snapshot::build(
        resources(&only_b, &["a.default", "b.default"], true),
        Some(&s2),
        &m,
    )
    .unwrap();
    drop(s2);
    assert_eq!(
        samples(&m, "weft_requests_total", &[r#"route="to-a""#]),
        Vec::<String>::new()
    );
    for family in [
        "weft_request_duration_seconds_count",
        "weft_response_headers_duration_seconds_count",
        "weft_request_body_bytes_total",
        "weft_response_body_bytes_total",
    ] {
        assert_eq!(
            samples(&m, family, &[r#"route="to-a""#]),
            Vec::<String>::new()
        );
    }
    // The kept route's series kept their counts (the snapshot pre-resolved its handles).
    let b = samples(
        &m,
        "weft_requests_total",
        &[r#"route="to-b""#, r#"code="418""#],
    );
    assert_eq!(
        b.iter().map(|l| value(l)).collect::<Vec<_>>(),
        [1.0],
        "{b:?}"
    );
    // Cluster `a.default` is still configured: its connect-error series stays, with its count,
    // and the kept cluster counts on into it.
    assert_eq!(
        connect_errors("a.default"),
        [r#"weft_upstream_connect_errors_total{cluster="a.default"} 1"#]
    );
    s3.clusters["a.default"].connect_errors.inc();
    assert_eq!(
        connect_errors("a.default"),
        [r#"weft_upstream_connect_errors_total{cluster="a.default"} 2"#]
    );
    // A cluster nothing connected to has none.
    assert_eq!(connect_errors("b.default"), Vec::<String>::new());

    // A push removing cluster (service) `a.default` and the TCP listener to `db.default`; a
    // connection accepted on that listener is still draining.
    let tcp_listener = Arc::clone(&s3.listeners[&TCP.parse().unwrap()]);
    let ListenerKind::Tcp { metrics: tcp, .. } = &tcp_listener.kind else {
        panic!("a TCP listener")
    };
    tcp.accepted.inc();
    let s4 = Snapshot::build(resources(&only_b, &["b.default"], false), Some(&s3), &m).unwrap();
    drop(s3);
    assert_eq!(
        samples(
            &m,
            "weft_upstream_connect_errors_total",
            &[r#"cluster="a.default""#]
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        samples(
            &m,
            "weft_upstream_connect_errors_total",
            &[r#"cluster="db.default""#]
        )
        .len(),
        1,
        "the draining connection's listener holds its cluster"
    );
    let accepted = samples(
        &m,
        "weft_tcp_connections_total",
        &[r#"cluster="db.default""#],
    );
    assert_eq!(accepted.iter().map(|l| value(l)).collect::<Vec<_>>(), [1.0]);
    // The connection ends: nothing can record into the TCP series any more.
    drop(tcp_listener);
    for cluster in ["db.default", "a.default"] {
        let label = format!(r#"cluster="{cluster}""#);
        assert_eq!(
            series_families(&m, &label),
            Vec::<String>::new(),
            "{cluster}"
        );
    }
    let b = samples(&m, "weft_requests_total", &[r#"route="to-b""#]);
    assert_eq!(b.len(), 1, "{b:?}");
    drop(s4);
    let text = String::from_utf8(m.encode()).unwrap();
    assert!(!text.contains(r#"route="to-b""#), "{text}");
}

#[test]
fn config_churn_does_not_grow_the_series() {
    let m = Metrics::new().unwrap();
    let clusters = ["a.default"];
    let mut current = Snapshot::build(
        resources(&[("gen-0", "a.default")], &clusters, false),
        None,
        &m,
    )
    .unwrap();
    for generation in 1..=50 {
        let route = format!("gen-{generation}");
        let next = Snapshot::build(
            resources(&[(route.as_str(), "a.default")], &clusters, false),
            Some(&current),
            &m,
        )
        .unwrap();
        current = next;
        let handle = outbound_metrics(&current, "a.default");
        assert_eq!(handle.route(), route);
        handle.record(http::StatusCode::OK, "", 0.001);
        handle.record(http::StatusCode::from_u16(599).unwrap(), "", 0.001);
        let routes: Vec<String> = samples(&m, "weft_requests_total", &[])
            .iter()
            .filter_map(|l| Some(l.split("route=\"").nth(1)?.split('"').next()?.to_owned()))
            .collect();
        assert_eq!(routes, [route.clone(), route], "generation {generation}");
    }
}

fn id(n: usize) -> Option<SpiffeId> {
    Some(SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/caller-{n}")).unwrap())
}

#[test]
fn the_peer_bound_holds_across_config_pushes_and_variants_go_with_their_route() {
    let m = Metrics::new().unwrap();
    let r = resources(&[], &[], false);
    let store = Arc::new(SnapshotStore::empty());
    let mut snapshot = Arc::new(Snapshot::build(r.clone(), None, &m).unwrap());
    let connection = |s: &Arc<Snapshot>, n: usize| {
        let listener = Arc::clone(&s.listeners[&INBOUND.parse().unwrap()]);
        HttpProxy::new(Arc::clone(&store), listener).with_peer(id(n))
    };
    let base = |s: &Snapshot| {
        let ListenerKind::Http(h) = &s.listeners[&INBOUND.parse().unwrap()].kind else {
            panic!("an HTTP listener")
        };
        Arc::clone(&h.catch_all.as_ref().unwrap().metrics)
    };
    // Callers arrive over several config pushes, each snapshot replacing (and dropping) the
    // previous one, each connection closed after its request.
    for n in 0..MAX_PEERS_PER_HANDLE + 10 {
        if n % 7 == 0 {
            snapshot = Arc::new(Snapshot::build(r.clone(), Some(&snapshot), &m).unwrap());
        }
        let handle = connection(&snapshot, n).request_metrics(&base(&snapshot));
        let want = if n < MAX_PEERS_PER_HANDLE {
            format!("spiffe://cluster.local/ns/default/sa/caller-{n}")
        } else {
            PEER_OTHER.to_owned()
        };
        assert_eq!(handle.peer(), want, "caller {n}");
        handle.record(http::StatusCode::OK, "", 0.001);
    }
    let peers = samples(&m, "weft_requests_total", &[r#"route="inbound""#]);
    assert_eq!(
        peers.len(),
        MAX_PEERS_PER_HANDLE + 1,
        "64 callers and other"
    );

    // The inbound listener loses its catch-all (a push): its base and variants go with it.
    let mut no_catch_all = r;
    no_catch_all.listeners.as_mut().unwrap().listeners[1].cluster = String::new();
    let next = Snapshot::build(no_catch_all, Some(&snapshot), &m).unwrap();
    drop(snapshot);
    assert_eq!(
        samples(&m, "weft_requests_total", &[r#"route="inbound""#]),
        Vec::<String>::new()
    );
    drop(next);
}

/// `resources` with a TCP-connect health check every 20ms on `checked`, whose endpoints are
/// `ports` (127.0.0.1; nothing listens there).
fn with_health_check(mut r: Resources, checked: &str, ports: &[u16]) -> Resources {
    for c in &mut r.clusters.as_mut().unwrap().clusters {
        if c.name == checked {
            c.health_check = Some(v1::HealthCheck {
                kind: Some(v1::health_check::Kind::Tcp(true)),
                interval_ms: 20,
                timeout_ms: 100,
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            });
        }
    }
    for ce in &mut r.endpoints.as_mut().unwrap().clusters {
        if ce.cluster == checked {
            ce.endpoints = ports
                .iter()
                .map(|p| v1::Endpoint {
                    address: format!("127.0.0.1:{p}"),
                    weight: 1,
                    ..Default::default()
                })
                .collect();
        }
    }
    r
}

/// Waits (bounded) until `cond` holds on scrapes of `m`.
async fn eventually(m: &Metrics, what: &str, cond: impl Fn(&Metrics) -> bool) {
    for _ in 0..200 {
        if cond(m) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{what}: {}", String::from_utf8(m.encode()).unwrap());
}

#[tokio::test]
async fn endpoint_health_series_follow_the_checked_endpoints() {
    let m = Metrics::new().unwrap();
    let routes = [("to-a", "a.default")];
    let healthy = |m: &Metrics| samples(m, "weft_endpoint_healthy", &[r#"cluster="a.default""#]);
    let s1 = Snapshot::build(
        with_health_check(
            resources(&routes, &["a.default"], false),
            "a.default",
            &[9401, 9402],
        ),
        None,
        &m,
    )
    .unwrap();
    eventually(&m, "both endpoints checked", |m| healthy(m).len() == 2).await;

    // A rollout replaces endpoint 9402 by 9403: the gone endpoint's series goes.
    let s2 = Snapshot::build(
        with_health_check(
            resources(&routes, &["a.default"], false),
            "a.default",
            &[9401, 9403],
        ),
        Some(&s1),
        &m,
    )
    .unwrap();
    drop(s1);
    eventually(&m, "9403 checked, 9402 gone", |m| {
        let h = healthy(m);
        h.len() == 2
            && h.iter().any(|l| l.contains(":9403"))
            && !h.iter().any(|l| l.contains(":9402"))
    })
    .await;
    // A few more check rounds: 9402 does not come back.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !healthy(&m).iter().any(|l| l.contains(":9402")),
        "{:?}",
        healthy(&m)
    );

    // The service is removed: every per-cluster series of it goes with its state.
    let s3 = Snapshot::build(resources(&[], &[], false), Some(&s2), &m).unwrap();
    drop(s2);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        series_families(&m, r#"cluster="a.default""#),
        Vec::<String>::new()
    );
    drop(s3);
}

/// `resources` with a rate limit on route `route`.
fn with_rate_limit(mut r: Resources, route: &str) -> Resources {
    for t in &mut r.routes.as_mut().unwrap().tables {
        for x in &mut t.routes {
            if x.name == route {
                x.rate_limit = Some(v1::RateLimit {
                    requests_per_second: 1,
                    burst: 1,
                });
            }
        }
    }
    r
}

/// The refusal counter of the rate limit on the route a request to `host` takes.
fn refusals(s: &Snapshot, host: &str) -> weft_proxy::metrics::LeasedCounter {
    outbound_route(s, host)
        .rate_limit
        .as_ref()
        .expect("a rate limit")
        .1
        .clone()
}

#[test]
fn rate_limit_buckets_and_series_live_while_the_route_has_the_limit() {
    let m = Metrics::new().unwrap();
    let routes = [("to-a", "a.default"), ("to-b", "b.default")];
    let build = |prev: Option<&Snapshot>, limited: bool| {
        let r = resources(&routes, &["a.default", "b.default"], false);
        let r = if limited {
            with_rate_limit(r, "to-a")
        } else {
            r
        };
        Snapshot::build(r, prev, &m).unwrap()
    };
    let s1 = build(None, true);
    refusals(&s1, "a.default").inc();
    // A push that keeps the limit keeps its bucket and its count.
    let s2 = build(Some(&s1), true);
    drop(s1);
    let kept = refusals(&s2, "a.default");
    assert_eq!(kept.get(), 1);
    drop(kept);
    assert_eq!(m.resilience().live_buckets(), 1);
    assert_eq!(
        samples(&m, "weft_rate_limited_total", &[r#"name="to-a""#]).len(),
        1
    );
    // A push that removes it: bucket and series go once the old snapshot is gone.
    let s3 = build(Some(&s2), false);
    drop(s2);
    assert_eq!(m.resilience().live_buckets(), 0);
    assert_eq!(
        samples(&m, "weft_rate_limited_total", &[]),
        Vec::<String>::new()
    );
    drop(s3);
}
