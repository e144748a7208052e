//! Request metrics by peer identity through the public surface: a snapshot built from
//! hand-made resources, and `HttpProxy`s for inbound connections with and without a verified
//! client identity (`HttpProxy::request_metrics`).

use std::sync::Arc;

use weft_proto::v1;
use weft_proxy::metrics::{Metrics, RequestMetrics, MAX_PEERS_PER_HANDLE, PEER_OTHER};
use weft_proxy::pipeline::HttpProxy;
use weft_proxy::snapshot::{ListenerKind, Resources, Snapshot, SnapshotStore};
use weft_proxy::tls::spiffe::SpiffeId;

const INBOUND: &str = "127.0.0.1:15006";

fn id(service: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{service}")
}

fn spiffe(service: &str) -> Option<SpiffeId> {
    Some(SpiffeId::parse(&id(service)).unwrap())
}

/// An inbound HTTP listener whose catch-all is the local app (cluster `inbound`).
fn resources() -> Resources {
    Resources {
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![v1::Listener {
                name: "inbound".into(),
                address: INBOUND.into(),
                direction: v1::Direction::Inbound.into(),
                protocol: v1::ListenerProtocol::Http.into(),
                cluster: "inbound".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        clusters: Some(v1::ClusterSet {
            version: "c1".into(),
            clusters: vec![v1::Cluster {
                name: "inbound".into(),
                mtls: v1::MtlsMode::Disabled.into(),
                ..Default::default()
            }],
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e1".into(),
            clusters: vec![v1::ClusterEndpoints {
                cluster: "inbound".into(),
                endpoints: vec![v1::Endpoint {
                    address: "127.0.0.1:8080".into(),
                    weight: 1,
                    ..Default::default()
                }],
            }],
        }),
        ..Default::default()
    }
}

struct Fixture {
    metrics: Metrics,
    store: Arc<SnapshotStore>,
    snapshot: Arc<Snapshot>,
}

impl Fixture {
    fn new() -> Self {
        let metrics = Metrics::new().unwrap();
        let snapshot = Arc::new(Snapshot::build(resources(), None, &metrics).unwrap());
        let store = Arc::new(SnapshotStore::empty());
        store.store(Some(Arc::clone(&snapshot)));
        Self {
            metrics,
            store,
            snapshot,
        }
    }

    /// The service of a new connection to the inbound listener from `peer` (None = plaintext).
    fn connection(&self, peer: Option<SpiffeId>) -> HttpProxy {
        let listener = Arc::clone(&self.snapshot.listeners[&INBOUND.parse().unwrap()]);
        HttpProxy::new(Arc::clone(&self.store), listener).with_peer(peer)
    }

    /// The catch-all's base handle (what the snapshot resolved for the listener).
    fn base(&self) -> Arc<RequestMetrics> {
        let l = &self.snapshot.listeners[&INBOUND.parse().unwrap()];
        let ListenerKind::Http(h) = &l.kind else {
            panic!("an HTTP listener")
        };
        Arc::clone(&h.catch_all.as_ref().unwrap().metrics)
    }
}

#[test]
fn inbound_connection_resolves_its_peer_handle_once_and_reuses_it() {
    let f = Fixture::new();
    let base = f.base();
    assert_eq!((base.tls(), base.peer()), ("none", ""));

    let web = f.connection(spiffe("web"));
    let first = web.request_metrics(&base);
    assert_eq!((first.tls(), first.peer()), ("mtls", id("web").as_str()));
    assert_eq!(first.route(), "inbound");
    for _ in 0..10 {
        assert!(Arc::ptr_eq(&first, &web.request_metrics(&base)));
    }
    // A clone of the service (same connection) shares the resolved handle.
    let same_connection = web.clone();
    assert!(Arc::ptr_eq(&first, &same_connection.request_metrics(&base)));
    assert!(Arc::ptr_eq(&first, &web.request_metrics(&base)));
    // Another connection of the same caller counts on the same series.
    assert!(Arc::ptr_eq(
        &first,
        &f.connection(spiffe("web")).request_metrics(&base)
    ));
    // Another caller gets its own; a plaintext connection uses the base itself.
    let other = f.connection(spiffe("other")).request_metrics(&base);
    assert_eq!(other.peer(), id("other"));
    let plain = f.connection(None);
    assert!(Arc::ptr_eq(&base, &plain.request_metrics(&base)));

    first.record(http::StatusCode::OK, "", 0.001);
    first.record(http::StatusCode::FORBIDDEN, "", 0.001);
    base.record(http::StatusCode::OK, "", 0.001);
    let text = String::from_utf8(f.metrics.encode()).unwrap();
    let web_ok = format!(
        r#"weft_requests_total{{cluster="inbound",code="200",code_class="2xx",direction="inbound",grpc_status="",peer="{}",route="inbound",tls="mtls"}} 1"#,
        id("web")
    );
    assert!(text.contains(&web_ok), "{text}");
    assert!(
        text.contains(&format!(
            r#"code="403",code_class="4xx",direction="inbound",grpc_status="",peer="{}""#,
            id("web")
        )),
        "{text}"
    );
    assert!(text.contains(r#"weft_requests_total{cluster="inbound",code="200",code_class="2xx",direction="inbound",grpc_status="",peer="",route="inbound",tls="none"} 1"#), "{text}");
}

#[test]
fn callers_past_the_bound_share_peer_other() {
    let f = Fixture::new();
    let base = f.base();
    for n in 0..MAX_PEERS_PER_HANDLE {
        let m = f
            .connection(spiffe(&format!("caller-{n}")))
            .request_metrics(&base);
        assert_eq!(m.peer(), id(&format!("caller-{n}")));
    }
    let late = f.connection(spiffe("late")).request_metrics(&base);
    assert_eq!((late.tls(), late.peer()), ("mtls", PEER_OTHER));
    let later = f.connection(spiffe("later")).request_metrics(&base);
    assert!(Arc::ptr_eq(&late, &later));
    // An admitted caller keeps its own series on a new connection.
    assert_eq!(
        f.connection(spiffe("caller-7"))
            .request_metrics(&base)
            .peer(),
        id("caller-7")
    );
    // The bound holds across config pushes: a rebuilt snapshot's handle for the same labels is
    // the same handle, with the same admitted callers (`metric_series.rs`: also once the
    // previous snapshot is gone).
    let rebuilt = Snapshot::build(resources(), Some(&f.snapshot), &f.metrics).unwrap();
    let ListenerKind::Http(h) = &rebuilt.listeners[&INBOUND.parse().unwrap()].kind else {
        panic!("an HTTP listener")
    };
    let new_base = &h.catch_all.as_ref().unwrap().metrics;
    assert!(Arc::ptr_eq(&base, new_base));
    assert_eq!(
        f.connection(spiffe("latest"))
            .request_metrics(new_base)
            .peer(),
        PEER_OTHER
    );
}
