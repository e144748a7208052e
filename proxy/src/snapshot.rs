//! The proxy's configuration: the resource sets held from the control plane ([`Resources`]) and
//! the immutable, validated, ready-to-serve [`Snapshot`] built from them.
//!
//! A discovery response replaces some sets; [`Resources::merge`] combines them with the sets held
//! for the other types and [`Snapshot::build`] compiles and validates the whole, returning every
//! problem as a [`Rejection`] naming the resource and field (this becomes the NACK). The data
//! path reads the current snapshot through a [`SnapshotStore`] (`ArcSwap`), once per request.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prost::Message as _;
use weft_proto::v1;

use crate::authz::{build_policies, AuthzPolicy, Policies};
use crate::cluster::Cluster;
use crate::metrics::{Metrics, PeerLabels, RequestMetrics, TcpMetrics};
use crate::route::RouteTable;
use crate::tls::inbound::MtlsMode;
use crate::tls::trust::TrustBundle;

mod endpoint_push;
mod held_routes;

use held_routes::{held_route_tables, held_table_corrupt, held_table_routes};

/// Where the data path finds the current snapshot; empty until the first one is applied.
pub type SnapshotStore = ArcSwapOption<Snapshot>;

/// One reason a configuration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {field}: {reason}")]
pub struct Rejection {
    /// e.g. `listener "outbound"`.
    pub resource: String,
    /// e.g. `address`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl Rejection {
    /// A rejection of `field` of `resource`.
    pub fn new(
        resource: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            resource: resource.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Joins rejections into one NACK reason.
pub fn nack_reason(rejections: &[Rejection]) -> String {
    rejections
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The resource types, with their proto enum and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// Listener set.
    Listeners,
    /// Route tables.
    Routes,
    /// Clusters.
    Clusters,
    /// Endpoints.
    Endpoints,
    /// Authorization policies.
    Policies,
    /// Trust domain and roots.
    Trust,
}

impl ResourceKind {
    /// Every kind, in a stable order.
    pub const ALL: [Self; 6] = [
        Self::Listeners,
        Self::Routes,
        Self::Clusters,
        Self::Endpoints,
        Self::Policies,
        Self::Trust,
    ];

    /// The name used in metrics and `/config_dump`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listeners => "listeners",
            Self::Routes => "routes",
            Self::Clusters => "clusters",
            Self::Endpoints => "endpoints",
            Self::Policies => "policies",
            Self::Trust => "trust",
        }
    }

    /// The protocol enum value.
    pub fn proto(self) -> v1::ResourceType {
        match self {
            Self::Listeners => v1::ResourceType::Listeners,
            Self::Routes => v1::ResourceType::Routes,
            Self::Clusters => v1::ResourceType::Clusters,
            Self::Endpoints => v1::ResourceType::Endpoints,
            Self::Policies => v1::ResourceType::Policies,
            Self::Trust => v1::ResourceType::Trust,
        }
    }
}

/// The resource sets the proxy holds (the last applied of each type).
#[derive(Debug, Clone, Default)]
pub struct Resources {
    /// Listeners.
    pub listeners: Option<v1::ListenerSet>,
    /// Route tables.
    pub routes: Option<v1::RouteSet>,
    /// Clusters.
    pub clusters: Option<v1::ClusterSet>,
    /// Endpoints.
    pub endpoints: Option<v1::EndpointSet>,
    /// Authorization policies.
    pub policies: Option<v1::PolicySet>,
    /// Trust domain and roots.
    pub trust: Option<v1::TrustSet>,
}

impl Resources {
    /// These sets with the ones present in `resp` replacing them.
    pub fn merge(&self, resp: &v1::DiscoveryResponse) -> Self {
        Self {
            listeners: resp.listeners.clone().or_else(|| self.listeners.clone()),
            routes: resp.routes.clone().or_else(|| self.routes.clone()),
            clusters: resp.clusters.clone().or_else(|| self.clusters.clone()),
            endpoints: resp.endpoints.clone().or_else(|| self.endpoints.clone()),
            policies: resp.policies.clone().or_else(|| self.policies.clone()),
            trust: resp.trust.clone().or_else(|| self.trust.clone()),
        }
    }

    /// The sets `resp` carries (moved out of it, their lists trimmed to their length: see
    /// [`Resources::shrink`]) and, for the types it does not carry, copies of `held`'s (its
    /// route set decoded): what the next snapshot is built from, with one copy of the unchanged
    /// sets. `Err` only if the held route set does not decode ([`Encoded::decode`]).
    pub fn merged(
        held: Option<&HeldResources>,
        resp: v1::DiscoveryResponse,
    ) -> Result<Self, Rejection> {
        let carried = Self::carried_by(resp);
        let Some(h) = held else { return Ok(carried) };
        let routes = match carried.routes {
            Some(r) => Some(r),
            // Not trimmed: held only while the next snapshot is built, which holds it encoded.
            None => h.routes()?,
        };
        // `clone` allocates each list at its length: the copies need no trimming.
        Ok(Self {
            listeners: carried
                .listeners
                .or_else(|| h.listeners.as_deref().cloned()),
            routes,
            clusters: carried.clusters.or_else(|| h.clusters.as_deref().cloned()),
            endpoints: match carried.endpoints {
                Some(e) => Some(e),
                None => h
                    .endpoints
                    .as_deref()
                    .map(HeldEndpoints::decode)
                    .transpose()?,
            },
            policies: carried.policies.or_else(|| h.policies.as_deref().cloned()),
            trust: carried.trust.or_else(|| h.trust.as_deref().cloned()),
        })
    }

    /// The sets `resp` carries, trimmed ([`Resources::shrink`]).
    fn carried_by(resp: v1::DiscoveryResponse) -> Self {
        let mut carried = Self {
            listeners: resp.listeners,
            routes: resp.routes,
            clusters: resp.clusters,
            endpoints: resp.endpoints,
            policies: resp.policies,
            trust: resp.trust,
        };
        carried.shrink();
        carried
    }

    /// [`Resources::merged`], also saying what `held` still describes as it is ([`Unchanged`]),
    /// for [`Snapshot::build_after`] with the snapshot that holds `held`: the held route set is
    /// kept as its bytes (decoded only if a route table must be rebuilt, never re-encoded), and
    /// with `endpoints` (the clusters an endpoint delta touched, [`crate::discovery::delta`]) the
    /// clusters it did not touch are reused without comparing them.
    pub fn merged_unchanged(
        held: Option<&HeldResources>,
        resp: v1::DiscoveryResponse,
        delta: Option<(HeldEndpoints, EndpointChange)>,
    ) -> Result<(Self, Unchanged), Rejection> {
        let Some(h) = held else {
            let mut merged = Self::carried_by(resp);
            // Resolving a delta fails without a held set; should one come here, it is whole.
            if let Some((set, _)) = delta.filter(|_| merged.endpoints.is_none()) {
                merged.endpoints = Some(set.decode()?);
            }
            return Ok((merged, Unchanged::default()));
        };
        let (endpoints, endpoint_change) = match (&resp.endpoints, delta) {
            (None, Some((set, change))) => (Some(Arc::new(set)), Some(change)),
            (None, None) => (
                h.endpoints.clone(),
                h.endpoints.as_ref().map(|e| EndpointChange {
                    base: e.version.clone(),
                    clusters: HashSet::new(),
                }),
            ),
            (Some(_), _) => (None, None),
        };
        // The held sets the push does not replace are shared with the held snapshot, not
        // copied; the route set stays encoded (decoded by the build for its tables).
        let unchanged = Unchanged {
            routes: h.routes.clone().filter(|_| resp.routes.is_none()),
            listeners: h.listeners.clone().filter(|_| resp.listeners.is_none()),
            clusters: h.clusters.clone().filter(|_| resp.clusters.is_none()),
            endpoints,
            policies: h.policies.clone().filter(|_| resp.policies.is_none()),
            trust: h.trust.clone().filter(|_| resp.trust.is_none()),
            endpoint_change,
        };
        let carried = Self::carried_by(resp);
        Ok((carried, unchanged))
    }

    /// Gives back what decoding allocated beyond each list's length. prost grows a repeated
    /// field by pushing, so a list ends with up to twice the room it needs, and a list of one or
    /// two large messages (a service's routes, its header matches) with room for four: held for
    /// as long as the set is (until the next push of that type), for every service in scope.
    pub fn shrink(&mut self) {
        if let Some(s) = &mut self.listeners {
            s.listeners.shrink_to_fit();
            for l in &mut s.listeners {
                if let Some(d) = &mut l.detection {
                    d.skip_ports.shrink_to_fit();
                }
            }
        }
        if let Some(s) = &mut self.routes {
            s.tables.shrink_to_fit();
            for r in s.tables.iter_mut().flat_map(|t| {
                t.routes.shrink_to_fit();
                &mut t.routes
            }) {
                r.destinations.shrink_to_fit();
                if let Some(m) = &mut r.r#match {
                    m.hosts.shrink_to_fit();
                    m.headers.shrink_to_fit();
                    m.methods.shrink_to_fit();
                    m.query.shrink_to_fit();
                }
                if let Some(retry) = &mut r.retry {
                    retry.on_status.shrink_to_fit();
                    retry.on_grpc_status.shrink_to_fit();
                }
            }
        }
        if let Some(s) = &mut self.clusters {
            s.clusters.shrink_to_fit();
            for c in &mut s.clusters {
                c.dns_endpoints.shrink_to_fit();
            }
        }
        if let Some(s) = &mut self.endpoints {
            s.clusters.shrink_to_fit();
            for e in s.clusters.iter_mut().flat_map(|c| {
                c.endpoints.shrink_to_fit();
                &mut c.endpoints
            }) {
                e.labels.shrink_to_fit();
            }
        }
        if let Some(s) = &mut self.policies {
            s.policies.shrink_to_fit();
            for r in s.policies.iter_mut().flat_map(|p| {
                p.rules.shrink_to_fit();
                &mut p.rules
            }) {
                r.identities.shrink_to_fit();
                r.namespaces.shrink_to_fit();
                r.methods.shrink_to_fit();
                r.paths.shrink_to_fit();
            }
        }
        if let Some(s) = &mut self.trust {
            s.roots_pem.shrink_to_fit();
        }
    }

    /// The version held for `kind`, if any.
    pub fn version(&self, kind: ResourceKind) -> Option<&str> {
        match kind {
            ResourceKind::Listeners => self.listeners.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Routes => self.routes.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Clusters => self.clusters.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Endpoints => self.endpoints.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Policies => self.policies.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Trust => self.trust.as_ref().map(|s| s.version.as_str()),
        }
    }

    /// Every type version, as Hello and Ack list them.
    pub fn type_versions(&self) -> Vec<v1::TypeVersion> {
        type_versions(|k| self.version(k))
    }
}

/// The endpoint clusters an endpoint delta replaced, added or removed
/// ([`crate::discovery::delta`]), against the held set of version `base`: every other
/// cluster's endpoint list is the one held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointChange {
    /// The version of the endpoint set the delta was applied to.
    pub base: String,
    /// The clusters whose endpoint lists are not the held ones.
    pub clusters: HashSet<String>,
}

/// The sets a snapshot holds that a push did not replace ([`Resources::merged_unchanged`]),
/// shared with it rather than copied, and what [`Snapshot::build_after`] may therefore reuse
/// from that snapshot without comparing protos. Whether a part is that snapshot's own is checked
/// (the same allocation, or for the endpoints of a delta the version it was applied to) before
/// it is trusted; otherwise the build compares as [`Snapshot::build`] does.
#[derive(Debug, Clone, Default)]
pub struct Unchanged {
    /// The held route set, when the push carried none: the next snapshot holds these bytes.
    routes: Option<Encoded<v1::RouteSet>>,
    /// The held listener set, when the push carried none.
    listeners: Option<Arc<v1::ListenerSet>>,
    /// The held cluster set, when the push carried none.
    clusters: Option<Arc<v1::ClusterSet>>,
    /// The held endpoint set when the push carried none, or the held set with an endpoint
    /// delta applied.
    endpoints: Option<Arc<HeldEndpoints>>,
    /// The held policy set, when the push carried none.
    policies: Option<Arc<v1::PolicySet>>,
    /// The held trust set, when the push carried none.
    trust: Option<Arc<v1::TrustSet>>,
    /// The clusters whose endpoints changed since the held set (none: endpoints not carried);
    /// `None` when a whole set was carried (every cluster's endpoints are compared).
    endpoint_change: Option<EndpointChange>,
}

/// The endpoint set a build reads: carried whole (decoded), or held (encoded per cluster).
#[derive(Clone, Copy)]
enum EndpointsIn<'a> {
    Decoded(&'a v1::EndpointSet),
    Held(&'a HeldEndpoints),
}

/// Whether `a` is `b`'s very allocation (shared, so equal without comparing).
fn same_arc<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
}

/// The sets a build reads: each the one a push carried, else the one shared from the held
/// snapshot ([`Unchanged`]).
#[derive(Clone, Copy)]
struct Sets<'a> {
    listeners: Option<&'a v1::ListenerSet>,
    clusters: Option<&'a v1::ClusterSet>,
    endpoints: Option<EndpointsIn<'a>>,
    policies: Option<&'a v1::PolicySet>,
    trust: Option<&'a v1::TrustSet>,
}

/// A protobuf message held encoded (the bytes prost made of it) with its version, which is
/// read without decoding (Hello, ACKs, `/config_dump`). A decoded set of thousands of routes
/// is a tree of small allocations (each string, list and boxed sub-message its own) several
/// times the size of its encoding; what reads it (the next build, `/config_dump`) decodes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Encoded<T> {
    version: Box<str>,
    bytes: bytes::Bytes,
    message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Encoded<T> {
    /// `message`, encoded; `version` is its version field.
    pub fn new(message: &T, version: &str) -> Self {
        Self {
            version: version.into(),
            bytes: message.encode_to_vec().into(),
            message: PhantomData,
        }
    }

    /// The message. Only bytes that [`Encoded::new`] made are held, so this fails only if
    /// they were corrupted in memory: callers turn that into a rejection, never a default.
    pub fn decode(&self) -> Result<T, prost::DecodeError> {
        T::decode(self.bytes.clone())
    }

    /// The message's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Size of the encoding, in bytes.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether `other` is these very bytes (a clone of this `Encoded`), not only equal ones.
    fn same_bytes(&self, other: &Self) -> bool {
        self.bytes.as_ptr() == other.bytes.as_ptr()
            && self.bytes.len() == other.bytes.len()
            && self.version == other.version
    }

    /// Whether `message` encodes to these bytes (then it is equal to the held message; the
    /// sets held encoded have no map fields, whose order could make equal messages differ).
    pub fn holds(&self, message: &T) -> bool {
        message.encoded_len() == self.bytes.len() && message.encode_to_vec() == self.bytes
    }
}

impl<T> std::fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded")
            .field("type", &std::any::type_name::<T>())
            .field("version", &self.version)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The endpoint set as a snapshot holds it: each cluster's `v1::ClusterEndpoints` encoded (the
/// protobuf bytes, a fraction of the decoded lists' size: every address a string, every
/// endpoint a 128-byte message), by cluster name, in the set's order. An endpoint delta replaces
/// the bytes of the clusters it names and shares the others' ([`crate::discovery::delta`]); a
/// build decodes the endpoints of the clusters it rebuilds only, and compares the others by
/// bytes; `/config_dump` decodes them per request.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HeldEndpoints {
    /// The set's version.
    pub version: String,
    clusters: Vec<(Arc<str>, bytes::Bytes)>,
}

impl HeldEndpoints {
    /// `set`, encoded (one buffer, each cluster's bytes a slice of it).
    pub fn encode(set: &v1::EndpointSet) -> Self {
        let mut buf = Vec::with_capacity(set.clusters.iter().map(|c| c.encoded_len()).sum());
        let mut ranges = Vec::with_capacity(set.clusters.len());
        for c in &set.clusters {
            let start = buf.len();
            // A Vec grows as needed: encoding into it cannot fail.
            c.encode(&mut buf)
                .unwrap_or_else(|e| unreachable!("encoding into a Vec: {e}"));
            ranges.push((c.cluster.as_str(), start..buf.len()));
        }
        let all = bytes::Bytes::from(buf);
        Self {
            version: set.version.clone(),
            clusters: ranges
                .into_iter()
                .map(|(name, r)| (Arc::from(name), all.slice(r)))
                .collect(),
        }
    }

    /// A set of `version` holding `clusters` (name and encoded `v1::ClusterEndpoints`).
    pub fn from_parts(version: String, clusters: Vec<(Arc<str>, bytes::Bytes)>) -> Self {
        Self { version, clusters }
    }

    /// `ce`, as this set holds a cluster.
    pub fn encode_cluster(ce: &v1::ClusterEndpoints) -> (Arc<str>, bytes::Bytes) {
        (Arc::from(ce.cluster.as_str()), ce.encode_to_vec().into())
    }

    /// Each cluster's name and encoded endpoints, in the set's order.
    pub fn clusters(&self) -> &[(Arc<str>, bytes::Bytes)] {
        &self.clusters
    }

    /// The whole set, decoded. Only bytes that prost made are held, so this fails only if
    /// they were corrupted in memory: callers turn that into a rejection, never a default.
    pub fn decode(&self) -> Result<v1::EndpointSet, Rejection> {
        Ok(v1::EndpointSet {
            version: self.version.clone(),
            clusters: self
                .clusters
                .iter()
                .map(|(name, b)| decode_cluster_endpoints(&self.version, name, b))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl std::fmt::Debug for HeldEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldEndpoints")
            .field("version", &self.version)
            .field("clusters", &self.clusters.len())
            .finish()
    }
}

fn decode_cluster_endpoints(
    version: &str,
    name: &str,
    bytes: &bytes::Bytes,
) -> Result<v1::ClusterEndpoints, Rejection> {
    <v1::ClusterEndpoints as prost::Message>::decode(bytes.clone()).map_err(|err| {
        Rejection::new(
            format!("held endpoints of cluster {name:?}"),
            "endpoints",
            format!("version {version:?} does not decode: {err}"),
        )
    })
}

/// The resource sets a [`Snapshot`] holds (the last applied of each type), for versions, ACKs,
/// `/config_dump`, the next push's merge and the next build's reuse comparisons. The route set
/// is held encoded ([`Encoded`]): it is the largest set after the endpoints and nothing on a
/// request's path reads it (the built [`RouteTable`]s serve requests); the endpoint set is held
/// encoded per cluster ([`HeldEndpoints`]). Every set is behind an `Arc`, shared with the next
/// snapshot when a push does not carry its type ([`Resources::merged_unchanged`]).
#[derive(Debug, Clone, Default)]
pub struct HeldResources {
    /// Listeners.
    pub listeners: Option<Arc<v1::ListenerSet>>,
    /// Route tables, encoded: [`HeldResources::routes`] decodes them.
    pub routes: Option<Encoded<v1::RouteSet>>,
    /// Clusters.
    pub clusters: Option<Arc<v1::ClusterSet>>,
    /// Endpoints, encoded per cluster.
    pub endpoints: Option<Arc<HeldEndpoints>>,
    /// Authorization policies.
    pub policies: Option<Arc<v1::PolicySet>>,
    /// Trust domain and roots.
    pub trust: Option<Arc<v1::TrustSet>>,
}

impl HeldResources {
    /// Holds `r`, encoding its route set.
    pub fn hold(r: Resources) -> Self {
        let routes = r.routes.as_ref().map(|s| Encoded::new(s, &s.version));
        Self::with_routes(r, routes)
    }

    /// Holds `r` with `routes`, the encoding of `r.routes`.
    fn with_routes(r: Resources, routes: Option<Encoded<v1::RouteSet>>) -> Self {
        Self {
            listeners: r.listeners.map(Arc::new),
            routes,
            clusters: r.clusters.map(Arc::new),
            endpoints: r
                .endpoints
                .as_ref()
                .map(|e| Arc::new(HeldEndpoints::encode(e))),
            policies: r.policies.map(Arc::new),
            trust: r.trust.map(Arc::new),
        }
    }

    /// The route set, decoded.
    pub fn routes(&self) -> Result<Option<v1::RouteSet>, Rejection> {
        self.routes.as_ref().map(decode_held_routes).transpose()
    }

    /// Copies of every set, the routes decoded: the input of a rebuild of the same config.
    pub fn to_resources(&self) -> Result<Resources, Rejection> {
        Ok(Resources {
            listeners: self.listeners.as_deref().cloned(),
            routes: self.routes()?,
            clusters: self.clusters.as_deref().cloned(),
            endpoints: self
                .endpoints
                .as_deref()
                .map(HeldEndpoints::decode)
                .transpose()?,
            policies: self.policies.as_deref().cloned(),
            trust: self.trust.as_deref().cloned(),
        })
    }

    /// The version held for `kind`, if any.
    pub fn version(&self, kind: ResourceKind) -> Option<&str> {
        match kind {
            ResourceKind::Listeners => self.listeners.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Routes => self.routes.as_ref().map(Encoded::version),
            ResourceKind::Clusters => self.clusters.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Endpoints => self.endpoints.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Policies => self.policies.as_ref().map(|s| s.version.as_str()),
            ResourceKind::Trust => self.trust.as_ref().map(|s| s.version.as_str()),
        }
    }

    /// Every held type version, for Hello and Ack.
    pub fn type_versions(&self) -> Vec<v1::TypeVersion> {
        type_versions(|k| self.version(k))
    }
}

fn decode_held_routes(e: &Encoded<v1::RouteSet>) -> Result<v1::RouteSet, Rejection> {
    e.decode().map_err(|err| {
        Rejection::new(
            "held route set",
            "routes",
            format!("version {:?} does not decode: {err}", e.version()),
        )
    })
}

fn type_versions<'a>(version: impl Fn(ResourceKind) -> Option<&'a str>) -> Vec<v1::TypeVersion> {
    ResourceKind::ALL
        .iter()
        .filter_map(|&k| {
            version(k).map(|v| v1::TypeVersion {
                r#type: k.proto().into(),
                version: v.to_owned(),
            })
        })
        .collect()
}

/// The kinds (and versions) a discovery response carries.
pub fn carried(resp: &v1::DiscoveryResponse) -> Vec<(ResourceKind, String)> {
    let mut out = Vec::new();
    if let Some(s) = &resp.listeners {
        out.push((ResourceKind::Listeners, s.version.clone()));
    }
    if let Some(s) = &resp.routes {
        out.push((ResourceKind::Routes, s.version.clone()));
    }
    if let Some(s) = &resp.clusters {
        out.push((ResourceKind::Clusters, s.version.clone()));
    }
    if let Some(s) = &resp.endpoints {
        out.push((ResourceKind::Endpoints, s.version.clone()));
    }
    if let Some(s) = &resp.policies {
        out.push((ResourceKind::Policies, s.version.clone()));
    }
    if let Some(s) = &resp.trust {
        out.push((ResourceKind::Trust, s.version.clone()));
    }
    out
}

/// Whether a listener faces the local app (outbound) or the mesh (inbound); a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local app -> other services.
    Outbound,
    /// Peers -> local app.
    Inbound,
}

impl Direction {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// A validated listener.
#[derive(Debug)]
pub struct Listener {
    /// Name (unique in the snapshot).
    pub name: Arc<str>,
    /// Bound address (unique in the snapshot).
    pub addr: SocketAddr,
    /// Metric direction.
    pub direction: Direction,
    /// What it serves.
    pub kind: ListenerKind,
    /// Inbound listeners: whether peers must use mTLS.
    pub mtls: MtlsMode,
    /// Inbound listeners: the authorization policy guarding them (`None` = allow all).
    pub authz: Option<Arc<AuthzPolicy>>,
    /// `weft_authz_denied_total{direction,policy,protocol}` of this listener's policy.
    pub authz_denied: Option<crate::metrics::LeasedCounter>,
    /// Local rate limit of every request (HTTP) or connection (TCP) on this listener, and its
    /// `weft_rate_limited_total{scope="listener"}` counter. The bucket outlives snapshots.
    pub rate_limit: Option<(crate::ratelimit::RateLimiter, crate::metrics::LeasedCounter)>,
    /// Downstream connections with nothing in flight this long are closed (HTTP keep-alive,
    /// TCP with no bytes either way). 0 in the proto = [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Transparent mode (`Listener.captured`): connections the capture rules redirected here
    /// are routed by their original destination (`crate::transparent`); `None` = not captured.
    pub capture: Option<Capture>,
}

/// Idle timeout of listeners whose proto leaves it at 0.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Wait for a captured connection's first bytes when the listener's `detection` leaves it at 0.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Longest detection wait accepted from the control plane.
pub const MAX_DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a captured listener detects its connections' protocol (`Listener.detection`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// How long to wait for a client's first bytes; silent longer = opaque TCP.
    pub detect_timeout: Duration,
    /// Destination ports never sniffed (server-speaks-first, opaque): TCP at once. Sorted.
    pub skip_ports: Box<[u16]>,
}

impl Capture {
    fn from_proto(d: Option<&v1::ProtocolDetection>) -> Result<Self, (&'static str, String)> {
        let Some(d) = d else {
            return Ok(Self {
                detect_timeout: DEFAULT_DETECT_TIMEOUT,
                skip_ports: Box::new([]),
            });
        };
        let detect_timeout = match d.timeout_ms {
            0 => DEFAULT_DETECT_TIMEOUT,
            ms if Duration::from_millis(ms) > MAX_DETECT_TIMEOUT => {
                return Err((
                    "detection.timeout_ms",
                    format!("{ms} is more than {MAX_DETECT_TIMEOUT:?}"),
                ))
            }
            ms => Duration::from_millis(ms),
        };
        let mut skip_ports = Vec::with_capacity(d.skip_ports.len());
        for p in &d.skip_ports {
            match u16::try_from(*p) {
                Ok(port) if port != 0 => skip_ports.push(port),
                _ => {
                    return Err((
                        "detection.skip_ports",
                        format!("{p} is not a port (1..=65535)"),
                    ))
                }
            }
        }
        skip_ports.sort_unstable();
        skip_ports.dedup();
        Ok(Self {
            detect_timeout,
            skip_ports: skip_ports.into(),
        })
    }

    /// Whether connections to `port` skip detection.
    pub fn skips(&self, port: u16) -> bool {
        self.skip_ports.binary_search(&port).is_ok()
    }
}

/// HTTP routing or opaque TCP forwarding.
#[derive(Debug)]
pub enum ListenerKind {
    /// HTTP/1.1 + h2c (boxed: the routing config is much larger than the TCP variant).
    Http(Box<HttpListener>),
    /// Bytes to one cluster.
    Tcp {
        /// The destination cluster.
        cluster: Arc<Cluster>,
        /// Pre-resolved TCP metric handles.
        metrics: TcpMetrics,
    },
}

/// Routing configuration of an HTTP listener.
#[derive(Debug)]
pub struct HttpListener {
    /// The route table, if the listener names one.
    pub routes: Option<RouteTable>,
    /// Where requests go that match no route (inbound: the local app).
    pub catch_all: Option<CatchAll>,
    /// Metrics of requests that matched nothing (`route=""`, `cluster=""`).
    no_route: OnceLock<Arc<RequestMetrics>>,
    metrics: Metrics,
    direction: Direction,
    /// Path, host and header-name normalization applied before anything else.
    pub hygiene: crate::http::hygiene::Hygiene,
}

/// The catch-all destination of an HTTP listener; its route label is the listener's name.
#[derive(Debug)]
pub struct CatchAll {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    /// Metrics for (direction, listener name, cluster).
    pub metrics: Arc<RequestMetrics>,
}

impl HttpListener {
    /// Metric handles for requests that matched no route.
    pub fn no_route_metrics(&self) -> &Arc<RequestMetrics> {
        self.no_route.get_or_init(|| {
            self.metrics
                .request_metrics(self.direction.as_str(), "", "")
        })
    }
}

/// Everything the data path needs, validated and compiled; immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    /// The sets this was built from (for versions, ACKs, `/config_dump`, the next merge and
    /// the next build's reuse comparisons); the route set encoded.
    pub resources: HeldResources,
    /// Listeners by bound address.
    pub listeners: HashMap<SocketAddr, Arc<Listener>>,
    /// Clusters by name.
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// Authorization policies by name.
    pub policies: Policies,
    /// The `TRUST` resource, parsed (`None` until the control plane sends one).
    pub trust: Option<Arc<TrustBundle>>,
    /// Route tables no listener names, by name: transparent mode's per-destination tables
    /// (`<service>.<namespace>:<port>`), which captured connections are routed with.
    pub tables: HashMap<Arc<str>, Arc<RouteTable>>,
    /// The metric families this snapshot's handles were made with (outbound `tls` / `peer` of
    /// its clusters): what handles resolved later for it (captured destinations) use.
    pub metrics: Metrics,
    /// Whether `metrics`' outbound labels were made for a proxy with a mesh identity.
    has_identity: bool,
    /// Whether a cluster re-reads something at every build (DNS endpoints, TLS origination).
    clusters_reread: bool,
}

impl Snapshot {
    /// The built route table named `name`: an HTTP listener's, or a table no listener names.
    pub fn route_table(&self, name: &str) -> Option<&RouteTable> {
        self.listeners
            .values()
            .filter_map(|l| match &l.kind {
                ListenerKind::Http(h) => h.routes.as_ref(),
                ListenerKind::Tcp { .. } => None,
            })
            .find(|t| &*t.name == name)
            .or_else(|| self.tables.get(name).map(|t| &**t))
    }

    /// Compiles and validates `resources`, reusing long-lived cluster state of `previous`.
    ///
    /// What did not change since `previous` is reused rather than rebuilt: a cluster whose proto
    /// and endpoint list are equal (and that has no DNS endpoints or TLS origination, which are
    /// re-read at every build) is the same `Arc<Cluster>`; a route whose proto is equal and whose
    /// destinations are those same clusters is the same `Arc<Route>` (a table whose protos are
    /// all equal keeps its host index too); equal policy and trust sets keep their compiled
    /// forms. An endpoint change of one service therefore rebuilds that cluster and the routes
    /// to it. The result is a new snapshot all the same, swapped in whole.
    ///
    /// Outbound request metrics carry their cluster's `tls` / `peer` ([`outbound_peer_labels`]),
    /// mTLS only if this proxy has a mesh identity (`tls::origination`, installed at start
    /// before any snapshot is built).
    pub fn build(
        resources: Resources,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_after(resources, Unchanged::default(), previous, metrics)
    }

    /// [`Snapshot::build`] of what [`Resources::merged_unchanged`] made of `previous`' sets and
    /// a push: the parts `unchanged` names are reused without comparing them (a route set the
    /// push did not carry is held as the same bytes; when they are `previous`' own, each table
    /// `previous` built is rebuilt for the changed clusters from the protos of the routes to
    /// them only, [`RouteTable::rebuild_for_clusters`], and the set is not decoded; the clusters
    /// an endpoint delta did not touch are `previous`' own).
    pub fn build_after(
        resources: Resources,
        unchanged: Unchanged,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_with_identity(
            resources,
            unchanged,
            previous,
            metrics,
            crate::tls::origination().is_some(),
        )
    }

    /// [`Snapshot::build`] for a proxy that has (`has_identity`) or lacks a mesh identity.
    fn build_with_identity(
        resources: Resources,
        unchanged: Unchanged,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        has_identity: bool,
    ) -> Result<Self, Vec<Rejection>> {
        // The route set as this snapshot will hold it: the held bytes when the push carried
        // none (never re-encoded), else the carried set encoded.
        let held_routes = match &resources.routes {
            Some(s) => Some(Encoded::new(s, &s.version)),
            None => unchanged.routes.clone(),
        };
        let sets = Sets {
            listeners: resources
                .listeners
                .as_ref()
                .or(unchanged.listeners.as_deref()),
            clusters: resources
                .clusters
                .as_ref()
                .or(unchanged.clusters.as_deref()),
            endpoints: match (&resources.endpoints, unchanged.endpoints.as_deref()) {
                (Some(e), _) => Some(EndpointsIn::Decoded(e)),
                (None, Some(e)) => Some(EndpointsIn::Held(e)),
                (None, None) => None,
            },
            policies: resources
                .policies
                .as_ref()
                .or(unchanged.policies.as_deref()),
            trust: resources.trust.as_ref().or(unchanged.trust.as_deref()),
        };
        // What is `previous`' own and needs no comparing: the very route bytes it holds; its
        // cluster set, with the endpoints of the clusters an endpoint delta did not touch (the
        // delta checked against the endpoint version it holds).
        let held = previous.map(|p| &p.resources);
        let same_routes = resources.routes.is_none()
            && matches!((&unchanged.routes, held.and_then(|h| h.routes.as_ref())),
                (Some(a), Some(b)) if a.same_bytes(b));
        let changed_endpoints = unchanged
            .endpoint_change
            .as_ref()
            .filter(|c| {
                held.and_then(|h| h.version(ResourceKind::Endpoints)) == Some(c.base.as_str())
            })
            .map(|c| &c.clusters);
        let changed_clusters = changed_endpoints.filter(|_| {
            same_arc(
                unchanged.clusters.as_ref(),
                held.and_then(|h| h.clusters.as_ref()),
            )
        });
        let mut errors = Vec::new();
        // The clusters (patched from `previous`' for an endpoint-only push) and the family of
        // their outbound transports, `previous`' (`kept_family`) if none changed.
        let endpoint_push::Clusters {
            built:
                BuiltClusters {
                    clusters,
                    replaced: replaced_clusters,
                    reread: clusters_reread,
                },
            kept_family,
            family,
        } = endpoint_push::clusters(
            sets,
            changed_clusters,
            previous,
            metrics,
            has_identity,
            &mut errors,
        );
        let metrics = &family;
        let same_policies = |p: &&Snapshot| {
            same_arc(unchanged.policies.as_ref(), p.resources.policies.as_ref())
                || p.resources.policies.as_deref() == sets.policies
        };
        let policies = match previous.filter(same_policies) {
            Some(p) => p.policies.clone(),
            None => build_policies(sets.policies).unwrap_or_else(|mut e| {
                errors.append(&mut e);
                Policies::new()
            }),
        };
        let trust = match sets.trust {
            None => None,
            Some(t) if previous.is_some_and(|p| p.resources.trust.as_deref() == Some(t)) => {
                previous.and_then(|p| p.trust.clone())
            }
            Some(t) => match TrustBundle::from_pem(&t.trust_domain, &t.roots_pem) {
                Ok(b) => Some(Arc::new(b)),
                Err(e) => {
                    errors.push(Rejection::new("trust", "trust", e.to_string()));
                    None
                }
            },
        };
        // A push without routes whose route bytes are `previous`' own (an endpoint-only push),
        // with `previous`' metric family kept: the set is not decoded. Each table `previous`
        // built is rebuilt for the clusters that changed, reading only the protos of the routes
        // to them (`RouteTable::rebuild_for_clusters`); a table it did not build (a listener
        // pushed with a new direction) is decoded alone.
        let held_tables = match (same_routes, kept_family, &unchanged.routes) {
            (true, Some(_), Some(held)) => Some(held_route_tables(held).map_err(|e| vec![e])?),
            _ => None,
        };
        // Otherwise the tables are built from the decoded set: the carried one, or the held
        // bytes decoded once.
        let decoded_held_routes = match (&held_tables, &resources.routes, &unchanged.routes) {
            (None, None, Some(held)) => Some(decode_held_routes(held).map_err(|e| vec![e])?),
            _ => None,
        };
        let route_set = resources.routes.as_ref().or(decoded_held_routes.as_ref());
        // The route set `previous` was built from (its tables' protos, for
        // `RouteTable::build_reusing`): the same bytes are the set decoded above.
        let previous_routes = match kept_family.and_then(|p| p.resources.routes.as_ref()) {
            _ if held_tables.is_some() => None,
            Some(prev) if same_routes || held_routes.as_ref() == Some(prev) => {
                route_set.map(Cow::Borrowed)
            }
            // Not decodable (a bug, not a config error): built without reuse.
            Some(prev) => prev.decode().ok().map(Cow::Owned),
            None => None,
        };
        let reusable = match kept_family {
            Some(p) => PreviousTables::of(p, previous_routes.as_deref()),
            None => PreviousTables::default(),
        };
        let table_list: Vec<(&str, TableIn<'_>)> = match &held_tables {
            Some(held) => held
                .iter()
                .map(|(name, b)| (name.as_str(), TableIn::Held(b)))
                .collect(),
            None => route_set
                .iter()
                .flat_map(|s| &s.tables)
                .map(|t| (t.name.as_str(), TableIn::Decoded(t)))
                .collect(),
        };
        let mut tables: HashMap<&str, TableIn<'_>> = HashMap::with_capacity(table_list.len());
        for (name, t) in table_list {
            if tables.insert(name, t).is_some() {
                errors.push(Rejection::new(
                    format!("route table {name:?}"),
                    "name",
                    "duplicate route table name",
                ));
            }
        }
        let mut listeners = HashMap::new();
        let mut names = HashSet::new();
        let mut referenced = HashSet::new();
        for l in sets.listeners.iter().flat_map(|s| &s.listeners) {
            let res = format!("listener {:?}", l.name);
            if l.name.is_empty() {
                errors.push(Rejection::new(res.clone(), "name", "must not be empty"));
            } else if !names.insert(l.name.as_str()) {
                errors.push(Rejection::new(
                    res.clone(),
                    "name",
                    "duplicate listener name",
                ));
            }
            let Ok(addr) = l.address.parse::<SocketAddr>() else {
                errors.push(Rejection::new(
                    res,
                    "address",
                    format!("invalid ip:port {:?}", l.address),
                ));
                continue;
            };
            let direction = match v1::Direction::try_from(l.direction) {
                Ok(v1::Direction::Inbound) => Direction::Inbound,
                // Unspecified counts as outbound: only a metric label depends on it.
                _ => Direction::Outbound,
            };
            let cluster = if l.cluster.is_empty() {
                None
            } else {
                match clusters.get(l.cluster.as_str()) {
                    Some(c) => Some(Arc::clone(c)),
                    None => {
                        errors.push(Rejection::new(
                            res,
                            "cluster",
                            format!("unknown cluster {:?}", l.cluster),
                        ));
                        continue;
                    }
                }
            };
            let kind = match v1::ListenerProtocol::try_from(l.protocol) {
                Ok(v1::ListenerProtocol::Tcp) => {
                    let Some(cluster) = cluster else {
                        errors.push(Rejection::new(
                            res,
                            "cluster",
                            "a TCP listener needs a cluster",
                        ));
                        continue;
                    };
                    let metrics = metrics.tcp_metrics(direction.as_str(), &cluster.name);
                    ListenerKind::Tcp { cluster, metrics }
                }
                Ok(v1::ListenerProtocol::Http) => {
                    let routes = if l.route_table.is_empty() {
                        None
                    } else {
                        let Some(&t) = tables.get(l.route_table.as_str()) else {
                            errors.push(Rejection::new(
                                res,
                                "route_table",
                                format!("unknown route table {:?}", l.route_table),
                            ));
                            continue;
                        };
                        referenced.insert(l.route_table.as_str());
                        match t.build(
                            &l.route_table,
                            (&clusters, replaced_clusters.as_deref()),
                            metrics,
                            direction.as_str(),
                            &reusable,
                        ) {
                            Ok(t) => Some(t),
                            Err(mut e) => {
                                errors.append(&mut e);
                                continue;
                            }
                        }
                    };
                    let catch_all = cluster.map(|cluster| CatchAll {
                        metrics: metrics.request_metrics(
                            direction.as_str(),
                            &l.name,
                            &cluster.name,
                        ),
                        cluster,
                    });
                    ListenerKind::Http(Box::new(HttpListener {
                        routes,
                        catch_all,
                        // Pre-resolved if a live snapshot has them (see `Destination`).
                        no_route: metrics
                            .live_request_metrics(direction.as_str(), "", "")
                            .map_or_else(OnceLock::new, OnceLock::from),
                        metrics: metrics.clone(),
                        direction,
                        hygiene: crate::http::hygiene::Hygiene::from_proto(l.hygiene.as_ref()),
                    }))
                }
                _ => {
                    errors.push(Rejection::new(
                        res,
                        "protocol",
                        format!("unsupported listener protocol {}", l.protocol),
                    ));
                    continue;
                }
            };
            let rate_limit = match metrics.rate_limiter("listener", &l.name, l.rate_limit.as_ref())
            {
                Ok(limit) => limit,
                Err((field, reason)) => {
                    errors.push(Rejection::new(res, field, reason));
                    continue;
                }
            };
            let idle_timeout = match l.idle_timeout_ms {
                0 => DEFAULT_IDLE_TIMEOUT,
                ms => Duration::from_millis(ms),
            };
            let Some(mtls) = MtlsMode::from_proto(l.mtls) else {
                errors.push(Rejection::new(
                    res,
                    "mtls",
                    format!("unknown mTLS mode {}", l.mtls),
                ));
                continue;
            };
            let authz = if l.authorization.is_empty() {
                None
            } else if let Some(p) = policies.get(l.authorization.as_str()) {
                Some(Arc::clone(p))
            } else {
                errors.push(Rejection::new(
                    res,
                    "authorization",
                    format!("unknown authorization policy {:?}", l.authorization),
                ));
                continue;
            };
            let protocol = match kind {
                ListenerKind::Http(_) => "http",
                ListenerKind::Tcp { .. } => "tcp",
            };
            let authz_denied = authz
                .as_ref()
                .map(|p| metrics.authz_denied(direction.as_str(), &p.name, protocol));
            let capture = if l.captured {
                match Capture::from_proto(l.detection.as_ref()) {
                    Ok(c) => Some(c),
                    Err((field, reason)) => {
                        errors.push(Rejection::new(res, field, reason));
                        continue;
                    }
                }
            } else {
                None
            };
            let listener = Listener {
                name: l.name.as_str().into(),
                addr,
                direction,
                kind,
                mtls,
                authz,
                authz_denied,
                rate_limit,
                idle_timeout,
                capture,
            };
            if let Some(other) = listeners.insert(addr, Arc::new(listener)) {
                errors.push(Rejection::new(
                    format!("listener {:?}", l.name),
                    "address",
                    format!("{addr} is also the address of listener {:?}", other.name),
                ));
            }
        }
        add_ipv6_twins(&mut listeners);
        // Tables no listener uses are still validated, so a bad one is NACKed when pushed rather
        // than when a listener starts using it, and kept: captured connections are routed with
        // them (transparent mode's per-destination tables).
        let mut detached = HashMap::new();
        for (&name, t) in tables.iter().filter(|(n, _)| !referenced.contains(*n)) {
            let clusters = (&clusters, replaced_clusters.as_deref());
            match t.build(name, clusters, metrics, "outbound", &reusable) {
                Ok(built) => {
                    detached.insert(Arc::from(name), Arc::new(built));
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            resources: HeldResources {
                listeners: resources.listeners.map(Arc::new).or(unchanged.listeners),
                routes: held_routes,
                clusters: resources.clusters.map(Arc::new).or(unchanged.clusters),
                endpoints: match &resources.endpoints {
                    Some(e) => Some(Arc::new(HeldEndpoints::encode(e))),
                    None => unchanged.endpoints,
                },
                policies: resources.policies.map(Arc::new).or(unchanged.policies),
                trust: resources.trust.map(Arc::new).or(unchanged.trust),
            },
            listeners,
            clusters,
            policies,
            trust,
            tables: detached,
            metrics: metrics.clone(),
            has_identity,
            clusters_reread,
        })
    }
}

/// The IPv6 address a captured IPv4 listener at `addr` also listens on, so an app's captured
/// IPv6 connections are served: `[::1]:port` for a loopback address (where ip6tables' OUTPUT
/// REDIRECT sends the app's outbound connections), else `[::]:port` (PREROUTING's REDIRECT
/// sends inbound ones to the receiving interface's address; the socket is IPv6-only, so it
/// never competes with the IPv4 one). `None` for an IPv6 listener.
pub fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => Some(SocketAddr::from((
            std::net::Ipv6Addr::LOCALHOST,
            addr.port(),
        ))),
        std::net::IpAddr::V4(_) => Some(SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            addr.port(),
        ))),
        std::net::IpAddr::V6(_) => None,
    }
}

/// Adds every captured IPv4 listener's [`ipv6_twin`] (the same listener under a second
/// address, bound and drained with it) when this host has IPv6; an address another listener
/// has keeps that one.
fn add_ipv6_twins(listeners: &mut HashMap<SocketAddr, Arc<Listener>>) {
    static IPV6: OnceLock<bool> = OnceLock::new();
    let available = *IPV6
        .get_or_init(|| std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)).is_ok());
    if !available {
        return;
    }
    let twins: Vec<(SocketAddr, Arc<Listener>)> = listeners
        .values()
        .filter(|l| l.capture.is_some())
        .filter_map(|l| ipv6_twin(l.addr).map(|a| (a, Arc::clone(l))))
        .collect();
    for (addr, l) in twins {
        listeners.entry(addr).or_insert(l);
    }
}

/// The `tls` / `peer` labels of outbound requests to `cluster`: what its endpoints' pools
/// expect (`EndpointPool::mesh_identity`, the identity the upstream connect checks), mTLS only
/// if this proxy `has_identity`; see [`PeerLabels::outbound`].
pub fn outbound_peer_labels(cluster: &Cluster, has_identity: bool) -> PeerLabels {
    PeerLabels::outbound(
        cluster.endpoints.iter().map(|e| {
            e.pool
                .mesh_identity()
                .map(crate::tls::spiffe::SpiffeId::as_str)
        }),
        has_identity,
    )
}

/// The route tables a snapshot built, by (name, direction), and the protos they were built
/// from when known.
#[derive(Default)]
struct PreviousTables<'a> {
    built: HashMap<(&'a str, &'static str), &'a RouteTable>,
    protos: HashMap<&'a str, &'a v1::RouteTable>,
}

impl<'a> PreviousTables<'a> {
    /// The tables `s` built, and `routes` (its route set, decoded) if given.
    fn of(s: &'a Snapshot, routes: Option<&'a v1::RouteSet>) -> Self {
        let protos = routes
            .iter()
            .flat_map(|r| &r.tables)
            .map(|t| (t.name.as_str(), t))
            .collect();
        let listener_tables = s.listeners.values().filter_map(|l| match &l.kind {
            ListenerKind::Http(h) => h.routes.as_ref().map(|t| (t, l.direction.as_str())),
            ListenerKind::Tcp { .. } => None,
        });
        let detached = s.tables.values().map(|t| (&**t, "outbound"));
        let built = listener_tables
            .chain(detached)
            .map(|(table, direction)| ((&*table.name, direction), table))
            .collect();
        Self { built, protos }
    }

    /// The table built as `name` for `direction`, with its proto.
    fn get(
        &self,
        name: &str,
        direction: &'static str,
    ) -> Option<(&'a v1::RouteTable, &'a RouteTable)> {
        Some((*self.protos.get(name)?, self.built(name, direction)?))
    }

    /// The table built as `name` for `direction`.
    fn built(&self, name: &str, direction: &'static str) -> Option<&'a RouteTable> {
        self.built.get(&(name, direction)).copied()
    }
}

/// A build's clusters by name.
type ClusterMap = HashMap<Arc<str>, Arc<Cluster>>;

/// A route table a build reads: decoded, or the encoding of one in the held set that
/// `previous` was built from ([`held_route_tables`]).
#[derive(Clone, Copy)]
enum TableIn<'a> {
    Decoded(&'a v1::RouteTable),
    Held(&'a bytes::Bytes),
}

impl TableIn<'_> {
    /// The table `name` compiled for a listener of `direction`, reusing what `reusable` has;
    /// `clusters` are the build's, with `previous`' replaced ones if known ([`BuiltClusters`]).
    fn build(
        self,
        name: &str,
        (clusters, replaced): (&ClusterMap, Option<&[Arc<Cluster>]>),
        metrics: &Metrics,
        direction: &'static str,
        reusable: &PreviousTables<'_>,
    ) -> Result<RouteTable, Vec<Rejection>> {
        match self {
            Self::Decoded(t) => RouteTable::build_reusing(
                t,
                clusters,
                metrics,
                direction,
                reusable.get(name, direction),
            ),
            // Built by `previous` from these very bytes: rebuilt where its clusters changed.
            Self::Held(bytes) => match reusable.built(name, direction) {
                Some(prev) => RouteTable::rebuild_for_clusters(
                    prev,
                    clusters,
                    replaced,
                    metrics,
                    direction,
                    |at| held_table_routes(name, bytes, at),
                ),
                None => {
                    let t = v1::RouteTable::decode(bytes.clone())
                        .map_err(|err| vec![held_table_corrupt(name, &err.to_string())])?;
                    RouteTable::build_reusing(&t, clusters, metrics, direction, None)
                }
            },
        }
    }
}

/// A cluster's endpoint list as a build reads it: from a set carried whole, or held encoded.
#[derive(Clone, Copy)]
enum ClusterEps<'a> {
    Decoded(&'a v1::ClusterEndpoints),
    Encoded(&'a bytes::Bytes),
}

impl ClusterEps<'_> {
    /// Whether this is the list `previous` (held encoded) describes; a cluster not listed has
    /// no endpoints.
    fn same_as(this: Option<Self>, previous: Option<&bytes::Bytes>) -> bool {
        match (this, previous) {
            (Some(Self::Encoded(b)), Some(p)) => b == p,
            (Some(Self::Decoded(ce)), Some(p)) => {
                ce.encoded_len() == p.len() && ce.encode_to_vec() == **p
            }
            (None, None) => true,
            (Some(Self::Decoded(ce)), None) => ce.endpoints.is_empty(),
            (Some(Self::Encoded(b)), None) => no_endpoints(b),
            (None, Some(b)) => no_endpoints(b),
        }
    }
}

/// Whether `held` (an encoded `v1::ClusterEndpoints`) lists no endpoint.
fn no_endpoints(held: &bytes::Bytes) -> bool {
    v1::ClusterEndpoints::decode(held.clone()).is_ok_and(|ce| ce.endpoints.is_empty())
}

/// Whether a cluster built from `proto` reads nothing but its proto and endpoint list (no DNS
/// answers, no certificate files), so that equal inputs make an equal cluster.
fn rereads_nothing(proto: &v1::Cluster) -> bool {
    proto.dns_endpoints.is_empty() && proto.upstream_tls.is_none()
}

/// The clusters of a build, and (when few and known) `previous`' clusters that are not among
/// them: each either reused as `previous`' own `Arc` or in that list.
struct BuiltClusters {
    clusters: HashMap<Arc<str>, Arc<Cluster>>,
    replaced: Option<Vec<Arc<Cluster>>>,
    /// Whether a cluster of the set re-reads something at every build ([`rereads_nothing`]).
    reread: bool,
}

/// The cluster `proto` with its endpoint list `eps` (decoded here if held encoded, under the
/// endpoint set's `version`), sharing `prev`'s state where it can.
fn build_cluster(
    proto: &v1::Cluster,
    eps: Option<ClusterEps<'_>>,
    version: &str,
    prev: Option<&Cluster>,
    metrics: &Metrics,
    shared: &Arc<Metrics>,
) -> Result<Cluster, Vec<Rejection>> {
    let decoded;
    let eps: &[v1::Endpoint] = match eps {
        None => &[],
        Some(ClusterEps::Decoded(ce)) => &ce.endpoints,
        Some(ClusterEps::Encoded(b)) => {
            decoded = decode_cluster_endpoints(version, &proto.name, b).map_err(|e| vec![e])?;
            &decoded.endpoints
        }
    };
    Cluster::build_sharing(proto, eps, prev, metrics, shared)
}

/// Above this many replaced clusters, routes look their clusters up by name instead.
const FEW_REPLACED: usize = 64;

fn build_clusters(
    sets: Sets<'_>,
    changed: Option<&HashSet<String>>,
    previous: Option<&Snapshot>,
    metrics: &Metrics,
    errors: &mut Vec<Rejection>,
) -> BuiltClusters {
    let endpoints_version = match sets.endpoints {
        Some(EndpointsIn::Decoded(s)) => s.version.as_str(),
        Some(EndpointsIn::Held(h)) => h.version.as_str(),
        None => "",
    };
    let mut endpoints: HashMap<&str, ClusterEps<'_>> = HashMap::new();
    match sets.endpoints {
        Some(EndpointsIn::Decoded(set)) => {
            for ce in &set.clusters {
                if endpoints
                    .insert(ce.cluster.as_str(), ClusterEps::Decoded(ce))
                    .is_some()
                {
                    errors.push(Rejection::new(
                        format!("endpoints of cluster {:?}", ce.cluster),
                        "cluster",
                        "listed twice",
                    ));
                }
            }
        }
        // Held sets were checked when they arrived (a delta keeps names unique).
        Some(EndpointsIn::Held(h)) => endpoints.extend(
            h.clusters()
                .iter()
                .map(|(name, b)| (&**name, ClusterEps::Encoded(b))),
        ),
        None => {}
    }
    // `changed`: when the cluster set is `previous`' own, the clusters whose endpoints are not
    // `previous`' (every other one is reused without comparing). `None`: compare each one.
    // What `previous`' clusters were built from (not needed when nothing is compared).
    let (prev_protos, prev_endpoints): (HashMap<&str, &v1::Cluster>, HashMap<&str, &bytes::Bytes>) =
        match previous.filter(|_| changed.is_none()) {
            Some(p) => (
                p.resources
                    .clusters
                    .iter()
                    .flat_map(|s| &s.clusters)
                    .map(|c| (c.name.as_str(), c))
                    .collect(),
                p.resources
                    .endpoints
                    .iter()
                    .flat_map(|s| s.clusters())
                    .map(|(name, b)| (&**name, b))
                    .collect(),
            ),
            None => (HashMap::new(), HashMap::new()),
        };
    let mut clusters = HashMap::new();
    // `previous`' clusters this build saw by name (reused or rebuilt), and the rebuilt ones.
    let mut seen_previous = 0;
    let mut replaced = Vec::new();
    // The families the clusters new to this build make their lazy series with, made once.
    let mut shared: Option<Arc<Metrics>> = None;
    let mut reread = false;
    for c in sets.clusters.iter().flat_map(|s| &s.clusters) {
        let rereads = !rereads_nothing(c);
        reread |= rereads;
        if c.name.is_empty() {
            errors.push(Rejection::new("cluster \"\"", "name", "must not be empty"));
            continue;
        }
        let prev_arc = previous.and_then(|p| p.clusters.get(c.name.as_str()));
        let prev = prev_arc.map(|c| &**c);
        seen_previous += usize::from(prev_arc.is_some());
        let eps = endpoints.get(c.name.as_str()).copied();
        let reusable = !rereads
            && match changed {
                Some(changed) => !changed.contains(c.name.as_str()),
                None => {
                    prev_protos.get(c.name.as_str()) == Some(&c)
                        && ClusterEps::same_as(eps, prev_endpoints.get(c.name.as_str()).copied())
                }
            };
        if let Some(kept) = prev_arc.filter(|_| reusable) {
            if clusters
                .insert(Arc::clone(&kept.name), Arc::clone(kept))
                .is_some()
            {
                errors.push(Rejection::new(
                    format!("cluster {:?}", c.name),
                    "name",
                    "duplicate cluster name",
                ));
            }
            continue;
        }
        if let Some(p) = prev_arc.filter(|_| replaced.len() <= FEW_REPLACED) {
            replaced.push(Arc::clone(p));
        }
        let shared = shared.get_or_insert_with(|| Arc::new(metrics.clone()));
        // A held list is decoded for the clusters rebuilt only.
        match build_cluster(c, eps, endpoints_version, prev, metrics, shared) {
            Ok(built) => {
                if clusters
                    .insert(built.name.clone(), Arc::new(built))
                    .is_some()
                {
                    errors.push(Rejection::new(
                        format!("cluster {:?}", c.name),
                        "name",
                        "duplicate cluster name",
                    ));
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    // Endpoints of clusters not in the set are ignored: they cannot be routed to.
    // Exact only if every previous cluster was seen by name once (none removed, none twice).
    let exact = previous.is_some_and(|p| seen_previous == p.clusters.len())
        && replaced.len() <= FEW_REPLACED;
    BuiltClusters {
        clusters,
        replaced: exact.then_some(replaced),
        reread,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn listener(
        name: &str,
        addr: &str,
        tcp: bool,
        table: &str,
        cluster: &str,
    ) -> v1::Listener {
        v1::Listener {
            name: name.into(),
            address: addr.into(),
            direction: v1::Direction::Outbound.into(),
            protocol: if tcp {
                v1::ListenerProtocol::Tcp
            } else {
                v1::ListenerProtocol::Http
            }
            .into(),
            route_table: table.into(),
            cluster: cluster.into(),
            ..Default::default()
        }
    }

    pub(crate) fn resources() -> Resources {
        Resources {
            listeners: Some(v1::ListenerSet {
                version: "l1".into(),
                listeners: vec![
                    listener("outbound", "127.0.0.1:15001", false, "outbound", ""),
                    listener("inbound", "127.0.0.1:15006", false, "", "inbound"),
                    listener(
                        "outbound-tcp-db.default",
                        "127.0.0.1:7000",
                        true,
                        "",
                        "db.default",
                    ),
                ],
                ..Default::default()
            }),
            routes: Some(v1::RouteSet {
                version: "r1".into(),
                tables: vec![v1::RouteTable {
                    name: "outbound".into(),
                    routes: vec![v1::Route {
                        name: "default-backend.default".into(),
                        r#match: Some(v1::RouteMatch {
                            hosts: vec!["backend".into()],
                            ..Default::default()
                        }),
                        destinations: vec![v1::WeightedCluster {
                            cluster: "backend.default".into(),
                            weight: 100,
                        }],
                        timeout_ms: 0,
                        ..Default::default()
                    }],
                }],
            }),
            clusters: Some(v1::ClusterSet {
                version: "c1".into(),
                clusters: ["backend.default", "db.default", "inbound"]
                    .iter()
                    .map(|n| v1::Cluster {
                        name: (*n).into(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            endpoints: Some(v1::EndpointSet {
                version: "e1".into(),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: "backend.default".into(),
                    endpoints: vec![v1::Endpoint {
                        address: "127.0.0.1:9001".into(),
                        weight: 1,
                        ..Default::default()
                    }],
                }],
            }),
            policies: None,
            trust: None,
        }
    }

    fn reasons(r: Resources) -> Vec<String> {
        Snapshot::build(r, None, &Metrics::new().unwrap())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn builds_a_valid_snapshot() {
        let s = Snapshot::build(resources(), None, &Metrics::new().unwrap()).unwrap();
        assert_eq!(s.listeners.len(), 3);
        assert_eq!(s.clusters.len(), 3);
        let out = &s.listeners[&"127.0.0.1:15001".parse().unwrap()];
        assert!(
            matches!(&out.kind, ListenerKind::Http(h) if h.routes.as_ref().unwrap().len() == 1)
        );
        let inb = &s.listeners[&"127.0.0.1:15006".parse().unwrap()];
        assert!(
            matches!(&inb.kind, ListenerKind::Http(h) if h.routes.is_none() && h.catch_all.is_some())
        );
    }

    #[test]
    fn rate_limit_buckets_survive_a_rebuild_and_idle_timeouts_apply() {
        let m = Metrics::new().unwrap();
        let limited = || {
            let mut r = resources();
            let limit = v1::RateLimit {
                requests_per_second: 1,
                burst: 2,
            };
            let ls = &mut r.listeners.as_mut().unwrap().listeners;
            ls[1].rate_limit = Some(limit);
            ls[2].rate_limit = Some(limit);
            ls[2].idle_timeout_ms = 1500;
            let routes = &mut r.routes.as_mut().unwrap().tables[0].routes;
            routes[0].rate_limit = Some(limit);
            r
        };
        let first = Snapshot::build(limited(), None, &m).unwrap();
        let second = Snapshot::build(limited(), None, &m).unwrap();
        let listener = |s: &Snapshot, addr: &str| Arc::clone(&s.listeners[&addr.parse().unwrap()]);
        let route_limit = |s: &Snapshot| {
            let l = listener(s, "127.0.0.1:15001");
            let ListenerKind::Http(h) = &l.kind else {
                panic!("http")
            };
            let headers = http::HeaderMap::new();
            let info = crate::route::RequestInfo {
                host: "backend",
                path: "/",
                query: None,
                method: &http::Method::GET,
                headers: &headers,
            };
            h.routes
                .as_ref()
                .unwrap()
                .find(&info)
                .unwrap()
                .rate_limit
                .as_ref()
                .unwrap()
                .0
                .check()
        };
        for addr in ["127.0.0.1:15006", "127.0.0.1:7000"] {
            let check = |s: &Snapshot| listener(s, addr).rate_limit.as_ref().unwrap().0.check();
            assert!(check(&first).is_ok() && check(&first).is_ok());
            assert!(
                check(&second).is_err(),
                "{addr}: the push did not refill the bucket"
            );
        }
        assert!(route_limit(&first).is_ok() && route_limit(&first).is_ok());
        assert!(
            route_limit(&second).is_err(),
            "route bucket refilled by the push"
        );
        assert_eq!(
            listener(&second, "127.0.0.1:7000").idle_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(
            listener(&second, "127.0.0.1:15001").idle_timeout,
            DEFAULT_IDLE_TIMEOUT
        );
    }

    /// The request metric handles a request to `host` on listener `addr` is counted with.
    fn destination_metrics(s: &Snapshot, addr: &str, host: &str) -> Arc<RequestMetrics> {
        let l = &s.listeners[&addr.parse().unwrap()];
        let ListenerKind::Http(h) = &l.kind else {
            panic!("http")
        };
        let headers = http::HeaderMap::new();
        let info = crate::route::RequestInfo {
            host,
            path: "/",
            query: None,
            method: &http::Method::GET,
            headers: &headers,
        };
        match h.routes.as_ref().and_then(|t| t.find(&info)) {
            Some(route) => Arc::clone(route.destinations.pick().unwrap().metrics()),
            None => Arc::clone(&h.catch_all.as_ref().unwrap().metrics),
        }
    }

    #[test]
    fn outbound_request_metrics_carry_the_clusters_mtls_identity() {
        const BACKEND: &str = "spiffe://cluster.local/ns/default/sa/backend";
        let mut r = resources();
        r.endpoints.as_mut().unwrap().clusters[0].endpoints[0].identity = BACKEND.into();
        let labels = |m: &RequestMetrics| (m.tls().to_owned(), m.peer().to_owned());
        let mtls = || ("mtls".to_owned(), BACKEND.to_owned());
        let none = || ("none".to_owned(), String::new());

        let m = Metrics::new().unwrap();
        let s =
            Snapshot::build_with_identity(r.clone(), Unchanged::default(), None, &m, true).unwrap();
        let out = destination_metrics(&s, "127.0.0.1:15001", "backend");
        assert_eq!(labels(&out), mtls());
        // Inbound: the caller is per connection; the base handle is plaintext's.
        let mut inbound = resources();
        inbound.listeners.as_mut().unwrap().listeners[1].direction = v1::Direction::Inbound.into();
        let si =
            Snapshot::build_with_identity(inbound, Unchanged::default(), None, &m, true).unwrap();
        assert_eq!(
            labels(&destination_metrics(&si, "127.0.0.1:15006", "x")),
            none()
        );

        // Without an identity of its own the proxy dials in plaintext.
        let s = Snapshot::build_with_identity(r.clone(), Unchanged::default(), None, &m, false)
            .unwrap();
        assert_eq!(
            labels(&destination_metrics(&s, "127.0.0.1:15001", "backend")),
            none()
        );
        // A cluster whose mode is DISABLED is plaintext whatever its endpoints' identities.
        let mut disabled = r.clone();
        for c in &mut disabled.clusters.as_mut().unwrap().clusters {
            c.mtls = v1::MtlsMode::Disabled.into();
        }
        let s =
            Snapshot::build_with_identity(disabled, Unchanged::default(), None, &m, true).unwrap();
        assert_eq!(
            labels(&destination_metrics(&s, "127.0.0.1:15001", "backend")),
            none()
        );
        // A plaintext (static) endpoint joins the cluster: no longer all mTLS.
        let mut mixed = r;
        mixed.endpoints.as_mut().unwrap().clusters[0]
            .endpoints
            .push(v1::Endpoint {
                address: "127.0.0.1:9002".into(),
                weight: 1,
                ..Default::default()
            });
        let s = Snapshot::build_with_identity(mixed, Unchanged::default(), None, &m, true).unwrap();
        assert_eq!(
            labels(&destination_metrics(&s, "127.0.0.1:15001", "backend")),
            none()
        );
        // Unrouted requests have no destination.
        let ListenerKind::Http(h) = &s.listeners[&"127.0.0.1:15001".parse().unwrap()].kind else {
            panic!("http")
        };
        assert_eq!(labels(h.no_route_metrics()), none());
    }

    #[test]
    fn captured_listeners_carry_their_detection_settings() {
        let mut r = resources();
        let l = &mut r.listeners.as_mut().unwrap().listeners[0];
        l.captured = true;
        l.detection = Some(v1::ProtocolDetection {
            timeout_ms: 150,
            skip_ports: vec![3306, 25, 3306],
        });
        r.listeners.as_mut().unwrap().listeners[1].captured = true;
        let s = Snapshot::build(r.clone(), None, &Metrics::new().unwrap()).unwrap();
        let cap = |addr: &str| s.listeners[&addr.parse().unwrap()].capture.clone();
        let out = cap("127.0.0.1:15001").unwrap();
        assert_eq!(out.detect_timeout, Duration::from_millis(150));
        assert_eq!(&*out.skip_ports, [25, 3306]);
        assert!(out.skips(3306) && !out.skips(5432));
        assert_eq!(
            cap("127.0.0.1:15006").unwrap().detect_timeout,
            DEFAULT_DETECT_TIMEOUT
        );
        assert_eq!(cap("127.0.0.1:7000"), None);
        // Captured listeners also listen on IPv6 (where this host has it), as themselves.
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(Arc::ptr_eq(
                &s.listeners[&"[::1]:15001".parse().unwrap()],
                &s.listeners[&"127.0.0.1:15001".parse().unwrap()]
            ));
            assert!(s.listeners.contains_key(&"[::1]:15006".parse().unwrap()));
            assert!(!s.listeners.contains_key(&"[::1]:7000".parse().unwrap()));
        }
        assert_eq!(
            ipv6_twin("10.0.0.2:15006".parse().unwrap()),
            Some("[::]:15006".parse().unwrap())
        );
        assert_eq!(ipv6_twin("[fd00::2]:15006".parse().unwrap()), None);
        r.listeners.as_mut().unwrap().listeners[0]
            .detection
            .as_mut()
            .unwrap()
            .skip_ports = vec![70000];
        assert!(reasons(r)[0].contains("detection.skip_ports"));
    }

    #[test]
    fn nack_names_listener_address() {
        let mut r = resources();
        r.listeners.as_mut().unwrap().listeners[0].address = "127.0.0.1".into();
        assert_eq!(
            reasons(r),
            [r#"listener "outbound": address: invalid ip:port "127.0.0.1""#]
        );
    }

    #[test]
    fn nack_names_route_to_unknown_cluster() {
        let mut r = resources();
        r.clusters
            .as_mut()
            .unwrap()
            .clusters
            .retain(|c| c.name != "backend.default");
        assert_eq!(
            reasons(r),
            [
                r#"route table "outbound" route "default-backend.default": destinations[0].cluster: unknown cluster "backend.default""#
            ]
        );
    }

    #[test]
    fn nack_names_bad_regex_and_unknown_table() {
        let mut r = resources();
        let rs = r.routes.as_mut().unwrap();
        rs.tables[0].routes[0].r#match.as_mut().unwrap().path = Some(v1::PathMatch {
            kind: Some(v1::path_match::Kind::Regex("a(".into())),
        });
        let got = reasons(r.clone());
        assert!(
            got[0].contains("match.path.regex: invalid regex"),
            "{got:?}"
        );
        r.routes = None;
        assert_eq!(
            reasons(r),
            [r#"listener "outbound": route_table: unknown route table "outbound""#]
        );
    }

    #[test]
    fn nack_names_duplicate_address_and_tcp_without_cluster() {
        let mut r = resources();
        let ls = &mut r.listeners.as_mut().unwrap().listeners;
        ls[1].address = "127.0.0.1:15001".into();
        ls[2].cluster = String::new();
        let got = reasons(r);
        assert!(
            got.iter().any(|g| g.contains(
                r#"listener "outbound-tcp-db.default": cluster: a TCP listener needs a cluster"#
            )),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|g| g.contains("127.0.0.1:15001 is also the address of listener")),
            "{got:?}"
        );
    }

    /// The outbound listener's table.
    fn outbound_table(s: &Snapshot) -> &RouteTable {
        let ListenerKind::Http(h) = &s.listeners[&"127.0.0.1:15001".parse().unwrap()].kind else {
            panic!("http")
        };
        h.routes.as_ref().unwrap()
    }

    /// The outbound table's route for `GET /` to `host`, if any.
    fn outbound_route<'a>(s: &'a Snapshot, host: &str) -> Option<&'a crate::route::Route> {
        let headers = http::HeaderMap::new();
        outbound_table(s).find(&crate::route::RequestInfo {
            host,
            path: "/",
            query: None,
            method: &http::Method::GET,
            headers: &headers,
        })
    }

    #[test]
    fn an_endpoint_change_rebuilds_only_the_changed_cluster_and_its_routes() {
        let m = Metrics::new().unwrap();
        let mut r = resources();
        // A second route, to db.default, after the one to backend.default.
        let routes = &mut r.routes.as_mut().unwrap().tables[0].routes;
        let mut to_db = routes[0].clone();
        to_db.name = "default-db.default".into();
        to_db.r#match.as_mut().unwrap().hosts = vec!["db".into()];
        to_db.destinations[0].cluster = "db.default".into();
        routes.push(to_db);
        r.policies = Some(v1::PolicySet {
            version: "p1".into(),
            policies: vec![v1::AuthorizationPolicy {
                name: "backend".into(),
                ..Default::default()
            }],
        });
        let first = Snapshot::build(r.clone(), None, &m).unwrap();

        // The same resources: everything is kept.
        let same = Snapshot::build(r.clone(), Some(&first), &m).unwrap();
        for name in ["backend.default", "db.default", "inbound"] {
            assert!(
                Arc::ptr_eq(&first.clusters[name], &same.clusters[name]),
                "{name}"
            );
        }
        assert!(outbound_table(&same).shares_route(outbound_table(&first), 0));
        assert!(outbound_table(&same).shares_route(outbound_table(&first), 1));
        assert!(Arc::ptr_eq(
            &first.policies["backend"],
            &same.policies["backend"]
        ));

        // backend.default gets another endpoint (an endpoint-only push).
        let push = v1::DiscoveryResponse {
            nonce: "n2".into(),
            endpoints: Some(v1::EndpointSet {
                version: "e2".into(),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: "backend.default".into(),
                    endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
                        .iter()
                        .map(|a| v1::Endpoint {
                            address: (*a).into(),
                            weight: 1,
                            ..Default::default()
                        })
                        .collect(),
                }],
            }),
            ..Default::default()
        };
        let (merged, unchanged) =
            Resources::merged_unchanged(Some(&same.resources), push, None).unwrap();
        assert_eq!(merged.version(ResourceKind::Endpoints), Some("e2"));
        assert!(merged.routes.is_none(), "the held routes stay encoded");
        let next = Snapshot::build_after(merged, unchanged, Some(&same), &m).unwrap();
        assert_eq!(next.resources.version(ResourceKind::Routes), Some("r1"));
        let (old_backend, new_backend) = (
            &same.clusters["backend.default"],
            &next.clusters["backend.default"],
        );
        assert!(
            !Arc::ptr_eq(old_backend, new_backend),
            "the changed cluster is rebuilt"
        );
        assert_eq!(new_backend.endpoints.len(), 2);
        // ... keeping its long-lived state and its kept endpoint's pool.
        assert!(Arc::ptr_eq(old_backend.state(), new_backend.state()));
        assert!(old_backend.endpoints[0]
            .pool
            .same_as(&new_backend.endpoints[0].pool));
        for name in ["db.default", "inbound"] {
            assert!(
                Arc::ptr_eq(&same.clusters[name], &next.clusters[name]),
                "{name}"
            );
        }
        // The route to backend.default now holds the new cluster; the one to db is kept.
        assert!(!outbound_table(&next).shares_route(outbound_table(&same), 0));
        assert!(outbound_table(&next).shares_route(outbound_table(&same), 1));
        let picked = outbound_route(&next, "backend").unwrap();
        assert!(Arc::ptr_eq(
            &picked.destinations.pick().unwrap().cluster,
            new_backend
        ));
        assert!(Arc::ptr_eq(
            &same.policies["backend"],
            &next.policies["backend"]
        ));

        // A changed cluster proto (a timeout) is rebuilt too, an unchanged one is not.
        let mut changed = next.resources.to_resources().unwrap();
        changed.clusters.as_mut().unwrap().clusters[1].connect_timeout_ms = 250;
        let last = Snapshot::build(changed, Some(&next), &m).unwrap();
        assert!(!Arc::ptr_eq(
            &next.clusters["db.default"],
            &last.clusters["db.default"]
        ));
        assert!(Arc::ptr_eq(
            &next.clusters["backend.default"],
            &last.clusters["backend.default"]
        ));
        assert!(!outbound_table(&last).shares_route(outbound_table(&next), 1));
        assert!(outbound_table(&last).shares_route(outbound_table(&next), 0));
    }

    #[test]
    fn merged_trims_what_decoding_over_allocated() {
        use prost::Message;
        let r = resources();
        let sent = v1::DiscoveryResponse {
            nonce: "n".into(),
            routes: r.routes.clone(),
            endpoints: Some(v1::EndpointSet {
                version: "e2".into(),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: "backend.default".into(),
                    endpoints: (1..=5)
                        .map(|i| v1::Endpoint {
                            address: format!("127.0.0.1:{i}"),
                            ..Default::default()
                        })
                        .collect(),
                }],
            }),
            ..Default::default()
        };
        let decoded = v1::DiscoveryResponse::decode(sent.encode_to_vec().as_slice()).unwrap();
        let eps = |s: &v1::EndpointSet| s.clusters[0].endpoints.capacity();
        let hosts = |s: &v1::RouteSet| {
            s.tables[0].routes[0]
                .r#match
                .as_ref()
                .unwrap()
                .hosts
                .capacity()
        };
        // What prost's pushes leave (the test is void if it ever decodes to the length).
        assert!(eps(decoded.endpoints.as_ref().unwrap()) > 5);
        assert!(hosts(decoded.routes.as_ref().unwrap()) > 1);
        let merged = Resources::merged(Some(&HeldResources::hold(r.clone())), decoded).unwrap();
        assert_eq!(eps(merged.endpoints.as_ref().unwrap()), 5);
        assert_eq!(hosts(merged.routes.as_ref().unwrap()), 1);
        // The same content, and the sets not carried are the held ones.
        assert_eq!(merged.routes, sent.routes);
        assert_eq!(merged.endpoints, sent.endpoints);
        assert_eq!(merged.clusters, r.clusters);
        assert_eq!(merged.listeners, r.listeners);
    }

    #[test]
    fn merge_keeps_unchanged_sets_and_versions() {
        let r = resources();
        let resp = v1::DiscoveryResponse {
            nonce: "n".into(),
            endpoints: Some(v1::EndpointSet {
                version: "e2".into(),
                clusters: vec![],
            }),
            ..Default::default()
        };
        let m = r.merge(&resp);
        assert_eq!(m.version(ResourceKind::Endpoints), Some("e2"));
        assert_eq!(m.version(ResourceKind::Routes), Some("r1"));
        assert_eq!(m.type_versions().len(), 4);
        assert_eq!(carried(&resp), [(ResourceKind::Endpoints, "e2".to_owned())]);
    }

    #[test]
    fn the_route_set_is_held_encoded_and_decodes_to_what_was_pushed() {
        let r = resources();
        let s = Snapshot::build(r.clone(), None, &Metrics::new().unwrap()).unwrap();
        let held = s.resources.routes.as_ref().unwrap();
        assert_eq!(held.version(), "r1");
        assert_eq!(s.resources.version(ResourceKind::Routes), Some("r1"));
        assert_eq!(
            held.encoded_len(),
            prost::Message::encoded_len(r.routes.as_ref().unwrap())
        );
        assert!(held.holds(r.routes.as_ref().unwrap()));
        assert_eq!(s.resources.routes().unwrap(), r.routes);
        // Everything else as pushed, and a rebuild's input is the pushed resources again.
        let back = s.resources.to_resources().unwrap();
        assert_eq!(back.routes, r.routes);
        assert_eq!(back.listeners, r.listeners);
        assert_eq!(back.clusters, r.clusters);
        assert_eq!(back.endpoints, r.endpoints);
        assert_eq!(
            s.resources.type_versions(),
            HeldResources::hold(r.clone()).type_versions()
        );
        assert_eq!(s.resources.type_versions(), r.type_versions());
        // No route set held: none decoded.
        let mut none = r;
        none.routes = None;
        none.listeners.as_mut().unwrap().listeners[0]
            .route_table
            .clear();
        let s = Snapshot::build(none, None, &Metrics::new().unwrap()).unwrap();
        assert!(s.resources.routes.is_none());
        assert_eq!(s.resources.routes().unwrap(), None);
    }

    #[test]
    fn corrupt_held_routes_are_a_rejection_not_an_empty_table() {
        let mut held = HeldResources::hold(resources());
        held.routes = Some(Encoded {
            version: "r1".into(),
            // A length-delimited field whose length runs past the end.
            bytes: bytes::Bytes::from_static(&[0x12, 0x7f, 0x01]),
            message: PhantomData,
        });
        let push = v1::DiscoveryResponse {
            endpoints: resources().endpoints,
            ..Default::default()
        };
        let err = Resources::merged(Some(&held), push).unwrap_err();
        assert_eq!(err.field, "routes");
        assert!(err.reason.contains("\"r1\""), "{err}");
        assert!(held.to_resources().is_err());
    }

    /// A route push, then a push carrying only endpoints: the new snapshot routes with the
    /// routes of the first push (held encoded in between), to the new endpoints.
    #[test]
    fn an_endpoint_only_push_after_a_routes_push_still_routes() {
        let m = Metrics::new().unwrap();
        let first = Snapshot::build(resources(), None, &m).unwrap();
        let mut routes = resources().routes.unwrap();
        routes.version = "r2".into();
        routes.tables[0].routes[0]
            .r#match
            .as_mut()
            .unwrap()
            .hosts
            .push("backend.default.svc".into());
        let routes_push = v1::DiscoveryResponse {
            nonce: "n2".into(),
            routes: Some(routes.clone()),
            ..Default::default()
        };
        let (merged, unchanged) =
            Resources::merged_unchanged(Some(&first.resources), routes_push, None).unwrap();
        let second = Snapshot::build_after(merged, unchanged, Some(&first), &m).unwrap();
        assert_eq!(second.resources.version(ResourceKind::Routes), Some("r2"));
        assert!(!outbound_table(&second).shares_route(outbound_table(&first), 0));
        let endpoints_push = v1::DiscoveryResponse {
            nonce: "n3".into(),
            endpoints: Some(v1::EndpointSet {
                version: "e2".into(),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: "backend.default".into(),
                    endpoints: vec![v1::Endpoint {
                        address: "127.0.0.1:9002".into(),
                        weight: 1,
                        ..Default::default()
                    }],
                }],
            }),
            ..Default::default()
        };
        let (merged, unchanged) =
            Resources::merged_unchanged(Some(&second.resources), endpoints_push, None).unwrap();
        assert!(merged.routes.is_none(), "the held routes stay encoded");
        let third = Snapshot::build_after(merged, unchanged, Some(&second), &m).unwrap();
        assert_eq!(third.resources.version(ResourceKind::Routes), Some("r2"));
        assert_eq!(third.resources.version(ResourceKind::Endpoints), Some("e2"));
        assert_eq!(third.resources.routes().unwrap(), Some(routes));
        let picked = outbound_route(&third, "backend.default.svc").expect("the pushed host routes");
        let cluster = &picked.destinations.pick().unwrap().cluster;
        assert_eq!(cluster.endpoints[0].addr, "127.0.0.1:9002".parse().unwrap());
        // The route to the changed cluster was rebuilt; a table whose protos and clusters were
        // unchanged would have been kept (see the test above).
        assert!(!outbound_table(&third).shares_route(outbound_table(&second), 0));
        // CONNECT's "known host" reads the built table.
        assert!(third
            .route_table("outbound")
            .unwrap()
            .names_host("backend.default.svc"));
        assert!(!third.route_table("outbound").unwrap().names_host("db"));
        assert!(third.route_table("nope").is_none());
    }

    #[test]
    fn held_tables_and_routes_read_from_the_bytes_are_the_decoded_ones() {
        let mut r = resources();
        let set = r.routes.as_mut().unwrap();
        let mut second = set.tables[0].clone();
        second.name = "db.default:5432".into();
        second.routes[0].name = "second".into();
        second.routes.push(set.tables[0].routes[0].clone());
        set.tables.push(second);
        let held = Encoded::new(&*set, &set.version);
        let tables = held_route_tables(&held).unwrap();
        let names: Vec<&str> = tables.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["outbound", "db.default:5432"]);
        for ((name, bytes), table) in tables.iter().zip(&set.tables) {
            assert_eq!(v1::RouteTable::decode(bytes.clone()).unwrap(), *table);
            let all: Vec<usize> = (0..table.routes.len()).collect();
            assert_eq!(held_table_routes(name, bytes, &all).unwrap(), table.routes);
        }
        let (name, bytes) = &tables[1];
        assert_eq!(
            held_table_routes(name, bytes, &[1]).unwrap(),
            [set.tables[1].routes[1].clone()]
        );
        let missing = held_table_routes(name, bytes, &[2]).unwrap_err();
        assert!(
            missing.reason.contains("route 2 of a table of 2 routes"),
            "{missing:?}"
        );
        let truncated = bytes.slice(..bytes.len() - 1);
        assert!(held_table_routes(name, &truncated, &[0, 1]).is_err());
    }

    #[test]
    fn an_endpoint_only_push_reads_only_the_routes_to_changed_clusters() {
        let m = Metrics::new().unwrap();
        let mut r = resources();
        let set = r.routes.as_mut().unwrap();
        let mut to_db = set.tables[0].routes[0].clone();
        to_db.name = "default-db.default".into();
        to_db.r#match.as_mut().unwrap().hosts = vec!["db".into()];
        to_db.destinations[0].cluster = "db.default".into();
        set.tables[0].routes.push(to_db.clone());
        // A table no listener names (transparent mode's), routing to db.default only.
        set.tables.push(v1::RouteTable {
            name: "db.default:5432".into(),
            routes: vec![to_db],
        });
        let mut first = Snapshot::build(r, None, &m).unwrap();
        // Corrupt the held bytes of the route to db.default (its name is no longer UTF-8):
        // a build that decoded it, or the whole set, would fail.
        let held = first.resources.routes.take().unwrap();
        let mut bytes = held.bytes.to_vec();
        let at = bytes
            .windows(b"default-db.default".len())
            .position(|w| w == b"default-db.default")
            .unwrap();
        bytes[at] = 0xff;
        first.resources.routes = Some(Encoded {
            bytes: bytes.into(),
            ..held
        });
        assert!(first.resources.routes().is_err());

        let held_version = first.resources.endpoints.as_ref().unwrap().version.clone();
        let push = |cluster: &str, addr: &str| {
            let set = v1::EndpointSet {
                version: format!("e-{addr}"),
                clusters: vec![v1::ClusterEndpoints {
                    cluster: cluster.into(),
                    endpoints: vec![v1::Endpoint {
                        address: addr.into(),
                        weight: 1,
                        ..Default::default()
                    }],
                }],
            };
            let change = EndpointChange {
                base: held_version.clone(),
                clusters: [cluster.to_owned()].into(),
            };
            Resources::merged_unchanged(
                Some(&first.resources),
                delta_push(),
                Some((HeldEndpoints::encode(&set), change)),
            )
            .unwrap()
        };

        // backend.default's endpoints change: its route is rebuilt from its own proto, the
        // route to db.default and the host index are the previous ones, and the table no
        // listener names (no route to backend.default) is shared whole.
        let (merged, unchanged) = push("backend.default", "127.0.0.1:9201");
        let second = Snapshot::build_after(merged, unchanged, Some(&first), &m).unwrap();
        let (t1, t2) = (outbound_table(&first), outbound_table(&second));
        assert!(!t2.shares_route(t1, 0));
        assert!(t2.shares_route(t1, 1));
        assert_eq!(t2.shares_index_and_list(t1), (true, false));
        assert_eq!(
            second.tables["db.default:5432"]
                .shares_index_and_list(&first.tables["db.default:5432"]),
            (true, true)
        );
        let picked = outbound_route(&second, "backend").unwrap();
        assert!(Arc::ptr_eq(
            &picked.destinations.pick().unwrap().cluster,
            &second.clusters["backend.default"]
        ));
        assert!(second
            .resources
            .routes
            .as_ref()
            .unwrap()
            .same_bytes(first.resources.routes.as_ref().unwrap()));

        // db.default's endpoints change: its routes must be read, and the corrupt bytes are a
        // rejection naming the table (the last good snapshot keeps serving), not a panic.
        let (merged, unchanged) = push("db.default", "127.0.0.1:9202");
        let errors = Snapshot::build_after(merged, unchanged, Some(&first), &m).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.resource.starts_with("held route table") && e.reason.contains("decode")),
            "{errors:?}"
        );
    }

    /// An endpoint-only push as `delta::resolve` hands it over: the response without endpoints,
    /// and the whole set (encoded) with the clusters the delta named.
    fn delta_push() -> v1::DiscoveryResponse {
        v1::DiscoveryResponse {
            nonce: "n".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_endpoint_delta_keeps_the_held_route_bytes_and_trusts_the_change_set() {
        let m = Metrics::new().unwrap();
        let first = Snapshot::build(resources(), None, &m).unwrap();
        let held_version = first.resources.endpoints.as_ref().unwrap().version.clone();
        let endpoint = |addr: &str| v1::Endpoint {
            address: addr.into(),
            weight: 1,
            ..Default::default()
        };
        // backend.default changes (named in the change set); db.default's list is changed
        // too but not named: the build takes the change set's word for it, so db.default is
        // the previous cluster, proving it was not compared.
        let next_set = v1::EndpointSet {
            version: "e2".into(),
            clusters: vec![
                v1::ClusterEndpoints {
                    cluster: "backend.default".into(),
                    endpoints: vec![endpoint("127.0.0.1:9101")],
                },
                v1::ClusterEndpoints {
                    cluster: "db.default".into(),
                    endpoints: vec![endpoint("127.0.0.1:9102")],
                },
            ],
        };
        let next_set = HeldEndpoints::encode(&next_set);
        let change = EndpointChange {
            base: held_version,
            clusters: ["backend.default".to_owned()].into(),
        };
        let (merged, unchanged) = Resources::merged_unchanged(
            Some(&first.resources),
            delta_push(),
            Some((next_set.clone(), change.clone())),
        )
        .unwrap();
        assert!(merged.routes.is_none(), "the held routes stay encoded");
        let second = Snapshot::build_after(merged, unchanged, Some(&first), &m).unwrap();
        assert!(!Arc::ptr_eq(
            &first.clusters["backend.default"],
            &second.clusters["backend.default"]
        ));
        assert_eq!(
            second.clusters["backend.default"].endpoints[0].addr,
            "127.0.0.1:9101".parse().unwrap()
        );
        assert!(Arc::ptr_eq(
            &first.clusters["db.default"],
            &second.clusters["db.default"]
        ));
        // The route set is held as the very same bytes (not re-encoded), and still decodes.
        let (a, b) = (
            first.resources.routes.as_ref().unwrap(),
            second.resources.routes.as_ref().unwrap(),
        );
        assert!(a.same_bytes(b));
        // The sets the push did not carry are shared with the held snapshot, not copied.
        let (h1, h2) = (&first.resources, &second.resources);
        assert!(same_arc(h1.clusters.as_ref(), h2.clusters.as_ref()));
        assert!(same_arc(h1.listeners.as_ref(), h2.listeners.as_ref()));
        assert!(!same_arc(h1.endpoints.as_ref(), h2.endpoints.as_ref()));
        assert_eq!(h2.version(ResourceKind::Endpoints), Some("e2"));
        assert_eq!(second.resources.routes().unwrap(), resources().routes);
        assert!(!outbound_table(&second).shares_route(outbound_table(&first), 0));

        // A change set against another base than the one held is not trusted: every cluster
        // is compared, so db.default's new list is seen.
        let stale = EndpointChange {
            base: "not-held".into(),
            ..change
        };
        let (merged, unchanged) = Resources::merged_unchanged(
            Some(&first.resources),
            delta_push(),
            Some((next_set, stale)),
        )
        .unwrap();
        let third = Snapshot::build_after(merged, unchanged, Some(&first), &m).unwrap();
        assert_eq!(
            third.clusters["db.default"].endpoints[0].addr,
            "127.0.0.1:9102".parse().unwrap()
        );
        assert!(Arc::ptr_eq(
            &first.clusters["inbound"],
            &third.clusters["inbound"]
        ));
    }
}
