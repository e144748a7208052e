//! Clusters: a named set of endpoints with timeouts, an upstream protocol, a load balancer and
//! the resilience settings (circuit breaker, outlier detection, health check).
//!
//! A [`Cluster`] is immutable and belongs to one snapshot. What must survive a snapshot swap
//! lives in [`ClusterState`] (round-robin position, breaker counters, retry budget, outlier and
//! health-check state, the resolver of its DNS endpoints, keyed by cluster name) and in each
//! [`Endpoint`]'s pool, load and health (keyed by address), which a new snapshot takes over from
//! the previous one.
//!
//! Endpoints are the control plane's (static `ip:port` ones and registered sidecars) followed
//! by the addresses the cluster's `dns_endpoints` currently resolve to ([`crate::egress::dns`]).
//! What a connection to each must be is decided here, once per snapshot
//! ([`crate::tls::Expect`]): mTLS to a sidecar (an endpoint with an identity), TLS originated
//! to a service outside the mesh when the cluster has `upstream_tls` (its
//! [`OriginationConfig`], built here and reused while its inputs are unchanged), else
//! plaintext.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use prometheus::IntCounter;
use weft_proto::v1;

use crate::breaker::{BreakerLimits, BreakerState, ConnectionGate, Limit};
use crate::egress::dns::{DnsEndpoints, DnsTarget};
use crate::egress::EgressContext;
use crate::health::{HealthCheckConfig, HealthChecker, Target};
use crate::lb::{Avail, Balancer, EndpointLoad, HashOn, Policy};
use crate::metrics::{Metrics, SeriesLease};
use crate::outlier::{EndpointHealth, OutlierConfig, OutlierState};
use crate::resilience_metrics::ClusterResilienceMetrics;
use crate::retry::RetryBudget;
use crate::snapshot::Rejection;
use crate::tls::origination::{OriginationConfig, TlsTarget};
use crate::tls::Expect;
use crate::upstream::LazyPool;

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
    /// Retry budget, made by the first request that deposits into it ([`LazyBudget`]).
    pub budget: LazyBudget,
    /// Outlier-detection state (also told about failed health checks).
    pub outlier: Arc<OutlierState>,
    /// Active health checks.
    pub health: Arc<HealthChecker>,
    /// Retry/breaker/outlier/health metric handles.
    pub metrics: ClusterResilienceMetrics,
    /// The resolver of the cluster's DNS endpoints, while it has some (dropping it ends its
    /// task and its metric series).
    pub dns: ArcSwapOption<DnsEndpoints>,
}

impl ClusterState {
    fn new(metrics: ClusterResilienceMetrics) -> Self {
        let outlier = Arc::new(OutlierState::default());
        let breaker = Arc::new(BreakerState::new(metrics.clone()));
        Self {
            position: AtomicUsize::new(0),
            connections: Arc::new(ConnectionGate::new(Arc::clone(&breaker))),
            breaker,
            budget: LazyBudget::default(),
            health: Arc::new(HealthChecker::new(Arc::clone(&outlier), metrics.clone())),
            outlier,
            metrics,
            dns: ArcSwapOption::empty(),
        }
    }
}

/// A cluster's [`RetryBudget`], allocated the first time it is reached ([`Deref`](std::ops::Deref)):
/// requests of routes with a retry policy deposit into it, retries withdraw. Its window of slots
/// is about 240 bytes, held per cluster of the scope: a sidecar that may call thousands of
/// services and calls a few holds only theirs. A fresh budget is the same as an untouched one.
#[derive(Debug, Default)]
pub struct LazyBudget(OnceLock<Box<RetryBudget>>);

impl LazyBudget {
    /// Whether the budget was made.
    pub fn created(&self) -> bool {
        self.0.get().is_some()
    }
}

impl std::ops::Deref for LazyBudget {
    type Target = RetryBudget;

    fn deref(&self) -> &RetryBudget {
        self.0.get_or_init(Box::default)
    }
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// ip:port.
    pub addr: SocketAddr,
    /// Relative weight (0 in the proto counts as 1).
    pub weight: u32,
    /// Connections to this endpoint, made by the first HTTP request sent to it (TCP connections
    /// and health checks connect on their own); shared with later snapshots while the endpoint
    /// stays.
    pub pool: LazyPool,
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
    /// Outlier detection; `None` = off. (This, the health check and the locality are boxed:
    /// most clusters have none, and a sidecar holds one `Cluster` per service in scope.)
    pub outlier: Option<Box<OutlierConfig>>,
    /// Active health check; `None` = off.
    pub health_check: Option<Box<HealthCheckConfig>>,
    /// TLS originated to the endpoints outside the mesh (`upstream_tls`); `None` = plaintext.
    pub upstream_tls: Option<Arc<OriginationConfig>>,
    balancer: Balancer,
    /// Panic threshold (percent of available endpoints below which all are used).
    min_healthy_percent: u32,
    /// Zone preference: the endpoints in the caller's zone (`None`: no preference).
    locality: Option<Box<LocalZone>>,
    state: Arc<ClusterState>,
    /// `weft_upstream_connect_errors_total{cluster}`, created when first used ([`ConnectErrors`]).
    pub connect_errors: ConnectErrors,
}

/// `weft_upstream_connect_errors_total{cluster}` of one cluster, shared by every snapshot's
/// view of it (a rebuilt cluster takes it over from the previous one, like [`ClusterState`]).
///
/// The series is created, under a lease that keeps it exported while any cluster of that name
/// holds it, the first time the counter is reached ([`Deref`](std::ops::Deref)): the data path
/// hands it to every connect it makes to the cluster (`&cluster.connect_errors`), so the series
/// appears with the cluster's first request or connection, at 0, and counts from there. A
/// sidecar whose scope holds thousands of services it never calls holds (and exports) none
/// for them: the series and its lease were about 600 bytes per cluster.
pub struct ConnectErrors(Arc<ConnectErrorsCell>);

struct ConnectErrorsCell {
    /// The proxy's families (one `Arc` per snapshot build, shared by its new clusters).
    metrics: Arc<Metrics>,
    cluster: Arc<str>,
    series: OnceLock<(IntCounter, SeriesLease)>,
}

impl ConnectErrors {
    fn new(metrics: Arc<Metrics>, cluster: Arc<str>) -> Self {
        Self(Arc::new(ConnectErrorsCell {
            metrics,
            cluster,
            series: OnceLock::new(),
        }))
    }

    /// The counter of the previous snapshot's cluster of the same name.
    fn carry(previous: &ConnectErrors) -> Self {
        Self(Arc::clone(&previous.0))
    }

    /// Whether the series exists (the counter was reached).
    pub fn created(&self) -> bool {
        self.0.series.get().is_some()
    }
}

impl std::ops::Deref for ConnectErrors {
    type Target = IntCounter;

    fn deref(&self) -> &IntCounter {
        let cell = &*self.0;
        &cell
            .series
            .get_or_init(|| cell.metrics.connect_errors(&cell.cluster))
            .0
    }
}

impl std::fmt::Debug for ConnectErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectErrors")
            .field("cluster", &self.0.cluster)
            .field("created", &self.created())
            .finish()
    }
}

/// The endpoints in the caller's zone, preferred while enough of them are healthy (Envoy's
/// locality-weighted balancing and Istio's locality failover are the models).
#[derive(Debug)]
struct LocalZone {
    /// Which endpoint indices are in the zone.
    members: Avail,
    /// How many.
    count: usize,
    /// Stay in the zone while at least this percent of its endpoints are available.
    min_healthy_percent: u32,
}

fn reject(proto: &v1::Cluster, field: impl Into<String>, reason: impl Into<String>) -> Rejection {
    Rejection::new(format!("cluster {:?}", proto.name), field, reason)
}

/// Hands the cluster's DNS targets to its resolver (created on first use, dropped when the
/// cluster has none) and returns the addresses they resolve to now.
fn resolve_dns(
    state: &ClusterState,
    cluster: &str,
    targets: Vec<DnsTarget>,
    egress: Option<&Arc<EgressContext>>,
) -> Vec<crate::egress::dns::ResolvedEndpoint> {
    let Some(egress) = egress.filter(|_| !targets.is_empty()) else {
        state.dns.store(None);
        return Vec::new();
    };
    let dns = match state.dns.load_full() {
        Some(d) => d,
        None => {
            let d = DnsEndpoints::new(cluster, egress);
            state.dns.store(Some(Arc::clone(&d)));
            d
        }
    };
    dns.update(targets);
    dns.endpoints()
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
        self.pick_index_at(hash, crate::lb::load::now_nanos())
    }

    /// [`Cluster::pick_index`] at `now` ([`crate::lb::load::now_nanos`] of a clock read the
    /// caller made anyway: one per attempt, shared with the endpoint's load tracking).
    pub fn pick_index_at(&self, hash: Option<u64>, now: u64) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if let Some(zone) = &self.locality {
            // In the caller's zone while enough of it is available; else every zone.
            let local = Avail::from_fn(n, |i| {
                zone.members.contains(i) && self.endpoints[i].health.is_available(now)
            });
            let up = local.count(n);
            if up > 0
                && (up as u64) * 100 >= u64::from(zone.min_healthy_percent) * zone.count as u64
            {
                return self
                    .balancer
                    .pick_at(hash, &local, &self.state.position, now);
            }
            self.state.metrics.locality_spillover.inc();
        }
        let avail = self.state.outlier.avail(
            |i| &*self.endpoints[i].health,
            n,
            self.min_healthy_percent,
            now,
        );
        self.balancer
            .pick_at(hash, &avail, &self.state.position, now)
    }

    /// Records how an attempt to endpoint `i` ended for outlier detection (`ok` = not a 5xx,
    /// connect failure, reset or timeout).
    pub fn report(&self, i: usize, ok: bool) {
        if self.outlier.is_some() {
            self.report_at(i, ok, crate::lb::load::now_nanos());
        }
    }

    /// [`Cluster::report`] at `now` ([`crate::lb::load::now_nanos`] of a clock read the caller
    /// made anyway, e.g. when the response arrived).
    pub fn report_at(&self, i: usize, ok: bool, now: u64) {
        if let Some(cfg) = &self.outlier {
            self.state.outlier.report_at(
                cfg,
                |k| &*self.endpoints[k].health,
                self.endpoints.len(),
                i,
                ok,
                &self.state.metrics,
                now,
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
    /// DNS endpoints resolve through the process's [`crate::egress::context`].
    pub fn build(
        proto: &v1::Cluster,
        endpoints: &[v1::Endpoint],
        previous: Option<&Cluster>,
        metrics: &Metrics,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_with(
            proto,
            endpoints,
            previous,
            metrics,
            crate::egress::context(),
        )
    }

    /// [`Cluster::build`] for a snapshot build that makes many clusters: those new to it share
    /// `shared` (a copy of `metrics`) for their lazily created series ([`ConnectErrors`]).
    pub fn build_sharing(
        proto: &v1::Cluster,
        endpoints: &[v1::Endpoint],
        previous: Option<&Cluster>,
        metrics: &Metrics,
        shared: &Arc<Metrics>,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_in(
            proto,
            endpoints,
            previous,
            metrics,
            Some(shared),
            crate::egress::context(),
        )
    }

    /// [`Cluster::build`], resolving DNS endpoints through `egress` (`None`: they never
    /// resolve).
    pub fn build_with(
        proto: &v1::Cluster,
        endpoints: &[v1::Endpoint],
        previous: Option<&Cluster>,
        metrics: &Metrics,
        egress: Option<&Arc<EgressContext>>,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_in(proto, endpoints, previous, metrics, None, egress)
    }

    fn build_in(
        proto: &v1::Cluster,
        endpoints: &[v1::Endpoint],
        previous: Option<&Cluster>,
        metrics: &Metrics,
        shared: Option<&Arc<Metrics>>,
        egress: Option<&Arc<EgressContext>>,
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
        let upstream_tls = match &proto.upstream_tls {
            None => None,
            Some(t) => {
                match OriginationConfig::build(t, previous.and_then(|p| p.upstream_tls.as_ref())) {
                    Ok(c) => Some(c),
                    Err((field, reason)) => {
                        errors.push(reject(proto, field, reason));
                        None
                    }
                }
            }
        };
        let mut dns_targets = Vec::with_capacity(proto.dns_endpoints.len());
        for (i, d) in proto.dns_endpoints.iter().enumerate() {
            match DnsTarget::from_proto(d) {
                Ok(t) => dns_targets.push(t),
                Err((field, reason)) => {
                    errors.push(reject(proto, format!("dns_endpoints[{i}].{field}"), reason));
                }
            }
        }
        let state = match previous {
            Some(p) => Arc::clone(&p.state),
            None => Arc::new(ClusterState::new(metrics.cluster_resilience(&proto.name))),
        };
        // A rejected cluster changes no long-lived state.
        let resolved = if errors.is_empty() {
            resolve_dns(&state, &proto.name, dns_targets, egress)
        } else {
            Vec::new()
        };
        let old: HashMap<SocketAddr, &Endpoint> = previous
            .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
            .unwrap_or_default();
        let mut eps = Vec::with_capacity(endpoints.len() + resolved.len());
        // The caller's zone, and which endpoints are in it (by position in `eps`).
        let zone = proto
            .locality
            .as_ref()
            .filter(|l| !l.local_zone.is_empty())
            .map(|l| (&l.zone_label, &l.local_zone));
        let mut in_zone: Vec<bool> = Vec::with_capacity(endpoints.len() + resolved.len());
        // Pools are keyed by address and what connections must be (mTLS to an identity, TLS to
        // a server name, plaintext). None is made here: an endpoint gets its pool on first use
        // (`LazyPool`), and one that has it keeps it (the cell is shared with the previous
        // snapshot).
        let idle_timeout =
            (proto.idle_timeout_ms > 0).then(|| Duration::from_millis(proto.idle_timeout_ms));
        let gate = &state.connections;
        let mut add = |addr: SocketAddr, weight: u32, expect: Expect| {
            let (pool, load, health) = match old.get(&addr) {
                Some(p) if *p.pool.expectation() == expect => (
                    LazyPool::carry(&p.pool, Some(Arc::clone(gate)), idle_timeout),
                    Arc::clone(&p.load),
                    Arc::clone(&p.health),
                ),
                _ => (
                    LazyPool::new(addr, expect, Some(Arc::clone(gate)), idle_timeout),
                    Arc::default(),
                    Arc::default(),
                ),
            };
            eps.push(Endpoint {
                addr,
                weight: weight.max(1),
                pool,
                load,
                health,
            });
        };
        for (i, e) in endpoints.iter().enumerate() {
            let Ok(addr) = e.address.parse::<SocketAddr>() else {
                errors.push(Rejection::new(
                    format!("endpoints of cluster {:?}", proto.name),
                    format!("endpoints[{i}].address"),
                    format!("invalid ip:port {:?}", e.address),
                ));
                continue;
            };
            let mesh = crate::tls::expectation(proto, e);
            let expect = match &upstream_tls {
                // An endpoint outside the mesh (no identity) of a cluster that originates TLS:
                // only `sni` can name what its certificate must carry.
                Some(tls) if e.identity.is_empty() => match tls.server_name(None) {
                    Ok(name) => Expect::Tls(Arc::new(TlsTarget::new(Arc::clone(tls), name))),
                    Err(reason) => {
                        errors.push(reject(
                            proto,
                            "upstream_tls.sni",
                            format!("endpoint {addr}: {reason}"),
                        ));
                        continue;
                    }
                },
                _ => mesh,
            };
            in_zone.push(zone.is_some_and(|(label, local)| e.labels.get(label) == Some(local)));
            add(addr, e.weight, expect);
        }
        let statics: std::collections::HashSet<SocketAddr> = endpoints
            .iter()
            .filter_map(|e| e.address.parse().ok())
            .collect();
        for r in resolved {
            // An address listed statically too is that endpoint already.
            if statics.contains(&r.addr) {
                continue;
            }
            let expect = match &upstream_tls {
                Some(tls) => match tls.server_name(Some(&r.host)) {
                    Ok(name) => Expect::Tls(Arc::new(TlsTarget::new(Arc::clone(tls), name))),
                    Err(reason) => {
                        errors.push(reject(
                            proto,
                            "dns_endpoints.host",
                            format!("{}: {reason}", r.host),
                        ));
                        continue;
                    }
                },
                None => Expect::Plain,
            };
            in_zone.push(false);
            add(r.addr, r.weight, expect);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for p in eps.iter().filter_map(|e| e.pool.created()) {
            p.set_idle_timeout(idle_timeout);
        }
        let locality = proto.locality.as_ref().and_then(|l| {
            let count = in_zone.iter().filter(|&&z| z).count();
            (count > 0).then(|| LocalZone {
                members: Avail::from_fn(in_zone.len(), |i| in_zone[i]),
                count,
                min_healthy_percent: l.min_healthy_percent.min(100),
            })
        });
        let weights: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        // Only a ring places endpoints by a key.
        let keys: Vec<String> = if policy == Policy::RingHash {
            eps.iter().map(|e| e.addr.to_string()).collect()
        } else {
            Vec::new()
        };
        let loads = eps.iter().map(|e| Arc::clone(&e.load)).collect();
        let breaker = BreakerLimits::from_proto(proto.breaker.as_ref());
        state.metrics.publish_limits(&breaker.max);
        state.connections.set_max(breaker.get(Limit::Connections));
        // Without a check the checker needs no targets (it keeps none: 6,500 endpoints of a
        // large scope would be held twice for nothing).
        let checked = if health_check.is_some() {
            eps.as_slice()
        } else {
            &[]
        };
        state.health.update(
            health_check.clone(),
            checked
                .iter()
                .map(|e| Target {
                    addr: e.addr,
                    health: Arc::clone(&e.health),
                    expect: e.pool.expectation().clone(),
                })
                .collect(),
        );
        let ms = |v: u64| Duration::from_millis(v);
        let name: Arc<str> = proto.name.as_str().into();
        let connect_errors = match previous {
            Some(p) => ConnectErrors::carry(&p.connect_errors),
            None => ConnectErrors::new(
                shared.map_or_else(|| Arc::new(metrics.clone()), Arc::clone),
                Arc::clone(&name),
            ),
        };
        Ok(Self {
            name,
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
            locality: locality.map(Box::new),
            outlier: outlier.map(Box::new),
            health_check: health_check.map(Box::new),
            upstream_tls,
            breaker,
            endpoints: eps.into(),
            state,
            connect_errors,
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
    fn connect_errors_appear_on_first_use_and_follow_the_cluster_across_rebuilds() {
        let m = Metrics::new().unwrap();
        let scrape = || {
            String::from_utf8(m.encode())
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("weft_upstream_connect_errors_total{"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let proto = rr("b");
        let c1 = Cluster::build(&proto, &[ep("127.0.0.1:1", 1)], None, &m).unwrap();
        assert!(scrape().is_empty(), "no series before the cluster is used");
        assert!(!c1.connect_errors.created());
        c1.connect_errors.inc();
        assert_eq!(
            scrape(),
            [r#"weft_upstream_connect_errors_total{cluster="b"} 1"#]
        );
        // An endpoint change rebuilds the cluster: the same counter, counting on.
        let c2 = Cluster::build(&proto, &[ep("127.0.0.1:2", 1)], Some(&c1), &m).unwrap();
        assert!(c2.connect_errors.created());
        c2.connect_errors.inc();
        assert_eq!(
            scrape(),
            [r#"weft_upstream_connect_errors_total{cluster="b"} 2"#]
        );
        drop(c1);
        assert_eq!(scrape().len(), 1, "the rebuilt cluster holds the series");
        drop(c2);
        assert!(
            scrape().is_empty(),
            "gone with the last cluster of that name"
        );
        // A cluster never used, rebuilt and dropped, never had one.
        let unused = Cluster::build(&rr("u"), &[], None, &m).unwrap();
        let next = Cluster::build(&rr("u"), &[], Some(&unused), &m).unwrap();
        drop(unused);
        assert!(!next.connect_errors.created());
        assert!(scrape().is_empty());
    }

    #[test]
    fn the_retry_budget_is_made_on_first_use_and_kept_across_rebuilds() {
        let m = Metrics::new().unwrap();
        let proto = rr("b");
        let c1 = Cluster::build(&proto, &[ep("127.0.0.1:1", 1)], None, &m).unwrap();
        assert!(!c1.state().budget.created());
        // No minimum: only deposits allow retries (20% of the requests).
        let params = crate::retry::budget::BudgetParams {
            min_per_second: 0,
            ..Default::default()
        };
        assert!(
            !c1.state().budget.try_withdraw(&params),
            "a fresh budget is empty"
        );
        assert!(c1.state().budget.created());
        for _ in 0..5 {
            c1.state().budget.deposit(&params);
        }
        let c2 = Cluster::build(&proto, &[ep("127.0.0.1:2", 1)], Some(&c1), &m).unwrap();
        assert!(
            c2.state().budget.try_withdraw(&params),
            "the deposits carried over"
        );
        assert!(
            !c2.state().budget.try_withdraw(&params),
            "one retry per five requests"
        );
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
        assert!(c1.endpoints[0].pool.same_as(&c2.endpoints[0].pool));
        assert!(c1.endpoints[1].pool.same_as(&c2.endpoints[1].pool));
        assert!(Arc::ptr_eq(&c1.endpoints[1].load, &c2.endpoints[1].load));
        assert!(Arc::ptr_eq(
            &c1.endpoints[1].health,
            &c2.endpoints[1].health
        ));
        assert!(Arc::ptr_eq(c1.state(), c2.state()));
        assert_eq!(c2.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c2.request_timeout, None);
    }

    /// An HTTP/1.1 upstream answering every request `200 ok` on kept-alive connections.
    async fn http_upstream() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn endpoint_pools_are_made_on_first_use_and_kept_by_a_push() {
        use http_body_util::BodyExt;
        let up = http_upstream().await;
        let m = Metrics::new().unwrap();
        let proto = rr("lazy");
        let eps = [
            ep(&up.to_string(), 1),
            ep("127.0.0.1:2", 1),
            ep("127.0.0.1:3", 1),
        ];
        let c1 = Cluster::build(&proto, &eps, None, &m).unwrap();
        // A snapshot makes no pool: what a connection must be is known without one.
        assert!(c1.endpoints.iter().all(|e| e.pool.created().is_none()));
        assert_eq!(*c1.endpoints[1].pool.expectation(), Expect::Plain);
        assert_eq!(c1.endpoints[1].pool.idle_connections(), 0);
        assert!(c1.endpoints.iter().all(|e| e.pool.created().is_none()));
        // The first request makes the pool of the endpoint it goes to, and only that one.
        let e = c1.pick().unwrap();
        assert_eq!(e.addr, up);
        let req = http::Request::get("/")
            .header("host", "lazy")
            .body(crate::retry::RequestBody::Buffered {
                data: None,
                trailers: None,
            })
            .unwrap();
        let resp = e
            .pool
            .send(
                req,
                crate::upstream::Wire::H1,
                Duration::from_secs(5),
                &c1.connect_errors,
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        let made = Arc::clone(c1.endpoints[0].pool.created().expect("made by the request"));
        assert_eq!(
            made.idle_connections(),
            1,
            "the connection went back to the pool"
        );
        assert!(c1.endpoints[1..].iter().all(|e| e.pool.created().is_none()));
        // A push (one endpoint replaced, a new idle timeout) keeps the pool and its warm
        // connection, and still makes none for the others.
        let eps2 = [
            ep(&up.to_string(), 1),
            ep("127.0.0.1:2", 1),
            ep("127.0.0.1:4", 1),
        ];
        let pushed = v1::Cluster {
            idle_timeout_ms: 45_000,
            ..proto.clone()
        };
        let c2 = Cluster::build(&pushed, &eps2, Some(&c1), &m).unwrap();
        assert!(Arc::ptr_eq(c2.endpoints[0].pool.created().unwrap(), &made));
        assert_eq!(c2.endpoints[0].pool.idle_connections(), 1);
        assert_eq!(made.idle_timeout(), Duration::from_secs(45));
        assert!(c2.endpoints[1..].iter().all(|e| e.pool.created().is_none()));
        // A pool made through the older snapshot after the push is the newer one's too.
        let late = Arc::clone(c1.endpoints[1].pool.get());
        assert!(Arc::ptr_eq(c2.endpoints[1].pool.created().unwrap(), &late));
        // A removed endpoint's pool is not carried; a new one at another address has none.
        assert!(c2.endpoints[2].pool.created().is_none());
        assert!(!c2.endpoints[2].pool.same_as(&c1.endpoints[2].pool));
    }

    #[test]
    fn locality_prefers_the_callers_zone_until_too_few_are_available_there() {
        let m = Metrics::new().unwrap();
        let zoned = |addr: &str, zone: &str| v1::Endpoint {
            address: addr.into(),
            weight: 1,
            labels: [("zone".to_owned(), zone.to_owned())].into(),
            ..Default::default()
        };
        let proto = v1::Cluster {
            locality: Some(v1::LocalityLb {
                local_zone: "a".into(),
                zone_label: "zone".into(),
                min_healthy_percent: 60,
            }),
            ..rr("z")
        };
        let eps = [
            zoned("127.0.0.1:1", "a"),
            zoned("127.0.0.1:2", "a"),
            zoned("127.0.0.1:3", "b"),
            ep("127.0.0.1:4", 1),
        ];
        let c = Cluster::build(&proto, &eps, None, &m).unwrap();
        let ports = |c: &Cluster, n: usize| -> std::collections::BTreeSet<u16> {
            (0..n).map(|_| c.pick().unwrap().addr.port()).collect()
        };
        assert_eq!(ports(&c, 20), [1, 2].into(), "the caller's zone only");
        // One of two in the zone down: 50% < 60%: every available endpoint.
        c.endpoints[0].health.set_checked_healthy(false);
        c.state().outlier.note_unavailable();
        assert_eq!(ports(&c, 30), [2, 3, 4].into());
        assert!(c.state().metrics.locality_spillover.get() > 0);
        // Back: in the zone again.
        c.endpoints[0].health.set_checked_healthy(true);
        assert_eq!(ports(&c, 20), [1, 2].into());
        // Without a zone for the caller, or no endpoint in its zone: no preference.
        let elsewhere = v1::Cluster {
            locality: Some(v1::LocalityLb {
                local_zone: "c".into(),
                zone_label: "zone".into(),
                min_healthy_percent: 60,
            }),
            ..rr("y")
        };
        let c = Cluster::build(&elsewhere, &eps, None, &m).unwrap();
        assert_eq!(ports(&c, 40), [1, 2, 3, 4].into());
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

    /// Answers every name with 127.0.0.5.
    struct OneAddress;

    impl crate::egress::resolver::Resolve for OneAddress {
        fn resolve<'a>(
            &'a self,
            _host: &'a str,
        ) -> futures::future::BoxFuture<
            'a,
            Result<crate::egress::resolver::Answer, crate::egress::resolver::ResolveError>,
        > {
            Box::pin(async {
                Ok(crate::egress::resolver::Answer::new(
                    vec![[127, 0, 0, 5].into()],
                    None,
                ))
            })
        }
    }

    fn external(tls: Option<v1::UpstreamTls>) -> v1::Cluster {
        v1::Cluster {
            name: "stripe.default".into(),
            dns_endpoints: vec![v1::DnsEndpoint {
                host: "api.external.test".into(),
                port: 443,
                weight: 3,
                refresh_ms: 30_000,
            }],
            upstream_tls: tls,
            ..rr("stripe.default")
        }
    }

    fn roots() -> String {
        rcgen::generate_simple_self_signed(vec!["root.test".to_owned()])
            .unwrap()
            .cert
            .pem()
    }

    #[tokio::test]
    async fn dns_endpoints_become_endpoints_with_tls_to_their_name() {
        let m = Metrics::new().unwrap();
        let ctx = crate::egress::EgressContext::new(
            Arc::new(OneAddress),
            crate::egress::metrics::DnsMetrics::unregistered(),
        );
        let tls = v1::UpstreamTls {
            roots_pem: roots(),
            ..Default::default()
        };
        let proto = external(Some(tls));
        // Not resolved yet: no endpoints (503 no-endpoints), like a cluster without any.
        let c1 = Cluster::build_with(&proto, &[], None, &m, Some(&ctx)).unwrap();
        assert!(c1.pick().is_none());
        tokio::time::timeout(Duration::from_secs(5), ctx.changed())
            .await
            .expect("the name resolves and the change is signalled");
        let c2 = Cluster::build_with(&proto, &[], Some(&c1), &m, Some(&ctx)).unwrap();
        assert_eq!(c2.endpoints.len(), 1);
        let e = &c2.endpoints[0];
        assert_eq!(e.addr.to_string(), "127.0.0.5:443");
        assert_eq!(e.weight, 3);
        let Expect::Tls(target) = e.pool.expectation() else {
            panic!("TLS origination expected: {:?}", e.pool.expectation())
        };
        assert_eq!(target.server_name().to_str(), "api.external.test");
        assert!(e.pool.mesh_identity().is_none());
        // A rebuild (a push, a refresh) keeps the endpoint's pool and the TLS config.
        let c3 = Cluster::build_with(&proto, &[], Some(&c2), &m, Some(&ctx)).unwrap();
        assert!(c2.endpoints[0].pool.same_as(&c3.endpoints[0].pool));
        assert!(Arc::ptr_eq(
            c2.upstream_tls.as_ref().unwrap(),
            c3.upstream_tls.as_ref().unwrap()
        ));
        // Without upstream_tls the same address is plaintext: a new pool.
        let plain = Cluster::build_with(&external(None), &[], Some(&c3), &m, Some(&ctx)).unwrap();
        assert_eq!(*plain.endpoints[0].pool.expectation(), Expect::Plain);
        assert!(!c3.endpoints[0].pool.same_as(&plain.endpoints[0].pool));
        // Without DNS endpoints the resolver state goes.
        assert!(plain.state().dns.load().is_some());
        let none =
            Cluster::build_with(&rr("stripe.default"), &[], Some(&plain), &m, Some(&ctx)).unwrap();
        assert!(none.state().dns.load().is_none());
    }

    #[test]
    fn tls_origination_rejections_name_the_field() {
        let m = Metrics::new().unwrap();
        let tls = |sni: &str, cert: &str| v1::UpstreamTls {
            sni: sni.into(),
            roots_pem: roots(),
            client_cert_file: cert.into(),
            client_key_file: if cert.is_empty() {
                ""
            } else {
                "/nonexistent/key.pem"
            }
            .into(),
        };
        // An ip:port endpoint has no name to verify without sni.
        let proto = v1::Cluster {
            upstream_tls: Some(tls("", "")),
            ..rr("ext")
        };
        let errs = Cluster::build(&proto, &[ep("127.0.0.1:443", 1)], None, &m).unwrap_err();
        assert!(
            errs[0].to_string().starts_with(
                r#"cluster "ext": upstream_tls.sni: endpoint 127.0.0.1:443: an ip:port endpoint needs upstream_tls.sni"#
            ),
            "{errs:?}"
        );
        let proto = v1::Cluster {
            upstream_tls: Some(tls("api.external.test", "")),
            ..rr("ext")
        };
        let c = Cluster::build(&proto, &[ep("127.0.0.1:443", 1)], None, &m).unwrap();
        let Expect::Tls(t) = c.endpoints[0].pool.expectation() else {
            panic!("TLS expected")
        };
        assert_eq!(t.server_name().to_str(), "api.external.test");
        // Mesh endpoints (with an identity) keep mesh mTLS.
        let mesh = v1::Endpoint {
            identity: "spiffe://cluster.local/ns/default/sa/ext".into(),
            ..ep("127.0.0.2:443", 1)
        };
        let c = Cluster::build(&proto, &[mesh], None, &m).unwrap();
        assert!(c.endpoints[0].pool.mesh_identity().is_some());
        // An unreadable client certificate file: a NACK naming it.
        let proto = v1::Cluster {
            upstream_tls: Some(tls("api.external.test", "/nonexistent/client.pem")),
            ..rr("ext")
        };
        let errs = Cluster::build(&proto, &[], None, &m).unwrap_err();
        assert!(
            errs[0].to_string().starts_with(
                r#"cluster "ext": upstream_tls.client_cert_file: cannot read /nonexistent/client.pem"#
            ),
            "{errs:?}"
        );
        // A bad DNS endpoint names its index.
        let proto = v1::Cluster {
            dns_endpoints: vec![v1::DnsEndpoint {
                host: "api.external.test".into(),
                port: 0,
                ..Default::default()
            }],
            ..rr("ext")
        };
        let errs = Cluster::build(&proto, &[], None, &m).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            r#"cluster "ext": dns_endpoints[0].port: 0 is out of range 1..=65535"#
        );
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
