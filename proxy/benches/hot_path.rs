//! Per-request costs of the proxy's hot path, in isolation: route match (10 and 1000 routes;
//! 1000 routes with query-parameter conditions, 4 routes per host, and the worst case of 1000
//! on one host),
//! the balancer pick of every LB policy over 10 endpoints, header rewriting, metrics recording,
//! and the resilience checks every request passes (retry budget, breaker, rate limit, the
//! downstream idle-timeout bookkeeping).
//!
//! `cargo bench -p weft-proxy --bench hot_path` (criterion reports ns/op as "time").

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Request};
use weft_proto::v1;
use weft_proxy::breaker::{BreakerState, Limit};
use weft_proxy::cluster::Cluster;
use weft_proxy::http::headers::{prepare_request, strip_hop_by_hop};
use weft_proxy::http::idle::Activity;
use weft_proxy::lb::{Avail, Balancer, EndpointLoad, HashOn, Policy};
use weft_proxy::metrics::Metrics;
use weft_proxy::ratelimit::RateLimiter;
use weft_proxy::resilience_metrics::ClusterResilienceMetrics;
use weft_proxy::retry::{BudgetParams, RetryBudget};
use weft_proxy::route::{RequestInfo, RouteTable};
use weft_proxy::upstream::Wire;

fn table(n: usize, clusters: &HashMap<Arc<str>, Arc<Cluster>>, m: &Metrics) -> RouteTable {
    let routes = (0..n)
        .map(|i| v1::Route {
            name: format!("r{i}"),
            r#match: Some(v1::RouteMatch {
                hosts: vec![format!("svc-{i}")],
                path: Some(v1::PathMatch {
                    kind: Some(v1::path_match::Kind::Prefix(format!("/api/{i}"))),
                }),
                ..Default::default()
            }),
            destinations: vec![v1::WeightedCluster {
                cluster: "c".into(),
                weight: 100,
            }],
            ..Default::default()
        })
        .collect();
    RouteTable::build(
        &v1::RouteTable {
            name: "outbound".into(),
            routes,
        },
        clusters,
        m,
        "outbound",
    )
    .expect("valid table")
}

/// 1000 routes over 250 hosts (`svc-0`..`svc-249`), 4 per host: a query `exact`, a query
/// `regex`, a query `present` with a path prefix, and a plain path prefix.
fn query_table(clusters: &HashMap<Arc<str>, Arc<Cluster>>, m: &Metrics) -> RouteTable {
    use v1::query_match::Kind;
    let routes = (0..1000)
        .map(|i| {
            let (query, path) = match i % 4 {
                0 => (Some(("v", Kind::Exact("beta".into()))), None),
                1 => (Some(("user", Kind::Regex("u[0-9]+".into()))), None),
                2 => (Some(("debug", Kind::Present(true))), Some("/api")),
                _ => (None, Some("/api")),
            };
            v1::Route {
                name: format!("r{i}"),
                r#match: Some(v1::RouteMatch {
                    hosts: vec![format!("svc-{}", i / 4)],
                    path: path.map(|p| v1::PathMatch {
                        kind: Some(v1::path_match::Kind::Prefix(p.into())),
                    }),
                    query: query
                        .map(|(name, kind)| v1::QueryMatch {
                            name: name.into(),
                            kind: Some(kind),
                        })
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
                destinations: vec![v1::WeightedCluster {
                    cluster: "c".into(),
                    weight: 100,
                }],
                ..Default::default()
            }
        })
        .collect();
    RouteTable::build(
        &v1::RouteTable {
            name: "outbound".into(),
            routes,
        },
        clusters,
        m,
        "outbound",
    )
    .expect("valid table")
}

/// 1000 routes on one host, each with `v=<i>` exact: the worst case (a linear scan).
fn one_host_query_table(clusters: &HashMap<Arc<str>, Arc<Cluster>>, m: &Metrics) -> RouteTable {
    let routes = (0..1000)
        .map(|i| v1::Route {
            name: format!("r{i}"),
            r#match: Some(v1::RouteMatch {
                hosts: vec!["svc".into()],
                query: vec![v1::QueryMatch {
                    name: "v".into(),
                    kind: Some(v1::query_match::Kind::Exact(format!("{i}"))),
                }],
                ..Default::default()
            }),
            destinations: vec![v1::WeightedCluster {
                cluster: "c".into(),
                weight: 100,
            }],
            ..Default::default()
        })
        .collect();
    RouteTable::build(
        &v1::RouteTable {
            name: "outbound".into(),
            routes,
        },
        clusters,
        m,
        "outbound",
    )
    .expect("valid table")
}

fn route_match(c: &mut Criterion) {
    let m = Metrics::new().expect("metrics");
    let cluster = Cluster::build(
        &v1::Cluster {
            name: "c".into(),
            ..Default::default()
        },
        &[v1::Endpoint {
            address: "127.0.0.1:1".into(),
            weight: 1,
            ..Default::default()
        }],
        None,
        &m,
    )
    .expect("cluster");
    let clusters = HashMap::from([(Arc::<str>::from("c"), Arc::new(cluster))]);
    let headers = HeaderMap::new();
    for n in [10usize, 1000] {
        let t = table(n, &clusters, &m);
        let host = format!("svc-{}", n - 1);
        let path = format!("/api/{}/x", n - 1);
        c.bench_function(&format!("route_match/{n}_routes"), |b| {
            b.iter(|| {
                let info = RequestInfo {
                    host: black_box(&host),
                    path: black_box(&path),
                    query: None,
                    method: &Method::GET,
                    headers: &headers,
                };
                black_box(t.find(&info).is_some())
            })
        });
    }
    // Query conditions: (case, host, path, query, the route that must match).
    let t = query_table(&clusters, &m);
    let cases = [
        // The regex route (2nd of the host's 4) matches: the query is parsed once.
        (
            "regex_hit",
            "svc-249",
            "/api/x",
            "a=1&user=u42&v=alpha",
            "r997",
        ),
        // An escaped value is decoded before the exact match.
        ("exact_hit_escaped", "svc-249", "/api/x", "v=be%74a", "r996"),
        // No query condition holds: falls through to the plain prefix route.
        ("miss", "svc-249", "/api/x", "a=1&b=2&c=3", "r999"),
        // No query at all: the conditions fail without parsing anything.
        ("no_query", "svc-249", "/api/x", "", "r999"),
    ];
    for (case, host, path, query, want) in cases {
        let query = (!query.is_empty()).then_some(query);
        let info = RequestInfo {
            host,
            path,
            query,
            method: &Method::GET,
            headers: &headers,
        };
        assert_eq!(t.find(&info).map(|r| &*r.name), Some(want), "{case}");
        c.bench_function(&format!("route_match/1000_routes_query/{case}"), |b| {
            b.iter(|| {
                let info = RequestInfo {
                    host: black_box(host),
                    path: black_box(path),
                    query: black_box(query),
                    method: &Method::GET,
                    headers: &headers,
                };
                black_box(t.find(&info).is_some())
            })
        });
    }
    let t = one_host_query_table(&clusters, &m);
    c.bench_function("route_match/1000_routes_one_host_query/last", |b| {
        b.iter(|| {
            let info = RequestInfo {
                host: black_box("svc"),
                path: black_box("/"),
                query: black_box(Some("x=1&v=999")),
                method: &Method::GET,
                headers: &headers,
            };
            black_box(t.find(&info).is_some())
        })
    });
}

fn balancer_pick(c: &mut Criterion) {
    let keys: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:80")).collect();
    let weights = [1u32; 10];
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("user-1234"));
    for policy in [
        Policy::P2cPeakEwma,
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::RingHash,
    ] {
        let loads = (0..10).map(|_| Arc::new(EndpointLoad::default())).collect();
        let hash_on = (policy == Policy::RingHash)
            .then(|| HashOn::Header(http::HeaderName::from_static("x-user")));
        let b = Balancer::new(policy, hash_on, &keys, &weights, loads);
        let pos = AtomicUsize::new(0);
        c.bench_function(
            &format!("balancer_pick/{}/10_endpoints", policy.as_str()),
            |bch| {
                bch.iter(|| {
                    let h = b.request_hash(black_box(&headers), None);
                    black_box(b.pick(h, &Avail::All, &pos))
                })
            },
        );
    }
    // Through the cluster: availability check (outlier/health state) + P2C.
    let m = Metrics::new().expect("metrics");
    let eps: Vec<v1::Endpoint> = keys
        .iter()
        .map(|k| v1::Endpoint {
            address: k.clone(),
            weight: 1,
            ..Default::default()
        })
        .collect();
    let cluster = Cluster::build(
        &v1::Cluster {
            name: "c".into(),
            outlier: Some(v1::OutlierDetection {
                consecutive_failures: 5,
                ..Default::default()
            }),
            ..Default::default()
        },
        &eps,
        None,
        &m,
    )
    .expect("cluster");
    c.bench_function(
        "cluster_pick/p2c_peak_ewma_with_outlier/10_endpoints",
        |b| b.iter(|| black_box(cluster.pick_index(None))),
    );
}

fn headers_rewrite(c: &mut Criterion) {
    let endpoint = "10.0.0.1:80".parse().expect("addr");
    c.bench_function("prepare_request/h1_typical_headers", |b| {
        b.iter_batched(
            || {
                Request::builder()
                    .uri("/api/v1/items?x=1")
                    .header("host", "backend")
                    .header("user-agent", "bench")
                    .header("accept", "*/*")
                    .header("connection", "keep-alive")
                    .body(())
                    .expect("request")
            },
            |mut req| {
                prepare_request(&mut req, Wire::H1, endpoint);
                req
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert("content-type", HeaderValue::from_static("application/json"));
    resp_headers.insert("content-length", HeaderValue::from_static("42"));
    c.bench_function("strip_hop_by_hop/response_without_hop_headers", |b| {
        b.iter(|| strip_hop_by_hop(black_box(&mut resp_headers)))
    });
}

fn metrics_and_checks(c: &mut Criterion) {
    let m = Metrics::new().expect("metrics");
    let rm = m.request_metrics("outbound", "r", "c");
    c.bench_function("metrics/record_request", |b| {
        b.iter(|| rm.record(black_box(http::StatusCode::OK), "", 0.001))
    });
    let budget = RetryBudget::default();
    let params = BudgetParams::default();
    c.bench_function("retry_budget/deposit", |b| {
        b.iter(|| budget.deposit(&params))
    });
    let breaker = Arc::new(BreakerState::new(ClusterResilienceMetrics::detached("c")));
    c.bench_function("breaker/acquire_release", |b| {
        b.iter(|| black_box(breaker.try_acquire(Limit::Requests, 1024).is_ok()))
    });
    let limiter = RateLimiter::new(u32::MAX, u32::MAX);
    c.bench_function("rate_limit/check", |b| {
        b.iter(|| black_box(limiter.check()))
    });
    // The downstream idle-timeout bookkeeping every request does (begin + end of in-flight).
    let activity = Activity::new();
    c.bench_function("idle/in_flight_begin_end", |b| {
        b.iter(|| drop(black_box(activity.begin())))
    });
}

criterion_group!(
    benches,
    route_match,
    balancer_pick,
    headers_rewrite,
    metrics_and_checks
);
criterion_main!(benches);
