//! HTTP route tables: compiling the proto `RouteTable` into an indexed matcher, and matching a
//! request (host, path, headers, method, query parameters) to a route. Each route also carries
//! its compiled filters ([`crate::filters`]), built here once per snapshot.
//!
//! Matching is "first match wins, in declared order". To avoid scanning every route for every
//! request, routes are indexed by exact host name: each exact host maps to the ordered list of
//! routes that can match it (routes naming it, wildcard routes covering it, host-less routes);
//! hosts not in the index scan only the wildcard and host-less routes.
//!
//! Query parameters (`match.query`) are parsed at most once per request, and only when a
//! candidate route has query conditions ([`QueryParams`]): split on `&`, each name and value
//! decoded as `application/x-www-form-urlencoded` (the URL Standard: `+` is a space, `%XX` a
//! byte, a malformed escape kept as is, invalid UTF-8 replaced by U+FFFD); decoding allocates
//! only for a name or value that has an escape or `+`. A condition looks at the **first**
//! occurrence of its name (the Gateway API's recommendation for repeated parameters): `exact`
//! compares the decoded value, `regex` must match the whole decoded value, `present` holds for
//! `?name`, `?name=` and any value. Names and values are case-sensitive.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use regex::Regex;
use weft_proto::v1;

use crate::balance::WeightedPick;
use crate::cluster::Cluster;
use crate::metrics::{Metrics, RequestMetrics};
use crate::snapshot::Rejection;

/// A compiled route table, bound to the direction of the listener that uses it (for metrics).
#[derive(Debug)]
pub struct RouteTable {
    /// Table name.
    pub name: Arc<str>,
    /// Shared with the next snapshot's table when unchanged ([`RouteTable::build_reusing`],
    /// [`RouteTable::rebuild_for_clusters`]): each route, and the whole list when no route
    /// was rebuilt.
    routes: Arc<[Arc<Route>]>,
    /// Depends on the routes' hosts only: shared while every route's proto is unchanged.
    index: Arc<HostIndex>,
}

/// Which routes may match a host.
#[derive(Debug)]
struct HostIndex {
    /// Exact host -> indices into `routes` that may match it, in order. The keys are the
    /// routes' own host strings (shared, not copied). Hashed with foldhash, keyed with a random
    /// per-process seed (cheaper than SipHash on every request's `Host`): the keys are the
    /// configured hosts, a request only probes, and the seed keeps even the configured keys'
    /// placement unpredictable, so no choice of `Host` headers can make lookups degrade.
    by_host: HashMap<Arc<str>, Box<[u32]>, foldhash::fast::RandomState>,
    /// Indices of routes with wildcard hosts or no hosts, in order.
    fallback: Box<[u32]>,
}

/// One route.
#[derive(Debug)]
pub struct Route {
    /// Route name (a metric label).
    pub name: Arc<str>,
    /// Shared by the routes of one table build whose `hosts` are equal ([`SharedParts`]).
    hosts: Arc<[HostPattern]>,
    path: PathMatcher,
    /// Shared by the routes of one table build whose header conditions are equal.
    headers: Arc<[HeaderMatcher]>,
    methods: Box<[Method]>,
    query: Box<[QueryMatcher]>,
    /// Weighted clusters (none for a route whose filters answer every request).
    pub destinations: WeightedPick<Destination>,
    /// Whether its filters mirror to a cluster (which [`Route::same_clusters`] cannot see).
    mirrors: bool,
    /// Route timeout overriding the cluster's default.
    pub timeout: Option<Duration>,
    /// Retry policy; `None` = no retries.
    pub retry: Option<Arc<crate::retry::RetryPolicy>>,
    /// Local rate limit and its `weft_rate_limited_total{scope="route"}` counter.
    pub rate_limit: Option<(crate::ratelimit::RateLimiter, crate::metrics::LeasedCounter)>,
    /// Filters (`None` = none), compiled with the route.
    pub filters: Option<Arc<crate::filters::RouteFilters>>,
}

/// A route's destination cluster and the lazily resolved metric handles for the pair.
#[derive(Debug)]
pub struct Destination {
    /// The cluster.
    pub cluster: Arc<Cluster>,
    metrics: OnceLock<Arc<RequestMetrics>>,
    /// Shared by the routes of one table build (a `Metrics` is a few hundred bytes of handles).
    family: Arc<Metrics>,
    direction: &'static str,
    route: Arc<str>,
}

impl Destination {
    /// Metric handles for (direction, route, cluster); resolved on first use (or when the
    /// snapshot is built, if a live snapshot already uses them), then lock-free.
    pub fn metrics(&self) -> &Arc<RequestMetrics> {
        self.metrics.get_or_init(|| {
            self.family
                .request_metrics(self.direction, &self.route, &self.cluster.name)
        })
    }
}

#[derive(Debug)]
enum HostPattern {
    Exact(Arc<str>),
    /// `*.example.com` stored as `.example.com`.
    Suffix(Box<str>),
}

impl HostPattern {
    /// Whether `host` (normalized: lower case, no port) is one this pattern names.
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => **h == *host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(&**s),
        }
    }
}

#[derive(Debug)]
enum PathMatcher {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
struct HeaderMatcher {
    name: HeaderName,
    kind: HeaderKind,
    invert: bool,
}

#[derive(Debug)]
enum HeaderKind {
    Exact(HeaderValue),
    Regex(Regex),
    Present,
}

#[derive(Debug)]
struct QueryMatcher {
    /// Decoded name.
    name: Box<str>,
    kind: QueryKind,
}

#[derive(Debug)]
enum QueryKind {
    /// The decoded value.
    Exact(Box<str>),
    /// Matches the whole decoded value.
    Regex(Regex),
    Present,
}

/// The request facts routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Host, lower case, port stripped (see [`normalize_host`]).
    pub host: &'a str,
    /// URI path without the query.
    pub path: &'a str,
    /// The raw query (after `?`), if any.
    pub query: Option<&'a str>,
    /// Method.
    pub method: &'a Method,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// Compiles a regex that must match the whole input.
fn full_regex(re: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{re})$"))
}

impl RouteTable {
    /// Compiles `table` for a listener of `direction`; clusters are resolved by name.
    pub fn build(
        table: &v1::RouteTable,
        clusters: &HashMap<Arc<str>, Arc<Cluster>>,
        metrics: &Metrics,
        direction: &'static str,
    ) -> Result<Self, Vec<Rejection>> {
        Self::build_reusing(table, clusters, metrics, direction, None)
    }

    /// [`RouteTable::build`], taking over from `previous` (a table built by the previous
    /// snapshot for a listener of the same direction, with the proto it was built from) every
    /// route whose proto is equal and whose clusters (destinations, mirror) are the same
    /// `Arc`s in `clusters`, and the host index when every route's proto is equal. The caller
    /// passes `previous` only when `metrics` is the family `previous` was built with.
    pub fn build_reusing(
        table: &v1::RouteTable,
        clusters: &HashMap<Arc<str>, Arc<Cluster>>,
        metrics: &Metrics,
        direction: &'static str,
        previous: Option<(&v1::RouteTable, &RouteTable)>,
    ) -> Result<Self, Vec<Rejection>> {
        // Position i of a built table is route i of its proto (a table is built whole or not).
        let previous = previous.filter(|(p, t)| p.routes.len() == t.routes.len());
        let mut errors = Vec::new();
        let mut routes = Vec::with_capacity(table.routes.len());
        // The family of the routes built here, made on the first one.
        let mut family: Option<Arc<Metrics>> = None;
        let mut shared = SharedParts::default();
        // Every route's proto equal to the previous one's: the host index is still right.
        let mut same_protos =
            previous.is_some_and(|(proto, _)| proto.routes.len() == table.routes.len());
        for (i, r) in table.routes.iter().enumerate() {
            let kept = previous.and_then(|(proto, built)| {
                let equal = proto.routes.get(i) == Some(r);
                same_protos &= equal;
                let old = built.routes.get(i)?;
                (equal && old.same_clusters(clusters)).then(|| Arc::clone(old))
            });
            if let Some(old) = kept {
                routes.push(old);
                continue;
            }
            let family = family.get_or_insert_with(|| Arc::new(metrics.clone()));
            match Route::build(
                &table.name,
                i,
                r,
                clusters,
                metrics,
                family,
                direction,
                &mut shared,
            ) {
                Ok(route) => routes.push(Arc::new(route)),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let index = match previous {
            Some((_, built)) if same_protos => Arc::clone(&built.index),
            _ => Arc::new(HostIndex::of(&routes)),
        };
        Ok(Self {
            name: table.name.as_str().into(),
            routes: routes.into(),
            index,
        })
    }

    /// Whether a route of this table names `host` (lower case) in its `hosts`: exactly, or as
    /// the wildcard itself (`*.example.com`). What CONNECT's egress check calls a mesh
    /// service's host name (`crate::http::connect::is_known`); not request routing.
    pub fn names_host(&self, host: &str) -> bool {
        if self.index.by_host.contains_key(host) {
            return true;
        }
        host.strip_prefix('*').is_some_and(|suffix| {
            self.routes
                .iter()
                .flat_map(|r| r.hosts.iter())
                .any(|h| matches!(h, HostPattern::Suffix(s) if **s == *suffix))
        })
    }

    /// `previous` (a table built by the previous snapshot, for a listener of the same
    /// direction and with the family `metrics`, from the very route protos this build has)
    /// again, for clusters some of which were rebuilt: only the routes that hold a cluster
    /// that is no longer the same `Arc` in `clusters` (or that mirror) are built again, from
    /// their protos, which `protos_at` returns for the ascending route indices it is given;
    /// every other route and the host index (the same protos name the same hosts) are
    /// `previous`' own. No route proto is compared: an endpoint-only push at 5,000 services
    /// reads the 2 protos of the changed service, not the 10,000 of the table. `replaced`,
    /// when the caller knows it, is every cluster of the previous snapshot that is not in
    /// `clusters` any more (rebuilt or gone): a route holds one of those or none, which is
    /// checked without looking each route's clusters up by name.
    pub fn rebuild_for_clusters(
        previous: &RouteTable,
        clusters: &HashMap<Arc<str>, Arc<Cluster>>,
        replaced: Option<&[Arc<Cluster>]>,
        metrics: &Metrics,
        direction: &'static str,
        protos_at: impl FnOnce(&[usize]) -> Result<Vec<v1::Route>, Rejection>,
    ) -> Result<Self, Vec<Rejection>> {
        let kept = |r: &Route| match replaced {
            Some(replaced) => {
                !r.mirrors
                    && !r
                        .destinations
                        .items()
                        .any(|d| replaced.iter().any(|c| Arc::ptr_eq(c, &d.cluster)))
            }
            None => r.same_clusters(clusters),
        };
        let stale: Vec<usize> = previous
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| !kept(r))
            .map(|(i, _)| i)
            .collect();
        if stale.is_empty() {
            return Ok(Self {
                name: Arc::clone(&previous.name),
                routes: Arc::clone(&previous.routes),
                index: Arc::clone(&previous.index),
            });
        }
        let protos = protos_at(&stale).map_err(|e| vec![e])?;
        if protos.len() != stale.len() {
            return Err(vec![Rejection::new(
                format!("route table {:?}", previous.name),
                "routes",
                format!(
                    "{} of the {} routes to rebuild were found in the held set",
                    protos.len(),
                    stale.len()
                ),
            )]);
        }
        let mut routes = previous.routes.to_vec();
        let family = Arc::new(metrics.clone());
        let mut shared = SharedParts::default();
        let mut errors = Vec::new();
        for (&i, r) in stale.iter().zip(&protos) {
            match Route::build(
                &previous.name,
                i,
                r,
                clusters,
                metrics,
                &family,
                direction,
                &mut shared,
            ) {
                Ok(route) => routes[i] = Arc::new(route),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            name: Arc::clone(&previous.name),
            routes: routes.into(),
            index: Arc::clone(&previous.index),
        })
    }

    /// Whether `self` and `other` share route `i` (tests of the reuse).
    #[cfg(test)]
    pub(crate) fn shares_route(&self, other: &RouteTable, i: usize) -> bool {
        Arc::ptr_eq(&self.routes[i], &other.routes[i])
    }

    /// Whether `self` and `other` share their host index and whole route list (tests).
    #[cfg(test)]
    pub(crate) fn shares_index_and_list(&self, other: &RouteTable) -> (bool, bool) {
        (
            Arc::ptr_eq(&self.index, &other.index),
            Arc::ptr_eq(&self.routes, &other.routes),
        )
    }
}

impl HostIndex {
    fn of(routes: &[Arc<Route>]) -> Self {
        let mut by_host: HashMap<Arc<str>, Vec<u32>, foldhash::fast::RandomState> =
            HashMap::default();
        for r in routes {
            for h in r.hosts.iter() {
                if let HostPattern::Exact(h) = h {
                    by_host.entry(Arc::clone(h)).or_default();
                }
            }
        }
        // Each host's list holds, in declared order, every route that matches that host: the
        // routes naming it exactly, the routes without hosts, the wildcard routes it ends with.
        // One pass over the routes, each touching only the lists it belongs to (a route with
        // exact hosts only touches those: linear in the table, where comparing every route with
        // every host was quadratic: 2,000 routes x 4,000 hosts at 1,000 services).
        let mut fallback = Vec::new();
        let push = |list: &mut Vec<u32>, i: u32| {
            // A route naming a host twice, or both exactly and by a wildcard, is listed once.
            if list.last() != Some(&i) {
                list.push(i);
            }
        };
        for (i, r) in routes.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if r.hosts.is_empty() {
                fallback.push(i);
                for list in by_host.values_mut() {
                    push(list, i);
                }
                continue;
            }
            if r.hosts.iter().any(|h| matches!(h, HostPattern::Suffix(_))) {
                fallback.push(i);
            }
            for h in r.hosts.iter() {
                match h {
                    HostPattern::Exact(h) => {
                        if let Some(list) = by_host.get_mut(h) {
                            push(list, i);
                        }
                    }
                    HostPattern::Suffix(_) => {
                        for (host, list) in &mut by_host {
                            if h.matches(host) {
                                push(list, i);
                            }
                        }
                    }
                }
            }
        }
        Self {
            by_host: by_host.into_iter().map(|(k, v)| (k, v.into())).collect(),
            fallback: fallback.into(),
        }
    }
}

impl RouteTable {
    /// The first route matching `req`, in declared order.
    pub fn find(&self, req: &RequestInfo<'_>) -> Option<&Route> {
        // Parsed on first use by a route with query conditions, then shared by the rest.
        let mut query = QueryParams::new(req.query);
        match self.index.by_host.get(req.host) {
            Some(candidates) => candidates
                .iter()
                .map(|&i| &*self.routes[i as usize])
                .find(|r| r.matches_rest(req, &mut query)),
            None => self
                .index
                .fallback
                .iter()
                .map(|&i| &*self.routes[i as usize])
                .find(|r| r.matches_host(req.host) && r.matches_rest(req, &mut query)),
        }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// What the routes of one table build share instead of each holding a copy: the compiled
/// `hosts` of an equal host list (a service's routes all name its 4 host names) and the
/// compiled header conditions of an equal list (`x-canary: true` on every canary route). At
/// thousands of services this is a few hundred bytes and several allocations per route.
#[derive(Default)]
struct SharedParts<'p> {
    hosts: HashMap<&'p [String], Arc<[HostPattern]>>,
    /// Keyed by the protos' encoding (protos are not `Hash`).
    headers: HashMap<Vec<u8>, Arc<[HeaderMatcher]>>,
    /// Exact host names already made, shared by every list naming them (and the host index).
    names: HashSet<Arc<str>>,
}

impl SharedParts<'_> {
    fn name(&mut self, host: &str) -> Arc<str> {
        if let Some(n) = self.names.get(host) {
            return Arc::clone(n);
        }
        let n: Arc<str> = host.into();
        self.names.insert(Arc::clone(&n));
        n
    }
}

impl Route {
    /// Whether every cluster this route holds is the cluster of that name in `clusters` (its
    /// destinations; a route that mirrors never is).
    fn same_clusters(&self, clusters: &HashMap<Arc<str>, Arc<Cluster>>) -> bool {
        let same = |c: &Arc<Cluster>| {
            clusters
                .get(&*c.name)
                .is_some_and(|now| Arc::ptr_eq(now, c))
        };
        // A mirror's cluster is not visible from here: a route that mirrors is rebuilt.
        !self.mirrors && self.destinations.items().all(|d| same(&d.cluster))
    }

    #[allow(clippy::too_many_arguments)]
    fn build<'p>(
        table: &str,
        index: usize,
        r: &'p v1::Route,
        clusters: &HashMap<Arc<str>, Arc<Cluster>>,
        metrics: &Metrics,
        family: &Arc<Metrics>,
        direction: &'static str,
        shared: &mut SharedParts<'p>,
    ) -> Result<Self, Vec<Rejection>> {
        let label = if r.name.is_empty() {
            format!("#{index}")
        } else {
            r.name.clone()
        };
        let resource = format!("route table {table:?} route {label:?}");
        let mut errors = Vec::new();
        let mut reject = |field: String, reason: String| {
            errors.push(Rejection::new(resource.clone(), field, reason));
        };
        let name: Arc<str> = label.as_str().into();
        let no_match = v1::RouteMatch::default();
        let m = r.r#match.as_ref().unwrap_or(&no_match);

        let host_list: &'p [String] = r.r#match.as_ref().map_or(&[], |m| m.hosts.as_slice());
        let known_hosts = shared.hosts.get(host_list).cloned();
        let mut hosts = Vec::new();
        // A list compiled (and valid) for an earlier route of this build is not compiled again.
        let to_compile = if known_hosts.is_some() {
            &[][..]
        } else {
            host_list
        };
        for (i, h) in to_compile.iter().enumerate() {
            let h = h.trim().to_ascii_lowercase();
            if h == "*" {
                // "*" alone means any host: same as no hosts at all.
                hosts.clear();
                break;
            }
            if let Some(suffix) = h.strip_prefix('*') {
                if !suffix.starts_with('.') || suffix.len() < 2 || suffix.contains('*') {
                    reject(
                        format!("match.hosts[{i}]"),
                        format!("bad wildcard {h:?}, want *.domain"),
                    );
                    continue;
                }
                hosts.push(HostPattern::Suffix(suffix.into()));
            } else if h.is_empty() || h.contains(['*', '/', ' ']) {
                reject(
                    format!("match.hosts[{i}]"),
                    format!("invalid host name {h:?}"),
                );
            } else {
                hosts.push(HostPattern::Exact(shared.name(&h)));
            }
        }

        use v1::path_match::Kind as P;
        let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => PathMatcher::Any,
            Some(P::Exact(p)) => PathMatcher::Exact(p.as_str().into()),
            Some(P::Prefix(p)) if p.is_empty() || p == "/" => PathMatcher::Any,
            Some(P::Prefix(p)) => PathMatcher::Prefix(p.as_str().into()),
            Some(P::Regex(re)) => match full_regex(re) {
                Ok(re) => PathMatcher::Regex(re),
                Err(e) => {
                    reject(
                        "match.path.regex".into(),
                        format!("invalid regex {re:?}: {e}"),
                    );
                    PathMatcher::Any
                }
            },
        };

        use v1::header_match::Kind as H;
        let headers_key: Vec<u8> = m
            .headers
            .iter()
            .flat_map(prost::Message::encode_length_delimited_to_vec)
            .collect();
        let known_headers = shared.headers.get(&headers_key).cloned();
        let mut headers = Vec::new();
        let to_compile = if known_headers.is_some() {
            &[][..]
        } else {
            &m.headers[..]
        };
        for (i, h) in to_compile.iter().enumerate() {
            let Ok(hname) = HeaderName::from_bytes(h.name.as_bytes()) else {
                reject(
                    format!("match.headers[{i}].name"),
                    format!("invalid header name {:?}", h.name),
                );
                continue;
            };
            let kind = match &h.kind {
                Some(H::Exact(v)) => match HeaderValue::from_str(v) {
                    Ok(v) => HeaderKind::Exact(v),
                    Err(_) => {
                        reject(
                            format!("match.headers[{i}].exact"),
                            format!("invalid header value {v:?}"),
                        );
                        continue;
                    }
                },
                Some(H::Regex(re)) => match full_regex(re) {
                    Ok(re) => HeaderKind::Regex(re),
                    Err(e) => {
                        reject(
                            format!("match.headers[{i}].regex"),
                            format!("invalid regex {re:?}: {e}"),
                        );
                        continue;
                    }
                },
                Some(H::Present(true)) => HeaderKind::Present,
                Some(H::Present(false)) | None => {
                    reject(
                        format!("match.headers[{i}]"),
                        "needs one of exact, regex or present: true".into(),
                    );
                    continue;
                }
            };
            headers.push(HeaderMatcher {
                name: hname,
                kind,
                invert: h.invert,
            });
        }

        use v1::query_match::Kind as Q;
        let mut query = Vec::new();
        for (i, q) in m.query.iter().enumerate() {
            if q.name.is_empty() {
                reject(format!("match.query[{i}].name"), "must not be empty".into());
                continue;
            }
            let kind = match &q.kind {
                Some(Q::Exact(v)) => QueryKind::Exact(v.as_str().into()),
                Some(Q::Regex(re)) => match full_regex(re) {
                    Ok(re) => QueryKind::Regex(re),
                    Err(e) => {
                        reject(
                            format!("match.query[{i}].regex"),
                            format!("invalid regex {re:?}: {e}"),
                        );
                        continue;
                    }
                },
                Some(Q::Present(true)) => QueryKind::Present,
                Some(Q::Present(false)) | None => {
                    reject(
                        format!("match.query[{i}]"),
                        "needs one of exact, regex or present: true".into(),
                    );
                    continue;
                }
            };
            query.push(QueryMatcher {
                name: q.name.as_str().into(),
                kind,
            });
        }

        let mut methods = Vec::new();
        for (i, meth) in m.methods.iter().enumerate() {
            match Method::from_bytes(meth.to_ascii_uppercase().as_bytes()) {
                Ok(meth) => methods.push(meth),
                Err(_) => reject(
                    format!("match.methods[{i}]"),
                    format!("invalid method {meth:?}"),
                ),
            }
        }

        let retry = match r.retry.as_ref().map(crate::retry::RetryPolicy::from_proto) {
            None => None,
            Some(Ok(p)) => Some(Arc::new(p)),
            Some(Err((field, reason))) => {
                reject(format!("retry.{field}"), reason);
                None
            }
        };
        let rate_limit = match metrics.rate_limiter("route", &label, r.rate_limit.as_ref()) {
            Ok(l) => l,
            Err((field, reason)) => {
                reject(field.into(), reason);
                None
            }
        };

        let matched_prefix = match r.r#match.as_ref().and_then(|m| m.path.as_ref()) {
            Some(v1::PathMatch {
                kind: Some(P::Prefix(p)),
            }) => Some(p.as_str()),
            _ => None,
        };
        let filters = match &r.filters {
            None => None,
            Some(f) => {
                let cx = crate::filters::BuildContext {
                    route: &name,
                    matched_prefix,
                    has_destinations: !r.destinations.is_empty(),
                    clusters,
                    metrics,
                    direction,
                };
                match crate::filters::RouteFilters::build(f, &cx) {
                    Ok(f) => f.map(Arc::new),
                    Err(errs) => {
                        for (field, reason) in errs.into_vec() {
                            reject(format!("filters.{field}"), reason);
                        }
                        None
                    }
                }
            }
        };
        // A redirect or direct response answers every request: no destination needed (decided
        // on the proto, so an invalid one is not also reported as a missing destination).
        let terminal = r
            .filters
            .as_ref()
            .is_some_and(|f| f.redirect.is_some() || f.direct_response.is_some());

        let mut dests = Vec::new();
        if r.destinations.is_empty() && !terminal {
            reject(
                "destinations".into(),
                "must name at least one cluster (only a redirect or direct response needs none)"
                    .into(),
            );
        }
        for (i, d) in r.destinations.iter().enumerate() {
            match clusters.get(d.cluster.as_str()) {
                Some(c) => dests.push((
                    Destination {
                        cluster: c.clone(),
                        // The handles the previous snapshot resolved, if any: a route that stays
                        // keeps its series (the previous snapshot is live while this one is
                        // built; the series go with the last handle).
                        metrics: metrics
                            .live_request_metrics(direction, &name, &c.name)
                            .map_or_else(OnceLock::new, OnceLock::from),
                        family: Arc::clone(family),
                        direction,
                        route: name.clone(),
                    },
                    d.weight,
                )),
                None => reject(
                    format!("destinations[{i}].cluster"),
                    format!("unknown cluster {:?}", d.cluster),
                ),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let hosts = known_hosts.unwrap_or_else(|| {
            let hosts: Arc<[HostPattern]> = hosts.into();
            shared.hosts.insert(host_list, Arc::clone(&hosts));
            hosts
        });
        let headers = known_headers.unwrap_or_else(|| {
            let headers: Arc<[HeaderMatcher]> = headers.into();
            shared.headers.insert(headers_key, Arc::clone(&headers));
            headers
        });
        Ok(Self {
            name,
            hosts,
            path,
            headers,
            methods: methods.into(),
            query: query.into(),
            destinations: WeightedPick::new(dests),
            mirrors: r.filters.as_ref().is_some_and(|f| f.mirror.is_some()),
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            retry,
            rate_limit,
            filters,
        })
    }

    fn matches_host(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|p| p.matches(host))
    }

    fn matches_rest(&self, req: &RequestInfo<'_>, query: &mut QueryParams<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Exact(p) => **p == *req.path,
            PathMatcher::Prefix(p) => crate::http::normalize::prefix_matches(p, req.path),
            PathMatcher::Regex(re) => re.is_match(req.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(req.method))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && (self.query.is_empty() || {
                let params = query.get();
                self.query.iter().all(|q| q.matches(params))
            })
    }
}

impl QueryMatcher {
    fn matches(&self, params: &[(Cow<'_, str>, Cow<'_, str>)]) -> bool {
        let Some((_, value)) = params.iter().find(|(n, _)| **n == *self.name) else {
            return false;
        };
        match &self.kind {
            QueryKind::Present => true,
            QueryKind::Exact(v) => **v == **value,
            QueryKind::Regex(re) => re.is_match(value),
        }
    }
}

/// A request's query parameters, parsed on first use (see the module docs).
#[derive(Debug)]
pub struct QueryParams<'a> {
    raw: Option<&'a str>,
    parsed: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
}

impl<'a> QueryParams<'a> {
    /// The parameters of `raw` (the part after `?`), not parsed yet.
    pub fn new(raw: Option<&'a str>) -> Self {
        Self { raw, parsed: None }
    }

    /// `(name, value)` pairs in request order, decoded; parsed on the first call.
    pub fn get(&mut self) -> &[(Cow<'a, str>, Cow<'a, str>)] {
        let raw = self.raw;
        self.parsed.get_or_insert_with(|| {
            raw.map(|q| {
                q.split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (n, v) = p.split_once('=').unwrap_or((p, ""));
                        (form_decode(n), form_decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default()
        })
    }
}

/// Decodes one name or value of `application/x-www-form-urlencoded`: `+` is a space, `%XX` a
/// byte (a malformed escape stays as is), the bytes then read as UTF-8 (invalid sequences
/// replaced). Borrows when there is nothing to decode.
fn form_decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        // Two hex digits: h, l < 16, the byte fits.
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

impl HeaderMatcher {
    fn matches(&self, headers: &HeaderMap) -> bool {
        let hit = match &self.kind {
            HeaderKind::Present => headers.contains_key(&self.name),
            HeaderKind::Exact(v) => headers.get_all(&self.name).iter().any(|x| x == v),
            HeaderKind::Regex(re) => headers
                .get_all(&self.name)
                .iter()
                .any(|x| x.to_str().is_ok_and(|s| re.is_match(s))),
        };
        hit != self.invert
    }
}

/// Lower-cases a host and strips its port (`Api.Example.com:8080` -> `api.example.com`,
/// `[::1]:80` -> `[::1]`). Borrows when nothing changes, the common case.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets, drop what follows "]".
        let host = match rest.find(']') {
            Some(end) => &raw[..end + 2],
            None => raw,
        };
        return if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
    }
    // One pass over the bytes finds the last ':' and the first upper-case letter (this runs
    // on every request; `str::rfind` alone went through the generic pattern machinery). ':' is
    // ASCII, so the cut is at a char boundary.
    let (mut colon, mut upper) = (None, None);
    for (i, &b) in raw.as_bytes().iter().enumerate() {
        if b == b':' {
            colon = Some(i);
        } else if upper.is_none() && b.is_ascii_uppercase() {
            upper = Some(i);
        }
    }
    let host = &raw[..colon.unwrap_or(raw.len())];
    if upper.is_some_and(|u| u < host.len()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_cluster;

    fn clusters(names: &[&str]) -> HashMap<Arc<str>, Arc<Cluster>> {
        names
            .iter()
            .map(|n| (Arc::from(*n), test_cluster(n)))
            .collect()
    }

    fn route(name: &str, hosts: &[&str], cluster: &str) -> v1::Route {
        v1::Route {
            name: name.into(),
            r#match: Some(v1::RouteMatch {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                ..Default::default()
            }),
            destinations: vec![v1::WeightedCluster {
                cluster: cluster.into(),
                weight: 100,
            }],
            timeout_ms: 0,
            ..Default::default()
        }
    }

    #[test]
    fn a_rebuild_for_clusters_builds_only_the_routes_to_changed_clusters() {
        let m = Metrics::new().unwrap();
        let proto = v1::RouteTable {
            name: "outbound".into(),
            routes: vec![
                route("to-a", &["a"], "a"),
                route("to-b", &["b"], "b"),
                route("to-a-too", &["a2"], "a"),
            ],
        };
        let before = clusters(&["a", "b"]);
        let first = RouteTable::build(&proto, &before, &m, "outbound").unwrap();

        // No cluster changed: the whole table is shared and no proto is asked for.
        let same = RouteTable::rebuild_for_clusters(&first, &before, None, &m, "outbound", |at| {
            panic!("no route needs its proto, asked for {at:?}")
        })
        .unwrap();
        assert_eq!(same.shares_index_and_list(&first), (true, true));

        // `a` is rebuilt: the two routes to it are built again from their protos only.
        let mut after = before.clone();
        after.insert(Arc::from("a"), test_cluster("a"));
        // Found by looking the clusters up, or from the list of replaced clusters.
        let replaced = [Arc::clone(&before["a"])];
        let mut asked = Vec::new();
        RouteTable::rebuild_for_clusters(&first, &after, None, &m, "outbound", |at| {
            asked = at.to_vec();
            Ok(at.iter().map(|&i| proto.routes[i].clone()).collect())
        })
        .unwrap();
        assert_eq!(asked, [0, 2]);
        let next = RouteTable::rebuild_for_clusters(
            &first,
            &after,
            Some(&replaced),
            &m,
            "outbound",
            |at| {
                asked = at.to_vec();
                Ok(at.iter().map(|&i| proto.routes[i].clone()).collect())
            },
        )
        .unwrap();
        assert_eq!(asked, [0, 2]);
        assert!(!next.shares_route(&first, 0));
        assert!(next.shares_route(&first, 1));
        assert!(!next.shares_route(&first, 2));
        assert_eq!(next.shares_index_and_list(&first), (true, false));
        let headers = HeaderMap::new();
        for (host, cluster) in [("a", "a"), ("b", "b"), ("a2", "a")] {
            let req = RequestInfo {
                host,
                path: "/",
                query: None,
                method: &Method::GET,
                headers: &headers,
            };
            let picked = next.find(&req).unwrap().destinations.pick().unwrap();
            assert!(Arc::ptr_eq(&picked.cluster, &after[cluster]), "{host}");
        }

        // A proto that no longer builds (or is missing) is a rejection, never a partial table.
        let err = RouteTable::rebuild_for_clusters(&first, &after, None, &m, "outbound", |_| {
            Ok(vec![route("to-a", &["a"], "gone")])
        })
        .unwrap_err();
        assert!(!err.is_empty());
        let missing =
            RouteTable::rebuild_for_clusters(&first, &after, None, &m, "outbound", |at| {
                Ok(vec![proto.routes[at[0]].clone()])
            })
            .unwrap_err();
        assert!(
            missing[0].reason.contains("1 of the 2 routes"),
            "{missing:?}"
        );
    }

    #[test]
    fn the_host_index_lists_what_comparing_every_route_with_every_host_lists() {
        // Exact hosts, repeated hosts, wildcards overlapping exact hosts, routes without hosts,
        // interleaved: each host's list must be exactly the routes whose hosts match it, in
        // declared order, each once (the definition the index replaced).
        let specs: Vec<Vec<&str>> = vec![
            vec!["api.demo", "api"],
            vec![],
            vec!["*.demo", "web.demo"],
            vec!["web.demo", "web.demo"],
            vec!["*.x.demo"],
            vec!["a.x.demo", "*.demo"],
            vec!["api"],
            vec![],
            vec!["other"],
        ];
        let routes = specs
            .iter()
            .enumerate()
            .map(|(i, hosts)| route(&format!("r{i}"), hosts, "a"))
            .collect();
        let t = table(routes);
        assert!(!t.index.by_host.is_empty());
        for (host, list) in &t.index.by_host {
            let want: Vec<u32> = (0..t.routes.len() as u32)
                .filter(|&i| t.routes[i as usize].matches_host(host))
                .collect();
            assert_eq!(&**list, &want[..], "host {host}");
        }
        let fallback: Vec<u32> = vec![1, 2, 4, 5, 7];
        assert_eq!(&*t.index.fallback, &fallback[..]);
    }

    fn with_path(mut r: v1::Route, kind: v1::path_match::Kind) -> v1::Route {
        r.r#match.get_or_insert_with(Default::default).path =
            Some(v1::PathMatch { kind: Some(kind) });
        r
    }

    fn table(routes: Vec<v1::Route>) -> RouteTable {
        let t = v1::RouteTable {
            name: "outbound".into(),
            routes,
        };
        RouteTable::build(
            &t,
            &clusters(&["a", "b", "c"]),
            &Metrics::new().unwrap(),
            "outbound",
        )
        .unwrap()
    }

    fn find<'t>(
        t: &'t RouteTable,
        host: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'t str> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let host = normalize_host(host);
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let req = RequestInfo {
            host: &host,
            path,
            query,
            method: &method,
            headers: &h,
        };
        t.find(&req).map(|r| &*r.name)
    }

    fn with_header(mut r: v1::Route, name: &str, value: &str) -> v1::Route {
        r.r#match
            .get_or_insert_with(Default::default)
            .headers
            .push(v1::HeaderMatch {
                name: name.into(),
                kind: Some(v1::header_match::Kind::Exact(value.into())),
                invert: false,
            });
        r
    }

    /// A service's routes name the same hosts, canary routes the same header: one compiled copy
    /// each per table build (the index keys are those same names), and routing is unchanged.
    #[test]
    fn equal_hosts_and_header_conditions_are_compiled_once_per_table() {
        let t = table(vec![
            with_header(route("a-canary", &["a", "a.ns"], "b"), "x-canary", "true"),
            route("a-default", &["a", "a.ns"], "a"),
            with_header(route("c-canary", &["c", "c.ns"], "b"), "x-canary", "true"),
            with_header(route("c-beta", &["C", "c.ns "], "b"), "x-canary", "beta"),
            route("c-default", &["c", "c.ns"], "c"),
        ]);
        let r = |i: usize| &t.routes[i];
        assert!(Arc::ptr_eq(&r(0).hosts, &r(1).hosts));
        assert!(Arc::ptr_eq(&r(2).hosts, &r(4).hosts));
        assert!(!Arc::ptr_eq(&r(0).hosts, &r(2).hosts));
        // A list written differently compiles on its own, to the same names.
        assert!(!Arc::ptr_eq(&r(3).hosts, &r(2).hosts));
        let exact = |i: usize, j: usize| match &r(i).hosts[j] {
            HostPattern::Exact(h) => Arc::clone(h),
            HostPattern::Suffix(_) => panic!("exact"),
        };
        assert!(Arc::ptr_eq(&exact(3, 0), &exact(2, 0)));
        assert!(Arc::ptr_eq(&exact(3, 1), &exact(2, 1)));
        let (key, _) = t.index.by_host.get_key_value("c.ns").unwrap();
        assert!(Arc::ptr_eq(key, &exact(2, 1)));
        assert!(Arc::ptr_eq(&r(0).headers, &r(2).headers));
        assert!(!Arc::ptr_eq(&r(2).headers, &r(3).headers));
        assert!(Arc::ptr_eq(&r(1).headers, &r(4).headers));
        assert!(r(1).headers.is_empty());

        assert_eq!(
            find(&t, "a", "GET", "/", &[("x-canary", "true")]),
            Some("a-canary")
        );
        assert_eq!(find(&t, "a.ns", "GET", "/", &[]), Some("a-default"));
        assert_eq!(
            find(&t, "c", "GET", "/", &[("x-canary", "true")]),
            Some("c-canary")
        );
        assert_eq!(
            find(&t, "c.ns", "GET", "/", &[("x-canary", "beta")]),
            Some("c-beta")
        );
        assert_eq!(
            find(&t, "c", "GET", "/", &[("x-canary", "no")]),
            Some("c-default")
        );
        assert_eq!(find(&t, "b", "GET", "/", &[]), None);
        assert!(t.names_host("c.ns") && t.names_host("a") && !t.names_host("b"));
    }

    /// A list rejected for one route is rejected for the next one naming it too (nothing
    /// invalid is shared).
    #[test]
    fn an_invalid_shared_list_is_rejected_for_every_route() {
        let t = v1::RouteTable {
            name: "outbound".into(),
            routes: vec![
                route("one", &["bad host"], "a"),
                route("two", &["bad host"], "a"),
            ],
        };
        let errs = RouteTable::build(&t, &clusters(&["a"]), &Metrics::new().unwrap(), "outbound")
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].contains("\"one\"") && text[1].contains("\"two\""),
            "{text:?}"
        );
    }

    #[test]
    fn hosts_exact_wildcard_and_any() {
        let t = table(vec![
            route("exact", &["api.example.com"], "a"),
            route("wild", &["*.example.com"], "b"),
            route("any", &[], "c"),
        ]);
        assert_eq!(find(&t, "api.example.com", "GET", "/", &[]), Some("exact"));
        assert_eq!(
            find(&t, "API.Example.COM:8080", "GET", "/", &[]),
            Some("exact")
        );
        assert_eq!(find(&t, "x.example.com", "GET", "/", &[]), Some("wild"));
        assert_eq!(find(&t, "a.b.example.com", "GET", "/", &[]), Some("wild"));
        assert_eq!(find(&t, "example.com", "GET", "/", &[]), Some("any"));
        assert_eq!(find(&t, "other", "GET", "/", &[]), Some("any"));
    }

    #[test]
    fn declared_order_wins_across_index() {
        // A host-less route declared first beats a later exact-host route.
        let t = table(vec![
            with_path(
                route("first-any", &[], "a"),
                v1::path_match::Kind::Prefix("/x".into()),
            ),
            route("exact", &["svc"], "b"),
        ]);
        assert_eq!(find(&t, "svc", "GET", "/x/1", &[]), Some("first-any"));
        assert_eq!(find(&t, "svc", "GET", "/y", &[]), Some("exact"));
        assert_eq!(find(&t, "nope", "GET", "/y", &[]), None);
    }

    #[test]
    fn paths_exact_prefix_regex() {
        use v1::path_match::Kind;
        let t = table(vec![
            with_path(route("exact", &["h"], "a"), Kind::Exact("/a".into())),
            with_path(
                route("regex", &["h"], "b"),
                Kind::Regex("/users/[0-9]+".into()),
            ),
            with_path(route("prefix", &["h"], "c"), Kind::Prefix("/api".into())),
        ]);
        assert_eq!(find(&t, "h", "GET", "/a", &[]), Some("exact"));
        assert_eq!(find(&t, "h", "GET", "/a/", &[]), None);
        assert_eq!(find(&t, "h", "GET", "/users/42", &[]), Some("regex"));
        // Regexes match the whole path.
        assert_eq!(find(&t, "h", "GET", "/users/42/x", &[]), None);
        assert_eq!(find(&t, "h", "GET", "/api/v1", &[]), Some("prefix"));
        // Prefixes match whole segments.
        assert_eq!(find(&t, "h", "GET", "/apix", &[]), None);
        assert_eq!(find(&t, "h", "GET", "/api", &[]), Some("prefix"));
    }

    #[test]
    fn headers_and_methods() {
        use v1::header_match::Kind;
        let mut canary = route("canary", &["h"], "a");
        let m = canary.r#match.as_mut().unwrap();
        m.headers = vec![
            v1::HeaderMatch {
                name: "x-canary".into(),
                kind: Some(Kind::Exact("true".into())),
                invert: false,
            },
            v1::HeaderMatch {
                name: "x-user".into(),
                kind: Some(Kind::Regex("u[0-9]".into())),
                invert: false,
            },
            v1::HeaderMatch {
                name: "x-block".into(),
                kind: Some(Kind::Present(true)),
                invert: true,
            },
        ];
        m.methods = vec!["get".into(), "POST".into()];
        let t = table(vec![canary, route("default", &["h"], "b")]);
        let ok = [("x-canary", "true"), ("x-user", "u1")];
        assert_eq!(find(&t, "h", "GET", "/", &ok), Some("canary"));
        assert_eq!(find(&t, "h", "POST", "/", &ok), Some("canary"));
        assert_eq!(find(&t, "h", "DELETE", "/", &ok), Some("default"));
        assert_eq!(
            find(
                &t,
                "h",
                "GET",
                "/",
                &[("x-canary", "false"), ("x-user", "u1")]
            ),
            Some("default")
        );
        assert_eq!(
            find(
                &t,
                "h",
                "GET",
                "/",
                &[("x-canary", "true"), ("x-user", "u12")]
            ),
            Some("default")
        );
        assert_eq!(
            find(
                &t,
                "h",
                "GET",
                "/",
                &[("x-canary", "true"), ("x-user", "u1"), ("x-block", "1")]
            ),
            Some("default")
        );
        assert_eq!(find(&t, "h", "GET", "/", &[]), Some("default"));
    }

    #[test]
    fn build_errors_name_route_and_field() {
        use v1::path_match::Kind;
        let t = v1::RouteTable {
            name: "outbound".into(),
            routes: vec![
                with_path(route("bad-re", &[], "a"), Kind::Regex("(".into())),
                route("bad-dest", &[], "paymnts"),
                route("bad-host", &["*example.com"], "a"),
            ],
        };
        let errs = RouteTable::build(&t, &clusters(&["a"]), &Metrics::new().unwrap(), "outbound")
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with(
                r#"route table "outbound" route "bad-re": match.path.regex: invalid regex"#
            ),
            "{text:?}"
        );
        assert_eq!(
            text[1],
            r#"route table "outbound" route "bad-dest": destinations[0].cluster: unknown cluster "paymnts""#
        );
        assert!(text[2].contains("match.hosts[0]"), "{text:?}");
    }

    fn with_query(mut r: v1::Route, name: &str, kind: v1::query_match::Kind) -> v1::Route {
        r.r#match
            .get_or_insert_with(Default::default)
            .query
            .push(v1::QueryMatch {
                name: name.into(),
                kind: Some(kind),
            });
        r
    }

    #[test]
    fn query_exact_regex_present() {
        use v1::query_match::Kind;
        let t = table(vec![
            with_query(
                route("beta", &["h"], "a"),
                "version",
                Kind::Exact("beta".into()),
            ),
            with_query(
                route("users", &["h"], "a"),
                "user",
                Kind::Regex("u[0-9]+".into()),
            ),
            with_query(route("flag", &["h"], "a"), "flag", Kind::Present(true)),
            with_query(
                with_query(route("both", &["h"], "a"), "tag", Kind::Exact("a b".into())),
                "lang",
                Kind::Present(true),
            ),
            route("default", &["h"], "b"),
        ]);
        let cases = [
            ("/?version=beta", "beta"),
            ("/?x=1&version=beta&y", "beta"),
            ("/?version=be%74a", "beta"),
            ("/?version=Beta", "default"),
            ("/?version=alpha&version=beta", "default"),
            ("/?user=u42", "users"),
            ("/?user=u42x", "default"),
            ("/?flag", "flag"),
            ("/?flag=", "flag"),
            ("/?flags", "default"),
            ("/?tag=a+b&lang", "both"),
            ("/?tag=a%20b&lang=en", "both"),
            ("/?tag=a%2Bb&lang", "default"),
            ("/?tag=a+b", "default"),
            ("/", "default"),
            ("/?", "default"),
        ];
        for (path, want) in cases {
            assert_eq!(find(&t, "h", "GET", path, &[]), Some(want), "{path}");
        }
    }

    #[test]
    fn form_decoding() {
        assert!(matches!(form_decode("plain"), Cow::Borrowed("plain")));
        assert_eq!(form_decode("a+b%20c"), "a b c");
        assert_eq!(form_decode("%zz%4"), "%zz%4");
        assert_eq!(form_decode("%C3%A9"), "\u{e9}");
        assert_eq!(form_decode("%FF"), "\u{fffd}");
        let mut q = QueryParams::new(Some("a=1&&b&c=x=y"));
        let got: Vec<(String, String)> = q
            .get()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), "x=y".into())
            ]
        );
    }

    #[test]
    fn terminal_routes_need_no_destination() {
        let mut direct = route("direct", &["h"], "a");
        direct.destinations.clear();
        direct.filters = Some(v1::RouteFilters {
            direct_response: Some(v1::DirectResponse {
                status: 200,
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut empty = route("empty", &["h"], "a");
        empty.destinations.clear();
        let mut bad = route("bad-filter", &["h"], "a");
        bad.filters = Some(v1::RouteFilters {
            rewrite_path_prefix: "/x".into(),
            ..Default::default()
        });
        let t = v1::RouteTable {
            name: "outbound".into(),
            routes: vec![direct.clone(), empty, bad],
        };
        let errs = RouteTable::build(&t, &clusters(&["a"]), &Metrics::new().unwrap(), "outbound")
            .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 2, "{text:?}");
        assert!(
            text[0].contains(r#"route "empty": destinations: must name"#),
            "{text:?}"
        );
        assert!(
            text[1].contains(r#"route "bad-filter": filters.rewrite.path_prefix"#),
            "{text:?}"
        );
        let t = table(vec![direct]);
        let r = t.routes.first().unwrap();
        assert!(r.filters.as_ref().is_some_and(|f| f.is_terminal()));
        assert!(r.destinations.pick().is_none());
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("a.b:80"), "a.b");
        assert_eq!(normalize_host("A.B"), "a.b");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert!(matches!(normalize_host("svc"), Cow::Borrowed(_)));
        // Upper case only counts before the port; the last ':' cuts.
        assert_eq!(normalize_host("Api.Example.com:8080"), "api.example.com");
        assert!(matches!(normalize_host("svc:X"), Cow::Borrowed("svc")));
        assert_eq!(normalize_host("a:b:80"), "a:b");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
