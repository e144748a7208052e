//! Shared helpers of the integration tests: a real control plane on ephemeral ports, and a
//! scripted proxy speaking the discovery protocol by hand.
#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use weft_control::ctl::AdminClient;
use weft_control::{Config, Server};
use weft_proto::v1::discovery_client::DiscoveryClient;
use weft_proto::v1::discovery_request::Kind;
use weft_proto::v1::{
    Ack, DiscoveryRequest, DiscoveryResponse, Hello, Node, ResourceType, TypeVersion,
};

pub const POLICY: &str = "\
services:
  - name: web
  - name: backend
    endpoints:
      - address: 10.0.0.1:80
";

pub struct Running {
    pub grpc: String,
    pub cp: std::sync::Arc<weft_control::state::ControlPlane>,
    pub admin: AdminClient,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), weft_control::ServeError>>>,
    pub _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Shuts the server down and waits until `serve` returned (streams still open: ~2s).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn start(files: &[(&str, &str)], grace: Duration) -> Running {
    start_with(files, grace, Duration::from_secs(30)).await
}

pub async fn start_with(
    files: &[(&str, &str)],
    grace: Duration,
    push_timeout: Duration,
) -> Running {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let mut config = local_config(dir.path());
    config.deregister_grace = grace;
    config.push_timeout = push_timeout;
    let mut running = serve(config).await;
    running._dir = Some(dir);
    running
}

/// [`Config::new`] on ephemeral loopback ports.
pub fn local_config(policies: &std::path::Path) -> Config {
    let mut config = Config::new(policies);
    config.grpc = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config
}

/// Binds and serves `config` (whose directories the caller keeps).
pub async fn serve(config: Config) -> Running {
    let server = Server::bind(config).await.unwrap();
    let grpc = format!("http://{}", server.grpc_addr().unwrap());
    let cp = std::sync::Arc::clone(server.control_plane());
    let admin = AdminClient::new(&format!("http://{}", server.admin_addr().unwrap())).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let served = tokio::spawn(server.serve(async {
        let _ = rx.await;
    }));
    Running {
        grpc,
        cp,
        admin,
        shutdown: Some(tx),
        served: Some(served),
        _dir: None,
    }
}

pub struct Proxy {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: Streaming<DiscoveryResponse>,
}

pub fn node(id: &str, service: &str, inbound: &str) -> Node {
    Node {
        id: id.into(),
        service: service.into(),
        namespace: "default".into(),
        inbound_address: inbound.into(),
        outbound_address: "127.0.0.1:15001".into(),
        app_address: "127.0.0.1:8080".into(),
        tcp_bind_ip: "127.0.0.1".into(),
        ..Node::default()
    }
}

pub async fn connect(grpc: &str, first: DiscoveryRequest) -> Proxy {
    let mut client = DiscoveryClient::connect(grpc.to_owned()).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let rx = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    Proxy { tx, rx }
}

pub fn hello(node: Node, held: Vec<TypeVersion>) -> DiscoveryRequest {
    DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            node: Some(node),
            held,
        })),
    }
}

pub async fn next(proxy: &mut Proxy) -> DiscoveryResponse {
    tokio::time::timeout(Duration::from_secs(5), proxy.rx.message())
        .await
        .expect("no discovery response within 5s")
        .unwrap()
        .expect("stream ended")
}

pub async fn assert_silent(proxy: &mut Proxy) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), proxy.rx.message()).await {
        panic!("unexpected message: {m:?}");
    }
}

pub fn versions(r: &DiscoveryResponse) -> Vec<TypeVersion> {
    let mut out = Vec::new();
    let mut push = |t: ResourceType, v: Option<&String>| {
        if let Some(v) = v {
            out.push(TypeVersion {
                r#type: t as i32,
                version: v.clone(),
            });
        }
    };
    push(
        ResourceType::Listeners,
        r.listeners.as_ref().map(|s| &s.version),
    );
    push(ResourceType::Routes, r.routes.as_ref().map(|s| &s.version));
    push(
        ResourceType::Clusters,
        r.clusters.as_ref().map(|s| &s.version),
    );
    push(
        ResourceType::Endpoints,
        r.endpoints.as_ref().map(|s| &s.version),
    );
    push(
        ResourceType::Policies,
        r.policies.as_ref().map(|s| &s.version),
    );
    push(ResourceType::Trust, r.trust.as_ref().map(|s| &s.version));
    out
}

pub async fn ack(proxy: &Proxy, r: &DiscoveryResponse, held: &mut Vec<TypeVersion>) {
    for tv in versions(r) {
        held.retain(|h| h.r#type != tv.r#type);
        held.push(tv);
    }
    proxy
        .tx
        .send(DiscoveryRequest {
            kind: Some(Kind::Ack(Ack {
                nonce: r.nonce.clone(),
                versions: held.clone(),
            })),
        })
        .await
        .unwrap();
}

pub async fn get_json(admin: &AdminClient, path: &str) -> serde_json::Value {
    let r = admin.send(Method::GET, path, None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json().unwrap()
}
