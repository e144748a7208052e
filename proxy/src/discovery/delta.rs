//! Endpoint deltas (`DiscoveryResponse.endpoint_delta`, sent only to a proxy that advertises
//! [`CAPABILITY`]): the clusters added or changed since a set the proxy holds, and the names of
//! those removed, turned here into the whole set they describe before anything else sees the
//! response, so the build, the ACK's versions and `/config_dump` work on whole sets as before,
//! and [`crate::snapshot::Snapshot::build`] reuses every cluster the delta did not touch.
//!
//! A delta whose base is not the set held (a push lost or rejected on the way, a control plane
//! that lost track) is refused: the proxy NACKs it, keeps its config, and the control plane
//! answers with the whole set.

use std::collections::{HashMap, HashSet};

use weft_proto::v1;

use crate::metrics::Metrics;
use crate::snapshot::ResourceKind;

/// The `Node.capabilities` entry announcing that this proxy applies endpoint deltas.
pub const CAPABILITY: &str = "endpoint-delta";

/// The whole endpoint set `incoming` describes: itself when it is whole, else `held` with the
/// delta applied (clusters replaced or added, removed ones dropped, ordered by cluster name as
/// the control plane orders whole sets). An error names why a delta cannot be applied.
pub fn apply_endpoint_delta(
    held: Option<&v1::EndpointSet>,
    incoming: Incoming,
) -> Result<v1::EndpointSet, String> {
    let delta = match incoming {
        Incoming::Whole(set) => return Ok(set),
        Incoming::Delta(delta) => delta,
    };
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
    let mut changed: HashMap<String, v1::ClusterEndpoints> =
        HashMap::with_capacity(delta.clusters.len());
    for c in delta.clusters {
        if let Some(dup) = changed.insert(c.cluster.clone(), c) {
            return Err(format!(
                "endpoint delta {}: cluster {} listed twice",
                delta.version, dup.cluster
            ));
        }
    }
    let mut removed: HashSet<&str> = HashSet::with_capacity(delta.removed.len());
    for name in &delta.removed {
        if changed.contains_key(name) || !removed.insert(name) {
            return Err(format!(
                "endpoint delta {}: cluster {name} both removed and listed, or removed twice",
                delta.version
            ));
        }
    }
    let mut clusters = Vec::with_capacity(held.clusters.len() + changed.len());
    let mut gone = 0;
    for c in &held.clusters {
        if removed.contains(c.cluster.as_str()) {
            gone += 1;
        } else if let Some(new) = changed.remove(&c.cluster) {
            clusters.push(new);
        } else {
            clusters.push(c.clone());
        }
    }
    if gone != removed.len() {
        let held_names: HashSet<&str> = held.clusters.iter().map(|c| c.cluster.as_str()).collect();
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
        clusters.extend(changed.into_values());
        // Stable, and nearly sorted already: the held set is, the additions come last.
        clusters.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    }
    Ok(v1::EndpointSet {
        version: delta.version,
        clusters,
    })
}

/// An ENDPOINTS resource as a response carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `DiscoveryResponse.endpoints`.
    Whole(v1::EndpointSet),
    /// `DiscoveryResponse.endpoint_delta`.
    Delta(v1::EndpointDelta),
}

/// `resp` with an endpoint delta replaced by the whole set it describes against `held` (the
/// endpoints this proxy runs); any other response as it is. On a bad delta, the NACK to send
/// (boxed: a request is large, and the `Ok` path is the common one), counted in `metrics`'
/// `weft_config_updates_total{result="nack"}` for every type the response carried.
pub fn resolve(
    held: Option<&v1::EndpointSet>,
    mut resp: v1::DiscoveryResponse,
    metrics: &Metrics,
) -> Result<v1::DiscoveryResponse, Box<v1::DiscoveryRequest>> {
    let Some(delta) = resp.endpoint_delta.take() else {
        return Ok(resp);
    };
    let version = delta.version.clone();
    let error = if resp.endpoints.is_some() {
        format!("endpoint delta {version} arrived with a whole endpoint set in the same response")
    } else {
        match apply_endpoint_delta(held, Incoming::Delta(delta)) {
            Ok(set) => {
                resp.endpoints = Some(set);
                return Ok(resp);
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

    #[test]
    fn a_whole_set_passes_through() {
        let set = held();
        assert_eq!(
            apply_endpoint_delta(None, Incoming::Whole(set.clone())).unwrap(),
            set
        );
        let other = v1::EndpointSet {
            version: "x".into(),
            clusters: vec![],
        };
        assert_eq!(
            apply_endpoint_delta(Some(&set), Incoming::Whole(other.clone())).unwrap(),
            other
        );
    }

    #[test]
    fn changed_clusters_replace_held_ones_in_place_and_new_ones_are_sorted_in() {
        let merged = apply_endpoint_delta(
            Some(&held()),
            Incoming::Delta(delta(
                vec![
                    cluster("b.ns", "10.9.9.9:80"),
                    cluster("bb.ns", "10.8.8.8:80"),
                ],
                &[],
            )),
        )
        .unwrap();
        assert_eq!(merged.version, "v2");
        assert_eq!(
            merged.clusters,
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
        let merged = apply_endpoint_delta(
            Some(&held()),
            Incoming::Delta(delta(vec![], &["a.ns", "c.ns"])),
        )
        .unwrap();
        let names: Vec<&str> = merged.clusters.iter().map(|c| c.cluster.as_str()).collect();
        assert_eq!(names, ["b.ns", "inbound"]);
    }

    #[test]
    fn a_base_mismatch_is_an_error_naming_both_versions() {
        let mut d = delta(vec![cluster("b.ns", "10.9.9.9:80")], &[]);
        d.base_version = "v0".into();
        let err = apply_endpoint_delta(Some(&held()), Incoming::Delta(d.clone())).unwrap_err();
        assert!(err.contains("v0") && err.contains("holds v1"), "{err}");
        let err = apply_endpoint_delta(None, Incoming::Delta(d)).unwrap_err();
        assert!(err.contains("holds no endpoints"), "{err}");
    }

    #[test]
    fn inconsistent_deltas_are_errors() {
        let err = apply_endpoint_delta(Some(&held()), Incoming::Delta(delta(vec![], &["zz.ns"])))
            .unwrap_err();
        assert!(err.contains("zz.ns"), "{err}");
        let err = apply_endpoint_delta(
            Some(&held()),
            Incoming::Delta(delta(vec![cluster("a.ns", "10.1.1.1:80")], &["a.ns"])),
        )
        .unwrap_err();
        assert!(err.contains("a.ns"), "{err}");
        let err = apply_endpoint_delta(
            Some(&held()),
            Incoming::Delta(delta(
                vec![
                    cluster("a.ns", "10.1.1.1:80"),
                    cluster("a.ns", "10.1.1.2:80"),
                ],
                &[],
            )),
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
        let ok = resolve(Some(&held()), resp.clone(), &metrics).unwrap();
        assert!(ok.endpoint_delta.is_none());
        assert_eq!(ok.endpoints.as_ref().unwrap().version, "v2");
        assert_eq!(ok.endpoints.unwrap().clusters.len(), 4);
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
        assert_eq!(resolve(None, whole.clone(), &metrics).unwrap(), whole);
    }
}
