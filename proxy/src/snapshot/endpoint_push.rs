//! The clusters and metric family of a build ([`Snapshot::build_after`]): for an endpoint-only
//! push, the previous snapshot's cluster map patched where the push changed endpoints, so the
//! work follows the clusters the push names, not the clusters in scope.
//!
//! The patch applies when the build's cluster set is the previous snapshot's own allocation and
//! its endpoint change set is trusted (`changed`: the clusters an endpoint delta named, checked
//! against the endpoint version the previous snapshot holds), at most [`FEW_REPLACED`] clusters
//! changed, and no cluster of the set re-reads anything at a build (DNS endpoints, TLS
//! origination). Then every other cluster is the previous `Arc` (as [`build_clusters`] would
//! reuse it), the map is a copy of the previous one (no unchanged cluster's name hashed) with
//! the changed clusters rebuilt (found by binary search in sets ordered by name), and the
//! previous family is kept when the rebuilt clusters' transport labels are the ones it has (the
//! others' cannot have changed: same clusters, same identity). Anything else (a cluster added
//! or removed, a rebuilt cluster that does not build, endpoints that do not decode) takes the
//! full path, so rejections are exactly the full build's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use weft_proto::v1;

use super::{
    build_cluster, build_clusters, outbound_peer_labels, BuiltClusters, ClusterEps, EndpointsIn,
    Rejection, Sets, Snapshot, FEW_REPLACED,
};
use crate::cluster::Cluster;
use crate::metrics::{Metrics, PeerLabels};

/// The clusters of a build, the snapshot whose metric family (and so routes) it keeps, if any,
/// and the family its handles are made with.
pub(super) struct Clusters<'p> {
    pub built: BuiltClusters,
    pub kept_family: Option<&'p Snapshot>,
    pub family: Metrics,
}

/// The clusters of a build of `sets` after `previous` (`changed`: see [`build_clusters`]) and
/// its metric family: the previous family when every cluster's outbound `tls` / `peer` is the
/// same, else one made for these clusters ([`Metrics::for_clusters`]). Patched from `previous`
/// when the push changed a few clusters' endpoints only ([`patch`]), built otherwise.
pub(super) fn clusters<'p>(
    sets: Sets<'_>,
    changed: Option<&HashSet<String>>,
    previous: Option<&'p Snapshot>,
    metrics: &Metrics,
    has_identity: bool,
    errors: &mut Vec<Rejection>,
) -> Clusters<'p> {
    if let (Some(changed), Some(p)) = (changed, previous) {
        if let Some(patched) = patch(sets, changed, p, metrics, has_identity) {
            return patched;
        }
    }
    let built = build_clusters(sets, changed, previous, metrics, errors);
    family_of(built, previous, metrics, has_identity)
}

/// `built`'s family: `previous`' when its labels are exactly those of `built`'s clusters.
fn family_of<'p>(
    built: BuiltClusters,
    previous: Option<&'p Snapshot>,
    metrics: &Metrics,
    has_identity: bool,
) -> Clusters<'p> {
    // Every request handle of the snapshot (route destinations resolve theirs lazily) knows
    // the transport of its destination cluster.
    let peers: HashMap<Arc<str>, PeerLabels> = built
        .clusters
        .values()
        .map(|c| (Arc::clone(&c.name), outbound_peer_labels(c, has_identity)))
        .collect();
    // Routes are reused only with the family they were built with: one whose transports
    // changed rebuilds them all, so no old family outlives its snapshot in kept routes.
    let kept_family = previous.filter(|p| p.metrics.has_cluster_peers(metrics, &peers));
    let family = match kept_family {
        Some(p) => p.metrics.clone(),
        None => metrics.for_clusters(peers),
    };
    Clusters {
        built,
        kept_family,
        family,
    }
}

/// `previous`' clusters with those in `changed` rebuilt from the endpoints `sets` holds for
/// them; `None` when the patch does not apply (see the module doc), and the full build runs.
fn patch<'p>(
    sets: Sets<'_>,
    changed: &HashSet<String>,
    previous: &'p Snapshot,
    metrics: &Metrics,
    has_identity: bool,
) -> Option<Clusters<'p>> {
    if changed.len() > FEW_REPLACED {
        return None;
    }
    let Some(EndpointsIn::Held(held)) = sets.endpoints else {
        return None;
    };
    let set = sets.clusters?;
    // The set `previous` was built from (so names are unique), none of which re-reads.
    if previous.clusters_reread || !std::ptr::eq(set, previous.resources.clusters.as_deref()?) {
        return None;
    }
    // The protos of the clusters to rebuild, in the set's order, and their held endpoints:
    // found by name in O(log n) in sets ordered by name (as the control plane sends them),
    // else by a scan.
    let mut protos: Vec<(usize, &v1::Cluster)> = changed
        .iter()
        .filter_map(|name| {
            let at = set
                .clusters
                .binary_search_by(|c| c.name.as_str().cmp(name))
                .ok()
                .or_else(|| set.clusters.iter().position(|c| c.name == *name))?;
            Some((at, &set.clusters[at]))
        })
        .collect();
    protos.sort_unstable_by_key(|(at, _)| *at);
    let held_eps = held.clusters();
    let eps: Vec<Option<ClusterEps<'_>>> = protos
        .iter()
        .map(|(_, c)| {
            let at = held_eps
                .binary_search_by(|(n, _)| (**n).cmp(c.name.as_str()))
                .ok()
                .or_else(|| held_eps.iter().rposition(|(n, _)| **n == *c.name))?;
            Some(ClusterEps::Encoded(&held_eps[at].1))
        })
        .collect();
    let mut clusters = previous.clusters.clone();
    let mut replaced = Vec::with_capacity(protos.len());
    let mut rebuilt: Vec<Arc<Cluster>> = Vec::with_capacity(protos.len());
    let shared = Arc::new(metrics.clone());
    for ((_, c), eps) in protos.into_iter().zip(eps) {
        // The cluster set is `previous`' own: each of its clusters is there.
        let prev = previous.clusters.get(c.name.as_str())?;
        let built =
            Arc::new(build_cluster(c, eps, &held.version, Some(prev), metrics, &shared).ok()?);
        replaced.push(Arc::clone(prev));
        clusters.insert(Arc::clone(&built.name), Arc::clone(&built));
        rebuilt.push(built);
    }
    let built = BuiltClusters {
        clusters,
        replaced: Some(replaced),
        reread: false,
    };
    // Every other cluster is `previous`' own, built with the same identity: its labels in
    // `previous`' family are still its labels.
    let kept = previous.has_identity == has_identity
        && previous.metrics.has_peers_of(
            metrics,
            rebuilt
                .iter()
                .map(|c| (&*c.name, outbound_peer_labels(c, has_identity))),
        );
    if !kept {
        return Some(family_of(built, Some(previous), metrics, has_identity));
    }
    Some(Clusters {
        built,
        kept_family: Some(previous),
        family: previous.metrics.clone(),
    })
}

#[cfg(test)]
mod tests;
