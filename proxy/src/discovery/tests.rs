//! The client's failover against fake control-plane replicas (tonic servers in the test): it
//! moves to the next address when a stream breaks or an address is unreachable, tries every
//! address a name resolves to, and resumes with the versions it holds, serving meanwhile.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use weft_proto::v1;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::discovery_server::{Discovery as DiscoveryService, DiscoveryServer};

use super::status::ControlPlaneStatus;
use super::{ConfigApplier, Discovery};
use crate::listen::{DataPlane, ListenerManager};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotStore;

type Outbound = mpsc::Sender<Result<v1::DiscoveryResponse, Status>>;

/// One fake replica: hands every stream it accepts, tagged with its name, to the test.
struct Fake {
    name: &'static str,
    streams: mpsc::Sender<Accepted>,
}

struct Accepted {
    replica: &'static str,
    requests: Streaming<v1::DiscoveryRequest>,
    responses: Outbound,
}

#[tonic::async_trait]
impl DiscoveryService for Fake {
    type StreamStream = ReceiverStream<Result<v1::DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let _ = self
            .streams
            .send(Accepted {
                replica: self.name,
                requests: req.into_inner(),
                responses: tx,
            })
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts a fake replica named `name` on `addr`; aborting the handle stops it.
async fn replica(
    name: &'static str,
    addr: SocketAddr,
    streams: mpsc::Sender<Accepted>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(Fake { name, streams }))
            .serve_with_incoming(TcpListenerStream::new(l))
            .await;
    });
    (addr, task)
}

/// A port nothing listens on (bound, then released).
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn applier(store: &Arc<SnapshotStore>) -> ConfigApplier {
    let plane = DataPlane {
        store: Arc::clone(store),
        drain_timeout: Duration::from_millis(200),
        http: Arc::new(crate::http::server_builder()),
        tls: Arc::new(
            crate::tls::MeshTls::new(crate::tls::metrics::SecurityMetrics::unregistered())
                .expect("TLS 1.3 config"),
        ),
        limits: crate::conn_limit::RefusalMetrics::unregistered(),
        max_connections: crate::conn_limit::DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
        transparent: Arc::new(crate::transparent::Transparent::unregistered()),
    };
    let manager = ListenerManager::new(tokio::runtime::Handle::current(), plane);
    ConfigApplier::new(
        Arc::clone(store),
        Arc::new(Mutex::new(manager)),
        Metrics::new().unwrap(),
    )
}

fn node() -> v1::Node {
    v1::Node {
        id: "web-1".into(),
        service: "web".into(),
        ..Default::default()
    }
}

/// A complete config whose inbound listener binds `listen`.
fn response(nonce: &str, listen: SocketAddr) -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        nonce: nonce.into(),
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![v1::Listener {
                name: "inbound".into(),
                address: listen.to_string(),
                direction: v1::Direction::Inbound.into(),
                protocol: v1::ListenerProtocol::Http.into(),
                cluster: "inbound".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        routes: Some(v1::RouteSet {
            version: "r1".into(),
            tables: vec![],
        }),
        clusters: Some(v1::ClusterSet {
            version: "c1".into(),
            clusters: vec![v1::Cluster {
                name: "inbound".into(),
                ..Default::default()
            }],
        }),
        endpoints: Some(v1::EndpointSet {
            version: "e1".into(),
            clusters: vec![v1::ClusterEndpoints {
                cluster: "inbound".into(),
                endpoints: vec![v1::Endpoint {
                    address: "127.0.0.1:8080".into(),
                    ..Default::default()
                }],
            }],
        }),
        ..Default::default()
    }
}

async fn accepted(streams: &mut mpsc::Receiver<Accepted>) -> Accepted {
    tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("no stream reached a replica within 10s")
        .expect("replicas gone")
}

async fn next(s: &mut Streaming<v1::DiscoveryRequest>) -> Kind {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("proxy sent nothing within 10s")
        .unwrap()
        .expect("stream ended")
        .kind
        .unwrap()
}

async fn hello(s: &mut Streaming<v1::DiscoveryRequest>) -> v1::Hello {
    match next(s).await {
        Kind::Hello(h) => h,
        other => panic!("first message is not Hello: {other:?}"),
    }
}

fn held_versions(h: &v1::Hello) -> Vec<String> {
    let mut v: Vec<String> = h.held.iter().map(|t| t.version.clone()).collect();
    v.sort_unstable();
    v
}

fn reconnects(status: &ControlPlaneStatus, reason: &str) -> u64 {
    status.to_json()["reconnects"][reason].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_moves_to_the_next_replica_which_resumes_without_a_push() {
    let (streams_tx, mut streams) = mpsc::channel(8);
    let (a, _a) = replica("a", "127.0.0.1:0".parse().unwrap(), streams_tx.clone()).await;
    let (b, _b) = replica("b", "127.0.0.1:0".parse().unwrap(), streams_tx).await;
    let store = Arc::new(SnapshotStore::empty());
    let client = Discovery::with_control_planes(
        vec![format!("http://{a}"), format!("http://{b}")],
        node(),
        applier(&store),
    );
    let status = Arc::clone(client.status());
    tokio::spawn(client.run());

    // First stream: replica a, nothing held yet; a full push, ACKed.
    let mut s = accepted(&mut streams).await;
    assert_eq!(s.replica, "a");
    assert!(hello(&mut s.requests).await.held.is_empty());
    let listen = dead_addr();
    s.responses.send(Ok(response("1", listen))).await.unwrap();
    assert!(matches!(next(&mut s.requests).await, Kind::Ack(_)));
    assert_eq!(status.to_json()["address"], a.to_string());
    assert!(status.is_connected());

    // a breaks the stream (it stays up): the proxy moves to b, not back to a, and says what it
    // holds; b has nothing newer and sends nothing.
    s.responses
        .send(Err(Status::unavailable("replica shutting down")))
        .await
        .unwrap();
    let mut s = accepted(&mut streams).await;
    assert_eq!(s.replica, "b");
    let h = hello(&mut s.requests).await;
    assert_eq!(held_versions(&h), ["c1", "e1", "l1", "r1"]);
    assert_eq!(h.node.unwrap().id, "web-1");
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(status.is_connected() && status.to_json()["address"] == b.to_string()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the status never showed the stream to b");
    assert_eq!(reconnects(&status, "stream_error"), 1);
    // Serving all along: the snapshot (and its listener) stayed.
    let held = store.load_full().expect("the snapshot stays");
    assert_eq!(held.resources.endpoints.as_ref().unwrap().version, "e1");
    tokio::net::TcpStream::connect(listen)
        .await
        .expect("the snapshot's listener is still bound");
    // The proxy is quiet on the resumed stream: nothing to ACK, nothing else sent.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.requests.message())
            .await
            .is_err(),
        "the proxy sent something on a stream that pushed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_skipped_and_its_failure_counted() {
    let (streams_tx, mut streams) = mpsc::channel(8);
    let (b, _b) = replica("b", "127.0.0.1:0".parse().unwrap(), streams_tx).await;
    let dead = dead_addr();
    let store = Arc::new(SnapshotStore::empty());
    let client = Discovery::with_control_planes(
        vec![format!("http://{dead}"), format!("http://{b}")],
        node(),
        applier(&store),
    );
    let status = Arc::clone(client.status());
    tokio::spawn(client.run());
    let mut s = accepted(&mut streams).await;
    assert_eq!(s.replica, "b");
    hello(&mut s.requests).await;
    assert_eq!(reconnects(&status, "unreachable"), 1);
    let dump = status.to_json();
    assert!(
        dump["last_error"]
            .as_str()
            .unwrap()
            .contains(&dead.to_string()),
        "{dump}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_a_name_is_tried() {
    let (streams_tx, mut streams) = mpsc::channel(8);
    let (c, _c) = replica("c", "127.0.0.1:0".parse().unwrap(), streams_tx).await;
    let dead = dead_addr();
    let store = Arc::new(SnapshotStore::empty());
    let mut client = Discovery::with_control_planes(
        vec!["http://cp.weft.test:15010".to_owned()],
        node(),
        applier(&store),
    );
    // The name has two addresses: the first dead, the second a replica.
    let lookups = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&lookups);
    client.lookup = Arc::new(move |host: String, port: u16| {
        seen.lock().unwrap().push(format!("{host}:{port}"));
        Box::pin(async move { Ok(vec![dead, c]) })
    });
    tokio::spawn(client.run());
    let mut s = accepted(&mut streams).await;
    assert_eq!(s.replica, "c");
    hello(&mut s.requests).await;
    assert_eq!(*lookups.lock().unwrap(), ["cp.weft.test:15010"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_down_it_keeps_trying_with_growing_delays() {
    // Two dead addresses: the client goes round them, never faster than the backoff allows,
    // and reaches a replica that comes up later on one of them.
    let (streams_tx, mut streams) = mpsc::channel(8);
    let (dead1, dead2) = (dead_addr(), dead_addr());
    let store = Arc::new(SnapshotStore::empty());
    let client = Discovery::with_control_planes(
        vec![format!("http://{dead1}"), format!("http://{dead2}")],
        node(),
        applier(&store),
    );
    let status = Arc::clone(client.status());
    tokio::spawn(client.run());
    tokio::time::timeout(Duration::from_secs(10), async {
        while reconnects(&status, "unreachable") < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("fewer than 4 attempts within 10s");
    let (_up, _task) = replica("late", dead2, streams_tx).await;
    let mut s = accepted(&mut streams).await;
    assert_eq!(s.replica, "late");
    hello(&mut s.requests).await;
    // The replica came up after at least 4 failures; the delays after them (at least 400 ms,
    // then 800 ms) leave room for one or two more, never for a hot loop's hundreds.
    let failed = reconnects(&status, "unreachable");
    assert!((4..=8).contains(&failed), "{failed} failed attempts");
}

#[tokio::test]
async fn every_apply_is_timed_and_its_bytes_counted_and_the_old_snapshot_is_released() {
    let store = Arc::new(SnapshotStore::empty());
    let m = super::ApplyMetrics::unregistered();
    let applier = applier(&store).with_apply_metrics(m.clone());
    let listen = dead_addr();
    let first = response("n1", listen);
    let mut received = prost::Message::encoded_len(&first) as u64;
    assert!(matches!(applier.apply(&first).kind, Some(Kind::Ack(_))));
    assert_eq!(m.duration.get_sample_count(), 1);
    assert_eq!(m.received_bytes.get(), received);
    let applied = store.load_full().expect("a snapshot");

    // An endpoint change: applied, timed, counted; the replaced snapshot is let go once
    // nothing else holds it (here: once the test drops its own reference).
    let mut change = v1::DiscoveryResponse {
        nonce: "n2".into(),
        endpoints: first.endpoints.clone(),
        ..Default::default()
    };
    let eps = change.endpoints.as_mut().unwrap();
    eps.version = "e2".into();
    eps.clusters[0].endpoints[0].address = "127.0.0.1:8081".into();
    received += prost::Message::encoded_len(&change) as u64;
    assert!(matches!(applier.apply(&change).kind, Some(Kind::Ack(_))));
    assert_eq!(m.duration.get_sample_count(), 2);
    assert_eq!(m.received_bytes.get(), received);
    let weak = Arc::downgrade(&applied);
    drop(applied);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while weak.strong_count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replaced snapshot was never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A rejected response is timed and counted too.
    let mut bad = change.clone();
    bad.nonce = "n3".into();
    let eps = bad.endpoints.as_mut().unwrap();
    eps.version = "e3".into();
    eps.clusters[0].endpoints[0].address = "not an address".into();
    received += prost::Message::encoded_len(&bad) as u64;
    assert!(matches!(applier.apply(&bad).kind, Some(Kind::Nack(_))));
    assert_eq!(m.duration.get_sample_count(), 3);
    assert_eq!(m.received_bytes.get(), received);
}

/// A snapshot builder thread runs under SCHED_IDLE (unprivileged processes may always switch
/// to it), so a woken request thread takes its CPU at once.
#[test]
fn snapshot_builders_run_under_sched_idle() {
    use thread_priority::unix::thread_schedule_policy;
    use thread_priority::{NormalThreadSchedulePolicy, ThreadSchedulePolicy};
    let (before, after) = std::thread::spawn(|| {
        let before = thread_schedule_policy().expect("policy");
        super::yield_to_the_data_path();
        (before, thread_schedule_policy().expect("policy"))
    })
    .join()
    .expect("thread");
    assert_eq!(
        before,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)
    );
    assert_eq!(
        after,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)
    );
    // This thread (the test's) is untouched.
    assert_eq!(
        thread_schedule_policy().expect("policy"),
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other)
    );
}
