//! The leased TCP families' handles of a listener ([`TcpMetrics`]) and their per-caller
//! variants.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{IntCounter, IntGauge};

use super::lease::{LeaseKey, LeasedSeries, SeriesLease};
use super::{MAX_PEERS_PER_HANDLE, PEER_OTHER, TLS_MTLS};

/// Per (direction, cluster) TCP metrics, resolved when the snapshot is built. The series are
/// exported while a `TcpMetrics` for (direction, cluster) lives: the listener holding it is held
/// by its snapshots and by every connection accepted on it, so a draining connection keeps
/// counting into exported series. A counter cloned out of it and kept past the last
/// `TcpMetrics` would count into a removed child: lost counts, never a new series (only
/// `with_label_values`, under the lease lock, creates series).
#[derive(Clone)]
pub struct TcpMetrics {
    /// `weft_tcp_connections_total`.
    pub accepted: IntCounter,
    /// `weft_tcp_connections_closed_total`.
    pub closed: IntCounter,
    /// `weft_tcp_connections` (open now).
    pub open: IntGauge,
    /// Bytes read from the downstream.
    pub rx: IntCounter,
    /// Bytes written to the downstream.
    pub tx: IntCounter,
    _lease: SeriesLease,
    /// (direction, cluster) of these handles.
    labels: [Box<str>; 2],
    families: Arc<LeasedSeries>,
    /// Base handles (not a variant): the per-caller variants, at most
    /// [`MAX_PEERS_PER_HANDLE`] by identity plus `other`, owned here so that a caller's series
    /// live as long as the listener (not just its current connections).
    pub(super) variants: Option<Arc<TcpVariants>>,
}

/// The per-caller variants of base TCP handles, by `peer` label.
type TcpVariants = Mutex<HashMap<Box<str>, Arc<TcpMetrics>>>;

impl std::fmt::Debug for TcpMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMetrics")
            .field("labels", &self.labels)
            .field("lease", &self._lease)
            .finish_non_exhaustive()
    }
}

/// The TCP handles of (direction, cluster, tls, peer), leased.
pub(super) fn tcp_handles(
    f: &Arc<LeasedSeries>,
    direction: &str,
    cluster: &str,
    tls: &str,
    peer: &str,
) -> TcpMetrics {
    let key = LeaseKey::Tcp {
        direction: direction.into(),
        cluster: cluster.into(),
        tls: tls.into(),
        peer: peer.into(),
    };
    let labels = [direction, cluster, tls, peer];
    let (lease, (accepted, closed, open, rx, tx)) = f.lease(key, || {
        (
            f.tcp_connections_total.with_label_values(&labels),
            f.tcp_connections_closed_total.with_label_values(&labels),
            f.tcp_connections.with_label_values(&labels),
            f.tcp_bytes_total
                .with_label_values(&[direction, cluster, tls, peer, "rx"]),
            f.tcp_bytes_total
                .with_label_values(&[direction, cluster, tls, peer, "tx"]),
        )
    });
    TcpMetrics {
        accepted,
        closed,
        open,
        rx,
        tx,
        _lease: lease,
        labels: [direction.into(), cluster.into()],
        families: Arc::clone(f),
        variants: None,
    }
}

impl TcpMetrics {
    /// The handles of a connection whose client proved the mesh identity `peer` (inbound mTLS):
    /// `tls="mtls"`, `peer=<peer>`, or `peer="other"` past [`MAX_PEERS_PER_HANDLE`] callers of
    /// this listener. Once per connection (a lock and, the first time, label resolution).
    pub fn for_peer(&self, peer: &str) -> Arc<TcpMetrics> {
        let Some(variants) = &self.variants else {
            // Already a variant.
            return Arc::new(self.clone());
        };
        let mut variants = variants.lock().unwrap_or_else(PoisonError::into_inner);
        let label = if variants.contains_key(peer) || variants.len() < MAX_PEERS_PER_HANDLE {
            peer
        } else {
            PEER_OTHER
        };
        if let Some(v) = variants.get(label) {
            return Arc::clone(v);
        }
        let [d, c] = &self.labels;
        let v = Arc::new(tcp_handles(&self.families, d, c, TLS_MTLS, label));
        variants.insert(label.into(), Arc::clone(&v));
        v
    }
}
