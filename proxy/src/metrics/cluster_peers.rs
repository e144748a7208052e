//! Checking a kept family's outbound transport labels for a few clusters only (an endpoint-only
//! push, `snapshot::endpoint_push`), instead of comparing the labels of every cluster
//! ([`Metrics::has_cluster_peers`]).

use std::sync::Arc;

use super::{Metrics, PeerLabels};

impl Metrics {
    /// Whether these handles come from `base`'s families and give each of `clusters` (name,
    /// labels) exactly these labels. For handles made by [`Metrics::for_clusters`] of a
    /// snapshot's clusters, and a build whose clusters are that snapshot's with only `clusters`
    /// rebuilt (same names, same identity), this is [`Metrics::has_cluster_peers`] of the
    /// build's whole map, read for the rebuilt clusters only.
    pub fn has_peers_of<'a>(
        &self,
        base: &Metrics,
        clusters: impl IntoIterator<Item = (&'a str, PeerLabels)>,
    ) -> bool {
        Arc::ptr_eq(&self.leased, &base.leased)
            && clusters
                .into_iter()
                .all(|(name, labels)| self.cluster_peers.get(name) == Some(&labels))
    }
}
