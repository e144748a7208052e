//! Clusters: a named set of endpoints with timeouts, an upstream protocol, a load balancer and
//! the resilience settings (circuit breaker, outlier detection, health check).
//!
//! A [`Cluster`] is immutable and belongs to one snapshot. What must survive a snapshot swap
//! lives in [`ClusterState`] (round-robin position, breaker counters, retry budget, outlier and
//! health-check state, keyed by cluster name) and in each [`Endpoint`]'s pool, load and health
//! (keyed by address), which a new snapshot takes over from the previous one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use prometheus::IntCounter;
use weft_proto::v1;

use crate::breaker::{BreakerLimits, BreakerState, ConnectionGate, Limit};
use crate::health::{HealthCheckConfig, HealthChecker, Target};
use crate::lb::{Balancer, EndpointLoad, HashOn, Policy};
use crate::metrics::{Metrics, SeriesLease};
use crate::outlier::{EndpointHealth, OutlierConfig, OutlierState};
use crate::resilience_metrics::ClusterResilienceMetrics;
use crate::retry::RetryBudget;
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
#[derive(Debug)]
pub struct ClusterState {
    /// Round-robin position, shared by every snapshot's view of the cluster.
    pub position: AtomicUsize,
    /// Circuit-breaker counters.
    pub breaker: Arc<BreakerState>,
    /// The `max_connections` limit, shared with the endpoints' connection pools.
    pub connections: Arc<ConnectionGate>,
    /// Retry budget.
    pub budget: RetryBudget,
    /// Outlier-detection state (also told about failed health checks).
    pub outlier: Arc<OutlierState>,
    /// Active health checks.
    pub health: Arc<HealthChecker>,
    /// Retry/breaker/outlier/health metric handles.
    pub metrics: ClusterResilienceMetrics,
}

impl ClusterState {
    fn new(metrics: ClusterResilienceMetrics) -> Self {
        let outlier = Arc::new(OutlierState::default());
        let breaker = Arc::new(BreakerState::new(metrics.clone()));
        Self {
            position: AtomicUsize::new(0),
            connections: Arc::new(ConnectionGate::new(Arc::clone(&breaker))),
            breaker,
            budget: RetryBudget::default(),
            health: Arc::new(HealthChecker::new(Arc::clone(&outlier), metrics.clone())),
            outlier,
            metrics,
        }
    }
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
    /// Outstanding requests and RTT estimate (P2C), shared like the pool.
    pub load: Arc<EndpointLoad>,
    /// Outlier / health-check verdicts, shared like the pool.
    pub health: Arc<EndpointHealth>,
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
    /// Idle timeout of pooled upstream connections and TCP connections; `None` = default.
    pub idle_timeout: Option<Duration>,
    /// Upstream HTTP version policy.
    pub protocol: UpstreamProtocol,
    /// Endpoints in the order the control plane sent them.
    pub endpoints: Box<[Endpoint]>,
    /// Circuit-breaker limits.
    pub breaker: BreakerLimits,
    /// Outlier detection; `None` = off.
    pub outlier: Option<OutlierConfig>,
    /// Active health check; `None` = off.
    pub health_check: Option<HealthCheckConfig>,
    balancer: Balancer,
    /// Panic threshold (percent of available endpoints below which all are used).
    min_healthy_percent: u32,
    state: Arc<ClusterState>,
    /// `weft_upstream_connect_errors_total{cluster}`.
    pub connect_errors: IntCounter,
    /// Keeps `connect_errors`' series exported while this cluster (of any snapshot, or held by a
    /// request or connection) lives; the last cluster of that name to go removes it.
    _connect_errors_series: SeriesLease,
}

fn reject(proto: &v1::Cluster, field: impl Into<String>, reason: impl Into<String>) -> Rejection {
    Rejection::new(format!("cluster {:?}", proto.name), field, reason)
}

fn lb_of(proto: &v1::Cluster, errors: &mut Vec<Rejection>) -> (Policy, Option<HashOn>) {
    let policy = match v1::LbPolicy::try_from(proto.lb) {
        Ok(v1::LbPolicy::Unspecified | v1::LbPolicy::P2cPeakEwma) => Policy::P2cPeakEwma,
        Ok(v1::LbPolicy::RoundRobin) => Policy::RoundRobin,
        Ok(v1::LbPolicy::LeastRequest) => Policy::LeastRequest,
        Ok(v1::LbPolicy::RingHash) => Policy::RingHash,
        Err(_) => {
            errors.push(reject(
                proto,
                "lb",
                format!("unknown lb policy {}", proto.lb),
            ));
            Policy::P2cPeakEwma
        }
    };
    let hash = match proto.hash.as_ref().and_then(|h| h.kind.as_ref()) {
        None => None,
        Some(v1::hash_policy::Kind::Header(h)) => match http::HeaderName::try_from(h.as_str()) {
            Ok(name) => Some(HashOn::Header(name)),
            Err(_) => {
                errors.push(reject(
                    proto,
                    "hash.header",
                    format!("invalid header name {h:?}"),
                ));
                None
            }
        },
        Some(v1::hash_policy::Kind::Cookie(c)) if !c.is_empty() => {
            Some(HashOn::Cookie(c.as_str().into()))
        }
        Some(v1::hash_policy::Kind::Cookie(_)) => {
            errors.push(reject(proto, "hash.cookie", "must not be empty"));
            None
        }
        Some(v1::hash_policy::Kind::SourceIp(true)) => Some(HashOn::SourceIp),
        Some(v1::hash_policy::Kind::SourceIp(false)) => None,
    };
    (policy, hash)
}

impl Cluster {
    /// The next endpoint for a request without a hash key (TCP, non-ring-hash clusters).
    pub fn pick(&self) -> Option<&Endpoint> {
        self.pick_index(None).map(|i| &self.endpoints[i])
    }

    /// An endpoint for a connection from `source` (TCP): a ring hash on `source_ip` keeps a
    /// client on one endpoint; other policies (and hashes on headers/cookies, which TCP has
    /// not) pick as [`Cluster::pick`].
    pub fn pick_for(&self, source: Option<IpAddr>) -> Option<&Endpoint> {
        let hash = self.request_hash(&HeaderMap::new(), source);
        self.pick_index(hash).map(|i| &self.endpoints[i])
    }

    /// The request's ring-hash key, if this cluster hashes requests.
    pub fn request_hash(&self, headers: &HeaderMap, source: Option<IpAddr>) -> Option<u64> {
        if self.balancer.wants_hash() {
            self.balancer.request_hash(headers, source)
        } else {
            None
        }
    }

    /// The endpoint for a request with ring-hash key `hash`, as an index into `endpoints`:
    /// available endpoints only (not ejected, not failing health checks) unless fewer than the
    /// panic threshold are; `None` only when the cluster has no endpoints.
    pub fn pick_index(&self, hash: Option<u64>) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let avail = self.state.outlier.avail(
            |i| &*self.endpoints[i].health,
            n,
            self.min_healthy_percent,
            crate::lb::load::now_nanos(),
        );
        self.balancer.pick(hash, &avail, &self.state.position)
    }

    /// Records how an attempt to endpoint `i` ended for outlier detection (`ok` = not a 5xx,
    /// connect failure, reset or timeout).
    pub fn report(&self, i: usize, ok: bool) {
        if let Some(cfg) = &self.outlier {
            self.state.outlier.report(
                cfg,
                |k| &*self.endpoints[k].health,
                self.endpoints.len(),
                i,
                ok,
                &self.state.metrics,
            );
        }
    }

    /// The state that outlives snapshots.
    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    /// The load-balancing policy.
    pub fn lb_policy(&self) -> Policy {
        self.balancer.policy()
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
                errors.push(reject(
                    proto,
                    "protocol",
                    format!("unknown upstream protocol {}", proto.protocol),
                ));
                UpstreamProtocol::Preserve
            }
        };
        let (policy, hash_on) = lb_of(proto, &mut errors);
        let health_check = HealthCheckConfig::from_proto(proto.health_check.as_ref())
            .unwrap_or_else(|(field, reason)| {
                errors.push(reject(proto, field, reason));
                None
            });
        let outlier = OutlierConfig::from_proto(proto.outlier.as_ref());
        let state = match previous {
            Some(p) => Arc::clone(&p.state),
            None => Arc::new(ClusterState::new(metrics.cluster_resilience(&proto.name))),
        };
        let old: HashMap<SocketAddr, &Endpoint> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
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
            // Pools are keyed by address and what connections must be (mTLS to an identity).
            let expect = crate::tls::expectation(proto, e);
            let (pool, load, health) = match old.get(&addr) {
                Some(p) if *p.pool.expectation() == expect => (
                    Arc::clone(&p.pool),
                    Arc::clone(&p.load),
                    Arc::clone(&p.health),
                ),
                _ => (
                    Arc::new(
                        EndpointPool::with_gate(addr, Arc::clone(&state.connections))
                            .expect(expect),
                    ),
                    Arc::default(),
                    Arc::default(),
                ),
            };
            eps.push(Endpoint {
                addr,
                weight: e.weight.max(1),
                pool,
                load,
                health,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let idle_timeout =
            (proto.idle_timeout_ms > 0).then(|| Duration::from_millis(proto.idle_timeout_ms));
        for e in &eps {
            e.pool.set_idle_timeout(idle_timeout);
        }
        let weights: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        let keys: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
        let loads = eps.iter().map(|e| Arc::clone(&e.load)).collect();
        let breaker = BreakerLimits::from_proto(proto.breaker.as_ref());
        state.breaker.publish_limits(&breaker);
        state.connections.set_max(breaker.get(Limit::Connections));
        state.health.update(
            health_check.clone(),
            eps.iter()
                .map(|e| Target {
                    addr: e.addr,
                    health: Arc::clone(&e.health),
                    expect: e.pool.expectation().clone(),
                })
                .collect(),
        );
        let ms = |v: u64| Duration::from_millis(v);
        let (connect_errors, connect_errors_series) = metrics.connect_errors(&proto.name);
        Ok(Self {
            name: proto.name.as_str().into(),
            connect_timeout: if proto.connect_timeout_ms == 0 {
                DEFAULT_CONNECT_TIMEOUT
            } else {
                ms(proto.connect_timeout_ms)
            },
            request_timeout: (proto.request_timeout_ms > 0).then(|| ms(proto.request_timeout_ms)),
            idle_timeout,
            protocol,
            balancer: Balancer::new(policy, hash_on, &keys, &weights, loads),
            min_healthy_percent: outlier.as_ref().map_or(0, |o| o.min_healthy_percent),
            outlier,
            health_check,
            breaker,
            endpoints: eps.into(),
            state,
            connect_errors,
            _connect_errors_series: connect_errors_series,
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

    fn rr(name: &str) -> v1::Cluster {
        v1::Cluster {
            name: name.into(),
            lb: v1::LbPolicy::RoundRobin.into(),
            ..Default::default()
        }
    }

    #[test]
    fn round_robin_survives_rebuild_and_pools_are_reused() {
        let m = Metrics::new().unwrap();
        let proto = rr("b");
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
        assert!(Arc::ptr_eq(&c1.endpoints[1].load, &c2.endpoints[1].load));
        assert!(Arc::ptr_eq(
            &c1.endpoints[1].health,
            &c2.endpoints[1].health
        ));
        assert!(Arc::ptr_eq(c1.state(), c2.state()));
        assert_eq!(c2.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c2.request_timeout, None);
    }

    #[test]
    fn empty_cluster_picks_nothing() {
        let m = Metrics::new().unwrap();
        let c = Cluster::build(&rr("e"), &[], None, &m).unwrap();
        assert!(c.pick().is_none());
        assert_eq!(c.lb_policy(), Policy::RoundRobin);
    }

    #[test]
    fn default_policy_is_p2c_and_ring_hash_needs_valid_hash() {
        let m = Metrics::new().unwrap();
        let c = Cluster::build(
            &v1::Cluster {
                name: "p".into(),
                ..Default::default()
            },
            &[ep("127.0.0.1:1", 1)],
            None,
            &m,
        )
        .unwrap();
        assert_eq!(c.lb_policy(), Policy::P2cPeakEwma);
        let errs = Cluster::build(
            &v1::Cluster {
                name: "h".into(),
                lb: v1::LbPolicy::RingHash.into(),
                hash: Some(v1::HashPolicy {
                    kind: Some(v1::hash_policy::Kind::Header("bad header".into())),
                }),
                ..Default::default()
            },
            &[],
            None,
            &m,
        )
        .unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"cluster "h": hash.header: invalid header name "bad header""#
        );
    }

    #[test]
    fn ejected_endpoint_leaves_rotation() {
        let m = Metrics::new().unwrap();
        let proto = v1::Cluster {
            outlier: Some(v1::OutlierDetection {
                consecutive_failures: 2,
                min_healthy_percent: 10,
                ..Default::default()
            }),
            ..rr("o")
        };
        let eps = [
            ep("127.0.0.1:1", 1),
            ep("127.0.0.1:2", 1),
            ep("127.0.0.1:3", 1),
        ];
        let c = Cluster::build(&proto, &eps, None, &m).unwrap();
        c.report(1, false);
        c.report(1, false);
        let picked: Vec<u16> = (0..6).map(|_| c.pick().unwrap().addr.port()).collect();
        assert!(!picked.contains(&2), "{picked:?}");
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains(
                r#"weft_outlier_ejections_total{cluster="o",reason="consecutive_failures"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"weft_outlier_ejected_endpoints{cluster="o"} 1"#));
    }

    #[test]
    fn bad_endpoint_address_is_rejected() {
        let m = Metrics::new().unwrap();
        let errs = Cluster::build(
            &rr("b"),
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
