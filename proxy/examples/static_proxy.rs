//! Runs the proxy's data path with a fixed config and no control plane, for benchmarks:
//! `static_proxy LISTEN UPSTREAM [h1|h2|preserve]` forwards every HTTP request on LISTEN to
//! UPSTREAM. Stops on Ctrl-C. Data-path workers: `WEFT_WORKER_THREADS` (default one per CPU), on
//! the same runtime the proxy uses.

use std::sync::{Arc, Mutex};

#[global_allocator]
static ALLOC: weft_proxy::alloc::Allocator = weft_proxy::alloc::ALLOCATOR;
use std::time::Duration;

use weft_proto::v1;
use weft_proxy::discovery::ConfigApplier;
use weft_proxy::listen::{DataPlane, ListenerManager};
use weft_proxy::metrics::Metrics;
use weft_proxy::snapshot::SnapshotStore;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: static_proxy LISTEN UPSTREAM [h1|h2|preserve]");
    };
    let protocol = match args.get(3).map(String::as_str) {
        Some("h1") => v1::UpstreamProtocol::Http1,
        Some("h2") => v1::UpstreamProtocol::Http2,
        _ => v1::UpstreamProtocol::Preserve,
    };
    let workers = match std::env::var(weft_proxy::config::WORKER_THREADS_ENV) {
        Ok(v) => weft_proxy::config::parse_worker_threads(&v).map_err(anyhow::Error::msg)?,
        Err(_) => weft_proxy::config::default_worker_threads(),
    };
    let rt = weft_proxy::app::data_runtime(workers)?;
    rt.block_on(async {
        let store = Arc::new(SnapshotStore::empty());
        let plane = DataPlane {
            store: store.clone(),
            drain_timeout: Duration::from_secs(1),
            http: Arc::new(weft_proxy::http::server_builder()),
            tls: Arc::new(
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
        let applier = ConfigApplier::new(store, Arc::new(Mutex::new(manager)), Metrics::new()?);
        let resp = v1::DiscoveryResponse {
            nonce: "static".into(),
            listeners: Some(v1::ListenerSet {
                version: "static".into(),
                listeners: vec![v1::Listener {
                    name: "outbound".into(),
                    address: listen.clone(),
                    direction: v1::Direction::Outbound.into(),
                    protocol: v1::ListenerProtocol::Http.into(),
                    route_table: "outbound".into(),
                    cluster: String::new(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            routes: Some(v1::RouteSet {
                version: "static".into(),
                tables: vec![v1::RouteTable {
                    name: "outbound".into(),
                    routes: vec![v1::Route {
                        name: "all".into(),
                        r#match: None,
                        destinations: vec![v1::WeightedCluster {
                            cluster: "upstream".into(),
                            weight: 100,
                        }],
                        timeout_ms: 0,
                        ..Default::default()
                    }],
                }],
            }),
            clusters: Some(v1::ClusterSet {
                version: "static".into(),
                clusters: vec![v1::Cluster {
                    name: "upstream".into(),
                    protocol: protocol.into(),
                    request_timeout_ms: 15_000,
                    ..Default::default()
                }],
            }),
            endpoints: Some(v1::EndpointSet {
                version: "static".into(),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: "upstream".into(),
                    endpoints: vec![v1::Endpoint {
                        address: upstream.clone(),
                        weight: 1,
                        ..Default::default()
                    }],
                }],
            }),
            ..Default::default()
        };
        match applier.apply(&resp).kind {
            Some(v1::discovery_request::Kind::Ack(_)) => {}
            other => anyhow::bail!("config rejected: {other:?}"),
        }
        eprintln!("static_proxy: {listen} -> {upstream}");
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}
