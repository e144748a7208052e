//! Where captured connections go, looked up by original destination: a table built from one
//! snapshot, on the first captured connection that snapshot serves (the snapshot never builds
//! or imports it), and kept until a connection finds a newer snapshot in force.
//!
//! - **Outbound** `ip:port`: a service VIP (`Cluster.vip`) -> the service's per-port cluster of
//!   that port (`Cluster.port`) if there is one, else its service cluster; else an endpoint of
//!   a per-port cluster (a registered transparent instance's `instance_ip:port`) or of a service
//!   cluster (a sidecar's inbound address, a static endpoint) -> that cluster; else
//!   [`Outbound::Passthrough`]. A per-port cluster of an http/grpc service has a route table of
//!   its name in the snapshot's detached tables: HTTP requests are routed with it.
//! - **Inbound** port: the `inbound:<port>` cluster (the app port on the instance IP) with a
//!   catch-all for HTTP requests; none = the port is passed through as TCP to the address the
//!   connection was sent to.
//!
//! Metric handles (TCP per destination, request handles of inbound catch-alls) are resolved
//! here once per snapshot, with the snapshot's own families (`Snapshot::metrics`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwapOption;

use crate::cluster::Cluster;
use crate::metrics::TcpMetrics;
use crate::pipeline::Routing;
use crate::snapshot::{CatchAll, Direction, Snapshot};

/// Metric / access-log name of captured outbound connections to unknown destinations.
pub const PASSTHROUGH: &str = "passthrough";
/// Metric / access-log name of captured inbound connections to an app port no cluster names.
pub const INBOUND_PASSTHROUGH: &str = "inbound-passthrough";

/// A mesh destination of captured connections.
#[derive(Debug)]
pub struct MeshDestination {
    /// Where the bytes (TCP) or requests (catch-all) go.
    pub cluster: Arc<Cluster>,
    /// `weft_tcp_*` of connections to it.
    pub tcp: TcpMetrics,
    /// HTTP requests' routing; `None` = the destination is opaque (TCP only, never sniffed).
    pub http: Option<Routing>,
}

/// What a captured outbound connection's original destination is.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A mesh service (its VIP or one of its endpoints).
    Mesh(Arc<MeshDestination>),
    /// Anything else: TCP to where the app wanted to go, as egress allows.
    Passthrough,
}

/// The lookup tables of one snapshot.
#[derive(Debug)]
pub struct Destinations {
    /// The snapshot they were built from (kept as an allocation, so its address identifies it).
    snapshot: Weak<Snapshot>,
    /// VIP -> (per-port destinations by port, the service cluster's destination).
    vips: HashMap<IpAddr, Service>,
    /// Endpoint address -> destination (per-port clusters first).
    endpoints: HashMap<SocketAddr, Arc<MeshDestination>>,
    /// App port -> `inbound:<port>`.
    inbound: HashMap<u16, Arc<MeshDestination>>,
    /// `weft_tcp_*{direction="outbound",cluster="passthrough"}`.
    pub passthrough: TcpMetrics,
    /// `weft_tcp_*{direction="inbound",cluster="inbound-passthrough"}`.
    pub inbound_passthrough: TcpMetrics,
}

#[derive(Debug, Default)]
struct Service {
    base: Option<Arc<MeshDestination>>,
    ports: HashMap<u16, Arc<MeshDestination>>,
}

impl Destinations {
    /// Builds the tables of `snapshot`.
    pub fn build(snapshot: &Arc<Snapshot>) -> Self {
        let metrics = &snapshot.metrics;
        let protos = snapshot.resources.clusters.iter().flat_map(|s| &s.clusters);
        let inbound_listener = snapshot
            .listeners
            .values()
            .find(|l| l.direction == Direction::Inbound && l.capture.is_some())
            .map_or_else(|| Arc::from("inbound"), |l| Arc::clone(&l.name));
        let mut by_service: HashMap<(&str, &str), Service> = HashMap::new();
        let mut vips: HashMap<IpAddr, (&str, &str)> = HashMap::new();
        let mut inbound = HashMap::new();
        for c in protos {
            let Some(cluster) = snapshot.clusters.get(c.name.as_str()) else {
                continue;
            };
            let port = u16::try_from(c.port).ok().filter(|p| *p != 0);
            if c.service.is_empty() {
                // The local app's clusters: `inbound`, and `inbound:<port>` in transparent mode.
                if let Some(port) = port {
                    let catch_all = CatchAll {
                        cluster: Arc::clone(cluster),
                        metrics: metrics.request_metrics("inbound", &inbound_listener, &c.name),
                    };
                    inbound.insert(
                        port,
                        Arc::new(MeshDestination {
                            cluster: Arc::clone(cluster),
                            tcp: metrics.tcp_metrics("inbound", &c.name),
                            http: Some(Routing {
                                routes: None,
                                catch_all: Some(Arc::new(catch_all)),
                            }),
                        }),
                    );
                }
                continue;
            }
            // Subset clusters (`svc.ns~k=v`) are reached through routes, never by address.
            if c.name.contains('~') {
                continue;
            }
            let dest = Arc::new(MeshDestination {
                cluster: Arc::clone(cluster),
                tcp: metrics.tcp_metrics("outbound", &c.name),
                http: snapshot.tables.get(c.name.as_str()).map(|t| Routing {
                    routes: Some(Arc::clone(t)),
                    catch_all: None,
                }),
            });
            let entry = by_service
                .entry((c.service.as_str(), c.namespace.as_str()))
                .or_default();
            match port {
                Some(p) => {
                    entry.ports.insert(p, dest);
                }
                None => {
                    entry.base = Some(dest);
                    if let Ok(vip) = c.vip.parse::<IpAddr>() {
                        vips.insert(vip, (c.service.as_str(), c.namespace.as_str()));
                    }
                }
            }
        }
        // Endpoints: per-port clusters' first (an instance address names the port's cluster),
        // then service clusters' (inbound addresses, static endpoints) where not taken.
        let mut endpoints = HashMap::new();
        for s in by_service.values() {
            for d in s.ports.values() {
                for e in d.cluster.endpoints.iter() {
                    endpoints.insert(e.addr, Arc::clone(d));
                }
            }
        }
        for d in by_service.values().filter_map(|s| s.base.as_ref()) {
            for e in d.cluster.endpoints.iter() {
                endpoints.entry(e.addr).or_insert_with(|| Arc::clone(d));
            }
        }
        let vips = vips
            .into_iter()
            .filter_map(|(ip, key)| by_service.remove(&key).map(|s| (ip, s)))
            .collect();
        Self {
            snapshot: Arc::downgrade(snapshot),
            vips,
            endpoints,
            inbound,
            passthrough: metrics.tcp_metrics("outbound", PASSTHROUGH),
            inbound_passthrough: metrics.tcp_metrics("inbound", INBOUND_PASSTHROUGH),
        }
    }

    /// Where a captured outbound connection to `original` goes.
    pub fn outbound(&self, original: SocketAddr) -> Outbound {
        if let Some(s) = self.vips.get(&original.ip()) {
            if let Some(d) = s.ports.get(&original.port()).or(s.base.as_ref()) {
                return Outbound::Mesh(Arc::clone(d));
            }
        }
        match self.endpoints.get(&original) {
            Some(d) => Outbound::Mesh(Arc::clone(d)),
            None => Outbound::Passthrough,
        }
    }

    /// The app port `port`'s destination (`inbound:<port>`), if the node announced it.
    pub fn inbound(&self, port: u16) -> Option<&Arc<MeshDestination>> {
        self.inbound.get(&port)
    }

    fn is_of(&self, snapshot: &Arc<Snapshot>) -> bool {
        // The weak reference keeps the allocation, so an equal address is the same snapshot.
        std::ptr::eq(self.snapshot.as_ptr(), Arc::as_ptr(snapshot))
    }
}

/// The tables of the snapshot in force, rebuilt when a newer one is found.
#[derive(Debug, Default)]
pub struct DestinationCache {
    current: ArcSwapOption<Destinations>,
}

impl DestinationCache {
    /// The tables of `snapshot` (built now if the cache holds another snapshot's).
    pub fn get(&self, snapshot: &Arc<Snapshot>) -> Arc<Destinations> {
        if let Some(d) = self.current.load_full().filter(|d| d.is_of(snapshot)) {
            return d;
        }
        let built = Arc::new(Destinations::build(snapshot));
        self.current.store(Some(Arc::clone(&built)));
        built
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::v1;

    use super::*;
    use crate::metrics::Metrics;
    use crate::snapshot::Resources;

    fn cluster(name: &str, service: &str, vip: &str, port: u32) -> v1::Cluster {
        v1::Cluster {
            name: name.into(),
            service: service.into(),
            namespace: if service.is_empty() { "" } else { "default" }.into(),
            vip: vip.into(),
            port,
            ..Default::default()
        }
    }

    fn endpoints(cluster: &str, addrs: &[&str]) -> v1::ClusterEndpoints {
        v1::ClusterEndpoints {
            cluster: cluster.into(),
            endpoints: addrs
                .iter()
                .map(|a| v1::Endpoint {
                    address: (*a).into(),
                    weight: 1,
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn snapshot() -> Arc<Snapshot> {
        let table = v1::RouteTable {
            name: "api.default:8080".into(),
            routes: vec![v1::Route {
                name: "default-api.default:8080".into(),
                r#match: Some(v1::RouteMatch::default()),
                destinations: vec![v1::WeightedCluster {
                    cluster: "api.default:8080".into(),
                    weight: 100,
                }],
                ..Default::default()
            }],
        };
        let r = Resources {
            listeners: Some(v1::ListenerSet {
                version: "l".into(),
                listeners: vec![v1::Listener {
                    name: "inbound".into(),
                    address: "10.0.0.2:15006".into(),
                    direction: v1::Direction::Inbound.into(),
                    protocol: v1::ListenerProtocol::Http.into(),
                    cluster: "inbound".into(),
                    captured: true,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            routes: Some(v1::RouteSet {
                version: "r".into(),
                tables: vec![table],
            }),
            clusters: Some(v1::ClusterSet {
                version: "c".into(),
                clusters: vec![
                    cluster("api.default", "api", "10.96.0.10", 0),
                    cluster("api.default:8080", "api", "", 8080),
                    cluster("api.default:9000", "api", "", 9000),
                    cluster("api.default~v=2", "api", "", 0),
                    cluster("db.default", "db", "10.96.0.11", 0),
                    cluster("inbound", "", "", 0),
                    cluster("inbound:8080", "", "", 8080),
                ],
            }),
            endpoints: Some(v1::EndpointSet {
                version: "e".into(),
                clusters: vec![
                    endpoints("api.default", &["10.0.0.3:15006"]),
                    endpoints("api.default:8080", &["10.0.0.3:8080"]),
                    endpoints("api.default:9000", &["10.0.0.3:9000"]),
                    endpoints("db.default", &["10.0.0.6:5432"]),
                    endpoints("inbound", &["127.0.0.1:8080"]),
                    endpoints("inbound:8080", &["10.0.0.2:8080"]),
                ],
            }),
            policies: None,
            trust: None,
        };
        Arc::new(Snapshot::build(r, None, &Metrics::new().unwrap()).unwrap())
    }

    fn mesh(o: Outbound) -> Arc<MeshDestination> {
        match o {
            Outbound::Mesh(d) => d,
            Outbound::Passthrough => panic!("passthrough"),
        }
    }

    #[test]
    fn original_destinations_find_their_service() {
        let s = snapshot();
        let t = Destinations::build(&s);
        let at = |a: &str| t.outbound(a.parse().unwrap());
        // VIP: the port's cluster, else the service cluster.
        let d = mesh(at("10.96.0.10:8080"));
        assert_eq!(&*d.cluster.name, "api.default:8080");
        assert!(d.http.as_ref().unwrap().routes.is_some());
        let d = mesh(at("10.96.0.10:7777"));
        assert_eq!(&*d.cluster.name, "api.default");
        assert!(
            d.http.is_none(),
            "a service cluster has no per-port table: TCP"
        );
        // An instance's app port, its inbound address, a static endpoint.
        assert_eq!(&*mesh(at("10.0.0.3:9000")).cluster.name, "api.default:9000");
        assert!(mesh(at("10.0.0.3:9000")).http.is_none());
        assert_eq!(&*mesh(at("10.0.0.3:15006")).cluster.name, "api.default");
        assert_eq!(&*mesh(at("10.0.0.6:5432")).cluster.name, "db.default");
        assert_eq!(&*mesh(at("10.96.0.11:5432")).cluster.name, "db.default");
        // Anything else passes through (an instance port nobody announced included).
        assert!(matches!(at("10.0.0.3:1234"), Outbound::Passthrough));
        assert!(matches!(at("192.0.2.1:443"), Outbound::Passthrough));
        // Inbound: the announced app ports.
        let i = t.inbound(8080).unwrap();
        assert_eq!(&*i.cluster.name, "inbound:8080");
        let catch_all = i.http.as_ref().unwrap().catch_all.as_ref().unwrap();
        assert_eq!(catch_all.metrics.route(), "inbound");
        assert!(t.inbound(9000).is_none());
    }

    #[test]
    fn the_cache_follows_the_snapshot() {
        let cache = DestinationCache::default();
        let (a, b) = (snapshot(), snapshot());
        let first = cache.get(&a);
        assert!(Arc::ptr_eq(&first, &cache.get(&a)));
        let second = cache.get(&b);
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&second, &cache.get(&b)));
    }
}
