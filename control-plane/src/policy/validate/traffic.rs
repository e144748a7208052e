//! Validation of the L7 traffic knobs: endpoints by DNS name, the upstream HTTP version and TLS
//! origination, locality, query matches, route filters, subsets and the egress policy.

use super::{one_line, Collector, Path, Service};
use crate::policy::lookup::ServiceLookup;
use crate::policy::traffic::{HeaderMutation, RouteFilters};
use crate::policy::{Protocol, Route, UpstreamProtocol};

/// Variables header values may use.
const VARIABLES: [&str; 3] = ["peer_identity", "route", "request_id"];

/// Largest direct-response body.
const MAX_DIRECT_BODY: usize = 64 * 1024;

/// Largest mirrored request body.
const MAX_MIRROR_BODY: u32 = 16 << 20;

/// A DNS name: dot-separated labels of `[a-z0-9-]` (case-insensitive), at most 253 bytes.
pub(super) fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

pub(super) fn check_service(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, s: &Service) {
    for (ei, e) in s.endpoints.iter().enumerate() {
        let epath = path.at("endpoints", ei);
        match (&e.host, e.port, e.address.is_empty()) {
            (None, None, false) => {} // `address`, checked by the caller
            (Some(host), Some(port), true) => {
                if !is_dns_name(host) || host.parse::<std::net::IpAddr>().is_ok() {
                    c.push(
                        fi,
                        format!("{epath}.host"),
                        format!("{host:?} is not a DNS name (an IP goes in address: ip:port)"),
                    );
                }
                if port == 0 {
                    c.push(
                        fi,
                        format!("{epath}.port"),
                        "port 0 is out of range 1..=65535",
                    );
                }
            }
            (Some(_), None, true) => c.push(fi, format!("{epath}.port"), "host needs a port"),
            _ => c.push(
                fi,
                epath.to_string(),
                "exactly one of address (ip:port) or host and port is required",
            ),
        }
    }
    if let Some(p) = s.upstream_protocol {
        if s.protocol == Protocol::Tcp {
            c.push(
                fi,
                format!("{path}.upstream_protocol"),
                "tcp services have no HTTP version",
            );
        } else if s.protocol == Protocol::Grpc && p == UpstreamProtocol::Http1 {
            c.push(
                fi,
                format!("{path}.upstream_protocol"),
                "gRPC needs HTTP/2: http2 or preserve",
            );
        }
    }
    if let Some(tls) = &s.tls {
        let tpath = path.field("tls");
        if s.endpoints.is_empty() {
            c.push(
                fi,
                tpath.to_string(),
                "TLS origination is for static endpoints (services outside the mesh): declare endpoints",
            );
        }
        if tls.sni.is_none() && s.endpoints.iter().any(|e| e.host.is_none()) {
            c.push(
                fi,
                format!("{tpath}.sni"),
                "required with address (ip:port) endpoints: the name the server's certificate must carry",
            );
        }
        if let Some(sni) = &tls.sni {
            if !is_dns_name(sni) {
                c.push(
                    fi,
                    format!("{tpath}.sni"),
                    format!("{sni:?} is not a DNS name"),
                );
            }
        }
        if let Some(pem) = &tls.roots_pem {
            use rustls::pki_types::pem::PemObject as _;
            let certs: Result<Vec<_>, _> =
                rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
            match certs {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => c.push(fi, format!("{tpath}.roots_pem"), "holds no certificate"),
                Err(e) => c.push(fi, format!("{tpath}.roots_pem"), format!("bad PEM: {e}")),
            }
        }
        match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => {
                for (field, file) in [("client_cert_file", cert), ("client_key_file", key)] {
                    if !file.starts_with('/') {
                        c.push(
                            fi,
                            format!("{tpath}.{field}"),
                            format!("{file:?}: an absolute path on the sidecar's host"),
                        );
                    }
                }
            }
            (None, None) => {}
            _ => c.push(
                fi,
                tpath.to_string(),
                "client_cert_file and client_key_file go together",
            ),
        }
    }
    if let Some(l) = &s.locality {
        if l.zone_label.is_empty() {
            c.push(
                fi,
                format!("{path}.locality.zone_label"),
                "must not be empty",
            );
        }
        if l.min_healthy_percent > 100 {
            c.push(
                fi,
                format!("{path}.locality.min_healthy_percent"),
                format!("{} is out of range 0..=100", l.min_healthy_percent),
            );
        }
    }
}

fn check_percent(c: &mut Collector<'_>, fi: usize, path: String, p: f64) {
    if !(0.0..=100.0).contains(&p) {
        c.push(fi, path, format!("{p} is out of range 0..=100"));
    }
}

fn check_value(c: &mut Collector<'_>, fi: usize, path: String, value: &str) {
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            c.push(fi, path, format!("{value:?}: unclosed ${{"));
            return;
        };
        let name = &after[..end];
        if !VARIABLES.contains(&name) {
            c.push(
                fi,
                path,
                format!(
                    "unknown variable ${{{name}}} (known: {})",
                    VARIABLES.map(|v| format!("${{{v}}}")).join(", ")
                ),
            );
            return;
        }
        rest = &after[end + 1..];
    }
    if http::HeaderValue::from_str(value).is_err() {
        c.push(fi, path, format!("{value:?} is not a valid header value"));
    }
}

fn check_mutation(c: &mut Collector<'_>, fi: usize, path: &str, m: &HeaderMutation) {
    let named = m
        .add
        .iter()
        .map(|(k, v)| ("add", k, Some(v)))
        .chain(m.set.iter().map(|(k, v)| ("set", k, Some(v))))
        .chain(m.remove.iter().map(|k| ("remove", k, None)));
    for (what, name, value) in named {
        let field = format!("{path}.{what}.{name}");
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            c.push(
                fi,
                field.clone(),
                format!("{name:?} is not a valid header name"),
            );
        } else if lower.starts_with(':')
            || [
                "host",
                "connection",
                "transfer-encoding",
                "content-length",
                "upgrade",
            ]
            .contains(&lower.as_str())
        {
            c.push(
                fi,
                field.clone(),
                format!("{name:?} cannot be changed by a filter (use rewrite.host for the host)"),
            );
        } else if lower == "x-weft-peer-identity" && path.contains("request_headers") {
            c.push(
                fi,
                field.clone(),
                "x-weft-peer-identity is set by the callee's sidecar only",
            );
        }
        if let Some(v) = value {
            check_value(c, fi, field, v);
        }
    }
}

fn check_path(c: &mut Collector<'_>, fi: usize, path: String, value: &str) {
    if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
        c.push(
            fi,
            path,
            format!("{value:?} must start with '/' and hold no '?', '#' or space"),
        );
    }
}

fn check_filters(
    c: &mut Collector<'_>,
    fi: usize,
    path: &str,
    route: &Route,
    f: &RouteFilters,
    all: &ServiceLookup<'_>,
    namespace: Option<&str>,
) {
    let fpath = format!("{path}.filters");
    if let Some(m) = &f.request_headers {
        check_mutation(c, fi, &format!("{fpath}.request_headers"), m);
    }
    if let Some(m) = &f.response_headers {
        check_mutation(c, fi, &format!("{fpath}.response_headers"), m);
    }
    let prefix_matched = route
        .matcher
        .as_ref()
        .and_then(|m| m.path.as_ref())
        .is_some_and(|p| p.prefix.is_some());
    if let Some(r) = &f.rewrite {
        let rpath = format!("{fpath}.rewrite");
        if r.path.is_some() && r.path_prefix.is_some() {
            c.push(fi, rpath.clone(), "at most one of path, path_prefix");
        }
        if let Some(p) = &r.path {
            check_path(c, fi, format!("{rpath}.path"), p);
        }
        if let Some(p) = &r.path_prefix {
            check_path(c, fi, format!("{rpath}.path_prefix"), p);
            if !prefix_matched {
                c.push(
                    fi,
                    format!("{rpath}.path_prefix"),
                    "replaces the matched prefix: the route needs match.path.prefix",
                );
            }
        }
        if let Some(h) = &r.host {
            if !is_dns_name(h.split(':').next().unwrap_or_default()) {
                c.push(
                    fi,
                    format!("{rpath}.host"),
                    format!("{h:?} is not a host name"),
                );
            }
        }
    }
    if f.redirect.is_some() && f.direct_response.is_some() {
        c.push(
            fi,
            fpath.clone(),
            "at most one of redirect, direct_response",
        );
    }
    if let Some(r) = &f.redirect {
        let rpath = format!("{fpath}.redirect");
        if let Some(s) = &r.scheme {
            if s != "http" && s != "https" {
                c.push(
                    fi,
                    format!("{rpath}.scheme"),
                    format!("{s:?}: http or https"),
                );
            }
        }
        if let Some(h) = &r.host {
            if !is_dns_name(h) {
                c.push(
                    fi,
                    format!("{rpath}.host"),
                    format!("{h:?} is not a host name"),
                );
            }
        }
        if r.port == Some(0) {
            c.push(
                fi,
                format!("{rpath}.port"),
                "port 0 is out of range 1..=65535",
            );
        }
        if r.path.is_some() && r.path_prefix.is_some() {
            c.push(fi, rpath.clone(), "at most one of path, path_prefix");
        }
        if let Some(p) = &r.path {
            check_path(c, fi, format!("{rpath}.path"), p);
        }
        if let Some(p) = &r.path_prefix {
            check_path(c, fi, format!("{rpath}.path_prefix"), p);
            if !prefix_matched {
                c.push(
                    fi,
                    format!("{rpath}.path_prefix"),
                    "replaces the matched prefix: the route needs match.path.prefix",
                );
            }
        }
        if let Some(s) = r.status {
            if ![301, 302, 303, 307, 308].contains(&s) {
                c.push(
                    fi,
                    format!("{rpath}.status"),
                    format!("{s}: one of 301, 302, 303, 307, 308"),
                );
            }
        }
    }
    if let Some(d) = &f.direct_response {
        let dpath = format!("{fpath}.direct_response");
        if !(200..=599).contains(&d.status) {
            c.push(
                fi,
                format!("{dpath}.status"),
                format!("{} is out of range 200..=599", d.status),
            );
        }
        if d.body.len() > MAX_DIRECT_BODY {
            c.push(
                fi,
                format!("{dpath}.body"),
                format!("{} bytes, at most {MAX_DIRECT_BODY}", d.body.len()),
            );
        }
        if let Some(ct) = &d.content_type {
            if http::HeaderValue::from_str(ct).is_err() {
                c.push(
                    fi,
                    format!("{dpath}.content_type"),
                    format!("{ct:?} is not a header value"),
                );
            }
        }
    }
    if f.terminal() {
        if !route.destinations.is_empty() {
            c.push(
                fi,
                format!("{path}.destinations"),
                "a route that answers itself (redirect or direct_response) has no destinations",
            );
        }
        if f.mirror.is_some() || f.rewrite.is_some() {
            c.push(
                fi,
                fpath.clone(),
                "mirror and rewrite need a destination: not with redirect or direct_response",
            );
        }
    }
    if let Some(fault) = &f.fault {
        let fp = format!("{fpath}.fault");
        if fault.delay.is_none() && fault.abort.is_none() {
            c.push(fi, fp.clone(), "at least one of delay, abort");
        }
        if let Some(d) = &fault.delay {
            if d.fixed.is_zero() {
                c.push(fi, format!("{fp}.delay.fixed"), "must be greater than 0s");
            }
            check_percent(c, fi, format!("{fp}.delay.percent"), d.percent);
        }
        if let Some(a) = &fault.abort {
            check_percent(c, fi, format!("{fp}.abort.percent"), a.percent);
            match (a.http_status, a.grpc_status) {
                (None, None) => c.push(
                    fi,
                    format!("{fp}.abort"),
                    "http_status or grpc_status is required",
                ),
                (Some(s), _) if !(200..=599).contains(&s) => c.push(
                    fi,
                    format!("{fp}.abort.http_status"),
                    format!("{s} is out of range 200..=599"),
                ),
                (_, Some(g)) if !(1..=16).contains(&g) => c.push(
                    fi,
                    format!("{fp}.abort.grpc_status"),
                    format!("{g} is out of range 1..=16"),
                ),
                _ => {}
            }
        }
    }
    if let Some(m) = &f.mirror {
        let mp = format!("{fpath}.mirror");
        check_percent(c, fi, format!("{mp}.percent"), m.percent);
        if m.max_body_bytes > MAX_MIRROR_BODY {
            c.push(
                fi,
                format!("{mp}.max_body_bytes"),
                format!("{} is more than {MAX_MIRROR_BODY}", m.max_body_bytes),
            );
        }
        match all.resolve(&m.service, namespace) {
            Ok(key) => {
                if all
                    .with_key(&key.name, &key.namespace)
                    .any(|s| s.protocol == Protocol::Tcp)
                {
                    c.push(
                        fi,
                        format!("{mp}.service"),
                        format!("service \"{key}\" is tcp and can't receive mirrored requests"),
                    );
                }
            }
            Err(e) => c.push(fi, format!("{mp}.service"), e.to_string()),
        }
    }
}

/// Route-level checks: query matches, filters, subsets. `namespace` is the route's service's.
pub(super) fn check_route(
    c: &mut Collector<'_>,
    fi: usize,
    path: &Path<'_>,
    route: &Route,
    all: &ServiceLookup<'_>,
    namespace: Option<&str>,
) {
    if let Some(m) = &route.matcher {
        for (qi, q) in m.query.iter().enumerate() {
            let qpath = path.at("match.query", qi);
            if q.name.is_empty() {
                c.push(fi, format!("{qpath}.name"), "must not be empty");
            }
            let set = usize::from(q.exact.is_some())
                + usize::from(q.regex.is_some())
                + usize::from(q.present.is_some());
            if set != 1 {
                c.push(
                    fi,
                    qpath.to_string(),
                    format!("exactly one of exact, regex, present is required ({set} given)"),
                );
            }
            if let Some(re) = &q.regex {
                if let Err(e) = regex::Regex::new(re) {
                    c.push(
                        fi,
                        format!("{qpath}.regex"),
                        format!("invalid regex: {}", one_line(&e.to_string())),
                    );
                }
            }
        }
    }
    for (di, d) in route.destinations.iter().enumerate() {
        for (k, v) in &d.subset {
            if k.is_empty() || v.is_empty() {
                c.push(
                    fi,
                    format!("{path}.destinations[{di}].subset"),
                    "label names and values must not be empty",
                );
            }
        }
    }
    if let Some(f) = &route.filters {
        // Routes with filters are few: their checks take the path rendered.
        check_filters(c, fi, &path.to_string(), route, f, all, namespace);
    }
}

/// `mesh.egress`.
pub(super) fn check_egress(c: &mut Collector<'_>, fi: usize, egress: &crate::policy::Egress) {
    for (hi, h) in egress.allow_hosts.iter().enumerate() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        if !is_dns_name(name) {
            c.push(
                fi,
                format!("mesh.egress.allow_hosts[{hi}]"),
                format!("{h:?} is not a host name or *.suffix"),
            );
        }
    }
}
