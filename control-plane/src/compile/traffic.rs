//! Compilation of the L7 traffic-management knobs (`crate::policy::traffic`): route filters,
//! query matches, subsets, the upstream HTTP version, TLS origination, DNS endpoints, locality
//! and the egress policy.

use std::collections::BTreeMap;

use weft_proto::v1::{
    query_match, DirectResponse, DnsEndpoint, EgressPolicy, Fault, HeaderMutation,
    HeaderValueOption, LocalityLb, Mirror, Node, QueryMatch, Redirect, RouteFilters,
    UpstreamProtocol, UpstreamTls,
};

use super::Inputs;
use crate::policy::{self, Protocol, Service, ServiceKey};

/// The HTTP version to a service's endpoints: as configured, else HTTP/2 for gRPC, HTTP/1.1
/// for a service with static endpoints (servers outside the mesh rarely speak h2c), else the
/// downstream request's (sidecars speak both).
pub(super) fn upstream_protocol(s: &Service) -> UpstreamProtocol {
    match s.upstream_protocol {
        Some(policy::UpstreamProtocol::Http1) => UpstreamProtocol::Http1,
        Some(policy::UpstreamProtocol::Http2) => UpstreamProtocol::Http2,
        Some(policy::UpstreamProtocol::Preserve) => UpstreamProtocol::Preserve,
        None if s.protocol == Protocol::Grpc => UpstreamProtocol::Http2,
        None if !s.endpoints.is_empty() => UpstreamProtocol::Http1,
        None => UpstreamProtocol::Preserve,
    }
}

/// TLS origination to the service's static endpoints.
pub(super) fn upstream_tls(s: &Service) -> Option<UpstreamTls> {
    s.tls.as_ref().map(|t| UpstreamTls {
        sni: t.sni.clone().unwrap_or_default(),
        roots_pem: t.roots_pem.clone().unwrap_or_default(),
        client_cert_file: t.client_cert_file.clone().unwrap_or_default(),
        client_key_file: t.client_key_file.clone().unwrap_or_default(),
    })
}

/// Default re-resolution period of a DNS endpoint (an answer's shorter TTL wins).
const DNS_REFRESH_MS: u64 = 30_000;

/// The static endpoints declared by DNS name.
pub(super) fn dns_endpoints(s: &Service) -> Vec<DnsEndpoint> {
    s.endpoints
        .iter()
        .filter_map(|e| {
            let host = e.host.as_ref()?;
            Some(DnsEndpoint {
                host: host.to_ascii_lowercase(),
                port: u32::from(e.port.unwrap_or(0)),
                weight: e.weight.max(1),
                refresh_ms: DNS_REFRESH_MS,
            })
        })
        .collect()
}

/// The host an external service's default route forwards with: its single DNS name (or its TLS
/// `sni`), so an app calling `http://stripe/` reaches `api.stripe.com` as `Host:
/// api.stripe.com`, the name the server's virtual host and certificate carry. `None` for a mesh
/// service or several DNS names.
pub(super) fn external_host(s: &Service) -> Option<String> {
    if let Some(sni) = s.tls.as_ref().and_then(|t| t.sni.as_ref()) {
        return Some(sni.to_ascii_lowercase());
    }
    let mut hosts = s.endpoints.iter().filter_map(|e| e.host.as_ref());
    let first = hosts.next()?;
    hosts
        .all(|h| h.eq_ignore_ascii_case(first))
        .then(|| first.to_ascii_lowercase())
}

/// Zone preference for a caller `node`: only when the service asks for it and the node has a
/// zone label.
pub(super) fn locality(s: &Service, node: &Node) -> Option<LocalityLb> {
    let l = s.locality.as_ref()?;
    let zone = node.labels.get(&l.zone_label)?;
    Some(LocalityLb {
        local_zone: zone.clone(),
        zone_label: l.zone_label.clone(),
        min_healthy_percent: l.min_healthy_percent,
    })
}

/// The cluster of the endpoints of `key` that carry every label of `subset`:
/// `<service>.<namespace>~<k>=<v>,...` (labels sorted).
pub fn subset_cluster_name(key: &ServiceKey, subset: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}~{}", key.cluster_name(), labels.join(","))
}

/// The query conditions of a route match.
pub(super) fn query(m: &policy::RouteMatch) -> Vec<QueryMatch> {
    m.query
        .iter()
        .map(|q| QueryMatch {
            name: q.name.clone(),
            kind: if let Some(e) = &q.exact {
                Some(query_match::Kind::Exact(e.clone()))
            } else if let Some(r) = &q.regex {
                Some(query_match::Kind::Regex(r.clone()))
            } else {
                q.present.map(query_match::Kind::Present)
            },
        })
        .collect()
}

fn mutation(m: &policy::HeaderMutation) -> HeaderMutation {
    let pairs = |map: &BTreeMap<String, String>| {
        map.iter()
            .map(|(k, v)| HeaderValueOption {
                name: k.to_ascii_lowercase(),
                value: v.clone(),
            })
            .collect()
    };
    HeaderMutation {
        add: pairs(&m.add),
        set: pairs(&m.set),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

/// Percent (0..=100, fractions allowed) in millionths.
fn ppm(percent: f64) -> u32 {
    // Validated to 0..=100: the product fits.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let v = (percent.clamp(0.0, 100.0) * 10_000.0).round() as u32;
    v
}

/// A route's filters, with the mirror's service resolved to its cluster (in the route's
/// service's namespace first).
pub(super) fn filters(
    inputs: &Inputs<'_>,
    service: &Service,
    route: &policy::Route,
) -> Option<RouteFilters> {
    let f = route.filters.as_ref()?;
    let rewrite = f.rewrite.clone().unwrap_or_default();
    Some(RouteFilters {
        request_headers: f.request_headers.as_ref().map(mutation),
        response_headers: f.response_headers.as_ref().map(mutation),
        rewrite_path_prefix: rewrite.path_prefix.unwrap_or_default(),
        rewrite_path: rewrite.path.unwrap_or_default(),
        rewrite_host: rewrite.host.unwrap_or_default(),
        redirect: f.redirect.as_ref().map(|r| Redirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            host: r.host.clone().unwrap_or_default(),
            port: u32::from(r.port.unwrap_or(0)),
            path: r.path.clone().unwrap_or_default(),
            path_prefix: r.path_prefix.clone().unwrap_or_default(),
            status: u32::from(r.status.unwrap_or(302)),
        }),
        direct_response: f.direct_response.as_ref().map(|d| DirectResponse {
            status: u32::from(d.status),
            body: d.body.clone(),
            content_type: d.content_type.clone().unwrap_or_default(),
        }),
        fault: f.fault.as_ref().map(|fault| Fault {
            delay_ms: fault.delay.as_ref().map_or(0, |d| {
                u64::try_from(d.fixed.as_millis()).unwrap_or(u64::MAX)
            }),
            delay_ppm: fault.delay.as_ref().map_or(0, |d| ppm(d.percent)),
            abort_http_status: fault
                .abort
                .as_ref()
                .and_then(|a| a.http_status)
                .map_or(0, u32::from),
            abort_grpc_status: fault
                .abort
                .as_ref()
                .and_then(|a| a.grpc_status)
                .unwrap_or(0),
            abort_ppm: fault.abort.as_ref().map_or(0, |a| ppm(a.percent)),
        }),
        mirror: f.mirror.as_ref().and_then(|m| {
            let key = inputs.resolve(&m.service, Some(&service.namespace))?;
            Some(Mirror {
                cluster: key.cluster_name(),
                ppm: ppm(m.percent),
                max_body_bytes: m.max_body_bytes,
            })
        }),
    })
}

/// The mesh's egress policy for outbound listeners (`None` when everything is allowed).
pub(super) fn egress(inputs: &Inputs<'_>) -> Option<EgressPolicy> {
    let e = inputs.mesh_egress();
    if *e == policy::Egress::default() {
        return None;
    }
    Some(EgressPolicy {
        deny_unknown: e.unknown == policy::EgressDefault::Deny,
        allow_hosts: e
            .allow_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    })
}
