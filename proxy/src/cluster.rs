//! Clusters: a named set of endpoints with connect/request timeouts and an upstream protocol.
//!
//! A [`Cluster`] is immutable and belongs to one snapshot. What must survive a snapshot swap, the
//! round-robin position and each endpoint's connection pool, lives in [`ClusterState`] and
//! [`EndpointPool`], which a new snapshot takes over from the previous one when the cluster (and
//! the endpoint address) is still present.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use weft_proto::v1;

use crate::balance::RoundRobin;
use crate::metrics::Metrics;
use crate::snapshot::Rejection;
use crate::upstream::EndpointPool;

/// Connect timeout used when the cluster leaves it at 0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Which HTTP version the proxy speaks to a cluster's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Same as the downstream request (h1 -> h1, h2 -> h2).
    Preserve,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 (prior knowledge).
    Http2,
}

/// State of a cluster that outlives snapshots.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// Round-robin position, shared by every snapshot's view of the cluster.
    pub position: AtomicUsize,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// ip:port.
    pub addr: SocketAddr,
    /// Relative weight (0 in the proto counts as 1).
    pub weight: u32,
    /// Connections to this endpoint; shared with later snapshots while the endpoint stays.
    pub pool: Arc<EndpointPool>,
}

/// A cluster as seen by one snapshot.
#[derive(Debug)]
pub struct Cluster {
    /// `<service>.<namespace>`, or `inbound`.
    pub name: Arc<str>,
    /// Per-attempt connect timeout.
    pub connect_timeout: Duration,
    /// Default whole-request timeout; `None` = no timeout.
    pub request_timeout: Option<Duration>,
    /// Upstream HTTP version policy.
    pub protocol: UpstreamProtocol,
    /// Endpoints in the order the control plane sent them.
    pub endpoints: Box<[Endpoint]>,
    rr: RoundRobin,
    state: Arc<ClusterState>,
    /// `weft_upstream_connect_errors_total{cluster}`.
    pub connect_errors: IntCounter,
}

impl Cluster {
    /// The next endpoint in weighted round-robin order; `None` if the cluster has none.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.rr
            .pick(&self.state.position)
            .map(|i| &self.endpoints[i])
    }

    /// Builds a cluster from its proto and endpoint list, reusing state and pools of `previous`.
    pub fn build(
        proto: &v1::Cluster,
        endpoints: &[v1::Endpoint],
        previous: Option<&Cluster>,
        metrics: &Metrics,
    ) -> Result<Self, Vec<Rejection>> {
        let mut errors = Vec::new();
        let protocol = match v1::UpstreamProtocol::try_from(proto.protocol) {
            Ok(v1::UpstreamProtocol::Unspecified | v1::UpstreamProtocol::Preserve) => {
                UpstreamProtocol::Preserve
            }
            Ok(v1::UpstreamProtocol::Http1) => UpstreamProtocol::Http1,
            Ok(v1::UpstreamProtocol::Http2) => UpstreamProtocol::Http2,
            Err(_) => {
                errors.push(Rejection::new(
                    format!("cluster {:?}", proto.name),
                    "protocol",
                    format!("unknown upstream protocol {}", proto.protocol),
                ));
                UpstreamProtocol::Preserve
            }
        };
        if v1::LbPolicy::try_from(proto.lb).is_err() {
            errors.push(Rejection::new(
                format!("cluster {:?}", proto.name),
                "lb",
                format!("unknown lb policy {}", proto.lb),
            ));
        }
        let old_pools: HashMap<SocketAddr, &Arc<EndpointPool>> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.addr, &e.pool)).collect())
            .unwrap_or_default();
        let mut eps = Vec::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            let Ok(addr) = e.address.parse::<SocketAddr>() else {
                errors.push(Rejection::new(
                    format!("endpoints of cluster {:?}", proto.name),
                    format!("endpoints[{i}].address"),
                    format!("invalid ip:port {:?}", e.address),
                ));
                continue;
            };
            let pool = match old_pools.get(&addr) {
                Some(p) => Arc::clone(p),
                None => Arc::new(EndpointPool::new(addr)),
            };
            eps.push(Endpoint {
                addr,
                weight: e.weight.max(1),
                pool,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let weights: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        let ms = |v: u64| Duration::from_millis(v);
        Ok(Self {
            name: proto.name.as_str().into(),
            connect_timeout: if proto.connect_timeout_ms == 0 {
                DEFAULT_CONNECT_TIMEOUT
            } else {
                ms(proto.connect_timeout_ms)
            },
            request_timeout: (proto.request_timeout_ms > 0).then(|| ms(proto.request_timeout_ms)),
            protocol,
            rr: RoundRobin::new(&weights),
            endpoints: eps.into(),
            state: previous.map(|p| Arc::clone(&p.state)).unwrap_or_default(),
            connect_errors: metrics.connect_errors(&proto.name),
        })
    }
}

/// A cluster with one endpoint per address, for tests.
#[cfg(test)]
pub fn test_cluster(name: &str) -> Arc<Cluster> {
    Arc::new(
        Cluster::build(
            &v1::Cluster {
                name: name.into(),
                ..Default::default()
            },
            &[v1::Endpoint {
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            None,
            &Metrics::new().unwrap(),
        )
        .unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, weight: u32) -> v1::Endpoint {
        v1::Endpoint {
            address: addr.into(),
            weight,
            ..Default::default()
        }
    }

    #[test]
    fn round_robin_survives_rebuild_and_pools_are_reused() {
        let m = Metrics::new().unwrap();
        let proto = v1::Cluster {
            name: "b".into(),
            ..Default::default()
        };
        let eps = [ep("127.0.0.1:1", 1), ep("127.0.0.1:2", 1)];
        let c1 = Cluster::build(&proto, &eps, None, &m).unwrap();
        assert_eq!(c1.pick().unwrap().addr.port(), 1);
        let eps2 = [
            ep("127.0.0.1:1", 1),
            ep("127.0.0.1:2", 1),
            ep("127.0.0.1:3", 1),
        ];
        let c2 = Cluster::build(&proto, &eps2, Some(&c1), &m).unwrap();
        // Position continues from the previous snapshot.
        assert_eq!(c2.pick().unwrap().addr.port(), 2);
        assert!(Arc::ptr_eq(&c1.endpoints[0].pool, &c2.endpoints[0].pool));
        assert!(Arc::ptr_eq(&c1.endpoints[1].pool, &c2.endpoints[1].pool));
        assert_eq!(c2.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c2.request_timeout, None);
    }

    #[test]
    fn empty_cluster_picks_nothing() {
        let m = Metrics::new().unwrap();
        let c = Cluster::build(
            &v1::Cluster {
                name: "e".into(),
                ..Default::default()
            },
            &[],
            None,
            &m,
        )
        .unwrap();
        assert!(c.pick().is_none());
    }

    #[test]
    fn bad_endpoint_address_is_rejected() {
        let m = Metrics::new().unwrap();
        let errs = Cluster::build(
            &v1::Cluster {
                name: "b".into(),
                ..Default::default()
            },
            &[ep("127.0.0.1:1", 1), ep("localhost", 1)],
            None,
            &m,
        )
        .unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"endpoints of cluster "b": endpoints[1].address: invalid ip:port "localhost""#
        );
    }
}
