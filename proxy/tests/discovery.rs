//! The discovery client against a fake control plane (a tonic server in the test): Hello, ACK,
//! NACK with the old config kept, and reconnect resending held versions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use weft_proto::v1;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::discovery_server::{Discovery as DiscoveryService, DiscoveryServer};
use weft_proxy::discovery::{ConfigApplier, Discovery};
use weft_proxy::listen::{DataPlane, ListenerManager};
use weft_proxy::metrics::Metrics;
use weft_proxy::snapshot::SnapshotStore;

type Outbound = mpsc::Sender<Result<v1::DiscoveryResponse, Status>>;

struct Fake {
    streams: mpsc::Sender<(Streaming<v1::DiscoveryRequest>, Outbound)>,
}

#[tonic::async_trait]
impl DiscoveryService for Fake {
    type StreamStream = ReceiverStream<Result<v1::DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<v1::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        self.streams.send((req.into_inner(), tx)).await.unwrap();
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn response(nonce: &str, listen: SocketAddr, endpoint: &str, ev: &str) -> v1::DiscoveryResponse {
    v1::DiscoveryResponse {
        nonce: nonce.into(),
        listeners: Some(v1::ListenerSet {
            version: "l1".into(),
            listeners: vec![v1::Listener {
                name: "inbound".into(),
                address: listen.to_string(),
                direction: v1::Direction::Inbound.into(),
                protocol: v1::ListenerProtocol::Http.into(),
                route_table: String::new(),
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
            version: ev.into(),
            clusters: vec![v1::ClusterEndpoints {
                cluster: "inbound".into(),
                endpoints: vec![v1::Endpoint {
                    address: endpoint.into(),
                    ..Default::default()
                }],
            }],
        }),
        ..Default::default()
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ack_nack_and_reconnect() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = l.local_addr().unwrap();
    let (streams_tx, mut streams) = mpsc::channel(4);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiscoveryServer::new(Fake {
                streams: streams_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );

    let store = Arc::new(SnapshotStore::empty());
    let plane = DataPlane {
        store: store.clone(),
        drain_timeout: Duration::from_millis(200),
        http: Arc::new(weft_proxy::http::server_builder()),
        tls:
            Arc::new(
                weft_proxy::tls::MeshTls::new(
                    weft_proxy::tls::metrics::SecurityMetrics::unregistered(),
                )
                .expect("TLS 1.3 config"),
            ),
        limits: weft_proxy::conn_limit::RefusalMetrics::unregistered(),
        max_connections: weft_proxy::conn_limit::DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
        transparent: Arc::new(weft_proxy::transparent::Transparent::unregistered()),
    };
    let manager = ListenerManager::new(tokio::runtime::Handle::current(), plane);
    let applier = ConfigApplier::new(
        store.clone(),
        Arc::new(Mutex::new(manager)),
        Metrics::new().unwrap(),
    );
    let node = v1::Node {
        id: "web-1".into(),
        service: "web".into(),
        ..Default::default()
    };
    tokio::spawn(Discovery::new(format!("http://{cp}"), node, applier).run());

    let (mut rx, tx) = streams.recv().await.unwrap();
    let Kind::Hello(hello) = next(&mut rx).await else {
        panic!("first message is not Hello")
    };
    assert_eq!(hello.node.unwrap().id, "web-1");
    assert!(hello.held.is_empty());

    let listen = free_port();
    tx.send(Ok(response("a", listen, "127.0.0.1:8080", "e1")))
        .await
        .unwrap();
    let Kind::Ack(ack) = next(&mut rx).await else {
        panic!("expected ACK")
    };
    assert_eq!(ack.nonce, "a");
    assert_eq!(ack.versions.len(), 4);
    tokio::net::TcpStream::connect(listen)
        .await
        .expect("listener from the snapshot is bound");

    tx.send(Ok(response("b", listen, "not-an-address", "e2")))
        .await
        .unwrap();
    let Kind::Nack(nack) = next(&mut rx).await else {
        panic!("expected NACK")
    };
    assert_eq!(nack.nonce, "b");
    assert!(
        nack.error
            .contains(r#"endpoints of cluster "inbound": endpoints[0].address"#),
        "{}",
        nack.error
    );
    assert!(nack.rejected.iter().any(|t| t.version == "e2"));
    let held = store.load_full().unwrap();
    assert_eq!(held.resources.endpoints.as_ref().unwrap().version, "e1");

    // The control plane goes away: the proxy reconnects and says what it holds.
    drop(tx);
    drop(rx);
    let (mut rx, _tx) = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("no reconnect within 10s")
        .unwrap();
    let Kind::Hello(hello) = next(&mut rx).await else {
        panic!("first message is not Hello")
    };
    let mut versions: Vec<_> = hello.held.iter().map(|t| t.version.as_str()).collect();
    versions.sort_unstable();
    assert_eq!(versions, ["c1", "e1", "l1", "r1"]);
    // Still serving the last good snapshot.
    tokio::net::TcpStream::connect(listen)
        .await
        .expect("listener kept while disconnected");
}
