//! Semantic validation of parsed policy files: names, uniqueness, references, ranges, matchers.

use std::cell::LazyCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use super::lookup::ServiceLookup;
use super::validate_cache::Reuse;
use super::{
    line_of, AuthorizationPolicy, Mesh, PathMatch, PolicyError, PolicyErrors, Protocol, Route,
    RouteMatch, Service, SourceFile,
};

mod resilience;
mod security;
mod traffic;
mod transparent;

/// Collects errors with their file and field path; lines are looked up at the end.
pub(super) struct Collector<'a> {
    files: &'a [SourceFile],
    errors: Vec<PolicyError>,
}

impl Collector<'_> {
    fn push(&mut self, file: usize, field: String, reason: impl Into<String>) {
        let source = &self.files[file];
        self.errors.push(PolicyError::Invalid {
            file: source.name.clone(),
            line: line_of(&source.content, &field),
            field,
            reason: reason.into(),
        });
    }

    fn location(&self, file: usize, field: &str) -> String {
        let source = &self.files[file];
        format!("{}:{}", source.name, line_of(&source.content, field))
    }
}

/// A field's path in its file (`services[3].endpoints[0]`), rendered only when an error names
/// it: validation walks every item of the set on every apply, and almost none has an error.
#[derive(Debug, Clone, Copy)]
pub(super) struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    name: &'a str,
    index: Option<usize>,
}

impl<'a> Path<'a> {
    /// `name[index]`, at the top of a file.
    pub(super) fn item(name: &'a str, index: usize) -> Self {
        Self {
            parent: None,
            name,
            index: Some(index),
        }
    }

    /// `<self>.name` (`name` may hold dots: `match.path`).
    pub(super) fn field(&'a self, name: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            name,
            index: None,
        }
    }

    /// `<self>.name[index]`.
    pub(super) fn at(&'a self, name: &'a str, index: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            name,
            index: Some(index),
        }
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            write!(f, "{parent}.")?;
        }
        f.write_str(self.name)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        Ok(())
    }
}

/// One file's declarations as validation sees them: borrowed from a fresh parse or from the
/// set in force (a file that did not change is not parsed again).
pub(super) struct FileView<'a> {
    pub(super) mesh: Option<&'a Mesh>,
    pub(super) services: &'a [Service],
    pub(super) routes: &'a [Route],
    pub(super) authorization: &'a [AuthorizationPolicy],
}

/// Checks every rule over the whole set; `parsed[i]` is the parse of `files[i]` and
/// `all_services` every service of `parsed`, in order. The checks `reuse` shows the set in
/// force already passed with the same inputs are skipped ([`super::validate_cache`]).
pub(super) fn validate(
    files: &[SourceFile],
    parsed: &[FileView<'_>],
    all_services: &[Service],
    reuse: &Reuse,
) -> Result<(), PolicyErrors> {
    let mut c = Collector {
        files,
        errors: Vec::new(),
    };
    let all = LazyCell::new(|| ServiceLookup::new(all_services));
    let check_services = !reuse.facts_unchanged;
    let check_routes = !reuse.all_declaring_unchanged(parsed.iter().map(|f| !f.routes.is_empty()));

    // Where each was first defined: (file, index in its list).
    let mut seen_services: HashMap<(&str, &str), (usize, usize)> = HashMap::new();
    let mut seen_routes: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut seen_matches: HashMap<String, (usize, usize, &str)> = HashMap::new();
    for (fi, file) in parsed.iter().enumerate() {
        let check_file = !reuse.unchanged[fi];
        for (si, service) in file.services.iter().enumerate() {
            let path = Path::item("services", si);
            let key = (service.name.as_str(), service.namespace.as_str());
            if !check_services {
            } else if let Some((first_file, first)) = seen_services.get(&key) {
                let first = c.location(*first_file, &Path::item("services", *first).to_string());
                c.push(
                    fi,
                    format!("{path}.name"),
                    format!(
                        "duplicate service \"{}.{}\" (first defined at {first})",
                        key.0, key.1
                    ),
                );
            } else {
                seen_services.insert(key, (fi, si));
            }
            if check_file {
                validate_service(&mut c, fi, &path, service, &all);
            }
        }
        for (ri, route) in file.routes.iter().enumerate() {
            let path = Path::item("routes", ri);
            let duplicate_name = check_routes && seen_routes.contains_key(route.name.as_str());
            if !check_routes {
            } else if let Some((first_file, first)) = seen_routes.get(route.name.as_str()) {
                let first = c.location(*first_file, &Path::item("routes", *first).to_string());
                c.push(
                    fi,
                    format!("{path}.name"),
                    format!(
                        "duplicate route \"{}\" (first defined at {first})",
                        route.name
                    ),
                );
            } else {
                seen_routes.insert(&route.name, (fi, ri));
            }
            if check_file {
                validate_route(&mut c, fi, &path, route, &all);
            }
            if !check_routes {
                continue;
            }
            // A repeated name is already an error; don't report its match a second time.
            if let Some(key) = match_key(route, &all).filter(|_| !duplicate_name) {
                if let Some((first_file, first, first_name)) = seen_matches.get(&key) {
                    let first = c.location(*first_file, &Path::item("routes", *first).to_string());
                    let field = if route.matcher.is_some() {
                        format!("{path}.match")
                    } else {
                        path.to_string()
                    };
                    c.push(
                        fi,
                        field,
                        format!(
                            "duplicate route: matches exactly the requests of route \"{first_name}\" \
                             (defined at {first}) for the same service, so it could never be selected"
                        ),
                    );
                } else {
                    seen_matches.insert(key, (fi, ri, &route.name));
                }
            }
        }
    }
    security::check(&mut c, parsed, &all, reuse);
    transparent::check(&mut c, parsed, all_services);
    for (fi, file) in parsed.iter().enumerate() {
        if let Some(mesh) = &file.mesh {
            traffic::check_egress(&mut c, fi, &mesh.egress);
        }
    }
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(PolicyErrors(c.errors))
    }
}

/// What makes two routes indistinguishable: the service they attach to and their normalized
/// match (path, headers by name, methods as a set). `hosts` are left out on purpose: compiled
/// hosts are aliases of the *service*, shared by all its routes (ARCHITECTURE.md), so two routes
/// that differ only in `hosts` still shadow each other. `None` when the service does not resolve
/// (that error is reported on its own).
fn match_key(route: &Route, all: &ServiceLookup<'_>) -> Option<String> {
    let service = all.resolve(&route.service, None).ok()?;
    let none = RouteMatch::default();
    let m = route.matcher.as_ref().unwrap_or(&none);
    let mut headers: Vec<String> = m
        .headers
        .iter()
        .map(|h| {
            format!(
                "{}|{:?}|{:?}|{:?}|{}",
                h.name.to_ascii_lowercase(),
                h.exact,
                h.regex,
                h.present,
                h.invert
            )
        })
        .collect();
    headers.sort();
    headers.dedup();
    let mut methods: Vec<String> = m.methods.iter().map(|x| x.to_ascii_uppercase()).collect();
    methods.sort();
    methods.dedup();
    let mut query: Vec<String> = m.query.iter().map(|q| format!("{q:?}")).collect();
    query.sort();
    query.dedup();
    Some(format!(
        "{service}|{:?}|{headers:?}|{methods:?}|{query:?}",
        m.path
    ))
}

/// Checks an endpoint address: `ip:port` with a port in 1..=65535.
fn check_address(address: &str) -> Result<(), String> {
    match address.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!("{address:?}: port 0 is out of range 1..=65535")),
        Ok(_) => Ok(()),
        Err(_) => {
            // Say "out of range" rather than "not an address" when only the port is wrong.
            if let Some((host, port)) = address.rsplit_once(':') {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.parse::<std::net::IpAddr>().is_ok() {
                    if let Ok(p) = port.parse::<u64>() {
                        return Err(format!("{address:?}: port {p} is out of range 1..=65535"));
                    }
                }
            }
            Err(format!("{address:?} is not an ip:port address"))
        }
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters (RFC 1123 label).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

const DNS_LABEL_RULE: &str =
    "must be a DNS label: lower-case letters, digits and '-', at most 63 characters, starting and ending with a letter or digit";

fn validate_service<'s>(
    c: &mut Collector<'_>,
    fi: usize,
    path: &Path<'_>,
    service: &Service,
    all: &LazyCell<ServiceLookup<'s>, impl FnOnce() -> ServiceLookup<'s>>,
) {
    if !is_dns_label(&service.name) {
        c.push(
            fi,
            format!("{path}.name"),
            format!("{:?} {DNS_LABEL_RULE}", service.name),
        );
    }
    if !is_dns_label(&service.namespace) {
        c.push(
            fi,
            format!("{path}.namespace"),
            format!("{:?} {DNS_LABEL_RULE}", service.namespace),
        );
    }
    match (service.protocol, service.port) {
        (Protocol::Tcp, None) => c.push(
            fi,
            format!("{path}.port"),
            "tcp services need a port (1..=65535)",
        ),
        (Protocol::Tcp, Some(p)) if !(1..=65535).contains(&p) => c.push(
            fi,
            format!("{path}.port"),
            format!("port {p} is out of range 1..=65535"),
        ),
        (Protocol::Http | Protocol::Grpc, Some(_)) => c.push(
            fi,
            format!("{path}.port"),
            "port is only valid for tcp services",
        ),
        _ => {}
    }
    if service.connect_timeout.is_zero() {
        c.push(
            fi,
            format!("{path}.connect_timeout"),
            "must be greater than 0s",
        );
    }
    if let Some(deps) = &service.dependencies {
        for (di, dep) in deps.iter().enumerate() {
            if let Err(e) = all.resolve(dep, Some(&service.namespace)) {
                c.push(fi, format!("{path}.dependencies[{di}]"), e.to_string());
            }
        }
    }
    for (ei, endpoint) in service.endpoints.iter().enumerate() {
        if endpoint.host.is_some() || endpoint.port.is_some() {
            continue; // by DNS name: `traffic::check_service`
        }
        if let Err(reason) = check_address(&endpoint.address) {
            c.push(fi, format!("{path}.endpoints[{ei}].address"), reason);
        }
    }
    resilience::check_service(c, fi, path, service);
    traffic::check_service(c, fi, path, service);
}

fn validate_route(
    c: &mut Collector<'_>,
    fi: usize,
    path: &Path<'_>,
    route: &Route,
    all: &ServiceLookup<'_>,
) {
    if !is_dns_label(&route.name) {
        c.push(
            fi,
            format!("{path}.name"),
            format!("{:?} {DNS_LABEL_RULE}", route.name),
        );
    }
    let mut context_namespace = None;
    match all.resolve(&route.service, None) {
        Ok(key) => {
            if let Some(s) = all.get(&key.name, &key.namespace) {
                if s.protocol == Protocol::Tcp {
                    c.push(
                        fi,
                        format!("{path}.service"),
                        format!("service \"{key}\" is tcp: tcp services can't have routes"),
                    );
                }
            }
            context_namespace = Some(key.namespace);
        }
        Err(e) => c.push(fi, format!("{path}.service"), e.to_string()),
    }
    for (hi, host) in route.hosts.iter().enumerate() {
        if host.is_empty() || host.contains(|ch: char| ch.is_whitespace() || ch == '/') {
            c.push(
                fi,
                format!("{path}.hosts[{hi}]"),
                format!("{host:?} is not a host name"),
            );
        }
    }
    if let Some(m) = &route.matcher {
        if let Some(p) = &m.path {
            check_path_match(c, fi, &path.field("match.path"), p);
        }
        for (hi, h) in m.headers.iter().enumerate() {
            let hpath = path.at("match.headers", hi);
            if http::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                c.push(
                    fi,
                    format!("{hpath}.name"),
                    format!("{:?} is not a valid header name", h.name),
                );
            }
            let set = usize::from(h.exact.is_some())
                + usize::from(h.regex.is_some())
                + usize::from(h.present.is_some());
            if set != 1 {
                c.push(
                    fi,
                    hpath.to_string(),
                    format!("exactly one of exact, regex, present is required ({set} given)"),
                );
            }
            if let Some(re) = &h.regex {
                if let Err(e) = regex::Regex::new(re) {
                    c.push(
                        fi,
                        format!("{hpath}.regex"),
                        format!("invalid regex: {}", one_line(&e.to_string())),
                    );
                }
            }
        }
        for (mi, method) in m.methods.iter().enumerate() {
            check_method(c, fi, &path.at("match.methods", mi), method);
        }
    }
    let terminal = route.filters.as_ref().is_some_and(|f| f.terminal());
    if route.destinations.is_empty() && !terminal {
        c.push(
            fi,
            format!("{path}.destinations"),
            "at least one destination is required (or a redirect / direct_response filter)",
        );
    }
    for (di, d) in route.destinations.iter().enumerate() {
        match all.resolve(&d.service, context_namespace.as_deref()) {
            Ok(key) => {
                let tcp = all
                    .with_key(&key.name, &key.namespace)
                    .any(|s| s.protocol == Protocol::Tcp);
                if tcp {
                    c.push(
                        fi,
                        format!("{path}.destinations[{di}].service"),
                        format!("service \"{key}\" is tcp and can't be a route destination"),
                    );
                }
            }
            Err(e) => c.push(
                fi,
                format!("{path}.destinations[{di}].service"),
                e.to_string(),
            ),
        }
    }
    if route.destinations.len() > 1 {
        let mut sum = 0u64;
        for (di, d) in route.destinations.iter().enumerate() {
            match d.weight {
                Some(w) => sum += u64::from(w),
                None => c.push(
                    fi,
                    format!("{path}.destinations[{di}].weight"),
                    "a weight is required when a route has several destinations",
                ),
            }
        }
        if route.destinations.iter().all(|d| d.weight.is_some()) && sum != 100 {
            c.push(
                fi,
                format!("{path}.destinations"),
                format!("weights must sum to 100 (they sum to {sum})"),
            );
        }
    } else if let Some(w) = route.destinations.first().and_then(|d| d.weight) {
        if w != 100 {
            c.push(
                fi,
                format!("{path}.destinations[0].weight"),
                format!("a single destination takes all traffic: weight must be 100 or omitted (got {w})"),
            );
        }
    }
    if let Some(retry) = &route.retry {
        resilience::check_retry(c, fi, &path.field("retry"), retry);
    }
    if let Some(limit) = &route.rate_limit {
        resilience::check_rate_limit(c, fi, &path.field("rate_limit"), limit);
    }
    traffic::check_route(c, fi, path, route, all, context_namespace.as_deref());
}

/// Exactly one of exact, prefix, regex; exact and prefix start with '/'; the regex compiles.
pub(super) fn check_path_match(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, p: &PathMatch) {
    let set = [&p.exact, &p.prefix, &p.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        c.push(
            fi,
            path.to_string(),
            format!("exactly one of exact, prefix, regex is required ({set} given)"),
        );
    }
    for (field, value) in [("exact", &p.exact), ("prefix", &p.prefix)] {
        if let Some(v) = value {
            if !v.starts_with('/') {
                c.push(
                    fi,
                    format!("{path}.{field}"),
                    format!("{v:?} must start with '/'"),
                );
            } else if let Some(reason) = not_normalized(v) {
                c.push(fi, format!("{path}.{field}"), format!("{v:?} {reason}"));
            }
        }
    }
    if let Some(re) = &p.regex {
        if let Err(e) = regex::Regex::new(re) {
            c.push(
                fi,
                format!("{path}.regex"),
                format!("invalid regex: {}", one_line(&e.to_string())),
            );
        }
    }
}

/// Why a path in a match can never match a request, if it cannot: sidecars normalize request
/// paths before matching (dot segments removed, `//` merged, `%` escapes of unreserved
/// characters decoded, a query never part of the path).
fn not_normalized(p: &str) -> Option<&'static str> {
    let segments: Vec<&str> = p[1..].split('/').collect();
    let last = segments.len() - 1;
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Some("has a '.' or '..' segment: request paths are normalized before matching, write the resolved path");
    }
    if segments
        .iter()
        .enumerate()
        .any(|(i, s)| s.is_empty() && i != last)
    {
        return Some("has an empty segment ('//'): request paths are normalized before matching");
    }
    if p.contains(['?', '#', '\\']) {
        return Some("may not contain '?', '#' or '\\'");
    }
    None
}

/// An HTTP method token.
pub(super) fn check_method(c: &mut Collector<'_>, fi: usize, path: &Path<'_>, method: &str) {
    if method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err() {
        c.push(
            fi,
            path.to_string(),
            format!("{method:?} is not an HTTP method"),
        );
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
