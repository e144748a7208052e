use std::collections::HashSet;
use std::sync::Arc;

use weft_proto::v1;

use super::super::tests::resources;
use super::super::{
    build_clusters, outbound_peer_labels, EndpointChange, EndpointsIn, HeldEndpoints, Resources,
    Sets, Snapshot, Unchanged,
};
use super::patch;
use crate::metrics::Metrics;

const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/svc";

fn endpoint(addr: &str, weight: u32, identity: &str, zone: &str) -> v1::Endpoint {
    v1::Endpoint {
        address: addr.into(),
        weight,
        identity: identity.into(),
        labels: [("zone".to_owned(), zone.to_owned())].into(),
        ..Default::default()
    }
}

/// The fixture with services `svc-0`..`svc-5` (a route each, two endpoints each).
fn mesh() -> Resources {
    let mut r = resources();
    let names: Vec<String> = (0..6).map(|i| format!("svc-{i}.default")).collect();
    let clusters = &mut r.clusters.as_mut().unwrap().clusters;
    clusters.extend(names.iter().map(|n| v1::Cluster {
        name: n.clone(),
        ..Default::default()
    }));
    let eps = &mut r.endpoints.as_mut().unwrap().clusters;
    eps.extend(names.iter().enumerate().map(|(i, n)| v1::ClusterEndpoints {
        cluster: n.clone(),
        endpoints: vec![
            endpoint(&format!("127.0.7.{i}:80"), 1, IDENTITY, "a"),
            endpoint(&format!("127.0.7.{i}:81"), 2, IDENTITY, "b"),
        ],
    }));
    let routes = &mut r.routes.as_mut().unwrap().tables[0].routes;
    routes.extend(names.iter().map(|n| v1::Route {
        name: format!("route-{n}"),
        r#match: Some(v1::RouteMatch {
            hosts: vec![n.clone()],
            ..Default::default()
        }),
        destinations: vec![v1::WeightedCluster {
            cluster: n.clone(),
            weight: 100,
        }],
        ..Default::default()
    }));
    r
}

/// What a cluster serves: each endpoint's address, weight and expected identity.
fn served(s: &Snapshot, name: &str) -> Vec<(std::net::SocketAddr, u32, Option<String>)> {
    s.clusters[name]
        .endpoints
        .iter()
        .map(|e| {
            let id = e.pool.mesh_identity().map(|i| i.as_str().to_owned());
            (e.addr, e.weight, id)
        })
        .collect()
}

/// `a` and `b` serve the same clusters with the same endpoints and transport labels, and
/// route each host to the same cluster under the same request labels.
fn assert_same_config(a: &Snapshot, b: &Snapshot, has_identity: bool) {
    let names = |s: &Snapshot| s.clusters.keys().cloned().collect::<HashSet<Arc<str>>>();
    assert_eq!(names(a), names(b));
    for name in a.clusters.keys() {
        assert_eq!(served(a, name), served(b, name), "{name}");
        assert_eq!(
            outbound_peer_labels(&a.clusters[name], has_identity),
            outbound_peer_labels(&b.clusters[name], has_identity),
            "{name}"
        );
    }
    for i in 0..6 {
        let host = format!("svc-{i}.default");
        let dest = |s: &Snapshot| {
            let d = route_to(s, &host).destinations.items().next().unwrap();
            let m = d.metrics();
            (
                d.cluster.name.to_string(),
                m.tls().to_owned(),
                m.peer().to_owned(),
            )
        };
        assert_eq!(dest(a), dest(b), "{host}");
    }
}

/// The outbound route a request for `host` takes.
fn route_to<'a>(s: &'a Snapshot, host: &str) -> &'a crate::route::Route {
    let headers = http::HeaderMap::new();
    s.route_table("outbound")
        .unwrap()
        .find(&crate::route::RequestInfo {
            host,
            path: "/",
            query: None,
            method: &http::Method::GET,
            headers: &headers,
        })
        .unwrap()
}

/// `previous`' endpoints with `edit` applied to cluster `name`: the delta's whole set and
/// change set, as `discovery::delta` makes them.
fn delta(
    previous: &Snapshot,
    version: &str,
    name: &str,
    edit: impl FnOnce(&mut Vec<v1::Endpoint>),
) -> (HeldEndpoints, EndpointChange) {
    let mut set = previous
        .resources
        .endpoints
        .as_ref()
        .unwrap()
        .decode()
        .unwrap();
    set.version = version.into();
    let ce = set.clusters.iter_mut().find(|c| c.cluster == name).unwrap();
    edit(&mut ce.endpoints);
    let change = EndpointChange {
        base: previous
            .resources
            .endpoints
            .as_ref()
            .unwrap()
            .version
            .clone(),
        clusters: [name.to_owned()].into(),
    };
    (HeldEndpoints::encode(&set), change)
}

fn push() -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        nonce: "n".into(),
        ..Default::default()
    }
}

/// The build after `previous` of the push `delta` describes (what production runs), and the
/// full build of the same sets with no previous snapshot.
fn both(
    previous: &Snapshot,
    delta: (HeldEndpoints, EndpointChange),
    m: &Metrics,
    has_identity: bool,
) -> (Snapshot, Snapshot) {
    let (merged, unchanged) =
        Resources::merged_unchanged(Some(&previous.resources), push(), Some(delta)).unwrap();
    let mut whole = merged.clone();
    whole.listeners = previous.resources.listeners.as_deref().cloned();
    whole.clusters = previous.resources.clusters.as_deref().cloned();
    whole.routes = previous.resources.routes().unwrap();
    whole.endpoints = Some(unchanged.endpoints.as_ref().unwrap().decode().unwrap());
    let patched =
        Snapshot::build_with_identity(merged, unchanged, Some(previous), m, has_identity).unwrap();
    let full =
        Snapshot::build_with_identity(whole, Unchanged::default(), None, m, has_identity).unwrap();
    (patched, full)
}

/// Whether [`patch`] applies to the push `delta` after `previous` (the fast path is taken).
fn patches(previous: &Snapshot, delta: &(HeldEndpoints, EndpointChange), m: &Metrics) -> bool {
    let sets = Sets {
        listeners: None,
        clusters: previous.resources.clusters.as_deref(),
        endpoints: Some(EndpointsIn::Held(&delta.0)),
        policies: None,
        trust: None,
    };
    patch(sets, &delta.1.clusters, previous, m, previous.has_identity).is_some()
}

#[test]
fn a_patched_build_equals_the_full_build_over_endpoint_changes() {
    // Sets ordered by name (as the control plane sends them: clusters found by binary search)
    // and in reverse (found by a scan).
    for (has_identity, reversed) in [(true, false), (false, false), (true, true)] {
        let m = Metrics::new().unwrap();
        let mut r = mesh();
        if reversed {
            r.clusters.as_mut().unwrap().clusters.reverse();
            r.endpoints.as_mut().unwrap().clusters.reverse();
        }
        let mut s =
            Snapshot::build_with_identity(r, Unchanged::default(), None, &m, has_identity).unwrap();
        type Edit = Box<dyn FnOnce(&mut Vec<v1::Endpoint>)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "svc-2.default",
                Box::new(|e| e.push(endpoint("127.0.8.1:80", 3, IDENTITY, "a"))),
            ),
            ("svc-2.default", Box::new(|e| drop(e.remove(0)))),
            ("svc-4.default", Box::new(|e| e[1].weight = 7)),
            (
                "svc-4.default",
                Box::new(|e| {
                    e[0].labels.insert("zone".into(), "c".into());
                }),
            ),
            // The transport changes: a plaintext endpoint joins (`tls="none"`).
            (
                "svc-1.default",
                Box::new(|e| e.push(endpoint("127.0.8.2:80", 1, "", "a"))),
            ),
            // Another identity: `peer=""` for that cluster.
            (
                "svc-3.default",
                Box::new(|e| e[0].identity = "spiffe://cluster.local/ns/x/sa/y".into()),
            ),
            ("svc-5.default", Box::new(Vec::clear)),
            (
                "svc-5.default",
                Box::new(|e| e.push(endpoint("127.0.8.3:80", 1, IDENTITY, "b"))),
            ),
        ];
        for (i, (name, edit)) in edits.into_iter().enumerate() {
            let d = delta(&s, &format!("e{}", i + 2), name, edit);
            assert!(patches(&s, &d, &m), "step {i}: the patch applies");
            let (patched, full) = both(&s, d, &m, has_identity);
            assert_same_config(&patched, &full, has_identity);
            // Every cluster the push did not name is the previous one; the named one is new.
            for (n, c) in &patched.clusters {
                assert_eq!(
                    Arc::ptr_eq(c, &s.clusters[n]),
                    &**n != name,
                    "step {i}: {n}"
                );
            }
            // The routes to the other clusters are the previous ones, the one to `name`
            // rebuilt; all of them when the cluster's transport labels changed (a new family).
            let relabelled = outbound_peer_labels(&s.clusters[name], has_identity)
                != outbound_peer_labels(&patched.clusters[name], has_identity);
            let (old, new) = (
                s.route_table("outbound").unwrap(),
                patched.route_table("outbound").unwrap(),
            );
            assert_eq!(old.len(), 7);
            for r in 0..old.len() {
                // Route 0 is the fixture's (backend.default), route j + 1 svc-j's.
                let to_name = r > 0 && format!("svc-{}.default", r - 1) == name;
                assert_eq!(
                    new.shares_route(old, r),
                    !to_name && !relabelled,
                    "step {i}: route {r}"
                );
            }
            assert_eq!(
                relabelled,
                matches!((has_identity, i), (true, 4..=7)),
                "step {i}"
            );
            s = patched;
        }
    }
}

#[test]
fn the_patch_equals_the_full_cluster_build() {
    let m = Metrics::new().unwrap();
    let s = Snapshot::build_with_identity(mesh(), Unchanged::default(), None, &m, true).unwrap();
    let d = delta(&s, "e2", "svc-0.default", |e| e[0].weight = 9);
    let sets = Sets {
        listeners: None,
        clusters: s.resources.clusters.as_deref(),
        endpoints: Some(EndpointsIn::Held(&d.0)),
        policies: None,
        trust: None,
    };
    let patched = patch(sets, &d.1.clusters, &s, &m, true).unwrap();
    let mut errors = Vec::new();
    let full = build_clusters(sets, None, Some(&s), &m, &mut errors);
    assert!(errors.is_empty());
    assert_eq!(patched.built.clusters.len(), full.clusters.len());
    for (n, c) in &full.clusters {
        let p = &patched.built.clusters[n];
        assert_eq!(Arc::ptr_eq(p, c), &**n != "svc-0.default", "{n}");
        let eps = |c: &crate::cluster::Cluster| {
            c.endpoints
                .iter()
                .map(|e| (e.addr, e.weight))
                .collect::<Vec<_>>()
        };
        assert_eq!(eps(p), eps(c));
    }
    let replaced = |r: &Option<Vec<Arc<crate::cluster::Cluster>>>| {
        r.as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(replaced(&patched.built.replaced), replaced(&full.replaced));
    // The transports did not change: the previous family is kept.
    assert!(std::ptr::eq(patched.kept_family.unwrap(), &s));
}

#[test]
fn what_the_patch_does_not_cover_takes_the_full_build() {
    let m = Metrics::new().unwrap();
    let s = Snapshot::build_with_identity(mesh(), Unchanged::default(), None, &m, true).unwrap();
    // An endpoint that does not build: not patched, and the push is the full build's NACK
    // naming the cluster; the previous snapshot is untouched.
    let bad = delta(&s, "e2", "svc-1.default", |e| {
        e[0].address = "nowhere".into()
    });
    assert!(!patches(&s, &bad, &m));
    let (merged, unchanged) =
        Resources::merged_unchanged(Some(&s.resources), push(), Some(bad.clone())).unwrap();
    let patched_err = Snapshot::build_with_identity(merged, unchanged, Some(&s), &m, true)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    let mut whole = mesh();
    whole.endpoints = Some(bad.0.decode().unwrap());
    let full_err = Snapshot::build_with_identity(whole, Unchanged::default(), None, &m, true)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    assert_eq!(patched_err, full_err);
    assert!(
        patched_err.iter().any(|e| e.contains("svc-1.default")),
        "{patched_err:?}"
    );
    assert_eq!(
        served(&s, "svc-1.default")[0].0,
        "127.0.7.1:80".parse().unwrap()
    );

    // A cluster that re-reads at every build (DNS endpoints) in the set: not patched.
    let mut dns = mesh();
    dns.clusters.as_mut().unwrap().clusters[0].dns_endpoints = vec![v1::DnsEndpoint {
        host: "localhost".into(),
        port: 80,
        ..Default::default()
    }];
    let d = Snapshot::build_with_identity(dns, Unchanged::default(), None, &m, true).unwrap();
    assert!(d.clusters_reread);
    let change = delta(&d, "e2", "svc-2.default", |e| e[0].weight = 5);
    assert!(!patches(&d, &change, &m));
    assert!(!s.clusters_reread);

    // More clusters named than the patch takes.
    let mut many = delta(&s, "e2", "svc-2.default", |e| e[0].weight = 5);
    many.1.clusters = (0..=super::FEW_REPLACED)
        .map(|i| format!("x-{i}"))
        .collect();
    assert!(!patches(&s, &many, &m));

    // A push that adds a cluster (a new cluster set) and its endpoints: the full build (the
    // set is not the previous snapshot's own), which builds the new cluster.
    let mut added = s.resources.clusters.as_deref().unwrap().clone();
    added.version = "c2".into();
    added.clusters.push(v1::Cluster {
        name: "svc-9.default".into(),
        ..Default::default()
    });
    let mut set = s.resources.endpoints.as_ref().unwrap().decode().unwrap();
    set.version = "e2".into();
    set.clusters.push(v1::ClusterEndpoints {
        cluster: "svc-9.default".into(),
        endpoints: vec![endpoint("127.0.9.1:80", 1, IDENTITY, "a")],
    });
    let change = EndpointChange {
        base: "e1".into(),
        clusters: ["svc-9.default".to_owned()].into(),
    };
    let resp = v1::DiscoveryResponse {
        clusters: Some(added),
        ..push()
    };
    let (merged, unchanged) = Resources::merged_unchanged(
        Some(&s.resources),
        resp,
        Some((HeldEndpoints::encode(&set), change)),
    )
    .unwrap();
    let next = Snapshot::build_with_identity(merged, unchanged, Some(&s), &m, true).unwrap();
    assert_eq!(
        served(&next, "svc-9.default")[0].0,
        "127.0.9.1:80".parse().unwrap()
    );
    assert!(Arc::ptr_eq(
        &next.clusters["svc-0.default"],
        &s.clusters["svc-0.default"]
    ));
    // And one that removes a cluster.
    let mut removed = s.resources.clusters.as_deref().unwrap().clone();
    removed.version = "c3".into();
    removed.clusters.retain(|c| c.name != "db.default");
    let resp = v1::DiscoveryResponse {
        clusters: Some(removed),
        ..push()
    };
    let (merged, unchanged) = Resources::merged_unchanged(Some(&s.resources), resp, None).unwrap();
    let next = Snapshot::build_with_identity(merged, unchanged, Some(&s), &m, true);
    // The TCP listener names db.default: the full build's NACK.
    assert!(next
        .unwrap_err()
        .iter()
        .any(|e| e.to_string().contains("db.default")));
}
