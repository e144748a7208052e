//! Endpoint deltas (`DiscoveryResponse.endpoint_delta`, sent only to a proxy that advertises
//! [`CAPABILITY`]): the clusters added or changed since a set the proxy holds, and the names of
//! those removed, turned here into the whole set they describe before the response is merged
//! (held encoded per cluster, [`HeldEndpoints`]: the untouched clusters' bytes are shared, not
//! copied), so the ACK's versions and `/config_dump` show whole sets as before, and
//! [`crate::snapshot::Snapshot::build_after`] reuses every cluster the delta did not touch
//! without comparing it.
//!
//! A delta whose base is not the set held (a push lost or rejected on the way, a control plane
//! that lost track) is refused: the proxy NACKs it, keeps its config, and the control plane
//! answers with the whole set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use weft_proto::v1;

use crate::metrics::Metrics;
use crate::snapshot::{EndpointChange, HeldEndpoints, ResourceKind};

/// The hasher of the per-delta lookups.
type Fast = foldhash::fast::RandomState;

/// The `Node.capabilities` entry announcing that this proxy applies endpoint deltas.
pub const CAPABILITY: &str = "endpoint-delta";

/// The whole endpoint set `delta` describes against `held` (the endpoint set this proxy runs,
/// encoded per cluster): the clusters it lists replaced or added (encoded), those it removes
/// dropped, every other cluster's bytes shared with `held` (no copy), ordered by cluster name as
/// the control plane orders whole sets. An error names why the delta cannot be applied.
pub fn apply_endpoint_delta(
    held: Option<&HeldEndpoints>,
    delta: v1::EndpointDelta,
) -> Result<HeldEndpoints, String> {
    let Some(held) = held else {
        return Err(format!(
            "endpoint delta {} is against endpoints {}, but this proxy holds no endpoints",
            delta.version, delta.base_version
        ));
    };
    if held.version != delta.base_version {
        return Err(format!(
            "endpoint delta {} is against endpoints {}, but this proxy holds {}",
            delta.version, delta.base_version, held.version
        ));
    }
    // Every held cluster's name is looked up in these: a fast (randomly seeded) hash, not
    // SipHash (hashing names was a large part of an endpoint push at 5,000 clusters).
    let mut changed: HashMap<&str, &v1::ClusterEndpoints, Fast> =
        HashMap::with_capacity_and_hasher(delta.clusters.len(), Fast::default());
    for c in &delta.clusters {
        if let Some(dup) = changed.insert(c.cluster.as_str(), c) {
            return Err(format!(
                "endpoint delta {}: cluster {} listed twice",
                delta.version, dup.cluster
            ));
        }
    }
    let mut removed: HashSet<&str, Fast> =
        HashSet::with_capacity_and_hasher(delta.removed.len(), Fast::default());
    for name in &delta.removed {
        if changed.contains_key(name.as_str()) || !removed.insert(name) {
            return Err(format!(
                "endpoint delta {}: cluster {name} both removed and listed, or removed twice",
                delta.version
            ));
        }
    }
    let mut clusters = Vec::with_capacity(held.clusters().len() + changed.len());
    let mut gone = 0;
    for (name, bytes) in held.clusters() {
        if removed.contains(&**name) {
            gone += 1;
        } else if let Some(new) = changed.remove(&**name) {
            clusters.push(HeldEndpoints::encode_cluster(new));
        } else {
            clusters.push((Arc::clone(name), bytes.clone()));
        }
    }
    if gone != removed.len() {
        let held_names: HashSet<&str> = held.clusters().iter().map(|(n, _)| &**n).collect();
        let missing: Vec<&str> = removed
            .iter()
            .copied()
            .filter(|n| !held_names.contains(n))
            .collect();
        return Err(format!(
            "endpoint delta {} removes clusters this proxy does not hold: {}",
            delta.version,
            missing.join(", ")
        ));
    }
    if !changed.is_empty() {
        clusters.extend(changed.into_values().map(HeldEndpoints::encode_cluster));
        // Stable, and nearly sorted already: the held set is, the additions come last.
        clusters.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(HeldEndpoints::from_parts(delta.version, clusters))
}

/// A response with its endpoint delta applied ([`resolve`]).
#[derive(Debug)]
pub struct Resolved {
    /// The response, without `endpoint_delta`.
    pub resp: v1::DiscoveryResponse,
    /// The whole endpoint set a delta described (the held set with it applied) and the
    /// clusters it named: what the build must not take from the held snapshot
    /// ([`crate::snapshot::Unchanged`]). `None`: the response carried no delta.
    pub endpoints: Option<(HeldEndpoints, EndpointChange)>,
}

impl Resolved {
    /// The endpoint version the response carries (whole or as a delta), if any.
    pub fn endpoint_version(&self) -> Option<&str> {
        match (&self.resp.endpoints, &self.endpoints) {
            (Some(set), _) => Some(&set.version),
            (None, Some((set, _))) => Some(&set.version),
            (None, None) => None,
        }
    }
}

/// `resp` with an endpoint delta taken out and applied to `held` (the endpoints this proxy
/// runs): [`Resolved::endpoints`]; any other response as it is. On a bad delta, the NACK to send
/// (boxed: a request is large, and the `Ok` path is the common one), counted in `metrics`'
/// `weft_config_updates_total{result="nack"}` for every type the response carried.
pub fn resolve(
    held: Option<&HeldEndpoints>,
    mut resp: v1::DiscoveryResponse,
    metrics: &Metrics,
) -> Result<Resolved, Box<v1::DiscoveryRequest>> {
    let Some(delta) = resp.endpoint_delta.take() else {
        return Ok(Resolved {
            resp,
            endpoints: None,
        });
    };
    let version = delta.version.clone();
    let error = if resp.endpoints.is_some() {
        format!("endpoint delta {version} arrived with a whole endpoint set in the same response")
    } else {
        let change = EndpointChange {
            base: delta.base_version.clone(),
            clusters: delta
                .clusters
                .iter()
                .map(|c| c.cluster.clone())
                .chain(delta.removed.iter().cloned())
                .collect(),
        };
        match apply_endpoint_delta(held, delta) {
            Ok(set) => {
                return Ok(Resolved {
                    resp,
                    endpoints: Some((set, change)),
                })
            }
            Err(e) => e,
        }
    };
    tracing::warn!(nonce = %resp.nonce, %error, "endpoint delta rejected; keeping the config held");
    let mut rejected = crate::snapshot::carried(&resp);
    rejected.push((ResourceKind::Endpoints, version));
    let rejected = rejected
        .into_iter()
        .map(|(k, version)| {
            metrics.config_update(k.as_str(), false);
            v1::TypeVersion {
                r#type: k.proto().into(),
                version,
            }
        })
        .collect();
    Err(Box::new(v1::DiscoveryRequest {
        kind: Some(v1::discovery_request::Kind::Nack(v1::Nack {
            nonce: resp.nonce,
            error,
            rejected,
        })),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str, addr: &str) -> v1::ClusterEndpoints {
        v1::ClusterEndpoints {
            cluster: name.into(),
            endpoints: vec![v1::Endpoint {
                address: addr.into(),
                weight: 1,
                ..Default::default()
            }],
        }
    }

    fn held() -> v1::EndpointSet {
        v1::EndpointSet {
            version: "v1".into(),
            clusters: vec![
                cluster("a.ns", "10.0.0.1:80"),
                cluster("b.ns", "10.0.0.2:80"),
                cluster("c.ns", "10.0.0.3:80"),
                cluster("inbound", "127.0.0.1:8080"),
            ],
        }
    }

    fn delta(clusters: Vec<v1::ClusterEndpoints>, removed: &[&str]) -> v1::EndpointDelta {
        v1::EndpointDelta {
            version: "v2".into(),
            base_version: "v1".into(),
            clusters,
            removed: removed.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn held_encoded() -> HeldEndpoints {
        HeldEndpoints::encode(&held())
    }

    #[test]
    fn untouched_clusters_share_the_held_bytes() {
        let held = held_encoded();
        let merged = apply_endpoint_delta(
            Some(&held),
            delta(vec![cluster("b.ns", "10.9.9.9:80")], &[]),
        )
        .unwrap();
        for ((name, old), (new_name, new)) in held.clusters().iter().zip(merged.clusters()) {
            assert_eq!(name, new_name);
            // Same allocation (a slice of the held buffer) for the untouched ones.
            assert_eq!(old.as_ptr() == new.as_ptr(), &**name != "b.ns", "{name}");
        }
    }

    #[test]
    fn changed_clusters_replace_held_ones_in_place_and_new_ones_are_sorted_in() {
        let merged = apply_endpoint_delta(
            Some(&held_encoded()),
            delta(
                vec![
                    cluster("b.ns", "10.9.9.9:80"),
                    cluster("bb.ns", "10.8.8.8:80"),
                ],
                &[],
            ),
        )
        .unwrap();
        assert_eq!(merged.version, "v2");
        assert_eq!(
            merged.decode().unwrap().clusters,
            vec![
                cluster("a.ns", "10.0.0.1:80"),
                cluster("b.ns", "10.9.9.9:80"),
                cluster("bb.ns", "10.8.8.8:80"),
                cluster("c.ns", "10.0.0.3:80"),
                cluster("inbound", "127.0.0.1:8080"),
            ]
        );
    }

    #[test]
    fn removed_clusters_are_dropped() {
        let merged =
            apply_endpoint_delta(Some(&held_encoded()), delta(vec![], &["a.ns", "c.ns"])).unwrap();
        let names: Vec<&str> = merged.clusters().iter().map(|(n, _)| &**n).collect();
        assert_eq!(names, ["b.ns", "inbound"]);
    }

    #[test]
    fn a_base_mismatch_is_an_error_naming_both_versions() {
        let mut d = delta(vec![cluster("b.ns", "10.9.9.9:80")], &[]);
        d.base_version = "v0".into();
        let err = apply_endpoint_delta(Some(&held_encoded()), d.clone()).unwrap_err();
        assert!(err.contains("v0") && err.contains("holds v1"), "{err}");
        let err = apply_endpoint_delta(None, d).unwrap_err();
        assert!(err.contains("holds no endpoints"), "{err}");
    }

    #[test]
    fn inconsistent_deltas_are_errors() {
        let err =
            apply_endpoint_delta(Some(&held_encoded()), delta(vec![], &["zz.ns"])).unwrap_err();
        assert!(err.contains("zz.ns"), "{err}");
        let err = apply_endpoint_delta(
            Some(&held_encoded()),
            delta(vec![cluster("a.ns", "10.1.1.1:80")], &["a.ns"]),
        )
        .unwrap_err();
        assert!(err.contains("a.ns"), "{err}");
        let err = apply_endpoint_delta(
            Some(&held_encoded()),
            delta(
                vec![
                    cluster("a.ns", "10.1.1.1:80"),
                    cluster("a.ns", "10.1.1.2:80"),
                ],
                &[],
            ),
        )
        .unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn resolve_turns_a_delta_into_the_whole_set_or_a_nack() {
        let resp = v1::DiscoveryResponse {
            nonce: "7".into(),
            endpoint_delta: Some(delta(vec![cluster("b.ns", "10.9.9.9:80")], &[])),
            ..Default::default()
        };
        let metrics = Metrics::new().unwrap();
        let ok = resolve(Some(&held_encoded()), resp.clone(), &metrics).unwrap();
        assert!(ok.resp.endpoint_delta.is_none() && ok.resp.endpoints.is_none());
        assert_eq!(ok.endpoint_version(), Some("v2"));
        let (set, change) = ok.endpoints.unwrap();
        assert_eq!(set.clusters().len(), 4);
        assert_eq!(change.base, "v1");
        assert_eq!(change.clusters, HashSet::from(["b.ns".to_owned()]));
        let Err(nack) = resolve(None, resp, &metrics) else {
            panic!("a delta without a base applies")
        };
        let Some(v1::discovery_request::Kind::Nack(nack)) = nack.kind else {
            panic!("not a nack: {nack:?}")
        };
        assert_eq!(nack.nonce, "7");
        assert!(nack.error.contains("holds no endpoints"), "{}", nack.error);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains("weft_config_updates_total{result=\"nack\",type=\"endpoints\"} 1"),
            "{text}"
        );
        assert_eq!(
            nack.rejected,
            vec![v1::TypeVersion {
                r#type: v1::ResourceType::Endpoints.into(),
                version: "v2".into()
            }]
        );
        // Whole sets go through untouched.
        let whole = v1::DiscoveryResponse {
            nonce: "8".into(),
            endpoints: Some(held()),
            ..Default::default()
        };
        let passed = resolve(None, whole.clone(), &metrics).unwrap();
        assert_eq!(passed.resp, whole);
        assert!(passed.endpoints.is_none());
        assert_eq!(passed.endpoint_version(), Some("v1"));
    }
}
