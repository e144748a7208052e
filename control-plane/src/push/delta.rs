//! Endpoint deltas: a proxy that advertises [`CAPABILITY`] gets its ENDPOINTS as an
//! [`EndpointDelta`] (only the clusters added or changed, the names of those removed) against
//! the set it holds, instead of the whole set at every registration change: at 1,000 services
//! in scope a one-address change is 154 KiB whole and well under 1 KiB as a delta.
//!
//! What a stream remembers of a proxy's endpoints is an [`EndpointDigest`]: the set's version
//! and one 64-bit hash per cluster (not a copy of the protos). Versions are content hashes, so
//! one digest serves every stream holding that version: [`Digests`] hands out shared digests by
//! version, and a digest lives while some stream holds it as its base or pending push. Memory
//! and hashing are per distinct endpoint set, not per proxy (5,000 proxies of one scope share
//! one digest of ~5,000 x (name + 24) bytes instead of one each).
//! A delta goes out only against a digest whose version the proxy holds now (it ACKed it, or
//! listed it in its Hello while the stream compiled the same set), and only when it encodes
//! smaller than the whole set. A push not yet answered is never a base: the stream waits for
//! its ACK (one push outstanding), and a lost push leaves the last ACKed digest as the base
//! only while the proxy's reported version still matches it. After any NACK the next ENDPOINTS
//! push is whole ([`EndpointStream::nacked`]); a NACKed delta is retried at once as a whole
//! set, since the proxy may simply not hold its base.
//!
//! `weft_control_endpoint_pushes_total{kind="delta|full"}` counts ENDPOINTS pushes by form,
//! every proxy's (a proxy without the capability only ever gets `full`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use prost::Message;
use weft_proto::v1::{ClusterEndpoints, DiscoveryResponse, EndpointDelta, EndpointSet, Node};

use crate::hash::StableHasher;
use crate::metrics::Metrics;

/// The `Node.capabilities` entry of a proxy that applies [`EndpointDelta`]s.
pub const CAPABILITY: &str = "endpoint-delta";

/// Whether `node` advertises [`CAPABILITY`].
pub fn advertised(node: &Node) -> bool {
    node.capabilities.iter().any(|c| c == CAPABILITY)
}

/// A set of endpoints as the control plane remembers a proxy holds it: its version and a hash
/// of each cluster's endpoints, sorted by cluster name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDigest {
    version: String,
    clusters: Box<[(Box<str>, u64)]>,
}

impl EndpointDigest {
    /// The digest of `set`.
    pub fn of(set: &EndpointSet) -> Self {
        let mut clusters: Vec<(Box<str>, u64)> = set
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str().into(), cluster_hash(c)))
            .collect();
        clusters.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Self {
            version: set.version.clone(),
            clusters: clusters.into_boxed_slice(),
        }
    }

    /// The version of the set.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn hash_of(&self, cluster: &str) -> Option<u64> {
        self.clusters
            .binary_search_by(|(name, _)| (**name).cmp(cluster))
            .ok()
            .map(|i| self.clusters[i].1)
    }
}

/// A hash of one cluster's endpoints, fed exactly as the set versions feed it
/// ([`crate::compile::hash_cluster_endpoints`]: labels in sorted order).
fn cluster_hash(set: &ClusterEndpoints) -> u64 {
    let mut h = StableHasher::new();
    crate::compile::hash_cluster_endpoints(&mut h, set);
    h.finish()
}

/// Digests shared by version among every stream of the discovery service (see the module docs).
#[derive(Debug, Default)]
pub struct Digests {
    inner: Mutex<DigestMap>,
}

#[derive(Debug, Default)]
struct DigestMap {
    by_version: HashMap<String, Weak<EndpointDigest>>,
    /// Entries whose digest is gone are dropped when the map grows past this.
    prune_at: usize,
}

impl Digests {
    /// The digest of `set`: the one a stream already holds for its version, else made now.
    pub fn of(&self, set: &EndpointSet) -> Arc<EndpointDigest> {
        if let Some(d) = self.get(&set.version) {
            return d;
        }
        // Hashed outside the lock; two streams racing on one new version make it twice, and
        // the second takes the first's.
        let made = Arc::new(EndpointDigest::of(set));
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = map.by_version.get(&set.version).and_then(Weak::upgrade) {
            return d;
        }
        map.by_version
            .insert(set.version.clone(), Arc::downgrade(&made));
        if map.by_version.len() > map.prune_at {
            map.by_version.retain(|_, d| d.strong_count() > 0);
            map.prune_at = (map.by_version.len() * 2).max(64);
        }
        made
    }

    fn get(&self, version: &str) -> Option<Arc<EndpointDigest>> {
        let map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.by_version.get(version).and_then(Weak::upgrade)
    }

    /// How many versions are tracked (live or not yet pruned).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.inner.lock().unwrap().by_version.len()
    }
}

/// What to send for a new endpoint set.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointPush {
    Full(EndpointSet),
    Delta(EndpointDelta),
}

/// `set` (whose digest is `digest`) against `base`: a delta when there is a base and the delta
/// encodes smaller than the whole set, else the whole set.
pub fn diff(
    base: Option<&EndpointDigest>,
    set: EndpointSet,
    digest: &EndpointDigest,
) -> EndpointPush {
    let Some(base) = base else {
        return EndpointPush::Full(set);
    };
    let changed: Vec<usize> = set
        .clusters
        .iter()
        .enumerate()
        .filter(|(_, c)| base.hash_of(&c.cluster) != digest.hash_of(&c.cluster))
        .map(|(i, _)| i)
        .collect();
    let removed: Vec<String> = base
        .clusters
        .iter()
        .filter(|(name, _)| digest.hash_of(name).is_none())
        .map(|(name, _)| name.to_string())
        .collect();
    let delta = EndpointDelta {
        version: set.version.clone(),
        base_version: base.version.clone(),
        clusters: changed.iter().map(|&i| set.clusters[i].clone()).collect(),
        removed,
    };
    if delta.encoded_len() < set.encoded_len() {
        EndpointPush::Delta(delta)
    } else {
        EndpointPush::Full(set)
    }
}

/// `weft_control_endpoint_pushes_total{kind}`, and the [`Digests`] every stream shares.
#[derive(Debug, Clone)]
pub struct EndpointPushes {
    full: prometheus::IntCounter,
    delta: prometheus::IntCounter,
    digests: Arc<Digests>,
}

impl EndpointPushes {
    /// The counters, registered in `metrics` (unregistered, with a warning, if that fails: a
    /// second discovery service on one control plane).
    pub fn register(metrics: &Metrics) -> Self {
        let vec = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "weft_control_endpoint_pushes_total",
                "ENDPOINTS pushes by form: delta (only the clusters changed since a set the proxy ACKed; proxies advertising endpoint-delta) or full (the whole set).",
            ),
            &["kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        if let Err(e) = metrics.register(Box::new(vec.clone())) {
            tracing::warn!(error = %e, "weft_control_endpoint_pushes_total not registered");
        }
        Self {
            full: vec.with_label_values(&["full"]),
            delta: vec.with_label_values(&["delta"]),
            digests: Arc::default(),
        }
    }
}

/// What one discovery stream knows of its proxy's endpoints.
#[derive(Debug)]
pub struct EndpointStream {
    pushes: EndpointPushes,
    /// Present only when the proxy advertised [`CAPABILITY`].
    delta: Option<DeltaState>,
}

#[derive(Debug, Default)]
struct DeltaState {
    /// The last set the proxy ACKed (or held at connect), if its content is known.
    acked: Option<Arc<EndpointDigest>>,
    /// The set carried by the push awaiting an answer, and whether it went as a delta.
    pending: Option<(String, Arc<EndpointDigest>, bool)>,
}

impl EndpointStream {
    /// A stream's state; deltas only when `capable`.
    pub fn new(pushes: EndpointPushes, capable: bool) -> Self {
        Self {
            pushes,
            delta: capable.then(DeltaState::default),
        }
    }

    /// Before building a push: the proxy holds `held` (its ACKed or Hello version) and the
    /// stream compiled `current`. When they are the same version and no digest of it is known,
    /// remember it, so the next change can go as a delta (a proxy resuming with the current
    /// set, e.g. after a control-plane restart, gets deltas from its first change on).
    pub fn learn(&mut self, held: Option<&str>, current: &EndpointSet) {
        let Some(state) = self.delta.as_mut() else {
            return;
        };
        if held == Some(current.version.as_str())
            && state
                .acked
                .as_ref()
                .is_none_or(|a| a.version != current.version)
        {
            state.acked = Some(self.pushes.digests.of(current));
        }
    }

    /// Turns the whole ENDPOINTS set of `response` (nonce set) into a delta when the proxy
    /// holds (`held`) a set whose digest is known and the delta is smaller; counts the push.
    pub fn prepare(&mut self, response: &mut DiscoveryResponse, held: Option<&str>) {
        let Some(set) = response.endpoints.take() else {
            return;
        };
        let Some(state) = self.delta.as_mut() else {
            self.pushes.full.inc();
            response.endpoints = Some(set);
            return;
        };
        let base = state.acked.as_deref().filter(|a| held == Some(a.version()));
        let digest = self.pushes.digests.of(&set);
        let push = diff(base, set, &digest);
        let is_delta = matches!(push, EndpointPush::Delta(_));
        match push {
            EndpointPush::Full(set) => {
                self.pushes.full.inc();
                response.endpoints = Some(set);
            }
            EndpointPush::Delta(delta) => {
                self.pushes.delta.inc();
                response.endpoint_delta = Some(delta);
            }
        }
        state.pending = Some((response.nonce.clone(), digest, is_delta));
    }

    /// The push `nonce` was ACKed: its set is the base from now on.
    pub fn acked(&mut self, nonce: &str) {
        if let Some(state) = self.delta.as_mut() {
            if let Some((_, digest, _)) = state.pending.take_if(|(n, _, _)| n == nonce) {
                state.acked = Some(digest);
            }
        }
    }

    /// The push `nonce` was NACKed: the next ENDPOINTS push is whole. Whether it carried a
    /// delta (the proxy may not hold its base: the caller pushes again at once, whole).
    pub fn nacked(&mut self, nonce: &str) -> bool {
        let Some(state) = self.delta.as_mut() else {
            return false;
        };
        state.acked = None;
        state
            .pending
            .take_if(|(n, _, _)| n == nonce)
            .is_some_and(|(_, _, was_delta)| was_delta)
    }

    /// The outstanding push is considered lost: what it carried is unknown to have been applied.
    pub fn lost(&mut self) {
        if let Some(state) = self.delta.as_mut() {
            state.pending = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::v1::Endpoint;

    fn cluster(name: &str, addrs: &[&str]) -> ClusterEndpoints {
        ClusterEndpoints {
            cluster: name.into(),
            endpoints: addrs
                .iter()
                .map(|a| Endpoint {
                    address: (*a).into(),
                    weight: 1,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// `n` clusters `svc-<i>.ns` with three endpoints each; `change` rewrites cluster 3's.
    fn set(version: &str, n: usize, change: Option<&str>) -> EndpointSet {
        let mut clusters: Vec<ClusterEndpoints> = (0..n)
            .map(|i| {
                cluster(
                    &format!("svc-{i:03}.ns"),
                    &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
                )
            })
            .collect();
        if let Some(addr) = change {
            clusters[3] = cluster("svc-003.ns", &[addr]);
        }
        EndpointSet {
            version: version.into(),
            clusters,
        }
    }

    fn counts() -> (EndpointPushes, Metrics) {
        let m = Metrics::new().unwrap();
        (EndpointPushes::register(&m), m)
    }

    fn response(nonce: &str, set: EndpointSet) -> DiscoveryResponse {
        DiscoveryResponse {
            nonce: nonce.into(),
            endpoints: Some(set),
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_carries_only_the_changed_clusters() {
        let v1 = set("v1", 50, None);
        let v2 = set("v2", 50, Some("10.9.9.9:80"));
        let base = EndpointDigest::of(&v1);
        let push = diff(Some(&base), v2.clone(), &EndpointDigest::of(&v2));
        let EndpointPush::Delta(d) = push else {
            panic!("expected a delta, got {push:?}")
        };
        assert_eq!(d.version, "v2");
        assert_eq!(d.base_version, "v1");
        assert_eq!(d.clusters, vec![cluster("svc-003.ns", &["10.9.9.9:80"])]);
        assert!(d.removed.is_empty());
    }

    #[test]
    fn removed_and_added_clusters_are_named() {
        let v1 = set("v1", 50, None);
        let mut v2 = set("v2", 50, None);
        v2.clusters.remove(7);
        v2.clusters.push(cluster("zzz.ns", &["10.1.1.1:80"]));
        let digest = EndpointDigest::of(&v2);
        let push = diff(Some(&EndpointDigest::of(&v1)), v2, &digest);
        let EndpointPush::Delta(d) = push else {
            panic!("expected a delta, got {push:?}")
        };
        assert_eq!(d.removed, vec!["svc-007.ns".to_owned()]);
        assert_eq!(d.clusters, vec![cluster("zzz.ns", &["10.1.1.1:80"])]);
    }

    #[test]
    fn label_order_does_not_make_a_change() {
        let mut a = cluster("a.ns", &["10.0.0.1:80"]);
        a.endpoints[0].labels = [("zone", "z1"), ("version", "v1"), ("x", "y")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut b = a.clone();
        // A map rebuilt in another insertion order may iterate (and encode) differently.
        b.endpoints[0].labels = a.endpoints[0]
            .labels
            .iter()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(cluster_hash(&a), cluster_hash(&b));
        b.endpoints[0].labels.insert("zone".into(), "z2".into());
        assert_ne!(cluster_hash(&a), cluster_hash(&b));
    }

    #[test]
    fn a_delta_not_smaller_than_the_set_goes_whole() {
        let v1 = set("v1", 2, None);
        // Every cluster changed: the delta would be the whole set plus its base and removals.
        let mut v2 = set("v2", 2, None);
        for c in &mut v2.clusters {
            c.endpoints[0].address = "10.7.7.7:80".into();
        }
        let push = diff(
            Some(&EndpointDigest::of(&v1)),
            v2.clone(),
            &EndpointDigest::of(&v2),
        );
        assert_eq!(push, EndpointPush::Full(v2));
    }

    #[test]
    fn no_base_no_delta() {
        let v1 = set("v1", 20, None);
        let push = diff(None, v1.clone(), &EndpointDigest::of(&v1));
        assert_eq!(push, EndpointPush::Full(v1));
    }

    #[test]
    fn a_proxy_without_the_capability_always_gets_whole_sets() {
        let (pushes, m) = counts();
        let mut s = EndpointStream::new(pushes, false);
        s.learn(Some("v1"), &set("v1", 50, None));
        let mut r = response("1", set("v2", 50, Some("10.9.9.9:80")));
        s.prepare(&mut r, Some("v1"));
        assert!(r.endpoints.is_some() && r.endpoint_delta.is_none());
        s.acked("1");
        let mut r = response("2", set("v3", 50, Some("10.8.8.8:80")));
        s.prepare(&mut r, Some("v2"));
        assert!(r.endpoints.is_some() && r.endpoint_delta.is_none());
        let text = m.render().unwrap();
        assert!(
            text.contains("weft_control_endpoint_pushes_total{kind=\"full\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("weft_control_endpoint_pushes_total{kind=\"delta\"} 0"),
            "{text}"
        );
        assert!(!advertised(&Node::default()));
        assert!(advertised(&Node {
            capabilities: vec!["other".into(), CAPABILITY.into()],
            ..Default::default()
        }));
    }

    #[test]
    fn first_push_full_then_deltas_against_the_acked_set() {
        let (pushes, m) = counts();
        let mut s = EndpointStream::new(pushes, true);
        // First push: nothing held.
        let mut r = response("1", set("v1", 50, None));
        s.prepare(&mut r, None);
        assert!(r.endpoints.is_some());
        // Not yet ACKed: the next push (after a timeout, say) has no base.
        s.lost();
        let mut r = response("2", set("v1", 50, None));
        s.prepare(&mut r, None);
        assert!(r.endpoints.is_some());
        s.acked("2");
        let mut r = response("3", set("v2", 50, Some("10.9.9.9:80")));
        s.prepare(&mut r, Some("v1"));
        let d = r.endpoint_delta.as_ref().expect("a delta against v1");
        assert!(r.endpoints.is_none());
        assert_eq!((d.base_version.as_str(), d.clusters.len()), ("v1", 1));
        s.acked("3");
        // The proxy reports another version than the ACKed set's (a late ACK of a lost push):
        // no delta against a base it may not hold.
        let mut r = response("4", set("v3", 50, Some("10.8.8.8:80")));
        s.prepare(&mut r, Some("vX"));
        assert!(r.endpoints.is_some());
        let text = m.render().unwrap();
        assert!(
            text.contains("weft_control_endpoint_pushes_total{kind=\"full\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weft_control_endpoint_pushes_total{kind=\"delta\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn full_after_a_nack() {
        let (pushes, _m) = counts();
        let mut s = EndpointStream::new(pushes, true);
        s.learn(Some("v1"), &set("v1", 50, None));
        let mut r = response("1", set("v2", 50, Some("10.9.9.9:80")));
        s.prepare(&mut r, Some("v1"));
        assert!(r.endpoint_delta.is_some());
        // NACKed delta: reported as such (pushed again at once).
        assert!(s.nacked("1"));
        let mut r = response("2", set("v2", 50, Some("10.9.9.9:80")));
        s.prepare(&mut r, Some("v1"));
        assert!(r.endpoints.is_some(), "whole set after a NACK");
        // A NACKed whole set is not a delta: not retried at once.
        assert!(!s.nacked("2"));
        let mut r = response("3", set("v3", 50, Some("10.8.8.8:80")));
        s.prepare(&mut r, Some("v1"));
        assert!(r.endpoints.is_some());
        s.acked("3");
        let mut r = response("4", set("v4", 50, Some("10.7.7.7:80")));
        s.prepare(&mut r, Some("v3"));
        assert!(
            r.endpoint_delta.is_some(),
            "deltas again once a whole set is ACKed"
        );
    }

    #[test]
    fn a_resumed_stream_learns_the_set_only_when_versions_match() {
        // A reconnect: the Hello holds v0, the stream compiles v1 (unknown content): whole.
        let (pushes, _m) = counts();
        let mut s = EndpointStream::new(pushes, true);
        let v1 = set("v1", 50, None);
        s.learn(Some("v0"), &v1);
        let mut r = response("1", v1.clone());
        s.prepare(&mut r, Some("v0"));
        assert!(r.endpoints.is_some());
        // A reconnect holding exactly what the stream compiles: known, deltas from the next.
        let (pushes, _m) = counts();
        let mut s = EndpointStream::new(pushes, true);
        s.learn(Some("v1"), &v1);
        let mut r = response("1", set("v2", 50, Some("10.9.9.9:80")));
        s.prepare(&mut r, Some("v1"));
        assert!(r.endpoint_delta.is_some());
    }

    /// Streams holding the same version share one digest; it goes when no stream holds it.
    #[test]
    fn streams_share_one_digest_per_version() {
        let (pushes, _m) = counts();
        let digests = Arc::clone(&pushes.digests);
        let mut streams: Vec<EndpointStream> = (0..100)
            .map(|_| EndpointStream::new(pushes.clone(), true))
            .collect();
        for (i, s) in streams.iter_mut().enumerate() {
            let mut r = response(&i.to_string(), set("v1", 50, None));
            s.prepare(&mut r, None);
            s.acked(&i.to_string());
        }
        let first = streams[0].delta.as_ref().unwrap().acked.clone().unwrap();
        assert!(streams
            .iter()
            .all(|s| Arc::ptr_eq(s.delta.as_ref().unwrap().acked.as_ref().unwrap(), &first)));
        assert_eq!(Arc::strong_count(&first), 101);
        drop(first);
        // Every stream moves on to v2 (a delta each, one digest of v2 for all).
        for (i, s) in streams.iter_mut().enumerate() {
            let nonce = format!("b{i}");
            let mut r = response(&nonce, set("v2", 50, Some("10.9.9.9:80")));
            s.prepare(&mut r, Some("v1"));
            assert!(r.endpoint_delta.is_some());
            s.acked(&nonce);
        }
        assert!(digests.get("v1").is_none(), "no stream holds v1 any more");
        assert!(digests.get("v2").is_some());
        drop(streams);
        assert!(digests.get("v2").is_none());
        // Dead entries are pruned as new versions come.
        for v in 0..200 {
            drop(digests.of(&set(&format!("x{v}"), 1, None)));
        }
        assert!(digests.tracked() <= 64 + 1, "{}", digests.tracked());
    }
}
